"""Sine position encoding and padding-mask down-sampling, as Deformable DETR computes them.

Both are pure functions of the padding mask (True on padding), channels-last.
"""
import math

import jax.numpy as jnp
import numpy as np

from solq_jax import box_ops


def sine_features(values, num_pos_feats, temperature=10000.0):
  """`values [...]` -> `[..., num_pos_feats]`: feature `i` is `values / temperature ** (2 *
  (i // 2) / num_pos_feats)`, sin for even `i` and cos for odd `i` (interleaved)."""
  dim_t = np.arange(num_pos_feats, dtype=np.float32)
  dim_t = np.float32(temperature) ** (2 * (dim_t // 2) / np.float32(num_pos_feats))
  pos = values[..., None] / jnp.asarray(dim_t, jnp.float32)
  sin_cos = jnp.stack([jnp.sin(pos[..., 0::2]), jnp.cos(pos[..., 1::2])], axis=-1)
  return sin_cos.reshape(pos.shape)


def sine_position_encoding(pad_mask, num_pos_feats, temperature=10000.0, scale=2 * math.pi,
                           eps=1e-6):
  """Deformable-DETR sine encoding of a padding mask `[B, H, W]` -> `[B, H, W, 2*num_pos_feats]`.

  The cumulative counts of unpadded pixels along each axis (1-based) are shifted by -0.5,
  divided by the last count plus `eps` and scaled to `[0, scale)`, then `sine_features`.
  Channels are `[pos_y, pos_x]` (y first).
  """
  not_mask = jnp.logical_not(pad_mask).astype(jnp.float32)
  y_embed = jnp.cumsum(not_mask, axis=1)
  x_embed = jnp.cumsum(not_mask, axis=2)
  y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * scale
  x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * scale
  return jnp.concatenate([sine_features(y_embed, num_pos_feats, temperature),
                          sine_features(x_embed, num_pos_feats, temperature)], axis=-1)


def downsample_mask(pad_mask, out_hw):
  """Padding mask `[B, H, W]` resized to `out_hw` by legacy nearest (a gather, not a max)."""
  h, w = pad_mask.shape[1:]
  rows = box_ops.legacy_nearest_indices(h, out_hw[0])
  cols = box_ops.legacy_nearest_indices(w, out_hw[1])
  return pad_mask[:, rows][:, :, cols]
