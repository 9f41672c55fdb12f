"""The data-parallel train step: one mesh over all devices (axis 'data'), GSPMD under `jax.jit`.

Parameters and optimiser state are replicated; every batch array is split on its leading axis.
Loss and gradients are computed on the global batch (the criterion normalises by the global
ground-truth count, as the official DDP run does), so the result does not depend on the number
of devices.
"""
import functools
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from solq_jax import losses as losses_lib
from solq_jax.training import optimizer as optimizer_lib
from solq_jax.training import state as state_lib

DATA_AXIS = 'data'


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh named 'data' over the first `num_devices` devices (0 = all, every process)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f'train.num_devices={num_devices} but only {len(devices)} devices exist')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


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


def _freeze(params, trainable):
  """Stops gradients into frozen leaves, so XLA drops their (unused) weight gradients."""
  return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)


def loss_fn(params, buffers, batch, key, *, model, config, trainable, mesh=None):
  """(weighted total, dict of loss terms) of one global batch."""
  variables = {'params': _freeze(params, trainable), 'buffers': buffers}
  outputs = model.apply(variables, batch['images'], batch['pad_mask'], train=True,
                        rngs={'dropout': key})
  terms = losses_lib.solq_losses(outputs, batch, config, mesh=mesh)
  return terms['total'], terms


def train_step_fn(config, model, tx, mesh, lr_schedule: Callable, trainable) -> Callable:
  """The un-jitted step (state, batch) -> (state, metrics); `make_train_step` compiles it."""

  def step(state: state_lib.TrainState, batch):
    key = state_lib.dropout_key(state)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, terms), grads = grad_fn(state.params, state.buffers, batch, key, model=model,
                                config=config, trainable=trainable, mesh=mesh)
    trained = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(terms)
    metrics['grad_norm'] = optax.tree.norm(trained)
    metrics['lr'] = lr_schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return step


def make_train_step(config, model, tx, mesh: Mesh, lr_schedule: Callable, params,
                    donate: bool = True) -> Callable:
  """Compiles the step with replicated state and batch-sharded inputs over `mesh`."""
  trainable = optimizer_lib.trainable_mask(params, config.model.backbone_frozen_stages)
  step = train_step_fn(config, model, tx, mesh, lr_schedule, trainable)
  repl = replicated(mesh)
  return under_mesh(mesh, jax.jit(step, in_shardings=(repl, batch_sharding(mesh)),
                                  out_shardings=(repl, repl),
                                  donate_argnums=(0,) if donate else ()))


def under_mesh(mesh: Mesh, fn: Callable) -> Callable:
  """`fn` called (and so traced) with `mesh` as the context mesh (`jax.set_mesh`).

  Ops that need the per-device view of the batch read it from there: the deformable-attention
  core runs under `shard_map` over DATA_AXIS (solq_jax.ops.ms_deform_attn.per_batch_shard).
  The evaluation forward runs under the same context (solq_jax.evaluation.evaluate).
  """
  @functools.wraps(fn)
  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)
  return call


def abstract_state(state: Any, mesh: Mesh) -> Any:
  """ShapeDtypeStructs (replicated over `mesh`) of a state: the restore target of a checkpoint."""
  repl = replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=repl), state)
