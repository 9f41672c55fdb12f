"""The train state: one pytree holding everything a resumed run needs from the device side."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class TrainState:
  """step: optimiser updates done; params: trained + frozen weights; buffers: FrozenBN constants;
  opt_state: optax state; rng: raw uint32[2] key, the root of every per-step dropout key."""
  step: jax.Array
  params: Any
  buffers: Any
  opt_state: Any
  rng: jax.Array

  @property
  def variables(self):
    return {'params': self.params, 'buffers': self.buffers}


def dropout_key(state: TrainState) -> jax.Array:
  """The dropout key of the update `state.step`: a pure function of (root rng, step)."""
  return jax.random.fold_in(state.rng, state.step)


def create(variables, tx, rng) -> TrainState:
  """A fresh state at step 0 from model variables `{'params', 'buffers'}` and an optimiser."""
  params = variables['params']
  buffers = variables.get('buffers', {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, buffers=buffers,
                    opt_state=tx.init(params),
                    rng=np.array(jax.device_get(rng), np.uint32))  # a copy: states are donated
