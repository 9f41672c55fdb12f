"""The flatten coder (paper Table 3a): the binary box crop itself, `mask_size**2` values.

The vector is the RoIAlign crop (`roi_align.py`, same as the DCT coder's) flattened row-major
as 0/1 floats; decoding reshapes and keeps values `>= 0.5`. The paper uses mask_size 28 (784-d).
"""
import jax.numpy as jnp
import numpy as np

from solq_jax.masks import base


class FlattenCoder(base.BoxCropCoder):
  """Box-relative mask as a flat `mask_size**2` vector."""

  def __init__(self, mask_size=28):
    self.mask_size = int(mask_size)
    self.num_coeffs = self.mask_size * self.mask_size

  def __repr__(self):
    return f'FlattenCoder(mask_size={self.mask_size})'

  def transform(self, crops):
    crops = jnp.asarray(crops)
    return crops.reshape(crops.shape[0], -1).astype(jnp.float32)

  def transform_np(self, crops):
    crops = np.asarray(crops)
    return crops.reshape(crops.shape[0], -1).astype(np.float32)

  def reconstruct(self, vectors):
    vectors = jnp.asarray(vectors, jnp.float32)
    return vectors.reshape(vectors.shape[0], self.mask_size, self.mask_size)

  def decode(self, vectors):
    return self.reconstruct(vectors) >= 0.5
