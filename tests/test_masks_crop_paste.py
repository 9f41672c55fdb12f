"""The RoIAlign crop and the paste against independent per-sample / per-pixel references.

The references below are literal loops over bins and samples (torchvision `roi_align` CPU,
aligned=True, sampling_ratio=0) and over output pixels (detectron2 `paste_masks_in_image` via
`grid_sample(bilinear, align_corners=False, zeros)`), written from the official code's description, in
float32 with torchvision's operation order.
"""
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solq_jax import masks
from solq_jax.masks import roi_align

F32 = np.float32
FIXTURE = pathlib.Path(__file__).parent / 'data' / 'masks' / 'torchvision_reference.npz'


def ref_roi_align(mask, box, out_size):
  """torchvision roi_align(aligned=True, spatial_scale=1, sampling_ratio=0) of one mask, loops."""
  height, width = mask.shape
  x0, y0, x1, y1 = (F32(v) for v in box)
  start_w, start_h = x0 - F32(0.5), y0 - F32(0.5)
  roi_w, roi_h = (x1 - F32(0.5)) - start_w, (y1 - F32(0.5)) - start_h
  bin_w, bin_h = roi_w / F32(out_size), roi_h / F32(out_size)
  grid_h, grid_w = math.ceil(roi_h / F32(out_size)), math.ceil(roi_w / F32(out_size))
  count = max(grid_h * grid_w, 1)
  out = np.zeros((out_size, out_size), F32)

  def bilinear(y, x):
    if y < -1.0 or y > height or x < -1.0 or x > width:
      return F32(0)
    y, x = max(y, F32(0)), max(x, F32(0))
    y_lo, x_lo = int(y), int(x)
    if y_lo >= height - 1:
      y_lo = y_hi = height - 1
      y = F32(y_lo)
    else:
      y_hi = y_lo + 1
    if x_lo >= width - 1:
      x_lo = x_hi = width - 1
      x = F32(x_lo)
    else:
      x_hi = x_lo + 1
    ly, lx = F32(y - y_lo), F32(x - x_lo)
    hy, hx = F32(1) - ly, F32(1) - lx
    return (hy * hx * mask[y_lo, x_lo] + hy * lx * mask[y_lo, x_hi]
            + ly * hx * mask[y_hi, x_lo] + ly * lx * mask[y_hi, x_hi])

  for ph in range(out_size):
    for pw in range(out_size):
      acc = F32(0)
      for iy in range(grid_h):
        y = (start_h + F32(ph) * bin_h) + (F32(iy + 0.5) * bin_h) / F32(grid_h)
        for ix in range(grid_w):
          x = (start_w + F32(pw) * bin_w) + (F32(ix + 0.5) * bin_w) / F32(grid_w)
          acc = F32(acc + bilinear(y, x))
      out[ph, pw] = acc / F32(count)
  return out


def ref_paste(mask, box, image_hw):
  """detectron2 paste of one `[S,S]` mask: grid_sample per output pixel (soft value, pre-threshold)."""
  size = mask.shape[0]
  x0, y0, x1, y1 = (F32(v) for v in box)
  out = np.zeros(image_hw, F32)

  def tap(i, j):
    return mask[i, j] if 0 <= i < size and 0 <= j < size else F32(0)

  with np.errstate(divide='ignore', invalid='ignore'):
    for y, x in np.ndindex(*image_hw):
      gy = (F32(y + 0.5) - y0) / (y1 - y0) * F32(2) - F32(1)
      gx = (F32(x + 0.5) - x0) / (x1 - x0) * F32(2) - F32(1)
      iy = ((gy + F32(1)) * F32(size) - F32(1)) / F32(2)
      ix = ((gx + F32(1)) * F32(size) - F32(1)) / F32(2)
      if not (np.isfinite(ix) and np.isfinite(iy)):   # degenerate box: torch gives NaN -> False
        continue
      i0, j0 = math.floor(iy), math.floor(ix)
      fy, fx = iy - F32(i0), ix - F32(j0)
      out[y, x] = ((1 - fy) * (1 - fx) * tap(i0, j0) + (1 - fy) * fx * tap(i0, j0 + 1)
                   + fy * (1 - fx) * tap(i0 + 1, j0) + fy * fx * tap(i0 + 1, j0 + 1))
  return out


def _blobs(rng, num, height, width):
  """Random smooth-ish binary masks: thresholded sums of a few Gaussian bumps."""
  yy, xx = np.mgrid[:height, :width]
  out = np.zeros((num, height, width), bool)
  for n in range(num):
    field = np.zeros((height, width))
    for _ in range(3):
      cy, cx = rng.uniform(0, height), rng.uniform(0, width)
      s = rng.uniform(2, max(height, width) / 3)
      field += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    out[n] = field > 0.4
  return out


@pytest.fixture(scope='module')
def crop_case():
  """Random masks and boxes: inside, partly outside, sub-pixel, larger than the image, g > 1."""
  rng = np.random.default_rng(0)
  height, width, size = 37, 53, 8
  mask = _blobs(rng, 10, height, width)
  boxes = np.array([
      [3.2, 4.7, 40.9, 30.1],      # ordinary, g = (4, 5)
      [0, 0, width, height],       # whole image
      [-6.5, -3.0, 20.25, 18.0],   # partly outside top-left
      [30.0, 20.0, 70.0, 50.0],    # partly outside bottom-right
      [10.3, 11.1, 12.4, 13.9],    # sub-pixel bins, g = 1
      [-20, -15, 80, 60],          # larger than the image
      [5.5, 5.5, 13.5, 13.5],      # bins exactly one pixel
      [1.0, 2.0, 1.0, 30.0],       # zero width
      [20.0, 8.0, 10.0, 30.0],     # negative width
      [44.0, 30.0, 52.99, 36.99],  # touching the bottom-right border
  ], np.float32)
  return mask, boxes, size


@pytest.fixture(scope='module')
def crop_reference(crop_case):
  mask, boxes, size = crop_case
  return np.stack([ref_roi_align(m.astype(F32), b, size) for m, b in zip(mask, boxes)])


@pytest.mark.parametrize('impl', ['dense', 'tiled'])
def test_roi_align_matches_reference_loop(crop_case, crop_reference, impl):
  mask, boxes, size = crop_case
  ref = crop_reference
  soft_np = roi_align.roi_align_masks_np(mask, boxes, size)
  soft_jnp = np.asarray(roi_align.roi_align_masks(mask, boxes, size, impl=impl))
  np.testing.assert_allclose(soft_np, ref, atol=2e-6)
  np.testing.assert_allclose(soft_jnp, ref, atol=2e-6)
  tie = np.abs(ref - 0.5) < 1e-5
  crops = np.asarray(masks.crop_masks(mask, boxes, size, impl=impl))
  crops_np = masks.crop_masks_np(mask, boxes, size)
  np.testing.assert_array_equal(crops[~tie], (ref >= 0.5)[~tie])
  np.testing.assert_array_equal(crops_np[~tie], (ref >= 0.5)[~tie])
  assert ref[7].max() == 0 and ref[8].max() == 0          # degenerate boxes read nothing
  assert 0 < crops[2].sum() and crops[5].any()


def test_roi_align_padded_masks_with_image_hw(crop_case):
  """Batch-padded masks plus the true size crop exactly like the unpadded masks (quirk 6)."""
  mask, boxes, size = crop_case
  padded = np.zeros((mask.shape[0], 48, 64), bool)
  padded[:, :mask.shape[1], :mask.shape[2]] = mask
  hw = np.tile(np.array(mask.shape[1:], np.int32), (mask.shape[0], 1))
  want = roi_align.roi_align_masks_np(mask, boxes, size)
  np.testing.assert_array_equal(roi_align.roi_align_masks_np(padded, boxes, size, hw), want)
  np.testing.assert_allclose(np.asarray(roi_align.roi_align_masks(padded, boxes, size, hw)), want,
                             atol=1e-6)
  np.testing.assert_array_equal(np.asarray(masks.crop_masks(padded, boxes, size, hw)),
                                masks.crop_masks_np(mask, boxes, size))
  # Without image_hw the padding is read as zeros (the official quirk): box 3 crosses the edge.
  official = roi_align.roi_align_masks_np(padded, boxes, size)
  assert not np.array_equal(official[3], want[3])
  np.testing.assert_array_equal(official[0], want[0])


def test_roi_align_under_jit_and_vmap(crop_case):
  mask, boxes, size = crop_case
  want = roi_align.crop_masks_np(mask, boxes, size)
  jitted = jax.jit(lambda m, b: masks.crop_masks(m, b, size))(mask, boxes)
  np.testing.assert_array_equal(np.asarray(jitted), want)
  per_pair = jax.vmap(lambda m, b: masks.crop_masks(m[None], b[None], size)[0])(
      jnp.asarray(mask), jnp.asarray(boxes))
  np.testing.assert_array_equal(np.asarray(per_pair), want)


def test_roi_align_matches_torchvision_fixture():
  """Crops of torchvision 0.29.1 itself (generated by tests/data/masks/make_torchvision_fixture.py)."""
  data = np.load(FIXTURE)
  mask = np.unpackbits(data['masks'], axis=-1)[..., :int(data['width'])].astype(bool)
  boxes = data['boxes']
  soft = roi_align.roi_align_masks_np(mask, boxes, int(data['soft_size']))
  np.testing.assert_allclose(soft, data['soft'], atol=2e-6)
  size = int(data['crop_size'])
  want = np.unpackbits(data['crops'], axis=-1)[..., :size].astype(bool)
  got = np.asarray(masks.crop_masks(mask, boxes, size))
  assert (got != want).sum() <= 2, (got != want).sum()   # only exact float32 ties may differ


@pytest.mark.parametrize('impl', ['dense', 'tiled'])
def test_paste_matches_reference_loop(impl):
  rng = np.random.default_rng(1)
  size, image_hw = 6, (23, 31)
  soft = rng.random((6, size, size)).astype(F32)
  soft[0] = (soft[0] > 0.5)
  boxes = np.array([
      [3.3, 2.2, 20.7, 15.1],
      [-5.0, -4.0, 12.0, 9.5],      # partly outside
      [25.0, 18.0, 40.0, 30.0],     # partly outside bottom-right
      [-10.0, -10.0, 45.0, 40.0],   # larger than the image
      [7.0, 7.0, 8.5, 9.0],         # tiny
      [4.0, 4.0, 4.0, 10.0],        # zero width
  ], F32)
  ref = np.stack([ref_paste(m, b, image_hw) for m, b in zip(soft, boxes)])
  got = np.asarray(masks.paste_masks(soft, boxes, image_hw, impl=impl))
  tie = np.abs(ref - 0.5) < 1e-5
  np.testing.assert_array_equal(got[~tie], (ref >= 0.5)[~tie])
  np.testing.assert_array_equal(got, masks.paste_masks_np(soft, boxes, image_hw))
  assert not got[5].any() and got[0].any() and got[4].any()
  binary = soft > 0.5
  ref_bin = np.stack([ref_paste(m.astype(F32), b, image_hw) for m, b in zip(binary, boxes)])
  np.testing.assert_array_equal(np.asarray(masks.paste_masks(binary, boxes, image_hw, impl=impl)),
                                ref_bin >= 0.5)


def test_paste_matches_torchvision_fixture():
  data = np.load(FIXTURE)
  pasted = masks.paste_masks(data['paste_masks'], data['paste_boxes'],
                             tuple(int(v) for v in data['paste_hw']))
  want = np.unpackbits(data['pasted'], axis=-1)[..., :int(data['paste_hw'][1])].astype(bool)
  assert (np.asarray(pasted) != want).sum() <= 2


def test_tiled_equals_dense_on_many_boxes():
  """Crop tiles and paste strips of every size (incl. the whole image), boxes crossing the edges,
  flipped boxes."""
  rng = np.random.default_rng(5)
  height, width, num = 90, 300, 24     # crop tiles 64..whole image; paste: 2 strips of 64 rows, bands up to 300
  mask = _blobs(rng, num, height, width)
  x0, y0 = rng.uniform(-40, width, num), rng.uniform(-30, height, num)
  boxes = np.stack([x0, y0, x0 + rng.uniform(-20, 320, num), y0 + rng.uniform(-10, 100, num)], 1)
  boxes = boxes.astype(F32)
  np.testing.assert_array_equal(np.asarray(masks.crop_masks(mask, boxes, 16, impl='dense')),
                                np.asarray(masks.crop_masks(mask, boxes, 16, impl='tiled')))
  crops = rng.random((num, 16, 16)) > 0.4
  np.testing.assert_array_equal(
      np.asarray(masks.paste_masks(crops, boxes, (height, width), impl='dense')),
      np.asarray(masks.paste_masks(crops, boxes, (height, width), impl='tiled')))
  with pytest.raises(ValueError, match='impl'):
    masks.paste_masks(crops, boxes, (height, width), impl='fast')


def test_bad_input_defined():
  """All-zero mask, zero-width box, box partly outside, NaN box: finite, defined outputs."""
  mask = np.zeros((4, 20, 30), bool)
  mask[1:, 5:15, 10:25] = True
  boxes = np.array([[10, 5, 25, 15], [10, 5, 10, 15], [20, -8, 45, 12], [np.nan, 0, 5, 5]], F32)
  soft = np.asarray(roi_align.roi_align_masks(mask, boxes, 16))
  assert np.isfinite(soft).all()
  assert soft[0].max() == 0 and soft[1].max() == 0 and soft[3].max() == 0
  assert soft[2].max() > 0.999
  pasted = np.asarray(masks.paste_masks(np.ones((4, 16, 16), bool), boxes, (20, 30)))
  assert not pasted[1].any() and not pasted[3].any()
  assert pasted[2, :12, 20:].all() and not pasted[2, 12:].any()
  assert masks.paste_masks(np.zeros((0, 16, 16)), np.zeros((0, 4)), (20, 30)).shape == (0, 20, 30)
  assert masks.crop_masks_np(mask[:0], boxes[:0], 16).shape == (0, 16, 16)
