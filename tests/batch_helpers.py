"""What a test reads back from a batch that the batch does not carry: the unpadded image size
(from the padding mask) and the absolute xyxy ground-truth boxes (from the normalised boxes)."""
import numpy as np


def unpadded_hw(pad_mask):
  """(h, w) of the unpadded top-left region of one image's `pad_mask [H, W]` (True on padding)."""
  inside = ~np.asarray(pad_mask)
  return int(inside.any(1).sum()), int(inside.any(0).sum())


def unpadded_sizes(pad_masks):
  """`[B, 2]` of `unpadded_hw` over a batch's `pad_mask [B, H, W]`."""
  return np.array([unpadded_hw(m) for m in pad_masks], np.int64).reshape(-1, 2)


def boxes_xyxy(batch, row):
  """Absolute xyxy boxes `[G, 4]` of one row: the cxcywh boxes times its unpadded size."""
  h, w = unpadded_hw(batch['pad_mask'][row])
  cx, cy, bw, bh = np.moveaxis(np.asarray(batch['boxes'][row], np.float64), -1, 0)
  xyxy = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
  return (xyxy * np.array([w, h, w, h])).astype(np.float32)
