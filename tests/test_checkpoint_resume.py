"""Checkpoints: a run stopped after step k (or SIGKILLed mid-save) and resumed ends exactly as an
uninterrupted run; NaN stops a run keeping the last good checkpoint; foreign, truncated and
mismatched checkpoint directories are clear errors."""
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import train_helpers
from solq_jax.inference import evaluate
from solq_jax.training import checkpoint as checkpoint_lib
from solq_jax.training import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
# The first test compiles the micro model's init and train step (minutes on a loaded 2-core box).
pytestmark = pytest.mark.timeout(1800)


def assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted 6-step run (checkpoints at 2, 4, 6)."""
  workdir = tmp_path_factory.mktemp('reference')
  result = train_helpers.trainer(8).fit(workdir)
  assert result['step'] == 6
  return workdir, jax.device_get(result['state'])


def test_stop_and_resume_is_exact(reference, tmp_path):
  ref_dir, ref_state = reference
  tr = train_helpers.trainer(8)
  first = tr.fit(tmp_path, stop_at_step=3)
  assert first['step'] == 3
  assert checkpoint_lib.Checkpointer(tmp_path / 'checkpoints', tr.config.model).all_steps() == [2, 3]
  second = tr.fit(tmp_path)
  assert second['step'] == 6 and len(second['history']) == 3
  assert_same_params(second['state'].params, ref_state.params)
  assert_same_params(second['state'].opt_state, ref_state.opt_state)
  assert train_helpers.losses_by_step(tmp_path) == train_helpers.losses_by_step(ref_dir)
  assert sorted(train_helpers.losses_by_step(tmp_path)) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigkill_mid_save_then_resume(reference, tmp_path):
  ref_dir, ref_state = reference
  ckpt_dir = tmp_path / 'checkpoints'
  env = dict(os.environ,   # conftest's XLA_FLAGS: 8 devices
             JAX_PLATFORMS='cpu')
  cmd = [sys.executable, 'train.py', '--config', train_helpers.CONFIG_FILE,
         '--workdir', str(tmp_path), '--config.train.checkpoint_every_steps=1']
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  killed_during = None
  try:
    while proc.poll() is None:
      names = os.listdir(ckpt_dir) if ckpt_dir.is_dir() else []
      done = [n for n in names if n.isdigit()]
      tmp = [n for n in names if 'orbax-checkpoint-tmp' in n]
      if done and tmp:
        os.kill(proc.pid, signal.SIGKILL)
        killed_during = tmp
        break
      time.sleep(0.002)
  finally:
    if proc.poll() is None and killed_during is None:
      proc.kill()
    _, err = proc.communicate(timeout=60)
  assert killed_during, f'never saw a save in progress; train.py said:\n{err.decode()[-3000:]}'
  assert proc.returncode == -signal.SIGKILL
  complete = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  assert complete and complete[-1] < 6
  result = train_helpers.trainer(8).fit(tmp_path)
  assert result['step'] == 6
  assert not [n for n in os.listdir(ckpt_dir) if 'orbax-checkpoint-tmp' in n]
  assert_same_params(result['state'].params, ref_state.params)
  assert train_helpers.losses_by_step(tmp_path) == train_helpers.losses_by_step(ref_dir)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  tr = train_helpers.trainer(8)
  tr.initial_state()
  real_step = tr.train_step

  def poisoned(state, batch):
    step = int(state.step)  # read before the step donates `state`
    new_state, metrics = real_step(state, batch)
    if step == 2:  # the third update
      metrics = dict(metrics, total=metrics['total'] * np.nan)
    return new_state, metrics

  monkeypatch.setattr(tr, '_train_step', poisoned)
  with pytest.raises(loop.NonFiniteLossError, match=r'step 3.*last good checkpoint is step 2'):
    tr.fit(tmp_path)
  assert checkpoint_lib.Checkpointer(tmp_path / 'checkpoints', tr.config.model).all_steps() == [2]


def test_foreign_truncated_and_mismatched_directories(reference, tmp_path):
  ref_dir, _ = reference
  tr = train_helpers.trainer(8)
  model_config = tr.config.model

  foreign = tmp_path / 'foreign' / 'checkpoints'
  foreign.mkdir(parents=True)
  (foreign / 'weights.pkl').write_bytes(b'not ours')
  with pytest.raises(checkpoint_lib.CheckpointError, match='weights.pkl'):
    tr.fit(foreign.parent)

  no_items = tmp_path / 'no_items' / 'checkpoints' / '4'
  no_items.mkdir(parents=True)
  with pytest.raises(checkpoint_lib.CheckpointError, match='missing'):
    checkpoint_lib.Checkpointer(no_items.parent, model_config)

  truncated = tmp_path / 'truncated'
  shutil.copytree(ref_dir / 'checkpoints', truncated / 'checkpoints')
  data_files = [p for p in (truncated / 'checkpoints' / '6' / 'state').rglob('*')
                if p.is_file() and p.stat().st_size > 1000]
  assert data_files
  for p in data_files:
    p.write_bytes(p.read_bytes()[:100])
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r'checkpoints/6 is corrupt: .*\(changed\).*resume_from_step=4'):
    tr.fit(truncated)   # the step's checksums name it first
  (truncated / 'checkpoints' / '6' / 'sha256.json').unlink()   # a step saved without checksums
  with pytest.raises(checkpoint_lib.CheckpointError, match='truncated'):
    tr.fit(truncated)

  other = model_config.copy_and_resolve_references()
  other.hidden_dim = 64
  with pytest.raises(checkpoint_lib.CheckpointError, match='hidden_dim'):
    checkpoint_lib.Checkpointer(ref_dir / 'checkpoints', other).restore_latest(None)


def test_loop_evaluation_reports_box_and_mask_ap(reference, tmp_path):
  _, ref_state = reference
  tr = train_helpers.trainer(8)
  evaluation = evaluate.make_evaluation(tr.config, tr.model, tr.coder, tr.mesh, progress=False)
  metrics = evaluation(ref_state.variables, tmp_path)
  for key in ('bbox/AP', 'segm/AP'):
    assert -1 <= metrics['summary'][key] <= 1
  assert metrics['num_images'] == tr.config.data.synthetic_val_images
  assert (tmp_path / 'segm_results.json').exists()
