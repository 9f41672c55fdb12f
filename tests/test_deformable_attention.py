"""The MSDeformAttn module (projections, locations, softmax, init) against numpy; not the core."""
import math

import jax
import numpy as np
import pytest

from solq_jax.models.deformable_attention import (MSDeformAttn, sampling_locations_from_reference,
                                                  sampling_offset_bias)

RNG = np.random.default_rng(1)
SHAPES = ((5, 7), (3, 4), (2, 2))
D, M, L, P = 16, 4, 3, 2


def _bilinear(value, h, w, x, y):
  """grid_sample(align_corners=False, zeros) of `value [H*W, C]` at normalised (x, y)."""
  u, v = x * w - 0.5, y * h - 0.5
  x0, y0 = math.floor(u), math.floor(v)
  out = np.zeros(value.shape[1])
  for yy, wy in ((y0, 1 - (v - y0)), (y0 + 1, v - y0)):
    for xx, wx in ((x0, 1 - (u - x0)), (x0 + 1, u - x0)):
      if 0 <= xx < w and 0 <= yy < h:
        out += wx * wy * value[yy * w + xx]
  return out


def _numpy_msda(params, query, ref, inp, pad):
  """MSDeformAttn forward written with explicit loops over queries, heads, levels and points."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  lin = lambda x, name: x @ p[name]['kernel'] + p[name]['bias']
  b, lq, _ = query.shape
  value = lin(inp, 'value_proj') * (~pad)[..., None]
  offsets = lin(query, 'sampling_offsets').reshape(b, lq, M, L, P, 2)
  logits = lin(query, 'attention_weights').reshape(b, lq, M, L * P)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn = (attn / attn.sum(-1, keepdims=True)).reshape(b, lq, M, L, P)
  starts = np.cumsum([0] + [h * w for h, w in SHAPES])
  dh = D // M
  out = np.zeros((b, lq, D))
  for n in range(b):
    for q in range(lq):
      for m in range(M):
        for l, (h, w) in enumerate(SHAPES):
          v_l = value[n, starts[l]:starts[l + 1], m * dh:(m + 1) * dh]
          for k in range(P):
            r = ref[n, q, l]
            if ref.shape[-1] == 2:
              x = r[0] + offsets[n, q, m, l, k, 0] / w
              y = r[1] + offsets[n, q, m, l, k, 1] / h
            else:
              x = r[0] + offsets[n, q, m, l, k, 0] / P * r[2] * 0.5
              y = r[1] + offsets[n, q, m, l, k, 1] / P * r[3] * 0.5
            out[n, q, m * dh:(m + 1) * dh] += attn[n, q, m, l, k] * _bilinear(v_l, h, w, x, y)
  return out @ p['output_proj']['kernel'] + p['output_proj']['bias']


@pytest.fixture(scope='module')
def setup():
  module = MSDeformAttn(D, L, M, P)
  s = sum(h * w for h, w in SHAPES)
  query = RNG.standard_normal((2, 6, D)).astype(np.float32)
  inp = RNG.standard_normal((2, s, D)).astype(np.float32)
  pad = RNG.random((2, s)) < 0.2
  ref2 = RNG.uniform(0.1, 0.9, (2, 6, L, 2)).astype(np.float32)
  init_vars = module.init(jax.random.key(0), query, ref2, inp, SHAPES, pad)
  # random weights (init has zero offsets/attention kernels); large offsets reach outside maps
  params = jax.tree_util.tree_map(
      lambda a: (RNG.standard_normal(a.shape) * 0.7).astype(np.float32), init_vars['params'])
  return module, init_vars, params, query, inp, pad, ref2


@pytest.mark.parametrize('ref_dim,weights', [(2, 'random'), (4, 'random'), (2, 'init')])
def test_module_against_numpy_loops(setup, ref_dim, weights):
  module, init_vars, params, query, inp, pad, ref2 = setup
  if weights == 'init':
    params = init_vars['params']
  if ref_dim == 2:
    ref = ref2
  else:
    ref = np.concatenate([ref2, RNG.uniform(0.2, 1.5, ref2.shape).astype(np.float32)], -1)
  got = np.asarray(jax.jit(module.apply, static_argnums=4)({'params': params}, query, ref, inp,
                                                           SHAPES, pad))
  want = _numpy_msda(params, query, ref, inp, pad)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_padded_values_are_ignored(setup):
  module, _, params, query, inp, pad, ref2 = setup
  apply = lambda x: np.asarray(module.apply({'params': params}, query, ref2, x, SHAPES, pad))
  changed = np.where(pad[..., None], 1e3, inp).astype(np.float32)
  np.testing.assert_allclose(apply(changed), apply(inp), rtol=1e-5, atol=1e-5)
  assert not np.allclose(apply(np.where(pad[..., None], inp, 1e3).astype(np.float32)),
                         apply(inp))


def test_sampling_locations_formulas():
  b, lq = 2, 3
  shapes = ((4, 6), (2, 5))
  offsets = RNG.standard_normal((b, lq, 2, 2, 3, 2)).astype(np.float32)
  ref2 = RNG.random((b, lq, 2, 2)).astype(np.float32)
  got = np.asarray(sampling_locations_from_reference(ref2, offsets, shapes))
  want = np.zeros_like(got)
  for l, (h, w) in enumerate(shapes):
    want[:, :, :, l, :, 0] = ref2[:, :, None, l, None, 0] + offsets[:, :, :, l, :, 0] / w
    want[:, :, :, l, :, 1] = ref2[:, :, None, l, None, 1] + offsets[:, :, :, l, :, 1] / h
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  ref4 = RNG.random((b, lq, 2, 4)).astype(np.float32)
  got = np.asarray(sampling_locations_from_reference(ref4, offsets, shapes))
  want = (ref4[:, :, None, :, None, :2] + offsets / 3 * ref4[:, :, None, :, None, 2:] * 0.5)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='reference_points'):
    sampling_locations_from_reference(ref4[..., :3], offsets, shapes)


def test_official_init(setup):
  _, init_vars, _, _, _, _, _ = setup
  p = init_vars['params']
  assert np.all(np.asarray(p['sampling_offsets']['kernel']) == 0)
  assert np.all(np.asarray(p['attention_weights']['kernel']) == 0)
  assert np.all(np.asarray(p['attention_weights']['bias']) == 0)
  bias = np.asarray(p['sampling_offsets']['bias']).reshape(M, L, P, 2)
  # 4 heads: directions 0, 90, 180, 270 degrees; point k at distance k + 1 on every level
  directions = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.float32)
  for k in range(P):
    np.testing.assert_allclose(bias[:, :, k], np.broadcast_to(directions[:, None] * (k + 1),
                                                              (M, L, 2)), atol=1e-6)
  # 8 heads: diagonal heads are scaled so max(|x|, |y|) = 1
  eight = sampling_offset_bias(8, 1, 1).reshape(8, 2)
  np.testing.assert_allclose(eight[1], [1, 1], atol=1e-6)
  np.testing.assert_allclose(eight[3], [-1, 1], atol=1e-6)
  for name in ('value_proj', 'output_proj'):
    k = np.asarray(p[name]['kernel'])
    bound = math.sqrt(6 / (D + D))
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.8 * bound
    assert np.all(np.asarray(p[name]['bias']) == 0)
