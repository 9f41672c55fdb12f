"""Mask coding: ground-truth masks <-> fixed-length vectors, and pasting masks into images.

    coder = build_coder(config.model)           # 'dct' (default) | 'pca' | 'flatten' | 'sparse'
    vectors = coder.encode(masks, boxes_xyxy)   # bool [N,H,W] full-image masks -> [N,num_coeffs]
    crops = coder.decode(vectors)               # -> bool [N,mask_size,mask_size], box-relative
    image_masks = paste_masks(crops, boxes_xyxy, (H, W))   # -> bool [N,H,W]
"""
from solq_jax.masks.base import MaskCoder
from solq_jax.masks.dct import DCTCoder
from solq_jax.masks.dct import dct_matrix
from solq_jax.masks.dct import zigzag_indices
from solq_jax.masks.flatten import FlattenCoder
from solq_jax.masks.none import NoMaskCoder
from solq_jax.masks.paste import paste_masks
from solq_jax.masks.paste import paste_masks_np
from solq_jax.masks.pca import PCACoder
from solq_jax.masks.roi_align import crop_masks
from solq_jax.masks.roi_align import crop_masks_np
from solq_jax.masks.sparse import SparseCoder

CODERS = ('dct', 'pca', 'flatten', 'sparse')


def build_coder(model_config):
  """The mask coder `config.model.mask_coder` selects, sized by `mask_size` and `num_coeffs`.

  Accepts the model section (or a whole config with a `model` section). Raises ValueError for an
  unknown coder, a flatten coder whose `num_coeffs != mask_size**2`, or a missing/mismatched PCA
  file (`config.model.pca_path`) or dictionary file (`config.model.sparse_path`). A
  detection-only model (`config.model.with_masks=False`) gets the `NoMaskCoder`.
  """
  cfg = model_config.model if 'model' in model_config else model_config
  if not cfg.with_masks:
    return NoMaskCoder()
  kind = cfg.mask_coder
  if kind == 'dct':
    return DCTCoder(cfg.mask_size, cfg.num_coeffs)
  if kind == 'flatten':
    if cfg.num_coeffs != cfg.mask_size ** 2:
      raise ValueError(f"config.model.mask_coder='flatten' needs num_coeffs == mask_size**2, got "
                       f'num_coeffs={cfg.num_coeffs}, mask_size={cfg.mask_size} (paper: 28, 784)')
    return FlattenCoder(cfg.mask_size)
  if kind == 'pca':
    return PCACoder.from_file(cfg.pca_path, cfg.mask_size, cfg.num_coeffs)
  if kind == 'sparse':
    return SparseCoder.from_file(cfg.sparse_path, cfg.mask_size, cfg.num_coeffs)
  raise ValueError(f'unknown config.model.mask_coder {kind!r}; expected one of {CODERS}')


__all__ = ['MaskCoder', 'DCTCoder', 'FlattenCoder', 'PCACoder', 'SparseCoder', 'NoMaskCoder', 'build_coder', 'zigzag_indices',
           'dct_matrix', 'paste_masks', 'paste_masks_np', 'crop_masks', 'crop_masks_np', 'CODERS']
