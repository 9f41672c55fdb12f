"""Shared by the training tests: one compiled Trainer per device count for the whole session."""
import functools
import json
import pathlib

import train_micro_config

from solq_jax import sharding
from solq_jax.training import loop

CONFIG_FILE = 'tests/train_micro_config.py'


def micro_config():
  return train_micro_config.get_config()


@functools.lru_cache(maxsize=None)
def trainer(num_devices: int) -> loop.Trainer:
  """A Trainer of the micro config on the first `num_devices` devices (its step compiles once).
  Every Trainer starts from the same step-0 variables (initialised once, by the 8-device one)."""
  variables = None
  if num_devices != 8:
    trainer(8).initial_state()
    variables = trainer(8)._variables  # pylint: disable=protected-access
  return loop.Trainer(micro_config(), mesh=sharding.make_mesh(num_devices), variables=variables)


# The accumulation and EMA tests' trainers: no dropout (k micro-batches then equal one batch),
# a global batch of 16 (so that each of 2 micro-batches still splits over 8 devices), an EMA.
ACCUM_BATCH = 16
EMA_DECAY = 0.5


def accumulation_config(grad_accum_steps: int):
  config = micro_config()
  config.model.dropout = 0.0
  t = config.train
  t.batch_size = ACCUM_BATCH
  t.grad_accum_steps = grad_accum_steps
  t.ema_decay = EMA_DECAY
  t.final_eval = True   # only where a test passes an evaluation callable
  return config


@functools.lru_cache(maxsize=None)
def accumulation_trainer(num_devices: int, grad_accum_steps: int) -> loop.Trainer:
  """A Trainer of `accumulation_config` (same step-0 variables as `trainer`)."""
  trainer(8).initial_state()
  return loop.Trainer(accumulation_config(grad_accum_steps),
                      mesh=sharding.make_mesh(num_devices),
                      variables=trainer(8)._variables)  # pylint: disable=protected-access


def losses_by_step(workdir):
  """{step: total} of the train records in workdir/metrics.jsonl (the last record of a step)."""
  out = {}
  for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines():
    rec = json.loads(line)
    if rec['split'] == 'train':
      out[rec['step']] = rec['total']
  return out
