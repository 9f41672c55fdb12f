"""The XLA deformable-attention core against a plain numpy loop, finite differences and autodiff."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solq_jax.ops import ms_deform_attn as msda

# Odd level sizes, including a 1x1 level and a single-row level.
LEVELS = ((5, 7), (3, 5), (1, 4), (1, 1))
HEADS, HEAD_DIM, POINTS = 2, 3, 2


def numpy_ms_deform_attn(value, shapes, loc, attn):
  """Reference: explicit loops over every sample and corner, grid_sample semantics."""
  value = np.asarray(value, np.float64)
  loc = np.asarray(loc, np.float64)
  attn = np.asarray(attn, np.float64)
  b, _, m, dh = value.shape
  lq, nl, np_ = loc.shape[1], loc.shape[3], loc.shape[4]
  starts = np.cumsum([0] + [h * w for h, w in shapes])
  out = np.zeros((b, lq, m, dh))
  for bi in range(b):
    for q in range(lq):
      for hd in range(m):
        for lvl in range(nl):
          h, w = shapes[lvl]
          for pt in range(np_):
            u = loc[bi, q, hd, lvl, pt, 0] * w - 0.5
            v = loc[bi, q, hd, lvl, pt, 1] * h - 0.5
            x0, y0 = int(np.floor(u)), int(np.floor(v))
            for x in (x0, x0 + 1):
              for y in (y0, y0 + 1):
                if 0 <= x < w and 0 <= y < h:
                  weight = (1 - abs(u - x)) * (1 - abs(v - y))
                  out[bi, q, hd] += (attn[bi, q, hd, lvl, pt] * weight *
                                     value[bi, starts[lvl] + y * w + x, hd])
  return out.reshape(b, lq, m * dh)


def random_inputs(rng, batch, queries, levels=LEVELS, margin=0.3, dtype=np.float32):
  """Values, locations in [-margin, 1 + margin] (taps outside every side) and weights."""
  s = sum(h * w for h, w in levels)
  value = rng.normal(size=(batch, s, HEADS, HEAD_DIM))
  loc = rng.uniform(-margin, 1 + margin, size=(batch, queries, HEADS, len(levels), POINTS, 2))
  attn = rng.uniform(size=(batch, queries, HEADS, len(levels), POINTS))
  return tuple(x.astype(dtype) for x in (value, loc, attn))


def off_edge_locations(rng, batch, queries, levels=LEVELS):
  """Locations whose pixel coordinates sit at least 0.1 from a cell edge (including outside)."""
  loc = np.empty((batch, queries, HEADS, len(levels), POINTS, 2))
  for lvl, (h, w) in enumerate(levels):
    for axis, size in ((0, w), (1, h)):
      shape = loc[..., lvl, :, axis].shape
      pixel = rng.integers(-2, size + 1, size=shape) + rng.uniform(0.1, 0.9, size=shape)
      loc[..., lvl, :, axis] = (pixel + 0.5) / size
  return loc


@pytest.fixture(scope='module')
def core():
  return jax.jit(msda.ms_deform_attn_core, static_argnums=(1, 4))


@pytest.fixture(scope='module')
def core_grad():
  def loss(value, loc, attn, cotangent):
    return jnp.sum(msda.ms_deform_attn_core(value, LEVELS, loc, attn) * cotangent)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


@pytest.mark.parametrize('batch,queries', [(1, 1), (3, 7), (2, 20)])
def test_forward_matches_numpy_loop(core, batch, queries):
  rng = np.random.default_rng(batch * 100 + queries)
  value, loc, attn = random_inputs(rng, batch, queries)
  out = core(value, LEVELS, loc, attn, 'xla')
  assert out.shape == (batch, queries, HEADS * HEAD_DIM) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, numpy_ms_deform_attn(value, LEVELS, loc, attn),
                             rtol=1e-5, atol=1e-5)


def test_pixel_centres_and_borders(core):
  """At a pixel centre the sample is that pixel; at the map border half of it (zero padding)."""
  rng = np.random.default_rng(1)
  value, _, _ = random_inputs(rng, 1, 1)
  h, w = LEVELS[0]
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  n = h * w
  loc = np.zeros((1, n, HEADS, len(LEVELS), POINTS, 2), np.float32)
  loc[0, :, :, :, :, 0] = ((xs.ravel() + 0.5) / w)[:, None, None, None]
  loc[0, :, :, :, :, 1] = ((ys.ravel() + 0.5) / h)[:, None, None, None]
  attn = np.zeros((1, n, HEADS, len(LEVELS), POINTS), np.float32)
  attn[:, :, :, 0, 0] = 1.0
  out = np.asarray(core(value, LEVELS, loc, attn, 'xla')).reshape(n, HEADS, HEAD_DIM)
  np.testing.assert_allclose(out, value[0, :n], rtol=1e-6, atol=1e-6)
  # x = 0 is half a pixel left of column 0's centre: half of column 0, half of zero padding.
  loc[0, :, :, :, :, 0] = 0.0
  out = np.asarray(core(value, LEVELS, loc, attn, 'xla')).reshape(n, HEADS, HEAD_DIM)
  np.testing.assert_allclose(out, 0.5 * value[0, ys.ravel() * w], rtol=1e-6, atol=1e-6)
  # Exact integer pixel corners and points far outside the map.
  loc = np.concatenate([np.full((1, 1, HEADS, len(LEVELS), POINTS, 2), c, np.float32)
                        for c in (-1.0, 1.0, 2.0, 0.5)], axis=1)
  attn = rng.uniform(size=(1, 4, HEADS, len(LEVELS), POINTS)).astype(np.float32)
  out = core(value, LEVELS, loc, attn, 'xla')
  np.testing.assert_allclose(out, numpy_ms_deform_attn(value, LEVELS, loc, attn),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out)[0, [0, 2]], 0.0)  # entirely off the map
  assert np.abs(np.asarray(out)[0, [1, 3]]).min() > 0  # the far border and the centre


def test_bfloat16_value_accumulates_in_float32(core):
  rng = np.random.default_rng(2)
  value, loc, attn = random_inputs(rng, 2, 5)
  value16 = jnp.asarray(value, jnp.bfloat16)
  out = core(value16, LEVELS, loc, attn, 'xla')
  assert out.dtype == jnp.bfloat16
  expected = numpy_ms_deform_attn(np.asarray(value16.astype(jnp.float32)), LEVELS, loc, attn)
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=1e-2, atol=1e-2)


def test_custom_vjp_matches_autodiff_of_forward(core_grad):
  """The hand-written backward equals autodiff of the same forward (fp32 vs fp32)."""
  rng = np.random.default_rng(3)
  value, loc, attn = random_inputs(rng, 3, 9)
  cotangent = rng.normal(size=(3, 9, HEADS * HEAD_DIM)).astype(np.float32)

  def loss(value, loc, attn):
    out = msda.fused_forward(value, LEVELS, loc, attn)
    return jnp.sum(out.reshape(cotangent.shape) * cotangent)

  expected = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(value, loc, attn)
  got = core_grad(value, loc, attn, cotangent)
  for name, g, e in zip(('value', 'locations', 'weights'), got, expected):
    np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-5, err_msg=name)
    assert np.abs(e).max() > 0.1, name  # a non-trivial gradient


def test_backward_chunking_pads_queries():
  """A query count that is not a multiple of the scan chunk gives the same gradients."""
  rng = np.random.default_rng(4)
  levels = LEVELS[1:3]
  value, loc, attn = random_inputs(rng, 2, 11, levels=levels)
  grad_out = rng.normal(size=(2, 11, HEADS * HEAD_DIM)).astype(np.float32)
  backward = jax.jit(msda.fused_backward, static_argnums=(1, 5))
  whole = backward(value, levels, loc, attn, grad_out, 11)
  chunked = backward(value, levels, loc, attn, grad_out, 4)
  for w, c in zip(whole, chunked):
    assert w.shape == c.shape
    np.testing.assert_allclose(c, w, rtol=1e-5, atol=1e-6)


def test_default_backward_chunk_follows_the_byte_budget(monkeypatch):
  """The default chunk holds BACKWARD_CHUNK_BYTES of output gradient; the split changes nothing."""
  rng = np.random.default_rng(6)
  value, loc, attn = random_inputs(rng, 2, 23)
  grad_out = rng.normal(size=(2, 23, HEADS * HEAD_DIM)).astype(np.float32)
  bytes_per_query = 4 * 2 * HEADS * HEAD_DIM  # f32, batch 2

  def scan_lengths():
    traced = jax.make_jaxpr(lambda *a: msda.fused_backward(*a[:1], LEVELS, *a[1:]))(
        value, loc, attn, grad_out)
    return [e.params['length'] for e in traced.jaxpr.eqns if e.primitive.name == 'scan']

  backend = jax.default_backend()
  monkeypatch.setitem(msda.BACKWARD_CHUNK_BYTES, backend, 1 * bytes_per_query)
  assert scan_lengths() == [3]  # at least 8 queries a step: ceil(23 / 8)
  monkeypatch.setitem(msda.BACKWARD_CHUNK_BYTES, backend, 20 * bytes_per_query)
  assert scan_lengths() == [2]  # 20 queries a step
  chunked = msda.fused_backward(value, LEVELS, loc, attn, grad_out)
  whole = msda.fused_backward(value, LEVELS, loc, attn, grad_out, 23)
  for w, c in zip(whole, chunked):
    np.testing.assert_allclose(c, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('backend', ['cpu', 'gpu', 'tpu'])
def test_per_backend_chunk_gives_the_same_gradients(monkeypatch, backend):
  """Each backend's default chunk (traced as if on that backend) gives the gradients of one
  whole-query step; so do chunks of 3 and 13 queries (several steps, a partial last one)."""
  rng = np.random.default_rng(7)
  value, loc, attn = random_inputs(rng, 2, 40)
  grad_out = rng.normal(size=(2, 40, HEADS * HEAD_DIM)).astype(np.float32)
  chunk = msda.backward_chunk(value.shape, backend)
  assert chunk == max(8, msda.BACKWARD_CHUNK_BYTES[backend] // (4 * 2 * HEADS * HEAD_DIM))
  whole = msda.fused_backward(value, LEVELS, loc, attn, grad_out, 40)
  monkeypatch.setattr(msda.jax, 'default_backend', lambda: backend)
  for chunk in (None, 3, 13):
    chunked = msda.fused_backward(value, LEVELS, loc, attn, grad_out, chunk)
    for w, c in zip(whole, chunked):
      np.testing.assert_allclose(c, w, rtol=1e-5, atol=1e-6)


def test_gradients_match_finite_differences_float64():
  """Directional derivatives of the custom_vjp equal central differences (float64)."""
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    value, _, attn = random_inputs(rng, 2, 6, dtype=np.float64)
    loc = off_edge_locations(rng, 2, 6)
    cotangent = rng.normal(size=(2, 6, HEADS * HEAD_DIM))

    @jax.jit
    def loss(value, loc, attn):
      return jnp.sum(msda.ms_deform_attn_core(value, LEVELS, loc, attn) * cotangent)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(value, loc, attn)
    assert grads[0].dtype == jnp.float64
    args = [value, loc, attn]
    eps = 1e-6
    for i, name in enumerate(('value', 'locations', 'weights')):
      direction = rng.normal(size=args[i].shape)
      plus, minus = list(args), list(args)
      plus[i] = args[i] + eps * direction
      minus[i] = args[i] - eps * direction
      numeric = (loss(*plus) - loss(*minus)) / (2 * eps)
      analytic = np.sum(np.asarray(grads[i]) * direction)
      np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8, err_msg=name)


def test_bad_inputs_raise_naming_the_argument():
  rng = np.random.default_rng(6)
  value, loc, attn = random_inputs(rng, 1, 2)
  with pytest.raises(ValueError, match='spatial_shapes'):
    msda.ms_deform_attn_core(value, LEVELS[:-1], loc, attn)
  with pytest.raises(ValueError, match='attention_weights'):
    msda.ms_deform_attn_core(value, LEVELS, loc, attn[..., :1])
  with pytest.raises(ValueError, match='sampling_locations'):
    msda.ms_deform_attn_core(value, LEVELS, loc[..., 0], attn)
  with pytest.raises(ValueError, match='attention_impl'):
    msda.ms_deform_attn_core(value, LEVELS, loc, attn, impl='cuda')


def test_sharded_batch_runs_per_device_without_all_gathers():
  """Under the train step's mesh context the core and its gradient run per batch shard.

  Left to the SPMD partitioner, the gathers and scatters into a batch-sharded value table became
  an all-gather per tap; under `sharding.per_batch_shard` the compiled program has none, and the
  values and gradients equal the unsharded ones.
  """
  from solq_jax import sharding
  rng = np.random.default_rng(7)
  value, loc, attn = random_inputs(rng, 8, 13)
  cotangent = rng.normal(size=(8, 13, HEADS * HEAD_DIM)).astype(np.float32)

  def loss(value, loc, attn):
    out = msda.ms_deform_attn_core(value, LEVELS, loc, attn)
    return jnp.sum(out * cotangent), out

  grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
  mesh = sharding.make_mesh(4)
  data = sharding.batch_sharding(mesh)
  sharded = jax.jit(grad, in_shardings=(data, data, data))
  with sharding.mesh_context(mesh):
    hlo = sharded.lower(value, loc, attn).compile().as_text()
    got_grads, got_out = sharded(value, loc, attn)
  assert 'all-gather' not in hlo and 'all-reduce' not in hlo
  want_grads, want_out = jax.jit(grad)(value, loc, attn)
  np.testing.assert_allclose(got_out, want_out, rtol=1e-6, atol=1e-6)
  for name, g, w in zip(('value', 'locations', 'weights'), got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)
