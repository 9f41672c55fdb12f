"""eval.py throughput on coco_val158: R50 config, random weights, time split.

    .venv/bin/python benchmarks/eval.py [--max_images 8] [--batch_size 1] [--config r50|tiny]

Runs the library path of `eval.py` (data pipeline, sharded jitted forward, on-device
post-processing, RLE encoding, COCOeval of bbox and segm) and reports where the time goes:
model forward (steady state: batches whose input shape was already compiled), the first call of
each input shape (compilation included), post-processing (top-k, decode, paste, host copy),
RLE/json encoding and COCOeval. Random weights give ~0 AP; the point is the time.
"""
import argparse
import os
import pathlib
import sys
import tempfile

import jax

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import solq_r50  # noqa: E402
from configs import tiny  # noqa: E402
from solq_jax import sharding  # noqa: E402
from solq_jax.inference import evaluate  # noqa: E402

COCO = REPO.parent / 'shared' / 'data' / 'coco_val158'
CONFIGS = {'r50': solq_r50.get_config, 'tiny': tiny.get_config}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='r50', choices=sorted(CONFIGS))
  parser.add_argument('--max_images', type=int, default=8)
  parser.add_argument('--batch_size', type=int, default=1)
  parser.add_argument('--num_workers', type=int, default=1)
  args = parser.parse_args()
  config = CONFIGS[args.config]()
  config.data.root = str(COCO)
  config.data.num_workers = args.num_workers
  config.model.num_classes = 91
  config.eval.max_images = args.max_images
  config.eval.batch_size = args.batch_size
  mesh = sharding.make_mesh(args.batch_size)
  with tempfile.TemporaryDirectory() as out_dir:
    metrics = evaluate.run(config, '', out_dir, mesh)
  n, b = metrics['num_images'], metrics['batches']
  steady = b['total'] - b['first_calls']
  print(f'\n{args.config}: {n} images, batch {args.batch_size}, {len(jax.devices())} device(s), '
        f'load average {os.getloadavg()[0]:.1f} (CPU time: all threads of this process)')
  for kind in ('time', 'cpu_time'):
    t = metrics[kind]
    per_batch = t['model'] / steady if steady else float('nan')
    print(f' {"wall" if kind == "time" else "cpu"}:')
    print(f'  model, steady state     {per_batch:8.2f} s/batch ({steady} batches) = '
          f'{args.batch_size / per_batch:.3f} img/s')
    print(f'  model, first calls      {t["model_first_calls"]:8.2f} s ({b["first_calls"]} shapes, '
          'compilation included)')
    print(f'  postprocess             {t["postprocess"] / n:8.3f} s/image '
          '(new paste sizes compile)')
    print(f'  RLE + json encoding     {t["encode"] / n:8.3f} s/image')
    print(f'  COCOeval (bbox + segm)  {t["cocoeval"]:8.2f} s total '
          f'({t["cocoeval"] / n:.3f} s/image)')
    rate = n / (n / args.batch_size * per_batch + t['postprocess'] + t['encode'])
    print(f'  throughput, steady      {rate:8.3f} img/s (model + postprocess + encoding)')
  print(f'  throughput, this run    {metrics["images_per_s"]:8.3f} img/s (wall, incl. compilation)')

if __name__ == '__main__':
  main()
