"""Draw SOLQ detections on images: PNG overlays plus detections.json.

  python predict.py --config configs/solq_r50.py --checkpoint DIR_OR_PTH --out_dir out \
      img1.jpg folder/ [--config.eval.score_threshold=0.5] [--config.eval.names_file=names.txt]
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from solq_jax import cli
from solq_jax.inference import predict
from solq_jax.weights import store

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'experiment config file')
_CHECKPOINT = flags.DEFINE_string('checkpoint', '', 'checkpoint dir or official .pth')
_OUT_DIR = flags.DEFINE_string('out_dir', 'predictions', 'overlays and detections.json go here')


def main(argv):
  logging.set_verbosity(max(logging.get_verbosity(), logging.INFO))   # --verbosity=1: debug
  if len(argv) < 2:
    raise app.UsageError('give image files or folders after the flags')
  try:
    predict.run(_CONFIG.value, _CHECKPOINT.value, argv[1:], _OUT_DIR.value)
  except store.CorruptCheckpoint as e:   # flipped bits: the step and files, one line
    cli.exit_with(e)


if __name__ == '__main__':
  cli.run(main)
