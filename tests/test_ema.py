"""The weight EMA (`train.ema_decay`): the bias-corrected closed form, on its own and in the
train step of the micro model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_helpers
from solq_jax import data
from solq_jax import sharding
from solq_jax.training import state as state_lib

pytestmark = pytest.mark.timeout(2400)


def closed_form(history, decay):
  """sum_s (1 - d) d^(t-s) p_s / (1 - d^t) over the parameters after updates s = 1..t, in
  float64."""
  t = len(history)
  weights = [(1 - decay) * decay ** (t - s) / (1 - decay ** t) for s in range(1, t + 1)]
  return jax.tree.map(lambda *ps: sum(w * np.asarray(p, np.float64) for w, p in zip(weights, ps)),
                      *history)


def test_update_follows_the_closed_form():
  """A toy parameter history of 40 updates, for a decay near 1 too (where 1 - d^t in float32
  would lose most digits); the first update makes the EMA the parameters themselves."""
  rng = np.random.default_rng(0)
  history = [{'w': rng.normal(size=(3, 4)).astype(np.float32),
              'b': rng.normal(size=5).astype(np.float32)} for _ in range(40)]
  update = jax.jit(state_lib.update_ema, static_argnums=3)
  for decay in (0.5, 0.9, 0.9999):
    ema = jax.tree.map(lambda x: x * 0 + 7.0, history[0])   # step 0: weighted by nothing
    for t, params in enumerate(history, start=1):
      ema = update(ema, params, jnp.int32(t), decay)
      if t == 1:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ema, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(ema), closed_form(history, decay))
  assert float(state_lib.ema_step_decay(jnp.int32(1), 0.9)) == 0.0
  assert abs(float(state_lib.ema_step_decay(jnp.int32(100000), 0.9)) - 0.9) < 1e-6


def test_train_step_ema_equals_the_closed_form_of_its_params():
  """Three train steps of the micro model: the state's EMA equals the closed form computed with
  numpy from the saved parameters of every step."""
  tr = train_helpers.accumulation_trainer(8, 2)
  state = tr.initial_state()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.ema_params),
               jax.device_get(state.params))
  iterator = tr.data.iterator()
  history = []
  for _ in range(3):
    batch = sharding.shard_batch(data.train_device_batch(next(iterator)), tr.mesh)
    state, _ = tr.train_step(state, batch)
    history.append(jax.device_get(state.params))
  ema = jax.device_get(state.ema_params)
  want = closed_form(history, train_helpers.EMA_DECAY)
  for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema),
                                                      jax.tree.leaves(history[-1])))


def test_checkpoints_without_an_ema_keep_the_old_layout(tmp_path, tiny_config):
  """A run without an EMA writes the items a checkpoint had before the state had an EMA field,
  and a checkpoint of that older state (no `ema_params` at all) still restores; a state with an
  EMA saves and restores it."""
  import dataclasses
  import optax
  from solq_jax.training import checkpoint as checkpoint_lib

  @jax.tree_util.register_dataclass
  @dataclasses.dataclass
  class OlderState:   # the train state's fields before the EMA field
    step: jax.Array
    params: dict
    buffers: dict
    opt_state: tuple
    rng: jax.Array

  variables = {'params': {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}, 'buffers': {}}
  mesh = sharding.make_mesh(1)
  tx = optax.adamw(1e-3)

  def save_and_restore(name, saved, template):
    ckpt = checkpoint_lib.Checkpointer(tmp_path / name, tiny_config.model, async_save=False)
    ckpt.save(1, sharding.replicate(saved, mesh), {'position': 1}, force=True)
    ckpt.close()
    ckpt = checkpoint_lib.Checkpointer(tmp_path / name, tiny_config.model, async_save=False)
    try:
      return ckpt.restore_latest(sharding.abstract_state(template, mesh))[1]
    finally:
      ckpt.close()

  plain = state_lib.create(variables, tx, np.array([0, 1], np.uint32))
  older = OlderState(**{f.name: getattr(plain, f.name) for f in dataclasses.fields(OlderState)})
  for name, saved in (('older', older), ('plain', plain)):
    restored = save_and_restore(name, saved, plain)
    assert isinstance(restored, state_lib.TrainState) and restored.ema_params is None
    np.testing.assert_array_equal(restored.params['w'], variables['params']['w'])
  assert set(checkpoint_lib.state_items(plain)) == {f.name for f in dataclasses.fields(OlderState)}
  with_ema = state_lib.create(variables, tx, np.array([0, 1], np.uint32), ema=True)
  with_ema = with_ema.replace(ema_params={'w': with_ema.ema_params['w'] + 1})
  restored = save_and_restore('ema', with_ema, with_ema)
  np.testing.assert_array_equal(restored.ema_params['w'], variables['params']['w'] + 1)
