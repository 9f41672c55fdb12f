"""Writes `torchvision_reference.npz`: crops and pastes computed by torch/torchvision themselves.

Not part of the test suite (torch is never a test dependency). Run it once in a throwaway venv
with torch==2.14.1 and torchvision==0.29.1:

    python tests/data/masks/make_torchvision_fixture.py tests/data/masks/torchvision_reference.npz

Crop = detectron2 `BitMasks.crop_and_resize`: `roi_align(aligned=True, sampling_ratio=0,
spatial_scale=1)` then `>= 0.5`. Paste = detectron2 `paste_masks_in_image` (full-image
`grid_sample(align_corners=False)`, then `>= 0.5`). Inputs are synthetic (random blobs, random
boxes), so the file carries no dataset content.
"""
import sys

import numpy as np
import torch
import torch.nn.functional as F
import torchvision


def blobs(rng, num, height, width):
  yy, xx = np.mgrid[:height, :width]
  out = np.zeros((num, height, width), bool)
  for n in range(num):
    field = np.zeros((height, width))
    for _ in range(rng.integers(1, 4)):
      cy, cx = rng.uniform(0, height), rng.uniform(0, width)
      sy, sx = rng.uniform(2, height / 2), rng.uniform(2, width / 2)
      field += np.exp(-((yy - cy) ** 2 / (2 * sy * sy) + (xx - cx) ** 2 / (2 * sx * sx)))
    out[n] = field > rng.uniform(0.3, 0.7)
  return out


def crop(masks, boxes, size):
  rois = torch.cat([torch.arange(len(boxes), dtype=torch.float32)[:, None],
                    torch.from_numpy(boxes)], dim=1)
  return torchvision.ops.roi_align(torch.from_numpy(masks).float()[:, None], rois, (size, size),
                                   spatial_scale=1.0, sampling_ratio=0, aligned=True)[:, 0].numpy()


def paste(masks, boxes, image_hw):
  height, width = image_hw
  masks = torch.from_numpy(masks).float()[:, None]
  boxes = torch.from_numpy(boxes)
  x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)
  img_y = (torch.arange(0, height, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
  img_x = (torch.arange(0, width, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
  num = masks.shape[0]
  gx = img_x[:, None, :].expand(num, height, width)
  gy = img_y[:, :, None].expand(num, height, width)
  out = F.grid_sample(masks, torch.stack([gx, gy], dim=3), align_corners=False)
  return (out[:, 0] >= 0.5).numpy()


def main(path):
  rng = np.random.default_rng(2026)
  height, width, num = 60, 90, 12
  masks = blobs(rng, num, height, width)
  x0 = rng.uniform(-10, 60, num)
  y0 = rng.uniform(-10, 40, num)
  boxes = np.stack([x0, y0, x0 + rng.uniform(1, 80, num), y0 + rng.uniform(1, 60, num)], 1)
  boxes[0] = [0, 0, width, height]
  boxes[1] = [-30.5, -20.25, 120.0, 85.5]          # larger than the image: g = 2 at 128
  boxes = boxes.astype(np.float32)
  paste_masks = rng.random((8, 28, 28)).astype(np.float32)
  paste_masks[:4] = paste_masks[:4] > 0.5
  px0 = rng.uniform(-20, 70, 8)
  py0 = rng.uniform(-20, 50, 8)
  paste_boxes = np.stack([px0, py0, px0 + rng.uniform(2, 90, 8), py0 + rng.uniform(2, 60, 8)], 1)
  paste_boxes = paste_boxes.astype(np.float32)
  np.savez_compressed(
      path,
      masks=np.packbits(masks, axis=-1), width=width,
      boxes=boxes,
      soft_size=16, soft=crop(masks, boxes, 16),
      crop_size=128, crops=np.packbits(crop(masks, boxes, 128) >= 0.5, axis=-1),
      paste_masks=paste_masks, paste_boxes=paste_boxes, paste_hw=np.array([height, width]),
      pasted=np.packbits(paste(paste_masks, paste_boxes, (height, width)), axis=-1),
      versions=np.array([torch.__version__, torchvision.__version__]))


if __name__ == '__main__':
  main(sys.argv[1])
