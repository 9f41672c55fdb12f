"""Fit the PCA mask coder on a COCO-format dataset's box-cropped ground-truth masks.

    python -m solq_jax.masks.fit_pca --annotations .../instances_train2017.json \\
        --output pca_28x256.npz --mask_size 28 --num_coeffs 256 [--whiten] [--max_instances N]

then train with `--config.model.mask_coder=pca --config.model.pca_path=pca_28x256.npz
--config.model.mask_size=28 --config.model.num_coeffs=256`. Crops are the same RoIAlign crops
as the DCT targets (non-crowd instances, the annotation's xywh box, unpadded image).
"""
import argparse
import logging

import numpy as np

from solq_jax.masks import pca
from solq_jax.masks import roi_align


def coco_crops(annotation_file, mask_size, max_instances=0):
  """Binary `[M,mask_size,mask_size]` RoIAlign crops of the non-crowd instances of a COCO json."""
  from pycocotools import coco as coco_api   # only this entry point needs pycocotools
  dataset = coco_api.COCO(annotation_file)
  crops = []
  total = 0
  for image_id in sorted(dataset.getImgIds()):
    anns = [a for a in dataset.loadAnns(dataset.getAnnIds(imgIds=image_id, iscrowd=False))
            if a['bbox'][2] > 0 and a['bbox'][3] > 0]
    if not anns:
      continue
    masks = np.stack([dataset.annToMask(a).astype(bool) for a in anns])
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a['bbox'] for a in anns)],
                     np.float32)
    crops.append(roi_align.crop_masks_np(masks, boxes, mask_size))
    total += len(anns)
    if max_instances and total >= max_instances:
      break
  if not crops:
    raise ValueError(f'no non-crowd instances with a positive-area box in {annotation_file!r}')
  crops = np.concatenate(crops)
  return crops[:max_instances] if max_instances else crops


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--annotations', required=True, help='COCO instances json')
  parser.add_argument('--output', required=True, help='.npz to write (config.model.pca_path)')
  parser.add_argument('--mask_size', type=int, default=28)
  parser.add_argument('--num_coeffs', type=int, default=256)
  parser.add_argument('--whiten', action='store_true')
  parser.add_argument('--max_instances', type=int, default=0, help='0 = all')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  crops = coco_crops(args.annotations, args.mask_size, args.max_instances)
  fitted = pca.fit_pca(crops, args.num_coeffs, args.whiten)
  pca.save_pca(args.output, fitted)
  kept = fitted['explained_variance'].sum() / crops.reshape(len(crops), -1).var(axis=0, ddof=1).sum()
  logging.info('fitted %d components on %d crops of %dx%d (%.1f%% of the variance) -> %s',
               args.num_coeffs, len(crops), args.mask_size, args.mask_size, 100 * kept, args.output)


if __name__ == '__main__':
  main()
