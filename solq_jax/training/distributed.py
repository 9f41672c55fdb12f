"""Multi-host start-up: `jax.distributed.initialize()` from the train config."""
import jax


def initialize(train_config) -> None:
  """Joins the multi-process job when `train.distributed` is set (before any other JAX call).

  Empty / 0 / -1 fields are left to JAX's auto-detection (SLURM, Open MPI, TPU pods, ...).
  """
  if not train_config.distributed:
    return
  kwargs = {}
  if train_config.coordinator_address:
    kwargs['coordinator_address'] = train_config.coordinator_address
  if train_config.num_processes > 0:
    kwargs['num_processes'] = int(train_config.num_processes)
  if train_config.process_id >= 0:
    kwargs['process_id'] = int(train_config.process_id)
  jax.distributed.initialize(**kwargs)


def is_main_process() -> bool:
  return jax.process_index() == 0
