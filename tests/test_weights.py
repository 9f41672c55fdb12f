"""weights.load: every kind of path -> variables, the one model-config check, read-only use of
a training run's checkpoint directory."""
import json
import os

import jax
import numpy as np
import optax
import pytest

from solq_jax import sharding
from solq_jax import weights
from solq_jax.training import checkpoint as train_ckpt
from solq_jax.training import state as state_lib
from solq_jax.weights import store

VARIABLES = {'params': {'head': {'kernel': np.arange(12, dtype=np.float32).reshape(3, 4)}},
             'buffers': {'bn': {'mean': np.full(4, 0.5, np.float32)}}}


def _training_run(directory, model_config, steps=(3,)):
  """A training run's orbax directory, saved replicated over all 8 devices."""
  state = state_lib.create(VARIABLES, optax.adamw(1e-3), np.array([0, 1], np.uint32))
  state = sharding.replicate(state, sharding.make_mesh())
  checkpointer = train_ckpt.Checkpointer(directory, model_config, async_save=False)
  for step in steps:
    checkpointer.save(step, state, {'step': step}, force=True)
  checkpointer.close()
  return directory


def test_bad_paths(tiny_config, tmp_path):
  with pytest.raises(FileNotFoundError, match='no_ckpt'):
    weights.load(str(tmp_path / 'no_ckpt'), tiny_config.model)
  (tmp_path / 'weights.txt').write_text('x')
  with pytest.raises(ValueError, match='weights.txt'):
    weights.load(str(tmp_path / 'weights.txt'), tiny_config.model)
  (tmp_path / 'empty_dir').mkdir()
  with pytest.raises(ValueError, match='empty_dir'):
    weights.load(str(tmp_path / 'empty_dir'), tiny_config.model)


def test_restore_from_a_training_checkpoint(tiny_config, tmp_path, monkeypatch):
  """A training run's orbax directory (saved replicated over 8 devices) -> params and buffers,
  also when named by a relative path (as `eval.py --checkpoint runs/x/checkpoints`)."""
  _training_run(tmp_path / 'run', tiny_config.model)
  restored = weights.load(str(tmp_path / 'run'), tiny_config.model)
  assert jax.tree.structure(restored) == jax.tree.structure(VARIABLES)
  jax.tree.map(np.testing.assert_array_equal, restored, VARIABLES)
  monkeypatch.chdir(tmp_path)
  relative = weights.load('run', tiny_config.model)
  jax.tree.map(np.testing.assert_array_equal, relative, VARIABLES)
  other = tiny_config.copy_and_resolve_references()
  other.model.nheads = 2                         # same parameter shapes, another model
  with pytest.raises(weights.ModelConfigMismatch, match='nheads'):
    weights.load(str(tmp_path / 'run'), other.model)


def test_one_step_folder_and_the_newest_step(tiny_config, tmp_path):
  """`checkpoints/<step>` loads that step; `checkpoints/` loads the newest complete one."""
  run = _training_run(tmp_path / 'run', tiny_config.model, steps=(2, 5))
  older = run / '2'
  state = state_lib.create(jax.tree.map(lambda x: x + 1, VARIABLES), optax.adamw(1e-3),
                           np.array([0, 1], np.uint32))
  checkpointer = train_ckpt.Checkpointer(run, tiny_config.model, async_save=False)
  checkpointer.save(7, sharding.replicate(state, sharding.make_mesh()), {'step': 7}, force=True)
  checkpointer.close()
  jax.tree.map(np.testing.assert_array_equal, weights.load(str(older), tiny_config.model),
               VARIABLES)
  newest = weights.load(str(run), tiny_config.model)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b + 1), newest, VARIABLES)


def test_reading_leaves_an_unfinished_save_alone(tiny_config, tmp_path):
  """A training may be saving while eval.py or predict.py reads its directory: the reader must
  not clean up orbax's temporary folder of the save in progress."""
  run = _training_run(tmp_path / 'run', tiny_config.model)
  in_progress = run / '4.orbax-checkpoint-tmp-1234'
  (in_progress / 'state').mkdir(parents=True)
  (in_progress / 'state' / 'partial').write_bytes(b'written by a running training')
  before = sorted(os.listdir(run))
  weights.load(str(run), tiny_config.model)
  assert sorted(os.listdir(run)) == before
  assert (in_progress / 'state' / 'partial').read_bytes() == b'written by a running training'


def test_the_one_model_config_check(tiny_config, tmp_path):
  """The same check, with the differing field named, for a converted directory, a training
  checkpoint read for inference, and a training resume (which compares every field)."""
  converted = store.save_converted(str(tmp_path / 'converted'), VARIABLES, tiny_config.model)
  _training_run(tmp_path / 'run', tiny_config.model)
  wider = tiny_config.model.copy_and_resolve_references()
  wider.hidden_dim = 96
  for path in (converted, tmp_path / 'run'):
    with pytest.raises(weights.ModelConfigMismatch, match=r"hidden_dim': \(64, 96\)"):
      weights.load(str(path), wider)
  no_dropout = tiny_config.model.copy_and_resolve_references()
  no_dropout.dropout = 0.5                       # not an architecture field: inference loads
  weights.load(str(tmp_path / 'run'), no_dropout)
  resume = train_ckpt.Checkpointer(tmp_path / 'run', no_dropout, async_save=False)
  try:
    with pytest.raises(train_ckpt.CheckpointError, match='dropout'):
      resume.restore_latest(None)
  finally:
    resume.close()


def test_random_weights_without_a_checkpoint(tiny_config):
  a = weights.load('', tiny_config.model, seed=3)
  b = weights.load(None, tiny_config.model, seed=3)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  c = weights.load('', tiny_config.model, seed=4)
  assert not np.array_equal(a['params']['query_embed']['embedding'],
                            c['params']['query_embed']['embedding'])


def test_use_ema_loads_the_weight_ema_of_a_training_checkpoint(tiny_config, tmp_path):
  """`use_ema` (config.eval.use_ema): the EMA of a checkpoint that keeps one, the parameters
  otherwise; without it the parameters."""
  state = state_lib.create(VARIABLES, optax.adamw(1e-3), np.array([0, 1], np.uint32), ema=True)
  state = state.replace(ema_params=jax.tree.map(lambda x: x + 10, state.ema_params))
  checkpointer = train_ckpt.Checkpointer(tmp_path / 'ema_run', tiny_config.model, async_save=False)
  checkpointer.save(1, sharding.replicate(state, sharding.make_mesh()), {'step': 1}, force=True)
  checkpointer.close()
  ema = weights.load(str(tmp_path / 'ema_run'), tiny_config.model, use_ema=True)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b + 10), ema['params'],
               VARIABLES['params'])
  jax.tree.map(np.testing.assert_array_equal, ema['buffers'], VARIABLES['buffers'])
  plain = weights.load(str(tmp_path / 'ema_run'), tiny_config.model, use_ema=False)
  jax.tree.map(np.testing.assert_array_equal, plain, VARIABLES)
  no_ema = _training_run(tmp_path / 'run', tiny_config.model)
  jax.tree.map(np.testing.assert_array_equal,
               weights.load(str(no_ema), tiny_config.model, use_ema=True), VARIABLES)
  with pytest.raises(ValueError, match='config.eval.use_ema'):
    weights.load(str(no_ema), tiny_config.model, use_ema='yes')


def test_resume_check_ignores_only_the_compute_fields(tiny_config):
  """A run resumes in another compute dtype or attention core; any other field still refuses."""
  saved = json.loads(tiny_config.model.to_json())
  other = tiny_config.model.copy_and_resolve_references()
  other.dtype, other.attention_impl = 'bfloat16', 'pallas'
  store.check_model_config(saved, other, 'run', fields=None, ignore=store.COMPUTE_FIELDS)
  with pytest.raises(weights.ModelConfigMismatch, match='dtype'):
    store.check_model_config(saved, other, 'run', fields=None)
  other.enc_n_points = 2
  with pytest.raises(weights.ModelConfigMismatch, match='enc_n_points') as e:
    store.check_model_config(saved, other, 'run', fields=None, ignore=store.COMPUTE_FIELDS)
  assert 'dtype' not in str(e.value)


def test_resume_check_accepts_fields_newer_than_the_record_at_their_default(tiny_config):
  """A run saved before a model option existed resumes while the option is off; switching it
  on, or a record lacking a field that has no model default, is still refused."""
  saved = json.loads(tiny_config.model.to_json())
  for name in ('dn_groups', 'two_stage', 'backbone_width'):
    del saved[name]
  store.check_model_config(saved, tiny_config.model, 'run', fields=None)
  other = tiny_config.model.copy_and_resolve_references()
  other.dn_groups = 2
  with pytest.raises(weights.ModelConfigMismatch, match=r"'dn_groups': \(None, 2\)"):
    store.check_model_config(saved, other, 'run', fields=None)
  del saved['mask_coder']          # a config field, not a model default: still compared
  with pytest.raises(weights.ModelConfigMismatch, match='mask_coder'):
    store.check_model_config(saved, tiny_config.model, 'run', fields=None)
