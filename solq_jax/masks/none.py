"""The coder of a detection-only model (`config.model.with_masks=False`, the paper's "det"
row and Deformable DETR): zero-length vectors, no masks.

The input pipeline then builds `vectors [B,G,0]` without cropping or encoding a mask, the
criterion has no vector term, and post-processing skips decoding and pasting (bbox-only COCO
evaluation). Decoding is refused: there is nothing to decode.
"""
import jax.numpy as jnp
import numpy as np

from solq_jax.masks import base


class NoMaskCoder(base.MaskCoder):
  """Zero-length mask vectors (detection only)."""

  has_masks = False
  mask_size = 0
  num_coeffs = 0

  def __repr__(self):
    return 'NoMaskCoder()'

  def encode(self, masks, boxes_xyxy, image_hw=None):
    return jnp.zeros((jnp.shape(masks)[0], 0), jnp.float32)

  def encode_np(self, masks, boxes_xyxy, image_hw=None):
    return np.zeros((np.shape(masks)[0], 0), np.float32)

  def reconstruct(self, vectors):
    raise ValueError('a detection-only model (config.model.with_masks=False) has no masks')

  def decode(self, vectors):
    raise ValueError('a detection-only model (config.model.with_masks=False) has no masks')
