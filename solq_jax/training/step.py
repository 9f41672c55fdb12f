"""The data-parallel train step: GSPMD under `jax.jit` over the mesh of `solq_jax.sharding`.

Parameters and optimiser state are replicated; every batch array is split on its leading axis.
Loss and gradients are computed on the global batch (the criterion normalises by the global
ground-truth count, as the official DDP run does), so the result does not depend on the number
of devices. The step is traced under the mesh as the context mesh, so the ops that must see the
per-device batch (the deformable-attention core, the host matcher) run per shard
(`sharding.per_batch_shard`).

Frozen parameters need nothing here: the backbone stops their gradients, so they are zero, and
the optimiser's frozen group never updates them (solq_jax.models.backbone.frozen_module).
"""
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from solq_jax import sharding
from solq_jax.training import state as state_lib


# The metrics key of the 0/1 flag "every updated parameter is finite" (popped by the loop).
PARAMS_FINITE = 'params_finite'


def params_finite(params) -> jax.Array:
  """float32 1.0 when every entry of every leaf is finite, else 0.0."""
  flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(params)]
  return jnp.stack(flags).all().astype(jnp.float32) if flags else jnp.float32(1)


def loss_fn(params, buffers, batch, key, *, model, criterion):
  """(weighted total, dict of loss terms) of one global batch."""
  variables = {'params': params, 'buffers': buffers}
  outputs = model.apply(variables, batch['images'], batch['pad_mask'], train=True,
                        rngs={'dropout': key})
  terms = criterion(outputs, batch)
  return terms['total'], terms


def train_step_fn(model, tx, criterion: Callable, lr_schedule: Callable) -> Callable:
  """The un-jitted step (state, batch) -> (state, metrics); `make_train_step` compiles it.

  `criterion(outputs, batch)`: dict of loss terms with the weighted `total`
  (`solq_jax.losses.criterion_from_config`)."""

  def step(state: state_lib.TrainState, batch):
    key = state_lib.dropout_key(state)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, terms), grads = grad_fn(state.params, state.buffers, batch, key, model=model,
                                criterion=criterion)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(terms)
    metrics['grad_norm'] = optax.tree.norm(grads)
    # The loss above comes from the parameters before the update, so a finite loss can still
    # leave non-finite parameters behind; the loop refuses to save (or continue from) such a
    # state. One fused reduction over all leaves, read by the loop as a 0/1 scalar.
    metrics[PARAMS_FINITE] = params_finite(params)
    metrics['lr'] = lr_schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return step


def make_train_step(model, tx, mesh: Mesh, criterion: Callable, lr_schedule: Callable,
                    donate: bool = True) -> Callable:
  """Compiles the step with replicated state and batch-sharded inputs over `mesh`."""
  step = train_step_fn(model, tx, criterion, lr_schedule)
  repl = sharding.replicated(mesh)
  compiled = jax.jit(step, in_shardings=(repl, sharding.batch_sharding(mesh)),
                     out_shardings=(repl, repl), donate_argnums=(0,) if donate else ())
  return sharding.under_mesh(mesh, compiled)
