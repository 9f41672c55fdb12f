"""The data-parallel train step: GSPMD under `jax.jit` over the mesh of `solq_jax.sharding`.

Parameters and optimiser state are replicated; every batch array is split on its leading axis.
Loss and gradients are computed on the global batch (the criterion normalises by the global
ground-truth count, as the official DDP run does), so the result does not depend on the number
of devices. The step is traced under the mesh as the context mesh, so the ops that must see the
per-device batch (the deformable-attention core, the host matcher) run per shard
(`sharding.per_batch_shard`).

Frozen parameters need nothing here: the backbone stops their gradients, so they are zero, and
the optimiser's frozen group never updates them (solq_jax.models.backbone.frozen_module).

Gradient accumulation (`grad_accum_steps` k > 1): the step still receives the whole global batch
of its optimizer step (so the data order, checkpoints and resume are those of k = 1) and splits
it into k micro-batches, run one after the other by a `lax.scan` (one compiled copy of the
model) that sums their gradients. Every micro-batch is matched on its own and its terms are
normalised by the counts of the whole global batch (the criterion's `step_valid`), so the summed
gradients and terms equal those of the global batch in one piece, up to float rounding. Micro-
batch i holds rows i, i+k, i+2k, ... of the global batch: each device's contiguous block of rows
then holds its equal share of every micro-batch, so each micro-batch is split over all devices
without moving any data. The dropout key of micro-batch i is fold_in(fold_in(rng, step), i).

Weight EMA (`ema_decay` > 0): updated after every optimizer step (solq_jax.training.state).
"""
import functools
from typing import Callable, Optional

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


# Folded into the dropout key for the denoising queries' noise (a stream of its own).
DENOISE_STREAM = 1


def loss_fn(params, buffers, batch, key, *, model, criterion, denoiser=None):
  """(weighted total, dict of loss terms) of one global batch. `denoiser`: None, or
  `(key, batch) -> DN queries` (`solq_jax.denoising.denoiser_from_config`), drawn from the
  dropout key and given to the model."""
  variables = {'params': params, 'buffers': buffers}
  extra = {}
  if denoiser is not None:
    extra['dn_queries'] = denoiser(jax.random.fold_in(key, DENOISE_STREAM), batch)
  outputs = model.apply(variables, batch['images'], batch['pad_mask'], train=True,
                        rngs={'dropout': key}, **extra)
  terms = criterion(outputs, batch)
  return terms['total'], terms


def check_grad_accum(grad_accum_steps, batch_size=None, num_devices: int = 1) -> None:
  """Raises naming the config field when `train.grad_accum_steps` is not a count or cannot
  split a global batch of `batch_size` (when given) over `num_devices`."""
  k = grad_accum_steps
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f'config.train.grad_accum_steps must be an integer >= 1, got {k!r}')
  if batch_size is not None and batch_size % (k * num_devices):
    raise ValueError(
        f'config.train.batch_size ({batch_size}) must be a multiple of '
        f'config.train.grad_accum_steps x devices ({k} x {num_devices} = {k * num_devices}): '
        'each of the micro-batches is split over every device')


def check_ema_decay(ema_decay) -> None:
  if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not (
      0.0 <= ema_decay < 1.0):
    raise ValueError(f'config.train.ema_decay must be a number in [0, 1) (0 = no EMA), got '
                     f'{ema_decay!r}')


def micro_batches(batch, k: int):
  """`[B, ...]` arrays -> `[k, B/k, ...]`: micro-batch i holds rows i, i+k, i+2k, ... (module
  docstring)."""
  return {name: jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
          for name, x in batch.items()}


def train_step_fn(model, tx, criterion: Callable, lr_schedule: Callable, *,
                  grad_accum_steps: int = 1, ema_decay: float = 0.0,
                  denoiser: Optional[Callable] = None) -> Callable:
  """The un-jitted step (state, batch) -> (state, metrics); `make_train_step` compiles it.

  `criterion(outputs, batch, step_valid=None)`: dict of loss terms with the weighted `total`
  (`solq_jax.losses.criterion_from_config`). `grad_accum_steps`: micro-batches per optimizer
  step; `ema_decay`: the weight EMA's decay (0 = none; the state must then keep one). Metrics:
  the terms of the whole global batch, its gradient norm and the learning rate. `denoiser`:
  see `loss_fn`."""
  check_grad_accum(grad_accum_steps)
  check_ema_decay(ema_decay)
  k = grad_accum_steps
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, denoiser=denoiser), has_aux=True)

  def gradients(state, batch):
    """(terms, gradients) of the global batch."""
    if k == 1:
      key = state_lib.dropout_key(state)
      (_, terms), grads = grad_fn(state.params, state.buffers, batch, key, model=model,
                                  criterion=criterion)
      return terms, grads
    size = batch['images'].shape[0]
    if size % k:
      raise ValueError(f'a batch of {size} images does not split into '
                       f'config.train.grad_accum_steps={k} micro-batches')
    step_criterion = functools.partial(criterion, step_valid=batch['valid'])

    def accumulate(grads_sum, micro):
      index, micro_batch = micro
      key = state_lib.dropout_key(state, micro=index)
      (_, terms), grads = grad_fn(state.params, state.buffers, micro_batch, key, model=model,
                                  criterion=step_criterion)
      return jax.tree.map(jnp.add, grads_sum, grads), terms

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, terms = jax.lax.scan(accumulate, zeros,
                                (jnp.arange(k, dtype=jnp.int32), micro_batches(batch, k)))
    return {name: value.sum(0) for name, value in terms.items()}, grads

  def step(state: state_lib.TrainState, batch):
    terms, grads = gradients(state, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(terms)
    metrics['grad_norm'] = optax.tree.norm(grads)
    # The loss above comes from the parameters before the update, so a finite loss can still
    # leave non-finite parameters behind; the loop refuses to save (or continue from) such a
    # state. One fused reduction over all leaves, read by the loop as a 0/1 scalar.
    metrics[PARAMS_FINITE] = params_finite(params)
    metrics['lr'] = lr_schedule(state.step)
    ema_params = state.ema_params
    if ema_decay:
      if ema_params is None:
        raise ValueError('config.train.ema_decay > 0 but the train state keeps no EMA '
                         '(create it with state.create(..., ema=True))')
      ema_params = state_lib.update_ema(ema_params, params, state.step + 1, ema_decay)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema_params)
    return new_state, metrics

  return step


def make_train_step(model, tx, mesh: Mesh, criterion: Callable, lr_schedule: Callable,
                    donate: bool = True, *, grad_accum_steps: int = 1,
                    ema_decay: float = 0.0, denoiser: Optional[Callable] = None) -> Callable:
  """Compiles the step with replicated state and batch-sharded inputs over `mesh`."""
  step = train_step_fn(model, tx, criterion, lr_schedule, grad_accum_steps=grad_accum_steps,
                       ema_decay=ema_decay, denoiser=denoiser)
  repl = sharding.replicated(mesh)
  compiled = jax.jit(step, in_shardings=(repl, sharding.batch_sharding(mesh)),
                     out_shardings=(repl, repl), donate_argnums=(0,) if donate else ())
  return sharding.under_mesh(mesh, compiled)
