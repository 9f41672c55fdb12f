"""Matching and losses on the 8 simulated CPU devices: under a context mesh (as the train step
traces) the scipy calls run per shard through shard_map; equality with the unsharded results,
and sharded loss/gradients equal to single-device ones."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from solq_jax import losses
from solq_jax import matching
from solq_jax import sharding
from test_losses import linear_model_outputs, make_batch
from test_matching import random_problem

NUM_DEVICES = 8
BATCH = 16


@pytest.fixture(scope='module')
def mesh():
  if jax.device_count() < NUM_DEVICES:
    pytest.skip(f'needs {NUM_DEVICES} devices (tests/conftest.py sets them)')
  return sharding.make_mesh(NUM_DEVICES)


@pytest.fixture(scope='module')
def problem():
  rng = np.random.default_rng(11)
  logits, boxes, labels, tgt, valid = random_problem(rng, BATCH, 12, 5, 6)
  layered = (np.stack([logits, logits[::-1]]), np.stack([boxes, boxes[::-1]]))  # [L=2, B, ...]
  return layered + (labels, tgt, valid)


@pytest.fixture
def host_calls(monkeypatch):
  """Records the cost shape of every host (scipy) call."""
  calls = []
  original = matching.assign_np

  def recording(costs, valid):
    calls.append(np.shape(costs))
    return original(costs, valid)

  monkeypatch.setattr(matching, 'assign_np', recording)
  return calls


def _put(mesh, arrays, specs):
  return [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(arrays, specs)]


LAYERED, BATCH_SPEC = P(None, sharding.AXIS), P(sharding.AXIS)
IN_SPECS = (LAYERED, LAYERED, BATCH_SPEC, BATCH_SPEC, BATCH_SPEC)


@pytest.mark.timeout(120)
def test_sharded_matching_equals_unsharded_and_runs_per_shard(mesh, problem, host_calls):
  reference = [np.asarray(x) for x in matching.hungarian_match(*problem)]
  host_calls.clear()
  out_sharding = NamedSharding(mesh, P(None, sharding.AXIS))
  fn = sharding.under_mesh(mesh, jax.jit(matching.hungarian_match,
                                         out_shardings=(out_sharding,) * 3))  # must not hang
  result = fn(*_put(mesh, problem, IN_SPECS))
  for got, want in zip(result, reference):
    assert got.sharding.spec == P(None, sharding.AXIS)
    np.testing.assert_array_equal(np.asarray(got), want)
  # One host call per device, each on its own images only (2 layers x 2 images).
  assert sorted(host_calls) == [(2, BATCH // NUM_DEVICES, 12, 6)] * NUM_DEVICES


@pytest.mark.timeout(120)
def test_plain_jit_gathers_the_batch_to_one_host_call(mesh, problem, host_calls):
  """Why the matcher runs per shard: without a context mesh (so without shard_map) the
  batch-sharded callback is gathered to one device and solved in a single host call (serial
  scipy; with out_shardings it can dead-lock)."""
  fn = jax.jit(matching.hungarian_match)
  jax.block_until_ready(fn(*_put(mesh, problem, IN_SPECS)))
  assert host_calls == [(2, BATCH, 12, 6)]


@pytest.mark.timeout(240)
def test_sharded_loss_and_grads_equal_single_device(mesh, tiny_config):
  outputs, targets = make_batch(12, b=BATCH, q=10, c=5, g=4, k=6, layers=2)
  targets['valid'][3:9] = False          # some devices hold no target at all
  base = {k: v for k, v in outputs.items() if k != 'aux_outputs'}
  rng = np.random.default_rng(13)
  feats = rng.normal(size=(2, BATCH, 10, 3)).astype(np.float32)
  w = rng.normal(0, 0.1, (3, 5 + 4 + 6)).astype(np.float32)

  criterion = losses.criterion_from_config(tiny_config.loss)

  def loss_fn(w, feats, base, targets):
    terms = criterion(linear_model_outputs(w, feats, base), targets)
    return terms['total'], terms

  single = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (ref_total, ref_terms), ref_grad = single(w, feats, base, targets)

  batch_spec = NamedSharding(mesh, P(sharding.AXIS))
  sharded_args = (
      jax.device_put(w, NamedSharding(mesh, P())),
      jax.device_put(feats, NamedSharding(mesh, P(None, sharding.AXIS))),
      jax.device_put(base, batch_spec), jax.device_put(targets, batch_spec))
  sharded = sharding.under_mesh(mesh, jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
                                              out_shardings=NamedSharding(mesh, P())))
  (total, terms), grad = sharded(*sharded_args)
  np.testing.assert_allclose(float(total), float(ref_total), rtol=1e-6)
  for key in ref_terms:
    np.testing.assert_allclose(float(terms[key]), float(ref_terms[key]), rtol=1e-6, err_msg=key)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-5, atol=1e-7)
  assert float(np.abs(ref_grad).max()) > 0


@pytest.mark.timeout(120)
def test_sharded_pure_jax_matcher_equals_scipy(mesh, problem):
  """The callback-free solver per shard finds the same (unique, continuous-cost) optimum."""
  reference = [np.asarray(x) for x in matching.hungarian_match(*problem)]
  fn = sharding.under_mesh(mesh, jax.jit(lambda *a: matching.hungarian_match(*a, solver='jax')))
  for got, want in zip(fn(*_put(mesh, problem, IN_SPECS)), reference):
    np.testing.assert_array_equal(np.asarray(got), want)


def test_bad_mesh_is_named(mesh, problem):
  other = Mesh(np.array(jax.devices()[:2]), ('batch',))
  with pytest.raises(ValueError, match="'data' axis"):
    sharding.under_mesh(other, jax.eval_shape)(matching.hungarian_match, *problem)
  odd = [x[..., :3, :, :] if x.ndim == 4 else x[:3] for x in problem]
  with pytest.raises(ValueError, match='not divisible'):
    sharding.under_mesh(mesh, jax.eval_shape)(matching.hungarian_match, *odd)
