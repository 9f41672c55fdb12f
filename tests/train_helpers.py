"""Shared by the training tests: one compiled Trainer per device count for the whole session."""
import functools

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
