"""Evaluate SOLQ on a COCO-format split: bbox and segm AP, result and metrics jsons.

  python eval.py --config configs/solq_r50.py --checkpoint DIR_OR_PTH \
      --config.data.root=/path/to/coco [--config.eval.max_images=50] [--out_dir DIR]

`--checkpoint`: a training run's checkpoint directory, a converted variables directory, or an
official SOLQ `.pth`; omitted: random weights (benchmarking only).
"""
import os

from absl import flags
from absl import logging
from ml_collections import config_flags

from solq_jax import cli
from solq_jax import sharding
from solq_jax.inference import evaluate
from solq_jax.training import distributed
from solq_jax.weights import store

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'experiment config file')
_CHECKPOINT = flags.DEFINE_string('checkpoint', '', 'checkpoint dir or official .pth')
_OUT_DIR = flags.DEFINE_string('out_dir', '', "jsons go here ('' = eval/ beside the checkpoint)")
_NUM_DEVICES = flags.DEFINE_integer('num_devices', 0, 'devices of the data mesh (0 = all)')


def main(argv):
  del argv
  logging.set_verbosity(max(logging.get_verbosity(), logging.INFO))   # --verbosity=1: debug
  config = _CONFIG.value
  # Multi-process (as train.py: --config.train.distributed=True ...): each process evaluates
  # its share of the split, process 0 scores them all.
  distributed.initialize(config.train)
  checkpoint = _CHECKPOINT.value
  # Default: beside the checkpoint (never inside: a training checkpoint dir must stay clean).
  out_dir = _OUT_DIR.value or os.path.join(
      os.path.dirname(os.path.abspath(checkpoint.rstrip('/'))) if checkpoint else '.', 'eval')
  mesh = sharding.make_mesh(_NUM_DEVICES.value)
  logging.info('results and metrics go to %s', out_dir)
  try:
    evaluate.run(config, checkpoint, out_dir, mesh)
  except store.CorruptCheckpoint as e:   # flipped bits: the step and files, one line
    cli.exit_with(e)


if __name__ == '__main__':
  cli.run(main)
