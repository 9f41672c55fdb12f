"""The mask-coder interface shared by the model, the input pipeline, the losses and the evaluator.

A coder turns a full-image binary mask plus its box into a fixed-length vector (the supervision
target of the UQR vector head) and a vector back into a box-relative `mask_size x mask_size` mask.
Concrete coders: `dct` (default, official SOLQ), `pca`, `flatten`, `sparse` (and `none.py`, the
detection-only coder); `build_coder(model_config)`
picks one from `config.model.mask_coder`.
"""
import abc
import os

import numpy as np

from solq_jax.masks import roi_align


def read_fitted_npz(path, keys, coder, field, what):
  """The arrays `keys` of a coder's fitted `.npz` (`config.model.<field>`); a ValueError naming
  the field or the file when it is unset, missing or lacks a key. `what` names the file's
  kind in messages, e.g. 'PCA'."""
  if not path:
    raise ValueError(f"config.model.mask_coder='{coder}' needs config.model.{field} (an .npz "
                     f'written by `python -m solq_jax.masks.fit_{coder}`)')
  if not os.path.isfile(path):
    raise ValueError(f'{what} file not found: {path!r} (config.model.{field})')
  try:
    with np.load(path) as data:
      return {k: data[k] for k in keys}
  except (KeyError, OSError, ValueError) as err:
    raise ValueError(f'{what} file {path!r} is not a valid {what} .npz (needs keys {keys}): '
                     f'{err}') from err


class MaskCoder(abc.ABC):
  """Box-relative mask coding. All `jnp` methods are jit- and vmap-able."""

  mask_size: int      # N: side of the box-relative mask
  num_coeffs: int     # length of a mask vector
  has_masks = True    # False only for the detection-only coder (masks/none.py)

  @abc.abstractmethod
  def encode(self, masks, boxes_xyxy):
    """`masks` bool `[N,H,W]` (full image), `boxes_xyxy` `[N,4]` absolute pixels -> float32 `[N,num_coeffs]` (jnp)."""

  @abc.abstractmethod
  def encode_np(self, masks, boxes_xyxy):
    """Host (numpy) twin of `encode` for the input pipeline; equal values."""

  @abc.abstractmethod
  def reconstruct(self, vectors):
    """Vectors `[N,num_coeffs]` -> float `[N,mask_size,mask_size]`, the soft (pre-threshold)
    reconstruction. Differentiable; used by spatial-domain losses."""

  @abc.abstractmethod
  def decode(self, vectors):
    """Vectors `[N,num_coeffs]` -> bool `[N,mask_size,mask_size]` with the coder's threshold."""


class BoxCropCoder(MaskCoder):
  """A coder whose vector is a transform of the binary RoIAlign box crop (all three coders).

  Subclasses define `transform` (jnp) and `transform_np` (numpy): box crops `[B,N,N]` ->
  vectors `[B,num_coeffs]`; `encode` = crop (`roi_align.crop_masks`) then transform.
  `image_hw [B,2]` (optional): the true (h, w) of each mask's image when the masks are
  batch-padded, so device-side encoding matches the host's unpadded crop.
  """

  @abc.abstractmethod
  def transform(self, crops):
    """Box crops `[B,N,N]` -> float32 `[B,num_coeffs]` (jnp)."""

  @abc.abstractmethod
  def transform_np(self, crops):
    """Numpy twin of `transform`."""

  def encode(self, masks, boxes_xyxy, image_hw=None):
    return self.transform(roi_align.crop_masks(masks, boxes_xyxy, self.mask_size, image_hw))

  def encode_np(self, masks, boxes_xyxy, image_hw=None):
    return self.transform_np(roi_align.crop_masks_np(masks, boxes_xyxy, self.mask_size, image_hw))
