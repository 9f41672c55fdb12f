"""The bilinear corner math of deformable attention, shared by every core.

Sampling follows `torch.nn.functional.grid_sample(align_corners=False, padding_mode='zeros')`: a
normalised location (x, y) maps to pixel coordinates `u = x * W - 0.5`, `v = y * H - 0.5` of its
level, and each of the 4 bilinear corners that falls outside the map contributes zero. The Pallas
kernel (kernels/ms_deform_attn.py) and the XLA core (solq_jax/ops/ms_deform_attn.py) both take
their taps from here, so the two cannot drift apart.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Tap(NamedTuple):
  """One bilinear corner of a batch of samples (all fields broadcast to the sample shape)."""
  index: jax.Array   # int32 flat pixel index `row * W + col`, clipped into the map
  inside: jax.Array  # 1.0 where the corner lies on the map, else 0.0
  wx: jax.Array      # horizontal bilinear factor (1 - fx or fx)
  wy: jax.Array      # vertical bilinear factor (1 - fy or fy)
  sx: float          # d wx / d fx (-1 or +1)
  sy: float          # d wy / d fy (-1 or +1)

  @property
  def weight(self):
    return self.inside * self.wx * self.wy


def bilinear_taps(loc, height, width):
  """The 4 bilinear corners of normalised locations `loc [..., 2]` on a `height x width` map."""
  return bilinear_taps_xy(loc[..., 0], loc[..., 1], height, width)


def bilinear_taps_xy(x, y, height, width):
  """`bilinear_taps` for separate x and y arrays (the form the Pallas kernel loads)."""
  u = x * width - 0.5
  v = y * height - 0.5
  x0 = jnp.floor(u)
  y0 = jnp.floor(v)
  fx = u - x0
  fy = v - y0
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)
  taps = []
  for dy, wy, sy in ((0, 1 - fy, -1.0), (1, fy, 1.0)):
    for dx, wx, sx in ((0, 1 - fx, -1.0), (1, fx, 1.0)):
      col = x0 + dx
      row = y0 + dy
      inside = ((col >= 0) & (col < width) & (row >= 0) & (row < height)).astype(u.dtype)
      index = jnp.clip(row, 0, height - 1) * width + jnp.clip(col, 0, width - 1)
      taps.append(Tap(index, inside, wx, wy, sx, sy))
  return taps


def accumulation_dtype(value):
  """f32 for f32/bf16/f16 values (f64 stays f64, for float64 gradient checks)."""
  return jnp.promote_types(value.dtype, jnp.float32)


def samples(shapes, num_points):
  """Yields `(level, point, level_start, H, W)` for every sample of a query, in order."""
  start = 0
  for lvl, (h, w) in enumerate(shapes):
    for pt in range(num_points):
      yield lvl, pt, start, h, w
    start += h * w
