"""Reliability: divergence stops a run before a non-finite state is saved; one writer per work
directory; checkpoint checksums; one-line config errors; the data check."""
import json
import logging
import math
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax
import pytest
from absl import flags

import train_helpers
from solq_jax import cli
from solq_jax.training import checkpoint as checkpoint_lib
from solq_jax.training import lock as lock_lib
from solq_jax.training import loop
from solq_jax.training import state as state_lib
from solq_jax.training import step as step_lib
from solq_jax.weights import store

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(1800)


class _Scale:
  """A one-parameter model: outputs w * sum(images); enough to drive the real step function."""

  def apply(self, variables, images, pad_mask, train, rngs):
    del pad_mask, train, rngs
    return {'x': variables['params']['w'] * images.sum()}


def _toy_step(lr):
  step = step_lib.train_step_fn(_Scale(), optax.sgd(lr), lambda out, batch: {'total': out['x']},
                                lambda s: lr)
  state = state_lib.create({'params': {'w': jnp.ones(())}}, optax.sgd(lr), jax.random.PRNGKey(0))
  batch = {'images': jnp.ones((1, 2, 2, 3)), 'pad_mask': jnp.zeros((1, 2, 2), bool)}
  return jax.jit(step)(state, batch)


def test_step_flags_nonfinite_updated_params_under_a_finite_loss():
  """The loss comes from the parameters before the update: an overflowing update leaves a
  finite loss and infinite parameters, which only the parameter flag reveals."""
  new_state, metrics = _toy_step(1e39)   # inf in float32
  assert math.isfinite(float(metrics['total']))
  assert not np.isfinite(np.asarray(new_state.params['w']))
  assert float(metrics[step_lib.PARAMS_FINITE]) == 0.0
  _, metrics = _toy_step(1e-3)
  assert float(metrics[step_lib.PARAMS_FINITE]) == 1.0


def test_huge_learning_rate_stops_and_leaves_only_finite_checkpoints(tmp_path):
  """A real divergence (lr 1e30, a checkpoint every step): the run stops with the message that
  names the last checkpoint, and every checkpoint on disk holds finite parameters."""
  config = train_helpers.micro_config()
  config.train.lr = 1e30
  config.train.checkpoint_every_steps = 1
  base = train_helpers.trainer(8)
  base.initial_state()
  tr = loop.Trainer(config, variables=base._variables)  # pylint: disable=protected-access
  with pytest.raises(loop.NonFiniteLossError, match='last good checkpoint is step') as err:
    tr.fit(tmp_path)
  named = int(re.search(r'last good checkpoint is step (\d+)', str(err.value)).group(1))
  steps = store.train_steps(tmp_path / 'checkpoints')
  assert steps and steps[-1] == named
  for s in steps:
    variables = store.load_train_variables(tmp_path / 'checkpoints' / str(s), config.model)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables)), s


def _write_lock(workdir, pid, host=None):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / lock_lib.LOCK_NAME).write_text(json.dumps(
      {'host': host or socket.gethostname(), 'pid': pid}))


def test_second_writer_is_refused_naming_the_owner(tmp_path):
  """A live owner's lock stops `fit` before it touches the checkpoints (a second run's start-up
  would remove the first one's save in progress); its pid and host are named."""
  owner = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])
  try:
    _write_lock(tmp_path, owner.pid)
    with pytest.raises(lock_lib.WorkdirLockedError,
                       match=rf'in use by process {owner.pid} on host {socket.gethostname()}'):
      train_helpers.trainer(8).fit(tmp_path)
    assert not (tmp_path / 'checkpoints').exists()
    _write_lock(tmp_path, 1, host='some-other-host')   # another host: cannot be checked
    with pytest.raises(lock_lib.WorkdirLockedError, match='some-other-host'):
      lock_lib.WorkdirLock(tmp_path).acquire()
  finally:
    owner.kill()
    owner.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  _write_lock(tmp_path, dead.pid)
  with caplog.at_level(logging.WARNING), lock_lib.WorkdirLock(tmp_path):
    owner = json.loads((tmp_path / lock_lib.LOCK_NAME).read_text())
    assert owner['pid'] == os.getpid()
    with pytest.raises(lock_lib.WorkdirLockedError, match=str(os.getpid())):
      lock_lib.WorkdirLock(tmp_path).acquire()   # held: even this process cannot take it twice
  assert 'stale lock' in caplog.text and str(dead.pid) in caplog.text
  assert not (tmp_path / lock_lib.LOCK_NAME).exists()   # released on exit


def _flip_bits(path, count=3):
  data = bytearray(path.read_bytes())
  for k in range(count):
    data[(len(data) // 2 + 7 * k) % len(data)] ^= 0x10
  path.write_bytes(bytes(data))


def test_flipped_bits_are_detected_and_resume_from_step_continues(tmp_path):
  """orbax restores a data file with flipped bits without a word; the checksums written with
  each step name the step and the file, and train.resume_from_step continues from an older one."""
  tr = train_helpers.trainer(8)
  assert tr.fit(tmp_path, stop_at_step=4)['step'] == 4
  ckpt_dir = tmp_path / 'checkpoints'
  assert store.train_steps(ckpt_dir) == [2, 4]
  assert all((ckpt_dir / s / store.CHECKSUM_FILE).is_file() for s in ('2', '4'))
  data_file = max((p for p in (ckpt_dir / '4' / 'state').rglob('*') if p.is_file()),
                  key=lambda p: p.stat().st_size)
  _flip_bits(data_file)
  name = data_file.relative_to(ckpt_dir / '4').as_posix()
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=rf'{ckpt_dir / "4"} is corrupt: {re.escape(name)} \(changed\).*'
                           r'resume_from_step=2'):
    tr.fit(tmp_path)
  with pytest.raises(store.CorruptCheckpoint, match=re.escape(name)):
    store.load_train_variables(ckpt_dir, tr.config.model)   # the read-only reader checks too
  with pytest.raises(checkpoint_lib.CheckpointError, match=r'resume_from_step=3: no such step'):
    checkpoint_lib.Checkpointer(ckpt_dir, tr.config.model, resume_from_step=3)
  tr.config.train.resume_from_step = 2
  try:
    result = tr.fit(tmp_path)
  finally:
    tr.config.train.resume_from_step = 0
  assert result['step'] == 6 and len(result['history']) == 4
  assert store.train_steps(ckpt_dir) == [2, 4, 6]
  assert (ckpt_dir / '_discarded_step_4').is_dir()   # kept for inspection, never deleted
  store.load_train_variables(ckpt_dir, tr.config.model)


@pytest.mark.parametrize('command', [
    ['train.py'], ['eval.py'], ['predict.py', 'image.jpg'], ['-m', 'solq_jax.weights']])
def test_config_errors_end_in_one_line(command):
  """A misspelled config field used to end a 53-line traceback; now: one line, exit status 2."""
  result = subprocess.run(
      [sys.executable, *command, '--config', 'configs/tiny.py', '--config.train.batch_sise=4'],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-2000:]
  assert lines[0].endswith('config.train.batch_sise: no such field; did you mean batch_size?')


def test_config_error_messages():
  assert cli.describe_error(
      flags.IllegalFlagValueError("flag --config.train.lr=x: could not convert string to float"),
      ['train.py']) == "config.train.lr: bad value 'x': could not convert string to float"
  try:
    ml_collections.ConfigDict({'eval': {'top_k': 1}}).eval.top_kk   # pylint: disable=pointless-statement
  except AttributeError as e:
    assert cli.describe_error(e, ['eval.py', '--config.eval.top_kk=3']) == (
        'config.eval.top_kk: no such field; did you mean top_k?')
