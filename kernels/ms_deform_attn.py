"""Multi-scale deformable attention as a Pallas (Triton) kernel, forward and backward.

Same semantics and signature as the XLA core that `solq_jax.ops.ms_deform_attn` dispatches to
beside this kernel (the bilinear corner math is shared: `kernels.bilinear`). One program handles
a block of `block_q` queries of one (batch, head): it gathers the 4 corners of every level and
point as `[block_q, Dp]` tiles (Dp = head dim padded to a power of two, the padding lanes
masked), weights and accumulates in f32. The backward program recomputes the taps, reduces them
against the output gradient in registers for the location and weight gradients (each program
owns its queries: plain stores), and atomically adds the weighted output gradient into an f32
value-gradient buffer.

All arrays are passed flat (1-D); indices are computed in the kernel. On CPU the kernel runs in
Pallas interpret mode (a correctness mode, slow). See kernels/README.md for the design notes.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import bilinear

MIN_COMPUTE_CAPABILITY = 8.0  # Pallas' Triton lowering needs sm80+ (Ampere, Hopper, newer)
FORWARD_BLOCK_Q = 64
BACKWARD_BLOCK_Q = 32


def device_supported(device):
  """True for CUDA GPUs of compute capability >= 8.0 (where the Triton kernel can run)."""
  if device.platform not in ('gpu', 'cuda'):
    return False
  capability = getattr(device, 'compute_capability', None)
  try:
    return float(capability) >= MIN_COMPUTE_CAPABILITY
  except (TypeError, ValueError):
    return False


class _Layout:
  """Static sizes and the flat-index arithmetic shared by the two kernels."""

  def __init__(self, value_shape, shapes, num_queries, num_points, block_q):
    self.b, self.s, self.m, self.dh = value_shape
    self.shapes = shapes
    self.num_points = num_points
    self.num_samples = len(shapes) * num_points
    self.dp = pl.next_power_of_2(self.dh)
    self.block_q = block_q
    self.lq = num_queries
    self.lq_pad = pl.cdiv(num_queries, block_q) * block_q
    self.grid = (self.lq_pad // block_q, self.b * self.m)

  def program_rows(self):
    """(batch, head, query rows `(b*Lq_pad + q)*M + head` [block_q]) of this program."""
    bm = pl.program_id(1)
    b, head = bm // self.m, bm % self.m
    q = pl.program_id(0) * self.block_q + jnp.arange(self.block_q, dtype=jnp.int32)
    return b, head, (b * self.lq_pad + q) * self.m + head

  def lanes(self):
    cols = jnp.arange(self.dp, dtype=jnp.int32)
    return cols, (cols < self.dh)[None, :]

  def taps(self, loc_ref, attn_ref, qrows, sample, h, w):
    """Loads one sample's (x, y, weight) for the block and returns its 4 bilinear taps."""
    base = qrows * self.num_samples + sample
    x = loc_ref[base * 2]
    y = loc_ref[base * 2 + 1]
    return attn_ref[base], bilinear.bilinear_taps_xy(x, y, h, w)

  def value_rows(self, b, head, start, tap):
    return (b * self.s + start + tap.index) * self.m + head


def _forward_kernel(value_ref, loc_ref, attn_ref, out_ref, *, layout):
  b, head, qrows = layout.program_rows()
  cols, lane_mask = layout.lanes()
  acc = jnp.zeros((layout.block_q, layout.dp), jnp.float32)
  for sample, (_, _, start, h, w) in enumerate(bilinear.samples(layout.shapes, layout.num_points)):
    a, taps = layout.taps(loc_ref, attn_ref, qrows, sample, h, w)
    for tap in taps:
      rows = layout.value_rows(b, head, start, tap)
      tile = plgpu.load(value_ref.at[rows[:, None] * layout.dh + cols[None, :]],
                        mask=lane_mask, other=0.0)
      acc += tile.astype(jnp.float32) * (tap.weight * a)[:, None]
  plgpu.store(out_ref.at[qrows[:, None] * layout.dh + cols[None, :]], acc, mask=lane_mask)


def _backward_kernel(value_ref, loc_ref, attn_ref, g_ref, _, grad_value_ref, grad_loc_ref,
                     grad_attn_ref, *, layout):
  b, head, qrows = layout.program_rows()
  cols, lane_mask = layout.lanes()
  g = plgpu.load(g_ref.at[qrows[:, None] * layout.dh + cols[None, :]], mask=lane_mask,
                 other=0.0).astype(jnp.float32)
  for sample, (_, _, start, h, w) in enumerate(bilinear.samples(layout.shapes, layout.num_points)):
    a, taps = layout.taps(loc_ref, attn_ref, qrows, sample, h, w)
    d_attn = d_fx = d_fy = jnp.zeros((layout.block_q,), jnp.float32)
    for tap in taps:
      rows = layout.value_rows(b, head, start, tap)
      tile = plgpu.load(value_ref.at[rows[:, None] * layout.dh + cols[None, :]],
                        mask=lane_mask, other=0.0).astype(jnp.float32)
      dot = jnp.sum(tile * g, axis=1) * tap.inside
      d_attn += dot * tap.wx * tap.wy
      d_fx += dot * tap.sx * tap.wy
      d_fy += dot * tap.wx * tap.sy
      # Padding lanes add zeros into the padded columns of their own row (no mask needed).
      plgpu.atomic_add(grad_value_ref, rows[:, None] * layout.dp + cols[None, :],
                       g * (tap.weight * a)[:, None])
    base = qrows * layout.num_samples + sample
    grad_attn_ref[base] = d_attn
    grad_loc_ref[base * 2] = d_fx * a * w
    grad_loc_ref[base * 2 + 1] = d_fy * a * h


def _pad_queries(x, lq_pad):
  return jnp.pad(x, [(0, 0), (0, lq_pad - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _flat_inputs(layout, sampling_locations, attention_weights):
  loc = _pad_queries(sampling_locations.astype(jnp.float32), layout.lq_pad).reshape(-1)
  attn = _pad_queries(attention_weights.astype(jnp.float32), layout.lq_pad).reshape(-1)
  return loc, attn


def _interpret(interpret):
  return jax.default_backend() != 'gpu' if interpret is None else interpret


def pallas_forward(value, shapes, sampling_locations, attention_weights, *, block_q=None,
                   interpret=None):
  """The forward kernel; returns `[B, Lq, M*Dh]` in value's dtype."""
  layout = _Layout(value.shape, shapes, sampling_locations.shape[1],
                   sampling_locations.shape[4], block_q or FORWARD_BLOCK_Q)
  loc, attn = _flat_inputs(layout, sampling_locations, attention_weights)
  out = pl.pallas_call(
      functools.partial(_forward_kernel, layout=layout),
      out_shape=jax.ShapeDtypeStruct((layout.b * layout.lq_pad * layout.m * layout.dh,),
                                     jnp.float32),
      grid=layout.grid,
      interpret=_interpret(interpret),
      name='ms_deform_attn_fwd',
  )(jnp.asarray(value).reshape(-1), loc, attn)
  out = out.reshape(layout.b, layout.lq_pad, layout.m * layout.dh)[:, :layout.lq]
  return out.astype(value.dtype)


def pallas_backward(value, shapes, sampling_locations, attention_weights, grad_out, *,
                    block_q=None, interpret=None):
  """The backward kernel: gradients w.r.t. value, sampling locations, attention weights."""
  layout = _Layout(value.shape, shapes, sampling_locations.shape[1],
                   sampling_locations.shape[4], block_q or BACKWARD_BLOCK_Q)
  loc, attn = _flat_inputs(layout, sampling_locations, attention_weights)
  g = _pad_queries(grad_out, layout.lq_pad).reshape(-1)
  rows = layout.b * layout.s * layout.m
  grad_value, grad_loc, grad_attn = pl.pallas_call(
      functools.partial(_backward_kernel, layout=layout),
      out_shape=(jax.ShapeDtypeStruct((rows * layout.dp,), jnp.float32),
                 jax.ShapeDtypeStruct(loc.shape, jnp.float32),
                 jax.ShapeDtypeStruct(attn.shape, jnp.float32)),
      grid=layout.grid,
      input_output_aliases={4: 0},  # the zero-initialised f32 value-gradient accumulator
      interpret=_interpret(interpret),
      name='ms_deform_attn_bwd',
  )(jnp.asarray(value).reshape(-1), loc, attn, g, jnp.zeros((rows * layout.dp,), jnp.float32))
  grad_value = grad_value.reshape(rows, layout.dp)[:, :layout.dh].reshape(value.shape)
  grad_loc = grad_loc.reshape(sampling_locations.shape[:1] + (layout.lq_pad,) +
                              sampling_locations.shape[2:])[:, :layout.lq]
  grad_attn = grad_attn.reshape(attention_weights.shape[:1] + (layout.lq_pad,) +
                                attention_weights.shape[2:])[:, :layout.lq]
  return (grad_value.astype(value.dtype), grad_loc.astype(sampling_locations.dtype),
          grad_attn.astype(attention_weights.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 4))
def _ms_deform_attn(value, shapes, sampling_locations, attention_weights, options):
  block_q, _, interpret = options
  return pallas_forward(value, shapes, sampling_locations, attention_weights, block_q=block_q,
                        interpret=interpret)


def _fwd(value, shapes, sampling_locations, attention_weights, options):
  out = _ms_deform_attn(value, shapes, sampling_locations, attention_weights, options)
  return out, (value, sampling_locations, attention_weights)


def _bwd(shapes, options, residuals, grad_out):
  _, block_q, interpret = options
  value, sampling_locations, attention_weights = residuals
  return pallas_backward(value, shapes, sampling_locations, attention_weights, grad_out,
                         block_q=block_q, interpret=interpret)


_ms_deform_attn.defvjp(_fwd, _bwd)


def ms_deform_attn_pallas(value, shapes, sampling_locations, attention_weights, *,
                          block_q=None, backward_block_q=None, interpret=None):
  """Differentiable Pallas core, `[B, Lq, M*Dh]`; interpret mode by default off-GPU.

  `block_q` / `backward_block_q`: queries per program (powers of two). In interpret mode the
  backward's atomic adds lose updates when one program repeats an index; `backward_block_q=1`
  makes every atomic add touch distinct elements, so interpret mode is exact (the default there).
  """
  interpret = _interpret(interpret)
  if backward_block_q is None and interpret:
    backward_block_q = 1
  return _ms_deform_attn(value, tuple(shapes), sampling_locations, attention_weights,
                         (block_q, backward_block_q, interpret))
