"""Training targets from an augmented sample, padded to `max_gt` (docs/design.md, "Batch").

Computed on the host after augmentation, from the unpadded augmented masks and the absolute xyxy
GT boxes (the official code crops from the batch-padded masks; computing from the unpadded masks
is a deliberate, harmless fix, docs/deviations.md). Mask vectors come from the model's
mask coder (`solq_jax.masks.build_coder(config.model).encode_np`).
"""
import logging

import numpy as np

from solq_jax import box_ops

log = logging.getLogger(__name__)


def keep_largest(sample, max_gt):
  """Keep at most `max_gt` instances: the largest boxes, in their original order (logged)."""
  n = len(sample['labels'])
  if n <= max_gt:
    return sample
  order = np.argsort(-box_ops.area(sample['boxes']), kind='stable')[:max_gt]
  keep = np.sort(order)
  log.warning('image %s has %d instances, more than data.max_gt=%d: kept the %d largest boxes',
              sample.get('image_id'), n, max_gt, max_gt)
  s = dict(sample)
  for k in ('masks', 'boxes', 'labels'):
    s[k] = sample[k][keep]
  return s


def make_targets(sample, coder, max_gt):
  """Padded targets of one augmented sample.

  Returns `labels int32 [G]`, `boxes float32 [G,4]` (cxcywh / (w, h) of the augmented image),
  `vectors float32 [G,K]`, `valid bool [G]`.
  """
  sample = keep_largest(sample, max_gt)
  h, w = sample['masks'].shape[1:]
  n = len(sample['labels'])
  xyxy = sample['boxes'].astype(np.float32)
  out = dict(
      labels=np.zeros((max_gt,), np.int32),
      boxes=np.zeros((max_gt, 4), np.float32),
      vectors=np.zeros((max_gt, coder.num_coeffs), np.float32),
      valid=np.zeros((max_gt,), bool))
  if n:
    out['labels'][:n] = sample['labels']
    out['boxes'][:n] = box_ops.xyxy_to_cxcywh(xyxy) / np.array([w, h, w, h], np.float32)
    out['vectors'][:n] = coder.encode_np(sample['masks'], xyxy)
    out['valid'][:n] = True
  return out
