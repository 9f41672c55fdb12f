"""Train SOLQ (and evaluate it at the end): a thin entry point over `solq_jax.training`.

  python train.py                                   # the CPU demo on the generated dataset
  python train.py --config configs/solq_r50.py --config.data.root=/path/to/coco \
      --config.train.batch_size=32 --workdir runs/r50

Re-running with the same --workdir resumes from its newest checkpoint.
"""
import logging as py_logging
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from solq_jax import cli

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'experiment config file')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'checkpoints, metrics and eval results')
_CACHE = flags.DEFINE_string(
    'compilation_cache', '.cache/jax_compilation',
    "JAX's persistent compilation cache: a re-run (or a resume) skips most compiling "
    "('' = off; the JAX_COMPILATION_CACHE_DIR environment variable wins)")


class _LibraryInfoFilter(py_logging.Filter):
  """Keeps the console readable: INFO lines of orbax and JAX internals are dropped (their
  warnings and errors still show)."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or not any(
        part in record.pathname for part in ('/orbax/', '/jax/_src/'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(max(logging.get_verbosity(), logging.INFO))   # --verbosity=1: debug
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  config = _CONFIG.value
  from solq_jax.training import host_malloc  # pylint: disable=g-import-not-at-top
  if not host_malloc.fix_malloc_thresholds():
    logging.info('malloc thresholds left as they are (no glibc mallopt)')
  import jax  # pylint: disable=g-import-not-at-top
  if _CACHE.value and 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    jax.config.update('jax_compilation_cache_dir', _CACHE.value)
  from solq_jax.training import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(config.train)  # before any other JAX call
  # pylint: disable=g-import-not-at-top
  from solq_jax.inference import evaluate
  from solq_jax.training import checkpoint
  from solq_jax.training import lock
  from solq_jax.training import loop
  trainer = loop.Trainer(config)
  logging.info('mesh %s; %d steps (%d per epoch); global batch %d', dict(trainer.mesh.shape),
               trainer.total_steps, trainer.steps_per_epoch, config.train.batch_size)
  # Training never imports inference code: COCO evaluation is wired in here.
  evaluation = evaluate.make_evaluation(config, trainer.model, trainer.coder, trainer.mesh,
                                        progress=config.train.progress_bar)
  try:
    trainer.fit(_WORKDIR.value, evaluation=evaluation)
  except (checkpoint.CheckpointError, lock.WorkdirLockedError, loop.NonFiniteLossError) as e:
    cli.exit_with(e)


if __name__ == '__main__':
  cli.run(main)
