"""The train state: one pytree holding everything a resumed run needs from the device side.

The optional weight EMA (`train.ema_decay` > 0) lives here too, so it is checkpointed and
restored with the rest. It is bias-corrected: after update t it is the normalised exponentially
weighted mean of the parameters after updates 1..t,

    ema_t = sum_{s=1..t} (1 - d) d^(t-s) params_s / (1 - d^t),

i.e. `ema = d_t * ema + (1 - d_t) * params` with d_t = d (1 - d^(t-1)) / (1 - d^t), which starts
at 0 (ema_1 = params_1) and tends to d. Without the correction the average would keep a weight
d^t on the step-0 weights (random or only a pretrained backbone): with d = 0.9998 that is still
37% after 5000 updates, so evaluating the EMA early in a run would score a mostly untrained
model. The correction is the one Adam applies to its moments.
"""
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class TrainState:
  """step: optimiser updates done; params: trained + frozen weights; buffers: FrozenBN constants;
  opt_state: optax state; rng: raw uint32[2] key, the root of every per-step dropout key;
  ema_params: the bias-corrected EMA of `params` (module docstring), or None when the run keeps
  none (then the pytree, and so a checkpoint, is what it was before EMAs existed)."""
  step: jax.Array
  params: Any
  buffers: Any
  opt_state: Any
  rng: jax.Array
  ema_params: Any = None

  @property
  def variables(self):
    return {'params': self.params, 'buffers': self.buffers}

  def eval_variables(self, use_ema: bool = True):
    """The variables to evaluate: the EMA's when the state keeps one and `use_ema`."""
    if use_ema and self.ema_params is not None:
      return {'params': self.ema_params, 'buffers': self.buffers}
    return self.variables


def dropout_key(state: TrainState, micro=None) -> jax.Array:
  """The dropout key of the update `state.step`: a pure function of (root rng, step), and of
  the micro-batch index `micro` when the update accumulates several."""
  key = jax.random.fold_in(state.rng, state.step)
  return key if micro is None else jax.random.fold_in(key, micro)


def ema_step_decay(step, decay: float):
  """d_t of update `step` (1-based) for the bias-corrected EMA of decay d (module docstring).
  1 - d^n is computed as -expm1(n log d): direct in float32 it loses most digits for d near 1."""
  log_d = math.log(decay)
  steps = jnp.asarray(step, jnp.float32)
  return decay * jnp.expm1((steps - 1) * log_d) / jnp.expm1(steps * log_d)


def update_ema(ema_params, params, step, decay: float):
  """The EMA after update `step` (1-based) whose result is `params`."""
  d = ema_step_decay(step, decay)
  return jax.tree.map(lambda e, p: d.astype(e.dtype) * e + (1 - d).astype(e.dtype) * p,
                      ema_params, params)


def create(variables, tx, rng, ema: bool = False) -> TrainState:
  """A fresh state at step 0 from model variables `{'params', 'buffers'}` and an optimiser;
  `ema`: keep an EMA of the parameters (it starts as a copy of them)."""
  params = variables['params']
  buffers = variables.get('buffers', {})
  # Copies on the host: states are donated, and two leaves of one state must not share a buffer.
  ema_params = jax.tree.map(lambda x: np.array(x, copy=True), params) if ema else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, buffers=buffers,
                    opt_state=tx.init(params),
                    rng=np.array(jax.device_get(rng), np.uint32),  # a copy: states are donated
                    ema_params=ema_params)
