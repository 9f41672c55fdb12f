"""The multi-scale deformable attention module (the official MSDeformAttn).

Projections and sampling-location arithmetic live here; the bilinear sampling itself is the core
function `solq_jax.ops.ms_deform_attn.ms_deform_attn_core`, chosen by `impl`.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from solq_jax.models.layers import constant_vector, xavier_uniform
from solq_jax.ops.ms_deform_attn import ms_deform_attn_core


def sampling_offset_bias(n_heads, n_levels, n_points):
  """Official init of the `sampling_offsets` bias, flattened `[heads, levels, points, 2]`.

  Head h points along angle 2*pi*h/heads, scaled so the larger of |cos|, |sin| is 1, and point
  p sits at distance p + 1 along it; identical for all levels.
  """
  thetas = np.arange(n_heads, dtype=np.float32) * np.float32(2.0 * math.pi / n_heads)
  grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
  grid = grid / np.abs(grid).max(-1, keepdims=True)
  grid = np.tile(grid[:, None, None, :], (1, n_levels, n_points, 1))
  grid = grid * np.arange(1, n_points + 1, dtype=np.float32)[None, None, :, None]
  return grid.reshape(-1).astype(np.float32)


def sampling_locations_from_reference(reference_points, offsets, spatial_shapes):
  """Normalised sampling locations `[B, Lq, M, L, P, 2]`.

  Args:
    reference_points: `[B, Lq, L, 2]` points (x, y) or `[B, Lq, L, 4]` boxes (cx, cy, w, h),
      normalised, already multiplied by the valid ratios.
    offsets: `[B, Lq, M, L, P, 2]` raw sampling offsets.
    spatial_shapes: static `(H_l, W_l)` per level.
  Points: `ref + offset / (W_l, H_l)` (offsets in pixels of each level). Boxes:
  `ref_xy + offset / P * ref_wh * 0.5`.
  """
  ref = reference_points[:, :, None, :, None, :]
  if reference_points.shape[-1] == 2:
    normalizer = jnp.asarray([[w, h] for h, w in spatial_shapes], jnp.float32)
    return ref + offsets / normalizer[None, None, None, :, None, :]
  if reference_points.shape[-1] == 4:
    n_points = offsets.shape[4]
    return ref[..., :2] + offsets / n_points * ref[..., 2:] * 0.5
  raise ValueError('reference_points must end in 2 (points) or 4 (boxes), got shape '
                   f'{reference_points.shape}')


class MSDeformAttn(nn.Module):
  """Multi-scale deformable attention (Zhu et al. 2021) with the official initialisation."""
  d_model: int
  n_levels: int
  n_heads: int
  n_points: int
  impl: str = 'xla'
  dtype: Any = jnp.float32      # computation dtype of the projections and the sampled values

  @nn.compact
  def __call__(self, query, reference_points, input_flatten, spatial_shapes, padding_mask=None):
    """query `[B, Lq, D]`, reference_points `[B, Lq, L, 2|4]`, input_flatten `[B, S, D]`,
    spatial_shapes static `((H_l, W_l), ...)`, padding_mask `[B, S]` (True = padding).

    The four projections run in `dtype`; the softmax and the sampling locations are float32
    (a bf16 location would be off by up to half a pixel on a 100-pixel map); the core samples
    `dtype` values with `dtype` attention weights and accumulates in float32."""
    d, m, nl, p = self.d_model, self.n_heads, self.n_levels, self.n_points
    if d % m:
      raise ValueError(f'hidden_dim {d} must be divisible by nheads {m}')
    if len(spatial_shapes) != nl:
      raise ValueError(f'{len(spatial_shapes)} spatial shapes for {nl} levels')
    b, lq, _ = query.shape
    s = input_flatten.shape[1]
    dense = lambda features, name, kernel_init=xavier_uniform, bias_init=nn.initializers.zeros: (
        nn.Dense(features, kernel_init=kernel_init, bias_init=bias_init, dtype=self.dtype,
                 name=name))
    value = dense(d, 'value_proj')(input_flatten)
    if padding_mask is not None:
      value = jnp.where(padding_mask[..., None], 0.0, value)
    value = value.reshape(b, s, m, d // m)
    # Two matmuls of the query: concatenating the kernels into one was slower on XLA:CPU.
    offsets = dense(m * nl * p * 2, 'sampling_offsets', nn.initializers.zeros,
                    constant_vector(sampling_offset_bias(m, nl, p)))(query)
    offsets = offsets.reshape(b, lq, m, nl, p, 2).astype(jnp.float32)
    logits = dense(m * nl * p, 'attention_weights', nn.initializers.zeros)(query)
    weights = jax.nn.softmax(logits.reshape(b, lq, m, nl * p).astype(jnp.float32), axis=-1)
    weights = weights.reshape(b, lq, m, nl, p).astype(self.dtype)
    locations = sampling_locations_from_reference(reference_points, offsets, spatial_shapes)
    out = ms_deform_attn_core(value, tuple(spatial_shapes), locations, weights, impl=self.impl)
    return dense(d, 'output_proj')(out)
