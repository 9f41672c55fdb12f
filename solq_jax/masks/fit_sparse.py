"""Learn the sparse-coding mask coder's dictionary on a COCO-format dataset's box crops.

    python -m solq_jax.masks.fit_sparse --annotations .../instances_train2017.json \\
        --output sparse_28x256.npz --mask_size 28 --num_coeffs 256 [--alpha 1.0] \\
        [--iterations 100] [--rounds 20] [--max_instances N]

then train with `--config.model.mask_coder=sparse --config.model.sparse_path=sparse_28x256.npz
--config.model.mask_size=28 --config.model.num_coeffs=256`. The crops are those of `fit_pca`
(the DCT targets' RoIAlign crops of the non-crowd instances).
"""
import argparse
import logging

import numpy as np

from solq_jax.masks import fit_pca
from solq_jax.masks import sparse


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--annotations', required=True, help='COCO instances json')
  parser.add_argument('--output', required=True, help='.npz to write (config.model.sparse_path)')
  parser.add_argument('--mask_size', type=int, default=28)
  parser.add_argument('--num_coeffs', type=int, default=256, help='dictionary atoms')
  parser.add_argument('--alpha', type=float, default=1.0, help='L1 weight of the codes')
  parser.add_argument('--iterations', type=int, default=100, help='FISTA steps per encoding')
  parser.add_argument('--rounds', type=int, default=20, help='code / dictionary alternations')
  parser.add_argument('--max_instances', type=int, default=0, help='0 = all')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  crops = fit_pca.coco_crops(args.annotations, args.mask_size, args.max_instances)
  fitted = sparse.fit_dictionary(crops, args.num_coeffs, args.alpha, args.iterations,
                                 args.rounds)
  sparse.save_dictionary(args.output, fitted)
  coder = sparse.SparseCoder(fitted)
  codes = coder.transform_np(crops)
  iou = _mean_iou(np.asarray(coder.decode(codes)), crops.astype(bool))
  logging.info('learned %d atoms on %d crops of %dx%d: %.1f nonzero codes per crop, mean '
               'decoded IoU %.3f -> %s', args.num_coeffs, len(crops), args.mask_size,
               args.mask_size, (codes != 0).sum(1).mean(), iou, args.output)


def _mean_iou(a, b):
  inter = (a & b).sum((1, 2))
  union = (a | b).sum((1, 2))
  return float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))


if __name__ == '__main__':
  main()
