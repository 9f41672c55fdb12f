"""The ground-truth crop: RoIAlign of a full-image binary mask to its box, as the official code.

Official SOLQ crops with detectron2 `BitMasks.crop_and_resize`, i.e. torchvision
`roi_align(mask, box, (S, S), spatial_scale=1, sampling_ratio=0, aligned=True)` followed by
`>= 0.5`. Per output bin (ph, pw) it averages `g_h x g_w` bilinear samples,
`g = ceil(box_extent / S)` (adaptive), at

    y = (y0 - 0.5 + ph * bin_h) + (iy + 0.5) * bin_h / g_h        (same for x)

A sample with y < -1, y > H, x < -1 or x > W reads 0; otherwise y is clamped to [0, H-1]
(torchvision `bilinear_interpolate`).

Exact jit-able formulation. The bilinear tap is a product of a row weight and a column weight,
and the out-of-image test is a product of a row test and a column test, so the bin average is
separable: for every sample index iy we gather the two mask rows each bin touches and
accumulate them with their weights (`[B,S,W]`), then do the same over columns (`[B,S,S]`).
The sample count is data-dependent, so the sample loop runs to the batch maximum of `g`
(a `fori_loop` with a traced bound under jit: no static cap, any box size is exact) and masks
the samples `i >= g` of each box with weight 0. The coordinate arithmetic is written in
torchvision's float32 operation order, and the binary crop is `sum >= 0.5 * count` (exact
scaling) rather than `sum / count >= 0.5`. The numpy twin is the same code run with numpy.
Summation order differs from torchvision's, and XLA:CPU's float32 division is not correctly
rounded (1 ulp), so a bin whose exact average lies within ~1e-6 of 0.5 can differ between
torchvision, the numpy twin and jnp; everything else is identical (tests; the benchmark counts
such pixels on real COCO masks).

`image_hw` lets device code crop batch-padded masks with the unpadded semantics of the host
(a deliberate difference from the official code, docs/deviations.md: clamp at the true image
edge instead of reading padding zeros).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from solq_jax.masks import tiling


def _axis_plan(xp, lo, hi, out_size):
  """Per box along one axis: (start, bin_size, grid) in torchvision's float32 arithmetic.

  grid = ceil(extent / S) samples per bin; a non-finite or non-positive extent samples nothing.
  """
  start = lo - np.float32(0.5)                    # aligned=True: shift by half a pixel
  extent = (hi - np.float32(0.5)) - start
  bin_size = extent / np.float32(out_size)
  grid = xp.where(xp.isfinite(bin_size), xp.clip(xp.ceil(bin_size), 0, 1 << 20), 0)
  return start, bin_size, grid.astype(np.int32)


def rounded(xp, product):
  """`product`, rounded to float32 before it is used in a sum.

  XLA:CPU contracts `a * b + c` into a fused multiply-add (one rounding); numpy and torchvision
  round the product first. A barrier stops the contraction. Used only where a product is
  inexact and then added (on small arrays).
  """
  return jax.lax.optimization_barrier(product) if xp is jnp else product


def _taps(xp, start, bin_size, grid, size, i, out_size, offset, extent):
  """Bilinear taps of sample `i` of every bin along one axis.

  Args:
    xp: numpy or jax.numpy.
    start, bin_size: float32 `[B]`.
    grid: int32 `[B]` samples per bin.
    size: float32 `[B]` true image extent along this axis.
    i: sample index (Python int or traced int32).
    out_size: number of bins S.
    offset: float32 `[B]` image row/column of index 0 of the array the taps index (a tile).
    extent: that array's length along this axis.

  Returns:
    `(lo, hi, w_lo, w_hi)`, each `[B,S]`: int32 indices into the array and float32 weights
    (0 for samples that do not exist or lie outside the image).
  """
  f32 = np.float32
  bins = xp.arange(out_size, dtype=f32)[None, :]
  g = xp.maximum(grid, 1).astype(f32)[:, None]
  pos = (start[:, None] + rounded(xp, bins * bin_size[:, None])) + (
      rounded(xp, (i + f32(0.5)) * bin_size[:, None]) / g)
  size = size[:, None]
  valid = (pos >= f32(-1.0)) & (pos <= size) & (i < grid[:, None])
  pos = xp.where(valid, xp.maximum(pos, f32(0.0)), f32(0.0))
  lo = xp.floor(pos)
  edge = lo >= size - f32(1.0)
  lo = xp.where(edge, size - f32(1.0), lo)
  pos = xp.where(edge, lo, pos)
  hi = xp.where(edge, lo, lo + f32(1.0))
  frac = pos - lo
  w_lo = xp.where(valid, f32(1.0) - frac, f32(0.0))
  w_hi = xp.where(valid, frac, f32(0.0))
  offset = offset[:, None]
  lo = xp.clip(lo - offset, 0, extent - 1).astype(np.int32)   # clip: only weight-0 taps move
  hi = xp.clip(hi - offset, 0, extent - 1).astype(np.int32)
  return lo, hi, w_lo, w_hi


def _rows(xp, masks, taps):
  """`w_lo * mask[lo] + w_hi * mask[hi]` over rows: `[B,H,W]` 0/1 -> `[B,S,W]` (exact products)."""
  lo, hi, w_lo, w_hi = (a[:, :, None] for a in taps)
  v_lo = xp.take_along_axis(masks, lo, axis=1).astype(np.float32)
  v_hi = xp.take_along_axis(masks, hi, axis=1).astype(np.float32)
  return w_lo * v_lo + w_hi * v_hi


def _cols(xp, values, taps):
  """The same over columns of the soft row averages: `[B,S,W]` -> `[B,S,S]`."""
  lo, hi, w_lo, w_hi = (a[:, None, :] for a in taps)
  v_lo = xp.take_along_axis(values, lo, axis=2)
  v_hi = xp.take_along_axis(values, hi, axis=2)
  return rounded(xp, w_lo * v_lo) + rounded(xp, w_hi * v_hi)


def _roi_align(xp, loop, masks, boxes, out_size, image_hw, origin=None):
  """Shared body of the jnp and numpy versions -> (sum of samples `[B,S,S]`, count `[B,1,1]`).

  `origin` (optional, float32 `[B]` rows and columns): image position of `masks[:, 0, 0]` when
  `masks` are tiles cut from the images (the tiled path); the arithmetic stays in image
  coordinates, so the result is identical.
  """
  f32 = np.float32
  boxes = boxes.astype(f32)
  image_hw = image_hw.astype(f32)
  num, height, width = masks.shape
  if origin is None:
    origin = (xp.zeros((num,), f32), xp.zeros((num,), f32))
  x_start, x_bin, x_grid = _axis_plan(xp, boxes[:, 0], boxes[:, 2], out_size)
  y_start, y_bin, y_grid = _axis_plan(xp, boxes[:, 1], boxes[:, 3], out_size)
  heights, widths = image_hw[:, 0], image_hw[:, 1]

  def row_step(i, acc):
    taps = _taps(xp, y_start, y_bin, y_grid, heights, i, out_size, origin[0], height)
    return acc + _rows(xp, masks, taps)

  rows = loop(xp.max(y_grid) if num else 0, row_step,
              xp.zeros((num, out_size, width), f32))

  def col_step(i, acc):
    taps = _taps(xp, x_start, x_bin, x_grid, widths, i, out_size, origin[1], width)
    return acc + _cols(xp, rows, taps)

  total = loop(xp.max(x_grid) if num else 0, col_step,
               xp.zeros((num, out_size, out_size), f32))
  count = xp.maximum(y_grid * x_grid, 1).astype(f32)[:, None, None]
  return total, count


def _np_loop(upper, body, init):
  for i in range(int(upper)):
    init = body(i, init)
  return init


def _jnp_loop(upper, body, init):
  return jax.lax.fori_loop(0, upper, body, init)


def _default_hw(masks, image_hw):
  if image_hw is None:
    return np.tile(np.array(masks.shape[1:3], np.float32), (masks.shape[0], 1))
  return image_hw


def _finish(total, count, binary):
  return total >= 0.5 * count if binary else total / count


def _roi_align_tiled(masks, boxes, image_hw, out_size, binary):
  """One mask at a time over a tile holding its box's region (`tiling.py`): the CPU path."""
  boxes = boxes.astype(jnp.float32)

  def make_branch(tile_h, tile_w):
    def crop_one(out, i, oy, ox):
      tile = jax.lax.dynamic_slice(masks[i], (oy, ox), (tile_h, tile_w))[None]
      origin = (oy.astype(jnp.float32)[None], ox.astype(jnp.float32)[None])
      total, count = _roi_align(jnp, _jnp_loop, tile, boxes[i][None], out_size,
                                image_hw[i][None], origin)
      return jax.lax.dynamic_update_slice(out, _finish(total, count, binary), (i, 0, 0))
    return crop_one

  dtype = bool if binary else jnp.float32
  init = jnp.zeros((masks.shape[0], out_size, out_size), dtype)
  return tiling.tiled_loop(boxes, masks.shape[1:], make_branch, init)


@functools.partial(jax.jit, static_argnames=('out_size', 'binary', 'impl'))
def _roi_align_jit(masks, boxes, image_hw, out_size, binary, impl):
  if impl == 'tiled':
    return _roi_align_tiled(masks, boxes, image_hw, out_size, binary)
  return _finish(*_roi_align(jnp, _jnp_loop, masks, boxes, out_size, image_hw), binary)




def roi_align_masks(masks, boxes_xyxy, out_size, image_hw=None, impl='auto'):
  """Soft RoIAlign crops (jnp): `masks [B,H,W]` (bool or float), `boxes_xyxy [B,4]` absolute
  pixels -> float32 `[B,out_size,out_size]`. `image_hw [B,2]` (optional) is the true (h, w) of
  each mask's image when `masks` are batch-padded; default: the array's (H, W). `impl`:
  'dense' (the whole batch at once: accelerators), 'tiled' (a loop over masks, each on a tile
  around its box: CPU), 'auto' (tiled on CPU); same values."""
  return _roi_align_jnp(masks, boxes_xyxy, out_size, image_hw, impl, binary=False)


def _roi_align_jnp(masks, boxes_xyxy, out_size, image_hw, impl, binary):
  masks = jnp.asarray(masks)
  image_hw = jnp.asarray(_default_hw(masks, image_hw))
  return _roi_align_jit(masks, jnp.asarray(boxes_xyxy), image_hw, out_size=out_size,
                        binary=binary, impl=tiling.resolve_impl(impl))


def roi_align_masks_np(masks, boxes_xyxy, out_size, image_hw=None):
  """Numpy twin of `roi_align_masks`."""
  total, count = _roi_align_np(masks, boxes_xyxy, out_size, image_hw)
  return total / count


def _roi_align_np(masks, boxes_xyxy, out_size, image_hw):
  """Per mask on the window around its box (numpy's tiled path; identical values)."""
  masks = np.asarray(masks)
  boxes = np.asarray(boxes_xyxy, np.float32)
  image_hw = np.asarray(_default_hw(masks, image_hw), np.float32)
  total = np.zeros((len(masks), out_size, out_size), np.float32)
  count = np.ones((len(masks), 1, 1), np.float32)
  height, width = masks.shape[1:]
  with np.errstate(invalid='ignore'):
    y0, y1 = tiling.box_region_np(boxes[:, 1], boxes[:, 3], height)
    x0, x1 = tiling.box_region_np(boxes[:, 0], boxes[:, 2], width)
  for i in range(len(masks)):
    if y1[i] <= y0[i] or x1[i] <= x0[i]:
      continue      # the box reads no pixel of the image: all samples are 0
    origin = (np.float32([y0[i]]), np.float32([x0[i]]))
    total[i:i + 1], count[i:i + 1] = _roi_align(
        np, _np_loop, masks[i:i + 1, y0[i]:y1[i], x0[i]:x1[i]], boxes[i:i + 1], out_size,
        image_hw[i:i + 1], origin)
  return total, count


def crop_masks(masks, boxes_xyxy, out_size, image_hw=None, impl='auto'):
  """Binary ground-truth crops (jnp): RoIAlign then `>= 0.5` -> bool `[B,out_size,out_size]`."""
  return _roi_align_jnp(masks, boxes_xyxy, out_size, image_hw, impl, binary=True)


def crop_masks_np(masks, boxes_xyxy, out_size, image_hw=None):
  """Numpy twin of `crop_masks`."""
  total, count = _roi_align_np(masks, boxes_xyxy, out_size, image_hw)
  return total >= 0.5 * count
