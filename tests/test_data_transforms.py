"""Transforms: official eval rounding, nearest index rule, op composition, box/mask consistency."""
import fractions

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from solq_jax import box_ops
from solq_jax.data import transforms as T


def _round_half_even(q):
  """Python 3 round() of a Fraction, re-derived: nearest integer, ties to even."""
  lo = q.numerator // q.denominator
  rest = q - lo
  if rest > fractions.Fraction(1, 2) or (rest == fractions.Fraction(1, 2) and lo % 2):
    return lo + 1
  return lo


def _reference_size(h, w, size, max_size):
  """torchvision-DETR `get_size_with_aspect_ratio`, re-derived with exact rational arithmetic."""
  short, long = min(h, w), max(h, w)
  if max_size is not None and fractions.Fraction(long, short) * size > max_size:
    size = _round_half_even(fractions.Fraction(max_size * short, long))
  if short == size:
    return h, w
  new_long = (size * long) // short
  return (size, new_long) if h <= w else (new_long, size)


# (h, w, size, max_size) -> (h', w'), worked by hand.
HAND_TABLE = [
    ((480, 640, 800, 1333), (800, 1066)),
    ((427, 640, 800, 1333), (800, 1199)),
    ((640, 427, 800, 1333), (1199, 800)),
    ((500, 333, 800, 1333), (1201, 800)),
    ((640, 640, 800, 1333), (800, 800)),
    ((800, 1000, 800, 1333), (800, 1000)),           # already at size: unchanged
    ((300, 4000, 800, 1333), (100, 1333)),           # panorama: round(99.975) = 100
    ((1, 2, 800, 1333), (666, 1332)),                # round(666.5) = 666: half to even
    ((3, 2, 800, 1333), (1200, 800)),                # 1.5 * 800 = 1200 <= 1333: no cap
    ((200, 600, 512, 1333), (444, 1332)),            # round(444.33) = 444
    ((240, 320, 256, 320), (240, 320)),              # tiny eval: round(320*240/320) = 240 = short
    ((200, 300, 256, 320), (213, 319)),              # int(213 * 300 / 200) = int(319.5)
]


@pytest.mark.parametrize('args,expected', HAND_TABLE)
def test_eval_size_hand_table(args, expected):
  h, w, size, max_size = args
  assert T.resized_hw((h, w), size, max_size) == expected
  assert _reference_size(h, w, size, max_size) == expected


def test_eval_size_matches_rational_rederivation():
  rng = np.random.default_rng(0)
  sizes = rng.integers(1, 4100, (3000, 2)).tolist() + [[h, w] for h in range(1, 40)
                                                      for w in range(1, 40)]
  for h, w in sizes:
    for size, max_size in ((800, 1333), (512, 1333), (256, 320), (600, None)):
      assert T.resized_hw((h, w), size, max_size) == _reference_size(h, w, size, max_size), (
          h, w, size, max_size)


def test_plan_eval_uses_config_sizes(r50_config, tiny_config):
  assert T.plan_eval((480, 640), r50_config.data) == ([('resize', (800, 1066))], (800, 1066))
  assert T.plan_eval((480, 640), tiny_config.data)[1] == (240, 320)


def test_nearest_indices_legacy_rule():
  for n_in, n_out in [(10, 20), (20, 10), (427, 800), (800, 427), (7, 7), (5, 13), (640, 1199)]:
    got = box_ops.legacy_nearest_indices(n_in, n_out)
    scale = np.float32(n_in) / np.float32(n_out)
    want = [min(int(np.floor(np.float32(j) * scale)), n_in - 1) for j in range(n_out)]
    assert got.tolist() == want
    exact = [min(j * n_in // n_out, n_in - 1) for j in range(n_out)]
    assert np.mean(np.array(want) == np.array(exact)) > 0.99
  assert box_ops.legacy_nearest_indices(10, 20).tolist() == [j // 2 for j in range(20)]
  assert box_ops.legacy_nearest_indices(20, 10).tolist() == [2 * j for j in range(10)]


# ---------------------------------------------------------------- op-by-op reference transforms


def _ref_apply(image, masks, boxes, labels, ops):
  """Plain per-op reference (numpy image and masks transformed op by op, explicit loops)."""
  image = np.asarray(image)
  for op in ops:
    h, w = masks.shape[1:]
    if op[0] == 'flip':
      image, masks = image[:, ::-1], masks[:, :, ::-1]
      boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
    elif op[0] == 'resize':
      oh, ow = op[1]
      image = np.asarray(Image.fromarray(image).resize((ow, oh), Image.BILINEAR))
      rows = [min(int(np.floor(np.float32(i) * (np.float32(h) / np.float32(oh)))), h - 1)
              for i in range(oh)]
      cols = [min(int(np.floor(np.float32(j) * (np.float32(w) / np.float32(ow)))), w - 1)
              for j in range(ow)]
      masks = masks[:, rows, :][:, :, cols]
      boxes = boxes * np.array([ow / w, oh / h, ow / w, oh / h], np.float32)
    else:
      top, left, ch, cw = op[1]
      image, masks = image[top:top + ch, left:left + cw], masks[:, top:top + ch, left:left + cw]
      boxes = boxes - np.array([left, top, left, top], np.float32)
      boxes = np.clip(boxes, 0, np.array([cw, ch, cw, ch], np.float32))
      keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
      boxes, masks, labels = boxes[keep], masks[keep], labels[keep]
  return image, masks, boxes, labels


def _random_sample(rng, h, w, n):
  """A gray image whose value encodes instance masks (axis-aligned rectangles + discs)."""
  masks = np.zeros((n, h, w), bool)
  boxes = np.zeros((n, 4), np.float32)
  yy, xx = np.mgrid[0:h, 0:w]
  for k in range(n):
    x0, y0 = rng.integers(0, w - 4), rng.integers(0, h - 4)
    x1, y1 = rng.integers(x0 + 3, w + 1), rng.integers(y0 + 3, h + 1)
    if k % 2:
      masks[k, y0:y1, x0:x1] = True
    else:
      cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, min(x1 - x0, y1 - y0) / 2
      masks[k] = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 < r * r
    ys, xs = np.nonzero(masks[k])
    boxes[k] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
  image = np.zeros((h, w, 3), np.uint8)
  image[masks.any(0)] = 255
  return dict(image=Image.fromarray(image), masks=masks, boxes=boxes,
              labels=np.arange(1, n + 1, dtype=np.int32))


def _mask_box(mask):
  ys, xs = np.nonzero(mask)
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.fixture(scope='module')
def tiny_data():
  return tiny.get_config().data


def _train_trials(seed, trials, instances, data_config):
  """(sample, planned ops, planned hw, transformed sample) for random images and plans."""
  rng = np.random.default_rng(seed)
  for _ in range(trials):
    h, w = (int(v) for v in rng.integers(150, 330, 2))
    sample = _random_sample(rng, h, w, instances)
    ops, hw = T.plan_train(rng, (h, w), data_config)
    yield sample, ops, hw, T.apply_ops(sample, ops)


def test_apply_ops_equals_op_by_op_reference(tiny_data):
  for sample, ops, hw, out in _train_trials(1, 25, 5, tiny_data):
    ref_img, ref_masks, ref_boxes, ref_labels = _ref_apply(
        sample['image'], sample['masks'], sample['boxes'], sample['labels'], ops)
    assert (out['image'].height, out['image'].width) == hw == ref_masks.shape[1:]
    np.testing.assert_array_equal(np.asarray(out['image']), ref_img)
    np.testing.assert_array_equal(out['masks'], ref_masks)
    np.testing.assert_allclose(out['boxes'], ref_boxes, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(out['labels'], ref_labels)


def test_flip_and_resize_keep_masks_and_boxes_consistent(tiny_data):
  rng = np.random.default_rng(2)
  for _ in range(30):
    h, w = (int(v) for v in rng.integers(100, 400, 2))
    sample = _random_sample(rng, h, w, 4)
    size = T.resized_hw((h, w), int(rng.choice([160, 192, 256, 512])), 700)
    ops = [('flip',), ('resize', size)] if rng.random() < 0.5 else [('resize', size)]
    out = T.apply_ops(sample, ops)
    for mask, box in zip(out['masks'], out['boxes']):
      np.testing.assert_allclose(_mask_box(mask), box, atol=1.0)


def test_crop_keeps_masks_within_boxes_and_rectangles_exact(tiny_data):
  rng = np.random.default_rng(3)
  seen_removed = 0
  for _ in range(40):
    h, w = (int(v) for v in rng.integers(150, 330, 2))
    sample = _random_sample(rng, h, w, 6)
    ops, _ = T.plan_train(rng, (h, w), tiny_data)
    ops = [op for op in ops if op[0] != 'resize'] or [('flip',)]
    if not any(op[0] == 'crop' for op in ops):
      ops.append(('crop', (int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2)),
                           h // 2, w // 2)))
    out = T.apply_ops(sample, ops)
    seen_removed += len(sample['labels']) - len(out['labels'])
    for mask, box, label in zip(out['masks'], out['boxes'], out['labels']):
      assert box[2] > box[0] and box[3] > box[1]
      if label % 2 == 0:  # rectangles (odd k -> label k + 1 even): the clipped box is exact
        np.testing.assert_allclose(_mask_box(mask), box, atol=1e-6)
      elif mask.any():  # discs: the mask lies inside the clipped box
        mb = _mask_box(mask)
        assert mb[0] >= box[0] - 1 and mb[1] >= box[1] - 1
        assert mb[2] <= box[2] + 1 and mb[3] <= box[3] + 1
  assert seen_removed > 0  # crops did remove instances


def test_image_stays_aligned_with_masks_through_train_ops(tiny_data):
  for _, _, _, out in _train_trials(4, 10, 3, tiny_data):
    union = out['masks'].any(0)
    bright = np.asarray(out['image'])[..., 0] > 127
    assert np.mean(union == bright) > 0.97


def test_plan_train_statistics_follow_the_recipe(r50_config):
  d = r50_config.data
  rng = np.random.default_rng(5)
  n, flips, crops = 2000, 0, 0
  for _ in range(n):
    hw = (int(rng.integers(200, 700)), int(rng.integers(200, 700)))
    ops, out = T.plan_train(rng, hw, d)
    flips += ops[0] == ('flip',)
    crops += any(op[0] == 'crop' for op in ops)
    kinds = [op[0] for op in ops if op[0] != 'flip']
    assert kinds in (['resize', 'resize'], ['resize', 'resize', 'crop', 'resize'])
    # the official rounding can overshoot the cap: round() of the short side, then int()
    assert max(out) <= d.train_max_size + 0.5 * max(out) / min(out)
    # short side = a train scale, unless the long side hit the cap (then within its rounding)
    assert min(out) in d.train_scales or max(out) >= d.train_max_size - max(out) / min(out) - 1
    for op in ops:
      if op[0] == 'crop':
        _, _, ch, cw = op[1]
        assert d.crop_min_size <= ch <= d.crop_max_size and d.crop_min_size <= cw <= d.crop_max_size
  assert abs(flips / n - d.flip_prob) < 0.05
  assert abs(crops / n - (1 - d.select_prob)) < 0.05


def test_normalize_image_imagenet():
  x = np.array([[[0, 128, 255]]], np.uint8)
  got = T.normalize_image(x)
  want = (np.array([0, 128, 255]) / 255 - np.array([0.485, 0.456, 0.406])) / np.array(
      [0.229, 0.224, 0.225])
  np.testing.assert_allclose(got[0, 0], want, rtol=1e-6)
  assert got.dtype == np.float32
