"""Gradient accumulation (`train.grad_accum_steps`): k micro-batches equal one batch of k times
their size, on one and on 8 devices; bad values are clear errors; a resumed run with
accumulation (and a weight EMA) continues exactly."""

import jax
import numpy as np
import pytest

import train_helpers
from solq_jax import data
from solq_jax import sharding
from solq_jax.training import loop

# The fixtures compile the micro model's train step three times (k = 1 and 2 on 8 devices, k = 2
# on one device): minutes on a loaded 2-core machine.
pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope='module')
def batch():
  return data.train_device_batch(next(train_helpers.accumulation_trainer(8, 1).data.iterator()))


def one_step(num_devices, grad_accum_steps, batch):
  tr = train_helpers.accumulation_trainer(num_devices, grad_accum_steps)
  state = tr.initial_state()
  new_state, metrics = tr.train_step(state, sharding.shard_batch(batch, tr.mesh))
  return jax.device_get((new_state, metrics))


@pytest.fixture(scope='module')
def whole_batch_step(batch):
  return one_step(8, 1, batch)


@pytest.mark.parametrize('num_devices', [8, 1])
def test_two_micro_batches_equal_one_batch(whole_batch_step, batch, num_devices):
  """2 micro-batches of 8 images == one step of 16 (float32, dropout 0): every loss term of
  every decoder layer, the gradient norm, the new parameters and the optimiser state."""
  ref_state, ref_metrics = whole_batch_step
  state, metrics = one_step(num_devices, 2, batch)
  assert set(metrics) == set(ref_metrics) and 'loss_vector_0' in metrics
  for key in ref_metrics:
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
  assert int(state.step) == 1
  worst = max(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)))
  assert worst <= 1e-5, worst
  for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(ref_state.opt_state)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)


def test_bad_values_name_the_field():
  config = train_helpers.accumulation_config(0)
  with pytest.raises(ValueError, match='grad_accum_steps'):
    loop.Trainer(config, mesh=sharding.make_mesh(8))
  config = train_helpers.accumulation_config(4)   # micro-batches of 4 images on 8 devices
  with pytest.raises(ValueError, match=r'batch_size \(16\).*grad_accum_steps'):
    loop.Trainer(config, mesh=sharding.make_mesh(8))
  config = train_helpers.accumulation_config(2)
  config.train.ema_decay = 1.0
  with pytest.raises(ValueError, match='ema_decay'):
    loop.Trainer(config, mesh=sharding.make_mesh(8))


def test_resume_with_accumulation_and_ema_is_exact(tmp_path):
  """A run stopped after step 3 and resumed from its checkpoint ends exactly as an uninterrupted
  run: parameters, optimiser state, weight EMA and the loss of every step. The uninterrupted
  run's final evaluation receives the EMA, not the parameters."""
  tr = train_helpers.accumulation_trainer(8, 2)
  evaluated = []

  def evaluation(variables, out_dir):
    del out_dir
    evaluated.append(jax.device_get(variables))

  ref = tr.fit(tmp_path / 'uninterrupted', evaluation=evaluation)
  first = tr.fit(tmp_path / 'resumed', stop_at_step=3)
  assert first['step'] == 3
  second = tr.fit(tmp_path / 'resumed')
  assert ref['step'] == second['step'] == 6 and len(second['history']) == 3
  ref_state, state = jax.device_get((ref['state'], second['state']))
  for name in ('params', 'opt_state', 'ema_params'):
    for a, b in zip(jax.tree.leaves(getattr(state, name)),
                    jax.tree.leaves(getattr(ref_state, name))):
      np.testing.assert_array_equal(a, b, err_msg=name)
  assert train_helpers.losses_by_step(tmp_path / 'resumed') == train_helpers.losses_by_step(tmp_path / 'uninterrupted')
  assert sorted(train_helpers.losses_by_step(tmp_path / 'resumed')) == [1, 2, 3, 4, 5, 6]

  assert len(evaluated) == 1
  for a, b in zip(jax.tree.leaves(evaluated[0]['params']), jax.tree.leaves(ref_state.ema_params)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ref_state.ema_params),
                                                      jax.tree.leaves(ref_state.params)))
