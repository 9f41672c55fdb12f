"""The official SOLQ / DETR image + target transforms, on host numpy arrays and PIL images.

A transform runs in two steps. A *plan* draws every random choice from a numpy Generator and
computes the output size from the input size alone (no pixels): a list of ops
`('flip',)`, `('resize', (h, w))`, `('crop', (top, left, h, w))`. `apply_ops` then executes a
plan on a sample. Planning without pixels lets every process agree on a batch's padded shape.

A sample is a dict: `image` (PIL RGB), `masks` bool `[N,H,W]`, `boxes` float32 `[N,4]` absolute
xyxy, `labels` int32 `[N]` (plus any other keys, passed through). The arithmetic mirrors the
official float32 torch code: boxes scale by the float ratio of new to old size,
masks resize with PyTorch's legacy nearest rule, the crop clips boxes and removes the instances
whose clipped box is empty.
"""
import numpy as np
from PIL import Image

from solq_jax import box_ops

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def resized_hw(hw, size, max_size=None):
  """Output (h, w) of resizing an image of size `hw` so its shorter side is `size`.

  The longer side is capped at `max_size` (None: no cap). Same arithmetic as the official
  `get_size_with_aspect_ratio`: the capped short side is `round(max_size * short / long)` with
  Python's round-half-even, the long side is truncated with `int()`.
  """
  h, w = int(hw[0]), int(hw[1])
  if max_size is not None:
    short, long = float(min(h, w)), float(max(h, w))
    if long / short * size > max_size:
      size = int(round(max_size * short / long))
  if (w <= h and w == size) or (h <= w and h == size):
    return h, w
  if w < h:
    return int(size * h / w), size
  return size, int(size * w / h)


def _choice(rng, values):
  return int(values[int(rng.integers(len(values)))])


def _plan_resize(rng, hw, scales, max_size):
  out = resized_hw(hw, _choice(rng, scales), max_size)
  return ('resize', out), out


def _plan_crop(rng, hw, min_size, max_size):
  """RandomSizeCrop: w ~ U{min..min(W, max)}, h likewise, then a uniform region.

  The official code fails when the image is smaller than `min_size`; here the lower bound is
  clamped to the image side instead (unreachable with the default scales).
  """
  h_img, w_img = hw
  w = int(rng.integers(min(min_size, w_img), min(w_img, max_size) + 1))
  h = int(rng.integers(min(min_size, h_img), min(h_img, max_size) + 1))
  top = int(rng.integers(0, h_img - h + 1))
  left = int(rng.integers(0, w_img - w + 1))
  return ('crop', (top, left, h, w)), (h, w)


def plan_train(rng, hw, data_config):
  """The official random train ops for an image of size `hw` -> (ops, output hw).

  flip(0.5) -> RandomResize(scales, max) -> RandomSelect(0.5: RandomResize(scales, max) |
  RandomResize(crop_resize_scales) -> RandomSizeCrop(crop_min, crop_max) ->
  RandomResize(scales, max)).
  """
  d = data_config
  scales, max_size = tuple(d.train_scales), d.train_max_size
  ops = []
  hw = (int(hw[0]), int(hw[1]))
  if rng.random() < d.flip_prob:
    ops.append(('flip',))
  op, hw = _plan_resize(rng, hw, scales, max_size)
  ops.append(op)
  if rng.random() < d.select_prob:
    op, hw = _plan_resize(rng, hw, scales, max_size)
    ops.append(op)
  else:
    for op_plan in (lambda s: _plan_resize(rng, s, tuple(d.crop_resize_scales), None),
                    lambda s: _plan_crop(rng, s, d.crop_min_size, d.crop_max_size),
                    lambda s: _plan_resize(rng, s, scales, max_size)):
      op, hw = op_plan(hw)
      ops.append(op)
  return ops, hw


def plan_eval(hw, data_config):
  """Eval ops: shorter side `eval_size`, longer at most `eval_max_size` -> (ops, output hw)."""
  out = resized_hw(hw, data_config.eval_size, data_config.eval_max_size)
  return [('resize', out)], out


# The ops below move the image and boxes at once; masks are only re-indexed: each op updates
# the source row / column / instance of every output mask pixel (`_rows`, `_cols`, `_inst`),
# and `apply_ops` gathers the masks once at the end. Nearest resizes, flips and crops compose
# exactly, so this equals transforming the masks op by op.


def hflip(sample):
  s = dict(sample)
  w = sample['image'].width
  s['image'] = sample['image'].transpose(Image.FLIP_LEFT_RIGHT)
  b = sample['boxes']
  s['boxes'] = (b[:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1], np.float32) +
                np.array([w, 0, w, 0], np.float32)).astype(np.float32)
  s['_cols'] = sample['_cols'][::-1]
  return s


def resize(sample, hw):
  """Resize the image (PIL bilinear, as torchvision's PIL path) and masks (nearest) to `hw`."""
  s = dict(sample)
  image = sample['image']
  h, w = hw
  if (image.height, image.width) != (h, w):
    s['image'] = image.resize((w, h), Image.BILINEAR)
  ratio = np.array([w / image.width, h / image.height] * 2, np.float32)
  s['boxes'] = (sample['boxes'] * ratio).astype(np.float32)
  s['_rows'] = sample['_rows'][box_ops.legacy_nearest_indices(image.height, h)]
  s['_cols'] = sample['_cols'][box_ops.legacy_nearest_indices(image.width, w)]
  return s


def crop(sample, region):
  """Crop to `region = (top, left, h, w)`; clip boxes, drop instances whose box empties."""
  top, left, h, w = region
  s = dict(sample)
  s['image'] = sample['image'].crop((left, top, left + w, top + h))
  boxes = sample['boxes'] - np.array([left, top, left, top], np.float32)
  boxes = np.minimum(boxes.reshape(-1, 2, 2), np.array([w, h], np.float32))
  boxes = np.maximum(boxes, 0).astype(np.float32)
  keep = np.all(boxes[:, 1, :] > boxes[:, 0, :], axis=1)
  s['boxes'] = boxes.reshape(-1, 4)[keep]
  s['labels'] = sample['labels'][keep]
  s['_inst'] = sample['_inst'][keep]
  s['_rows'] = sample['_rows'][top:top + h]
  s['_cols'] = sample['_cols'][left:left + w]
  return s


_OPS = {'flip': hflip, 'resize': resize, 'crop': crop}


def apply_ops(sample, ops):
  """Execute a plan (from `plan_train` / `plan_eval`) on a sample."""
  masks = sample['masks']
  s = dict(sample, _inst=np.arange(masks.shape[0]), _rows=np.arange(masks.shape[1]),
           _cols=np.arange(masks.shape[2]))
  for op in ops:
    if op[0] not in _OPS:
      raise ValueError(f'unknown transform op {op!r}')
    s = _OPS[op[0]](s, *op[1:])
  # columns first (on the smaller, source-sized array), then whole rows: ~5x faster than np.ix_
  picked = np.take(masks[s.pop('_inst')], s.pop('_cols'), axis=2)
  s['masks'] = np.take(picked, s.pop('_rows'), axis=1)
  return s


def normalize_image(image):
  """PIL RGB / uint8 `[H,W,3]` -> float32 ImageNet-normalised `[H,W,3]` (to_tensor + Normalize).

  The same float32 operations as torchvision: x / 255, then (x - mean) / std.
  """
  x = np.asarray(image, dtype=np.uint8).astype(np.float32)
  x /= np.float32(255)
  x -= IMAGENET_MEAN
  x /= IMAGENET_STD
  return x
