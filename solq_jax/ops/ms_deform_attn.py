"""Multi-scale deformable attention core: bilinear sampling of a multi-level value map.

`ms_deform_attn_core` is the one entry point (its contract: docs/design.md, "Deformable-attention
core"); it dispatches to the XLA core below or to the Pallas kernel of `kernels/`. Sampling
follows `torch.nn.functional.grid_sample(align_corners=False, padding_mode='zeros')`; the corner
math is `kernels.bilinear`, shared with the kernel.

The XLA implementation is written for XLA:CPU's fusion rules (benchmarks/ms_deform_attn.py
compares it with simpler cores): the value map is read as a table of rows `[B*S*M, Dh]`
(row = (batch, pixel, head), no transpose), each of the L*P samples computes its 4 corner rows
and weights inline and adds 4 weighted gathers to the accumulator in one loop fusion, and an
`optimization_barrier` between samples keeps it at one fusion per sample. Its gradient is a
`custom_vjp` that scans over chunks of queries, gathers the same taps, reduces them against the
output gradient (locations, weights) and scatter-adds the weighted output gradient into the value
gradient (deterministic on CPU).
"""
import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from kernels.bilinear import accumulation_dtype, bilinear_taps, bilinear_taps_xy, samples
from solq_jax import sharding

IMPLS = ('xla', 'pallas', 'auto')
# Output-gradient bytes per step of the backward scan, per backend: the chunk holds this many
# bytes of `[B, chunk, M, Dh]` f32. A step's temporaries (tap tables, gathered products, the
# scatter-add updates) are about 120 times the chunk's output gradient. XLA:CPU runs the step's
# fusions on a core at a time and is fastest when they stay in cache (64 KiB: a few MB of
# temporaries; the measured chunk sizes are in benchmarks/README.md). GPU and TPU pay a fixed
# launch/step cost per scan step instead, so they take chunks 32 times larger: a few hundred MB
# of temporaries per step (small beside a 16 GB device) and tens of steps instead of thousands
# for the R50 encoder. Chosen at trace time from `jax.default_backend()`; other backends get the
# CPU value, the smallest temporaries.
BACKWARD_CHUNK_BYTES = {
    'cpu': 64 * 1024,
    'gpu': 2 * 1024 * 1024,
    'tpu': 2 * 1024 * 1024,
}


def backward_chunk_bytes(backend=None):
  """The backward scan's output-gradient bytes per step for `backend` (default: the current
  default backend, read when the backward is traced)."""
  backend = backend or jax.default_backend()
  return BACKWARD_CHUNK_BYTES.get(backend, BACKWARD_CHUNK_BYTES['cpu'])


def backward_chunk(value_shape, backend=None):
  """Queries per backward scan step for a `[B, S, M, Dh]` value: as many as fill
  `backward_chunk_bytes(backend)` of f32 output gradient, at least 8."""
  b, _, m, dh = value_shape
  return max(8, backward_chunk_bytes(backend) // (4 * b * m * dh))


def check_inputs(value, spatial_shapes, sampling_locations, attention_weights):
  """Validates the inputs' shapes; returns `spatial_shapes` as a tuple of int pairs."""
  if value.ndim != 4:
    raise ValueError(f'value must be [B,S,M,Dh], got shape {value.shape}')
  b, s, m, _ = value.shape
  shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  if sum(h * w for h, w in shapes) != s:
    raise ValueError(f'spatial_shapes {shapes} cover {sum(h * w for h, w in shapes)} pixels '
                     f'but value has S={s}')
  if sampling_locations.ndim != 6 or sampling_locations.shape[-1] != 2:
    raise ValueError('sampling_locations must be [B,Lq,M,L,P,2], got shape '
                     f'{sampling_locations.shape}')
  _, lq, m2, nl, p, _ = sampling_locations.shape
  if (sampling_locations.shape[0], m2, nl) != (b, m, len(shapes)):
    raise ValueError(f'sampling_locations {sampling_locations.shape} does not match value '
                     f'{value.shape} and {len(shapes)} levels')
  if attention_weights.shape != (b, lq, m, nl, p):
    raise ValueError(f'attention_weights must be {(b, lq, m, nl, p)}, got '
                     f'{attention_weights.shape}')
  return shapes


def _row_base(b, s, m):
  """Per-(batch, head) offsets such that `(base + pixel) * M + head` is the table row."""
  batch = jnp.arange(b, dtype=jnp.int32)[:, None, None] * s
  head = jnp.arange(m, dtype=jnp.int32)
  return batch, head


def _materialise(*arrays):
  """The arrays, computed once before the sampling loops (an optimisation barrier).

  Without it XLA fuses their producers (the value projection's bias and padding mask, the
  sampling-offset arithmetic, the softmax) into every per-sample gather fusion and recomputes
  them for each of the L*P*4 taps and each of the Dh channels.
  """
  return lax.optimization_barrier(arrays)


def fused_forward(value, shapes, sampling_locations, attention_weights):
  """The forward pass (plain JAX, differentiable by autodiff); returns f32 `[B,Lq,M,Dh]`."""
  b, s, m, dh = value.shape
  value, sampling_locations, attention_weights = _materialise(
      value, sampling_locations, attention_weights)
  table = jnp.asarray(value).reshape(b * s * m, dh)
  batch, head = _row_base(b, s, m)
  acc_dtype = accumulation_dtype(value)
  loc = sampling_locations.astype(acc_dtype)
  attn = attention_weights.astype(acc_dtype)
  acc = jnp.zeros(loc.shape[:3] + (dh,), acc_dtype)
  for lvl, pt, start, h, w in samples(shapes, loc.shape[4]):
    a = attn[:, :, :, lvl, pt]
    contrib = 0.0
    for tap in bilinear_taps(loc[:, :, :, lvl, pt], h, w):
      rows = (batch + start + tap.index) * m + head
      gathered = table.at[rows].get(mode='clip').astype(acc_dtype)
      contrib = contrib + gathered * (tap.weight * a)[..., None]
    acc = lax.optimization_barrier(acc + contrib)
  return acc


def _to_chunks(x, chunk):
  """`[B, Lq, ...]` -> `[n, B, chunk, ...]`, zero-padding Lq to a multiple of `chunk`."""
  b, lq = x.shape[:2]
  n = -(-lq // chunk)
  x = jnp.pad(x, [(0, 0), (0, n * chunk - lq)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)


def _from_chunks(x, lq):
  n, b, chunk = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape((b, n * chunk) + x.shape[3:])[:, :lq]


def _tap_tables(loc, attn, shapes, num_pixels, heads):
  """The bilinear taps of a chunk of queries, taps-major: five `[K, N]` tables.

  `loc [B,C,M,L,P,2]`, `attn [B,C,M,L,P]`; K = L*P*4 taps ordered (level, point, corner) and
  N = B*C*M rows ordered (batch, query, head). Returns the value-table row of every tap, its
  weight in the output (bilinear * inside * attention), and the factors that turn its dot with
  the output gradient into d/d(attention) and, once times the attention weight, d/d(x) and d/d(y)
  of its sample's normalised location (d/d(fx) * W, d/d(fy) * H). Computed over whole
  arrays (a few fusions), and taps-major so that a tap's row is contiguous: per-tap tables sliced
  out of a minor axis, or per-sample scalars recomputed inside every channel loop, cost more than
  the gathers they feed.
  """
  b, c, m, nl, p = attn.shape
  n = b * c * m
  hw = np.asarray(shapes, np.int32)
  height = hw[:, 0].reshape(nl, 1, 1)
  width = hw[:, 1].reshape(nl, 1, 1)
  level_start = np.concatenate([[0], np.cumsum(hw[:, 0] * hw[:, 1])[:-1]]).reshape(nl, 1, 1)
  loc_t = jnp.transpose(loc.reshape(n, nl, p, 2), (3, 1, 2, 0))   # [2, L, P, N]
  attn_t = jnp.transpose(attn.reshape(n, nl, p), (1, 2, 0))        # [L, P, N]
  row = jnp.arange(n, dtype=jnp.int32)
  base = (row // (c * m)) * (num_pixels * heads) + row % heads    # batch offset + head
  tables = [[] for _ in range(5)]
  for tap in bilinear_taps_xy(loc_t[0], loc_t[1], height, width):
    inside = tap.inside
    tables[0].append((level_start + tap.index) * heads + base)
    tables[1].append(inside * tap.wx * tap.wy * attn_t)
    tables[2].append(inside * tap.wx * tap.wy)
    tables[3].append(inside * tap.sx * tap.wy * width)
    tables[4].append(inside * tap.wx * tap.sy * height)
  return tuple(jnp.stack(t, 2).reshape(nl * p * 4, n) for t in tables)


def fused_backward(value, shapes, sampling_locations, attention_weights, grad_out, chunk=None):
  """Gradients of `sum(fused_forward(...) * grad_out)` w.r.t. value, locations and weights.

  A scan over chunks of queries. Per chunk: the tap tables (`_tap_tables`); per sample, one
  fusion of its 4 gathers that forms the output gradient's products with the bilinear sample and
  with its x and y derivatives, reduced over channels for all samples at once; and one
  scatter-add of every tap's weighted output gradient into the value gradient (in place,
  deterministic on CPU). Small chunks keep each chunk's temporaries in cache: `chunk` queries
  per step, by default `backward_chunk(value.shape)` (per backend). The chunk changes the
  order of nothing but the scatter-adds into the value gradient: values are equal up to
  float rounding of that sum.
  """
  b, s, m, dh = value.shape
  lq = sampling_locations.shape[1]
  if chunk is None:
    chunk = backward_chunk(value.shape)
  chunk = min(chunk, lq)
  value, sampling_locations, attention_weights, grad_out = _materialise(
      value, sampling_locations, attention_weights, grad_out)
  table = jnp.asarray(value).reshape(b * s * m, dh)
  acc_dtype = accumulation_dtype(value)
  xs = (_to_chunks(sampling_locations.astype(acc_dtype), chunk),
        _to_chunks(attention_weights.astype(acc_dtype), chunk),
        _to_chunks(grad_out.reshape(b, lq, m, dh).astype(acc_dtype), chunk))

  def step(grad_table, x):
    loc, attn, g = x
    n = b * loc.shape[1] * m
    g = g.reshape(n, dh)
    rows, weight, c_attn, c_x, c_y = lax.optimization_barrier(
        _tap_tables(loc, attn, shapes, s, m))
    products = []
    for j in range(rows.shape[0] // 4):
      sample = d_x = d_y = 0.0
      for k in range(4 * j, 4 * j + 4):
        gathered = table.at[rows[k]].get(mode='promise_in_bounds').astype(acc_dtype)
        sample = sample + gathered * c_attn[k][:, None]
        d_x = d_x + gathered * c_x[k][:, None]
        d_y = d_y + gathered * c_y[k][:, None]
      products.append(lax.optimization_barrier(jnp.stack([sample * g, d_x * g, d_y * g])))
    dots = jnp.sum(jnp.stack(products), axis=-1)                   # [L*P, 3, N]
    updates = (weight[:, :, None] * g[None]).reshape(-1, dh)
    grad_table = grad_table.at[rows.reshape(-1)].add(updates, mode='promise_in_bounds')
    a = jnp.transpose(attn.reshape(n, -1))                          # [L*P, N]
    grad_loc = jnp.stack([dots[:, 1] * a, dots[:, 2] * a], axis=-1)
    grad_loc = jnp.transpose(grad_loc, (1, 0, 2)).reshape(loc.shape)
    grad_attn = jnp.transpose(dots[:, 0]).reshape(attn.shape)
    return grad_table, (grad_loc, grad_attn)

  grad_table, (grad_loc, grad_attn) = lax.scan(
      step, jnp.zeros((b * s * m, dh), acc_dtype), xs)
  return (grad_table.reshape(value.shape).astype(value.dtype),
          _from_chunks(grad_loc, lq).astype(sampling_locations.dtype),
          _from_chunks(grad_attn, lq).astype(attention_weights.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def ms_deform_attn_xla(value, shapes, sampling_locations, attention_weights):
  """XLA core: fused forward with the hand-written backward; returns `[B,Lq,M*Dh]`."""
  out = fused_forward(value, shapes, sampling_locations, attention_weights)
  return out.reshape(out.shape[:2] + (-1,)).astype(value.dtype)


def _xla_fwd(value, shapes, sampling_locations, attention_weights):
  out = ms_deform_attn_xla(value, shapes, sampling_locations, attention_weights)
  return out, (value, sampling_locations, attention_weights)


def _xla_bwd(shapes, residuals, grad_out):
  value, sampling_locations, attention_weights = residuals
  return fused_backward(value, shapes, sampling_locations, attention_weights, grad_out)


ms_deform_attn_xla.defvjp(_xla_fwd, _xla_bwd)


@functools.cache
def _resolve_auto(device):
  from kernels import ms_deform_attn as pallas_kernel  # pylint: disable=g-import-not-at-top
  chosen = 'pallas' if pallas_kernel.device_supported(device) else 'xla'
  logging.info('attention_impl=auto: %s device %r -> %s deformable-attention core',
               device.platform, device.device_kind, chosen)
  return chosen


def resolve_impl(impl, device=None):
  """Returns 'xla' or 'pallas'; 'auto' decides from `device` (default: the first device).

  'auto' picks the Pallas kernel where it can run (CUDA GPUs of compute capability 8.0 and
  newer, i.e. Ampere and Hopper) and the XLA core elsewhere; the choice is logged once.
  """
  if impl not in IMPLS:
    raise ValueError(f'attention_impl must be one of {IMPLS}, got {impl!r}')
  if impl != 'auto':
    return impl
  return _resolve_auto(device if device is not None else jax.devices()[0])


def ms_deform_attn_core(value, spatial_shapes, sampling_locations, attention_weights,
                        impl='xla'):
  """Multi-scale deformable attention.

  Args:
    value: `[B, S, M, Dh]`, S = sum of H_l * W_l, levels flattened in order, row-major.
    spatial_shapes: static tuple of `(H_l, W_l)` Python ints.
    sampling_locations: `[B, Lq, M, L, P, 2]` normalised (x, y), grid_sample
      `align_corners=False` convention; corners outside the map read zero.
    attention_weights: `[B, Lq, M, L, P]`, already softmaxed.
    impl: 'xla' | 'pallas' (Triton kernel, sm80+ GPUs or interpret mode) | 'auto'.

  Returns:
    `[B, Lq, M * Dh]` in value's dtype (f32 accumulation), heads concatenated head-major.
  """
  shapes = check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
  impl = resolve_impl(impl)
  if impl == 'pallas':
    from kernels import ms_deform_attn as pallas_kernel  # pylint: disable=g-import-not-at-top
    fn = pallas_kernel.ms_deform_attn_pallas
  else:
    fn = ms_deform_attn_xla
  # Per batch shard under the train and eval steps' context mesh: left to the SPMD partitioner,
  # the data-dependent gathers and scatters into a batch-sharded value table become an
  # all-gather per tap (thousands per step).
  return sharding.per_batch_shard(lambda v, loc, attn: fn(v, shapes, loc, attn), value,
                                  sampling_locations, attention_weights)
