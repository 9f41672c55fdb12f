"""Paste box-relative masks into the image, as detectron2 `paste_masks_in_image`, which the official post-processing calls.

For every output pixel (y, x) the official code samples the `S x S` mask with
`grid_sample(bilinear, align_corners=False, padding zeros)` at

    gx = ((x + 0.5) - x0) / (x1 - x0) * 2 - 1,   gy likewise,

and keeps `value >= 0.5`. The box is not clipped. The sample position in mask pixels is
`((g + 1) * S - 1) / 2`; its two bilinear taps per axis get weight 0 outside `[0, S-1]`.

Separable formulation: the bilinear weight of a tap is (row weight) x (column weight), so each
mask is first interpolated along x for all its rows (`[B,S,W]`, two gathered columns per output
column), then along y (`[B,H,W]`, two gathered rows per output row). Two implementations with
the same per-pixel arithmetic: 'dense' (whole batch over the whole image: accelerators) and
'tiled' (a loop over masks, each over strips of rows of a column band around its box,
`tiling.strip_loop`: CPU). The coordinate arithmetic follows torch's float32 operation order;
the summation order of the four taps and XLA:CPU's division (not correctly rounded) can differ
in the last bit, which matters only for a value within float32 rounding of the 0.5 threshold.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from solq_jax.masks import roi_align
from solq_jax.masks import tiling


def _axis_taps(xp, lo, hi, pixels, mask_size):
  """Taps along one axis for integer pixel indices `pixels [B or 1,L]` -> (i0, i1, w0, w1) `[B,L]`."""
  f32 = np.float32
  centre = pixels.astype(f32) + f32(0.5)
  grid = (centre - lo[:, None]) / (hi - lo)[:, None] * f32(2.0) - f32(1.0)
  src = (roi_align.rounded(xp, (grid + f32(1.0)) * f32(mask_size)) - f32(1.0)) / f32(2.0)
  src = xp.where(xp.isfinite(src), src, f32(-2.0))   # degenerate box: sample nothing
  i0 = xp.floor(src)
  i1 = i0 + f32(1.0)
  w0 = xp.where((i0 >= 0) & (i0 <= mask_size - 1), i1 - src, f32(0.0))
  w1 = xp.where((i1 >= 0) & (i1 <= mask_size - 1), src - i0, f32(0.0))
  i0 = xp.clip(i0, 0, mask_size - 1).astype(np.int32)
  i1 = xp.clip(i1, 0, mask_size - 1).astype(np.int32)
  return i0, i1, w0, w1


def _column_pass(xp, masks, boxes, xs):
  """Masks `[B,S,S]` interpolated along x at pixel columns `xs [B|1,Tx]` -> `[B,S,Tx]`."""
  x0, x1, wx0, wx1 = _axis_taps(xp, boxes[:, 0], boxes[:, 2], xs, masks.shape[-1])
  cols = (wx0[:, None, :] * xp.take_along_axis(masks, x0[:, None, :], axis=2)
          + wx1[:, None, :] * xp.take_along_axis(masks, x1[:, None, :], axis=2))   # [B,S,Tx]
  if xp is jnp:   # materialise: fused into the next gather, XLA would recompute it per pixel
    cols = jax.lax.optimization_barrier(cols)
  return cols


def _row_pass(xp, cols, boxes, ys, threshold):
  """`_column_pass` output interpolated along y at pixel rows `ys [B|1,Ty]`, `>= threshold`
  -> `[B,Ty,Tx]`."""
  y0, y1, wy0, wy1 = _axis_taps(xp, boxes[:, 1], boxes[:, 3], ys, cols.shape[1])
  image = (wy0[:, :, None] * xp.take_along_axis(cols, y0[:, :, None], axis=1)
           + wy1[:, :, None] * xp.take_along_axis(cols, y1[:, :, None], axis=1))  # [B,Ty,Tx]
  return image >= threshold


def _paste_pixels(xp, masks, boxes, ys, xs, threshold):
  """Pasted values `>= threshold` at pixel rows `ys [B|1,Ty]` x columns `xs [B|1,Tx]` -> `[B,Ty,Tx]`."""
  return _row_pass(xp, _column_pass(xp, masks, boxes, xs), boxes, ys, threshold)


def _paste_dense(xp, masks, boxes, image_hw, threshold):
  """Every mask over the whole image at once (accelerators; the numpy twin)."""
  ys = xp.arange(image_hw[0], dtype=np.int32)[None, :]
  xs = xp.arange(image_hw[1], dtype=np.int32)[None, :]
  return _paste_pixels(xp, masks, boxes, ys, xs, threshold)


def _paste_tiled(masks, boxes, image_hw, threshold):
  """One mask at a time over the rows of its region (`tiling.strip_loop`): the fast path on CPU.

  Per mask, the column pass runs once over a band of columns holding its region, then the row
  pass fills the region's rows strip by strip. Same per-pixel arithmetic as `_paste_dense`;
  pixels outside detectron2's region stay False, as in detectron2's CPU paste (their value is
  < 0.5 for masks in [0, 1]).
  """
  def prepare(i, ox, band_w):
    box = jax.lax.dynamic_slice_in_dim(boxes, i, 1)
    xs = (jnp.arange(band_w, dtype=jnp.int32) + ox)[None, :]
    return box, _column_pass(jnp, masks[i][None], box, xs)

  def write_strip(out, state, i, oy, ox, strip_h):
    box, cols = state
    ys = (jnp.arange(strip_h, dtype=jnp.int32) + oy)[None, :]
    return jax.lax.dynamic_update_slice(out, _row_pass(jnp, cols, box, ys, threshold),
                                        (i, oy, ox))

  init = jnp.zeros((masks.shape[0],) + tuple(image_hw), bool)
  return tiling.strip_loop(boxes, image_hw, prepare, write_strip, init)


@functools.partial(jax.jit, static_argnames=('image_hw', 'threshold', 'impl'))
def _paste_jit(masks, boxes, image_hw, threshold, impl):
  masks = masks.astype(jnp.float32)
  boxes = boxes.astype(jnp.float32)
  if impl == 'tiled':
    return _paste_tiled(masks, boxes, image_hw, threshold)
  return _paste_dense(jnp, masks, boxes, image_hw, threshold)


def paste_masks(masks, boxes_xyxy, image_hw, threshold=0.5, impl='auto'):
  """Paste `masks [B,S,S]` (bool, or soft in [0, 1]) into boxes `[B,4]` (absolute xyxy, not
  clipped) of an image of static size `image_hw = (H, W)` -> bool `[B,H,W]` (jnp, jit-able).

  `impl`: 'dense' (all masks over the whole image at once: accelerators), 'tiled' (a loop over
  masks, each over row strips around its box: less work on CPU), 'auto' (tiled on CPU). Both
  give the same pixels. A zero-width/height or non-finite box pastes an empty mask.
  """
  image_hw = (int(image_hw[0]), int(image_hw[1]))
  return _paste_jit(jnp.asarray(masks), jnp.asarray(boxes_xyxy), image_hw, float(threshold),
                    tiling.resolve_impl(impl))


def paste_masks_np(masks, boxes_xyxy, image_hw, threshold=0.5):
  """Numpy twin of `paste_masks` (host-side post-processing, tests)."""
  image_hw = (int(image_hw[0]), int(image_hw[1]))
  masks = np.asarray(masks).astype(np.float32)
  boxes = np.asarray(boxes_xyxy).astype(np.float32)
  return _paste_dense(np, masks, boxes, image_hw, float(threshold))
