"""The sharded train step: 8 devices == 1 device for one global batch; frozen leaves and the
FrozenBN buffers never move; dropout keys per step; a few steps fit a batch."""
import jax
import numpy as np
import pytest

import train_helpers
from solq_jax import data
from solq_jax import sharding
from solq_jax.training import optimizer as optimizer_lib
from solq_jax.training import state as state_lib

# The fixtures compile the micro model's init and train step on 8 and on 1 device.
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope='module')
def batch():
  return data.train_device_batch(next(train_helpers.trainer(8).data.iterator()))


@pytest.fixture(scope='module')
def one_step(batch):
  """(initial host variables, {devices: (state after one step, metrics)})."""
  out = {}
  for n in (8, 1):
    tr = train_helpers.trainer(n)
    state = tr.initial_state()
    new_state, metrics = tr.train_step(state, sharding.shard_batch(batch, tr.mesh))
    out[n] = jax.device_get((new_state, metrics))
    assert new_state.params['query_embed']['embedding'].sharding.is_fully_replicated
  return train_helpers.trainer(8)._variables, out  # pylint: disable=protected-access


def test_batch_is_split_over_the_mesh(batch):
  tr = train_helpers.trainer(8)
  sharded = sharding.shard_batch(batch, tr.mesh)
  images = sharded['images']
  assert images.shape == batch['images'].shape
  assert len(images.addressable_shards) == 8
  assert {s.data.shape[0] for s in images.addressable_shards} == {batch['images'].shape[0] // 8}
  with pytest.raises(ValueError, match='multiple'):
    sharding.check_batch_size(12, tr.mesh)


def test_eight_devices_equal_one(one_step):
  _, out = one_step
  (s8, m8), (s1, m1) = out[8], out[1]
  assert set(m8) == set(m1) and 'loss_vector_0' in m8 and 'grad_norm' in m8
  for k in m8:
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, err_msg=k)
  assert int(s8.step) == int(s1.step) == 1
  worst = max(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)))
  assert worst <= 1e-5, worst
  for a, b in zip(jax.tree.leaves(s8.opt_state), jax.tree.leaves(s1.opt_state)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)


def test_frozen_and_buffers_unchanged_trained_moved(one_step):
  variables, out = one_step
  state, metrics = out[8]
  labels = optimizer_lib.param_labels(variables['params'])
  moved = {g: 0 for g in optimizer_lib.GROUPS}
  for before, after, label in zip(jax.tree.leaves(variables['params']),
                                  jax.tree.leaves(state.params), jax.tree.leaves(labels)):
    if label == optimizer_lib.FROZEN:
      np.testing.assert_array_equal(before, after)
    else:
      moved[label] += int(not np.array_equal(before, after))
  assert all(moved[g] > 0 for g in (optimizer_lib.DEFAULT, optimizer_lib.BACKBONE,
                                    optimizer_lib.LINEAR_PROJ)), moved
  for before, after in zip(jax.tree.leaves(variables['buffers']), jax.tree.leaves(state.buffers)):
    np.testing.assert_array_equal(before, after)
  assert np.isfinite(metrics['total']) and metrics['grad_norm'] > 0
  assert metrics['lr'] == pytest.approx(train_helpers.micro_config().train.lr)


def test_dropout_key_per_step():
  s = state_lib.TrainState(step=np.int32(0), params={}, buffers={}, opt_state=(),
                           rng=jax.random.PRNGKey(7))
  k0 = state_lib.dropout_key(s)
  k1 = state_lib.dropout_key(s.replace(step=np.int32(1)))
  assert not np.array_equal(k0, k1)
  np.testing.assert_array_equal(k0, state_lib.dropout_key(s))


def test_a_few_steps_fit_one_batch(batch, one_step):
  del one_step  # the 1-device step is compiled there
  tr = train_helpers.trainer(1)
  state = tr.initial_state()
  sharded = sharding.shard_batch(batch, tr.mesh)
  totals = []
  for _ in range(6):
    state, metrics = tr.train_step(state, sharded)
    totals.append(float(metrics['total']))
  # clipped at global norm 0.1, the loss falls a little at every step
  assert all(b < a for a, b in zip(totals, totals[1:])) and totals[-1] < 0.98 * totals[0], totals
