"""The device mesh and everything that names its axis.

Training and evaluation are data-parallel over one 1-D mesh whose single axis, `AXIS`, splits
the batch; parameters and optimiser state are replicated. This module is the only place that
names the axis: model code is sharding-agnostic, and the few ops that must see the per-device
slice of the batch (the deformable-attention core, the host matcher) go through
`per_batch_shard`, which reads the context mesh that `under_mesh` / `mesh_context` set.
"""
import contextlib
import functools
from typing import Any, Callable, Dict, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'data'

Axes = Union[int, Sequence[int]]


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh named `AXIS` over the first `num_devices` devices (0 = all, every process)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f'train.num_devices={num_devices} but only {len(devices)} devices exist')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Split along the leading (batch) axis over `AXIS`."""
  return NamedSharding(mesh, P(AXIS))


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  if global_batch % mesh.size:
    raise ValueError(f'the global batch ({global_batch}) must be a multiple of the number of '
                     f'devices in the mesh ({mesh.size})')


def shard_batch(local_batch: Dict[str, np.ndarray], mesh: Mesh) -> Dict[str, jax.Array]:
  """Host arrays of this process's share of the global batch -> global batch-sharded arrays."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def replicate(tree, mesh: Mesh):
  """Places a host or device pytree on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def abstract_state(tree: Any, mesh: Mesh) -> Any:
  """ShapeDtypeStructs (replicated over `mesh`) of a state: the restore target of a checkpoint."""
  repl = replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=repl), tree)


def mesh_context(mesh: Optional[Mesh]):
  """`jax.set_mesh(mesh)`, or nothing without a mesh: code traced inside sees `mesh` as the
  context mesh, so `per_batch_shard` runs its ops on each device's slice of the batch."""
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def under_mesh(mesh: Optional[Mesh], fn: Callable) -> Callable:
  """`fn` called (and so traced) inside `mesh_context(mesh)`."""
  @functools.wraps(fn)
  def call(*args, **kwargs):
    with mesh_context(mesh):
      return fn(*args, **kwargs)
  return call


def device_putter(mesh: Optional[Mesh]) -> Callable:
  """Places this process's rows of an evaluation batch on the mesh, split along `AXIS`
  (identity without a mesh); in a multi-process run the global batch is every process's rows."""
  if mesh is None:
    return lambda x: x
  sharding = batch_sharding(mesh)
  size = mesh.shape[AXIS]

  def put(x):
    rows = x.shape[0] * jax.process_count()
    if rows % size:
      raise ValueError(f'eval batch of {rows} images does not split over the {size} '
                       f"devices of the '{AXIS}' mesh axis: set config.eval.batch_size to a "
                       'multiple')
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))
  return put


def local_rows(x):
  """This process's rows of a batch-sharded array, in batch order, as numpy (the array itself
  when it is not a multi-process array)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return x
  parts = {}
  for shard in x.addressable_shards:
    start = shard.index[0].start or 0
    parts.setdefault(start, shard.data)   # replicas of a row range hold the same values
  return np.concatenate([np.asarray(parts[k]) for k in sorted(parts)])


def _axis_spec(axis: int) -> P:
  return P(*(None,) * axis, AXIS)


def _per_arg(axes: Axes, count: int) -> tuple:
  return (axes,) * count if isinstance(axes, int) else tuple(axes)


def per_batch_shard(fn: Callable, *args, in_axes: Axes = 0, out_axes: Axes = 0):
  """`fn(*args)` run on each device's slice of the batch when the context mesh splits it.

  `in_axes` names the batch axis of every argument (one int for all, or one per argument) and
  `out_axes` that of the outputs (one int for all, or one per element of the output tuple).
  Under a context mesh (`under_mesh`, `mesh_context`) whose `AXIS` has more than one device,
  `fn` runs under `jax.shard_map` and sees only its device's examples: left to the SPMD
  partitioner, data-dependent gathers into a batch-sharded array become all-gathers, and a host
  callback receives the whole batch on one device (one serial host call, which can dead-lock
  with explicit output shardings). Without a context mesh, or with one device on the axis, it is
  a plain call. `fn` must treat examples independently; it runs without the varying-axis checks
  (`check_vma=False`), as host callbacks and custom gradients do not declare them.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*args)
  if AXIS not in mesh.axis_names:
    raise ValueError(f"the context mesh needs a '{AXIS}' axis to split the batch over, got "
                     f'axes {mesh.axis_names}')
  shards = mesh.shape[AXIS]
  if shards == 1:
    return fn(*args)
  in_axes = _per_arg(in_axes, len(args))
  for arg, axis in zip(args, in_axes):
    batch = np.shape(arg)[axis]
    if batch % shards:
      raise ValueError(f'the batch ({batch}) is not divisible by the {shards} devices of mesh '
                       f"axis '{AXIS}'")
  in_specs = tuple(_axis_spec(a) for a in in_axes)
  if isinstance(out_axes, int):
    out_specs = _axis_spec(out_axes)
  else:
    out_specs = tuple(_axis_spec(a) for a in out_axes)
  return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)
