"""Box math in one place: format conversions, areas, IoU and generalised IoU.

Every function takes numpy or JAX arrays and returns the same kind, so the host
input pipeline (numpy) and the device code (jnp) share one implementation.
Boxes are `[..., 4]`: `cxcywh` = centre x, centre y, width, height; `xyxy` = x0, y0, x1, y1.
"""
import jax.numpy as jnp
import numpy as np


def _xp(x):
  return np if isinstance(x, np.ndarray) else jnp


def _stack(xp, parts):
  return xp.stack(parts, axis=-1)


def cxcywh_to_xyxy(boxes):
  xp = _xp(boxes)
  cx, cy, w, h = (boxes[..., i] for i in range(4))
  return _stack(xp, [cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h])


def xyxy_to_cxcywh(boxes):
  xp = _xp(boxes)
  x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
  return _stack(xp, [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])


def area(boxes_xyxy):
  return (boxes_xyxy[..., 2] - boxes_xyxy[..., 0]) * (boxes_xyxy[..., 3] - boxes_xyxy[..., 1])


def _iou_and_union(a, b):
  """IoU and union of boxes that broadcast against each other (xyxy)."""
  xp = _xp(a)
  lt = xp.maximum(a[..., :2], b[..., :2])
  rb = xp.minimum(a[..., 2:], b[..., 2:])
  wh = xp.clip(rb - lt, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  union = area(a) + area(b) - inter
  return inter / union, union


def _giou(a, b):
  xp = _xp(a)
  iou, union = _iou_and_union(a, b)
  lt = xp.minimum(a[..., :2], b[..., :2])
  rb = xp.maximum(a[..., 2:], b[..., 2:])
  wh = xp.clip(rb - lt, 0, None)
  enclosing = wh[..., 0] * wh[..., 1]
  return iou - (enclosing - union) / enclosing


def pairwise_iou(a, b):
  """IoU of every box in `a [N,4]` with every box in `b [M,4]` (xyxy) -> `[N,M]`."""
  return _iou_and_union(a[:, None, :], b[None, :, :])[0]


def elementwise_giou(a, b):
  """Generalised IoU of matching boxes `a [...,4]` and `b [...,4]` (xyxy) -> `[...]`."""
  return _giou(a, b)


def inverse_sigmoid(x, eps=1e-5):
  """log(x / (1 - x)) with x clamped to [0, 1] and both terms to >= eps (official helper)."""
  xp = _xp(x)
  x = xp.clip(x, 0, 1)
  return xp.log(xp.clip(x, eps, None) / xp.clip(1 - x, eps, None))


def legacy_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output index under PyTorch's legacy `mode='nearest'` resize.

  torch computes `min(floor(dst * float32(in / out)), in - 1)` in float32; so does this (on the
  host: the sizes are static). The one rule for every nearest resize: the input pipeline's masks
  and the model's padding-mask down-sampling.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)
