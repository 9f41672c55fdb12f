"""The Pallas deformable-attention kernel: interpret mode on CPU against the XLA core, and its
lowering for CUDA targets (abstract A100 / H100 devices) without a GPU."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from kernels import ms_deform_attn as kernel
from solq_jax.ops import ms_deform_attn as msda

# Four levels of odd sizes (one 1x1) and two points per level: small enough for interpret mode.
LEVELS = ((5, 7), (3, 5), (1, 3), (1, 1))
POINTS = 2
TRITON_CALL = '__gpu$xla.gpu.triton'
FakeDevice = collections.namedtuple('FakeDevice', 'platform device_kind compute_capability')


def random_inputs(seed, batch, queries, heads, head_dim, levels=LEVELS, points=POINTS):
  """Locations in [-0.3, 1.3] (taps outside the map on every side), softmax-like weights."""
  rng = np.random.default_rng(seed)
  s = sum(h * w for h, w in levels)
  value = rng.normal(size=(batch, s, heads, head_dim)).astype(np.float32)
  loc = rng.uniform(-0.3, 1.3, size=(batch, queries, heads, len(levels), points, 2))
  attn = rng.uniform(size=(batch, queries, heads, len(levels), points))
  cotangent = rng.normal(size=(batch, queries, heads * head_dim))
  return value, loc.astype(np.float32), attn.astype(np.float32), cotangent.astype(np.float32)


def test_forward_matches_xla_core_official_heads():
  """8 heads x 48 (padded to 64 lanes), batch 3, 5 queries in blocks of 4 (a partial block)."""
  value, loc, attn, _ = random_inputs(0, batch=3, queries=5, heads=8, head_dim=48)
  out = jax.jit(lambda v, l, a: kernel.ms_deform_attn_pallas(v, LEVELS, l, a, block_q=4,
                                                             interpret=True))(value, loc, attn)
  expected = msda.ms_deform_attn_xla(value, LEVELS, loc, attn)
  assert out.shape == (3, 5, 8 * 48)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_forward_bfloat16_accumulates_in_float32():
  levels = LEVELS[:2]
  value, loc, attn, _ = random_inputs(1, batch=1, queries=3, heads=2, head_dim=3, levels=levels)
  value16 = jnp.asarray(value, jnp.bfloat16)
  out = kernel.ms_deform_attn_pallas(value16, levels, loc, attn, interpret=True)
  assert out.dtype == jnp.bfloat16
  # Same bf16 inputs, f32 accumulation in both: equal up to the final bf16 rounding.
  expected = msda.ms_deform_attn_xla(value16.astype(jnp.float32), levels, loc, attn)
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=8e-3, atol=8e-3)


def _pallas_and_xla_gradients(value, loc, attn, cotangent):
  """Gradients of `sum(core(...) * cotangent)` w.r.t. value, locations and weights, for the
  Pallas kernel (interpret mode) and the XLA core."""
  def loss(core):
    return lambda v, l, a: jnp.sum(core(v, LEVELS, l, a).astype(jnp.float32) * cotangent)

  pallas_core = lambda v, s, l, a: kernel.ms_deform_attn_pallas(v, s, l, a, interpret=True)
  got = jax.jit(jax.grad(loss(pallas_core), argnums=(0, 1, 2)))(value, loc, attn)
  expected = jax.jit(jax.grad(loss(msda.ms_deform_attn_xla), argnums=(0, 1, 2)))(
      value, loc, attn)
  return got, expected


def test_gradients_match_xla_core():
  """All three gradients vs jax.grad of the XLA core. Interpret mode is faithful here: the
  backward uses one query per program, so no atomic add repeats an index within a call."""
  value, loc, attn, cotangent = random_inputs(2, batch=3, queries=3, heads=2, head_dim=48,
                                              points=1)

  got, expected = _pallas_and_xla_gradients(value, loc, attn, cotangent)
  for name, g, e in zip(('value', 'locations', 'weights'), got, expected):
    assert g.shape == e.shape, name
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4, err_msg=name)
    assert np.abs(e).max() > 0.1, name


def test_bfloat16_gradients_match_xla_core():
  """bf16 values and attention weights (as model.dtype='bfloat16' passes them), f32 locations:
  both cores accumulate in f32, so the gradients agree up to their final bf16 rounding."""
  value, loc, attn, cotangent = random_inputs(5, batch=2, queries=3, heads=2, head_dim=8,
                                              points=1)
  value, attn = jnp.asarray(value, jnp.bfloat16), jnp.asarray(attn, jnp.bfloat16)

  got, expected = _pallas_and_xla_gradients(value, loc, attn, cotangent)
  for name, g, e in zip(('value', 'locations', 'weights'), got, expected):
    assert g.dtype == e.dtype, name
    g, e = np.asarray(g, np.float32), np.asarray(e, np.float32)
    scale = np.abs(e).max()
    assert scale > 0.1, name
    np.testing.assert_allclose(g, e, rtol=1e-2, atol=1e-2 * scale, err_msg=name)


def _abstract_gpu_mesh(device_kind):
  device = AbstractDevice(device_kind=device_kind, num_cores=None, platform='gpu')
  return AbstractMesh((1,), ('x',), (AxisType.Explicit,), abstract_device=device)


def _lower_for_cuda(device_kind, args):
  """Lowers forward and backward (jax.grad) of the kernel for CUDA on an abstract device."""
  def loss(v, l, a):
    return jnp.sum(kernel.ms_deform_attn_pallas(v, LEVELS, l, a, interpret=False) ** 2)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  with jax.sharding.use_abstract_mesh(_abstract_gpu_mesh(device_kind)):
    return fn.trace(*args).lower(lowering_platforms=('cuda',)).as_text()


@pytest.mark.parametrize('device_kind', ['NVIDIA A100-SXM4-80GB', 'NVIDIA H100 80GB HBM3'])
def test_lowers_for_cuda_sm80_and_sm90(device_kind):
  value, loc, attn, _ = random_inputs(3, batch=2, queries=70, heads=8, head_dim=48)
  value = jnp.asarray(value, jnp.bfloat16)
  text = _lower_for_cuda(device_kind, (value, loc, attn))
  assert text.count(TRITON_CALL) == 2  # the forward and the backward kernel
  assert 'ms_deform_attn_fwd' in text and 'ms_deform_attn_bwd' in text


def test_v100_is_refused_and_auto_chooses_xla():
  value, loc, attn, _ = random_inputs(4, batch=1, queries=4, heads=2, head_dim=48)
  with pytest.raises(RuntimeError, match='No supported GPU'):
    _lower_for_cuda('Tesla V100-SXM2-16GB', (value, loc, attn))
  v100 = FakeDevice('gpu', 'Tesla V100-SXM2-16GB', '7.0')
  a100 = FakeDevice('gpu', 'NVIDIA A100-SXM4-80GB', '8.0')
  h100 = FakeDevice('gpu', 'NVIDIA H100 80GB HBM3', '9.0')
  assert msda.resolve_impl('auto', v100) == 'xla'
  assert msda.resolve_impl('auto', a100) == 'pallas'
  assert msda.resolve_impl('auto', h100) == 'pallas'
  assert msda.resolve_impl('auto') == 'xla'  # the CPU test host
  assert msda.resolve_impl('pallas', v100) == 'pallas'  # explicit choice is respected


@pytest.mark.slow
def test_tiny_model_pallas_equals_xla(tiny_config):
  """The whole tiny model (one encoder and one decoder layer, to keep interpret mode's compile
  time down) with attention_impl=pallas (interpret mode) equals xla."""
  from solq_jax.models import build_model  # pylint: disable=g-import-not-at-top
  config = tiny_config.copy_and_resolve_references()
  config.model.enc_layers = 1
  config.model.dec_layers = 1
  rng = np.random.default_rng(5)
  images = jnp.asarray(rng.normal(size=(1, 64, 96, 3)), jnp.float32)
  pad_mask = jnp.zeros((1, 64, 96), bool).at[:, :, 80:].set(True)
  model_xla = build_model(config.model)
  variables = jax.jit(model_xla.init)(jax.random.key(0), images, pad_mask)
  config.model.attention_impl = 'pallas'
  model_pallas = build_model(config.model)
  out_xla = jax.jit(model_xla.apply)(variables, images, pad_mask)
  out_pallas = jax.jit(model_pallas.apply)(variables, images, pad_mask)
  for key in ('pred_logits', 'pred_boxes', 'pred_vectors'):
    np.testing.assert_allclose(out_pallas[key], out_xla[key], rtol=1e-4, atol=1e-4, err_msg=key)
