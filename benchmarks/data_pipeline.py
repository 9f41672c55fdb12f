"""Input-pipeline throughput and padding waste on coco_val158.

    .venv/bin/python benchmarks/data_pipeline.py                  # both configs, 0/1/2 workers
    .venv/bin/python benchmarks/data_pipeline.py --configs tiny --workers 1 2 --batches 20

Throughput: images/s of the train pipeline (official augmentations, mask-vector targets,
padding), after one warm-up batch (which includes starting the worker processes). The batch is
the per-device batch of the recipe (4 images). Padding waste needs no pixels: the planned sizes
of every batch of several epochs, padded to (a) the bucket sets below, (b) the batch maximum
(official behaviour, an unbounded number of shapes).
"""
import argparse
import os
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import solq_r50  # noqa: E402
from configs import tiny  # noqa: E402
from solq_jax import data  # noqa: E402
from solq_jax.data import pipeline  # noqa: E402
import timing  # noqa: E402  (benchmarks/timing.py)

COCO = REPO.parent / 'shared' / 'data' / 'coco_val158'
CONFIGS = {'r50': solq_r50.get_config, 'tiny': tiny.get_config}


def _config(name, workers, batch):
  config = CONFIGS[name]()
  config.model.num_classes = 91
  config.data.max_gt = 100  # coco_val158 has images with up to ~30 instances
  config.data.root = str(COCO)
  config.data.train_split = config.data.val_split = 'val2017'
  config.data.num_workers = workers
  config.train.batch_size = batch
  return config


def throughput(name, workers, batches, batch):
  """(images/s wall clock, CPU seconds per image in this process) after one warm-up batch.

  With workers=0 the CPU time is the whole cost of an image, and barely depends on what else
  runs on the machine; wall-clock figures on a shared machine do.
  """
  pipe = data.train_pipeline(_config(name, workers, batch), process_index=0, process_count=1)
  it = pipe.iterator()
  next(it)
  _, dt, dcpu = timing.timed(lambda: [next(it) for _ in range(batches)][-1])
  if workers:
    it.close()
  return batches * batch / dt, dcpu / (batches * batch)


def padding_waste(name, batch, epochs=4):
  """{(grouped, bucket option): (padded pixels / image pixels - 1, distinct shapes)}, train and
  eval (eval: (grouped, 'eval ...'))."""
  source = data.CocoSource(COCO, 'val2017', num_classes=91)
  out = {}
  for grouped in (True, False):
    d = _config(name, 0, batch).data
    d.group_by_aspect = grouped
    options = {'derived ' + str(data.bucket_sizes(d)): data.bucket_sizes(d),
               'multiples of 32': tuple(range(32, 4096, 32)),
               'batch max (official)': tuple(range(1, 4096))}
    train = pipeline.TrainBatcher(source, _NoCoder(), d, batch, 0, 1, seed=0)
    evals = pipeline.EvalBatcher(source, _NoCoder(), d, batch, 0, 1)
    for label, sizes in options.items():
      for kind, batcher, steps in (('train', train, epochs * train.steps_per_epoch),
                                   ('eval', evals, evals.num_steps)):
        padded, used, shapes = 0, 0, set()
        for step in range(steps):
          hws = [p[2] for p in batcher.records(step) if p[0] >= 0]
          shape = pipeline.bucket_shape(hws, sizes, 1)
          shapes.add(shape)
          padded += len(hws) * shape[0] * shape[1]
          used += sum(h * w for h, w in hws)
        out[(grouped, f'{kind} {label}')] = (padded / used - 1, len(shapes))
  return out


class _NoCoder:
  num_coeffs = 0


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--configs', nargs='+', default=['tiny', 'r50'])
  parser.add_argument('--workers', nargs='+', type=int, default=[0, 1, 2])
  parser.add_argument('--batches', type=int, default=10)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  if not COCO.exists():
    sys.exit(f'coco_val158 not found at {COCO}')
  for name in args.configs:
    for b in sorted({args.batch, 32}):
      for (grouped, label), (waste, n) in padding_waste(name, b).items():
        print(f'padding {name:4s} batch {b:2d} group_by_aspect={grouped:d} {label:38s} '
              f'waste {waste:6.1%}  shapes {n}')
  results = {}
  for _ in range(args.repeats):  # interleaved, so host noise spreads over all variants
    for name in args.configs:
      for w in args.workers:
        results.setdefault((name, w), []).append(throughput(name, w, args.batches, args.batch))
  for (name, w), runs in results.items():
    rates = [r for r, _ in runs]
    line = (f'train pipeline {name:4s} workers {w}: median {np.median(rates):6.2f} images/s '
            f'(runs {", ".join(f"{x:.2f}" for x in rates)})')
    if w == 0:
      line += f'; {1e3 * np.median([c for _, c in runs]):.0f} ms CPU per image'
    print(line)
  print(f'load average during the run: {os.getloadavg()}')


if __name__ == '__main__':
  main()
