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


def local_batch_size(global_batch: int) -> int:
  """This process's share of the global batch (processes feed equal shares)."""
  n = jax.process_count()
  if global_batch % n:
    raise ValueError(f'train.batch_size={global_batch} is not divisible by the number of '
                     f'processes ({n})')
  return global_batch // n
