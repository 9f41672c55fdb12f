"""Multi-process data parallelism on one machine: two processes with 4 CPU devices each join
through `jax.distributed` (gloo collectives), each feeds its half of every global batch, and
after two steps their checkpoint equals a single process with 8 devices."""
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import train_helpers
from solq_jax.training import checkpoint as checkpoint_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_processes_match_one(tmp_path):
  port = free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  procs = []
  for pid in range(2):
    cmd = [sys.executable, 'train.py', '--config', train_helpers.CONFIG_FILE,
           '--workdir', str(tmp_path / 'multi'), '--config.train.stop_at_step=2',
           '--config.train.distributed=True', f'--config.train.coordinator_address=localhost:{port}',
           '--config.train.num_processes=2', f'--config.train.process_id={pid}']
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                  stderr=open(tmp_path / f'stderr_{pid}.txt', 'wb')))
  try:
    for p in procs:
      p.wait(timeout=1500)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  logs = [(tmp_path / f'stderr_{pid}.txt').read_text()[-3000:] for pid in range(2)]
  assert [p.returncode for p in procs] == [0, 0], logs

  tr = train_helpers.trainer(8)
  single = tr.fit(tmp_path / 'single', stop_at_step=2)
  multi = checkpoint_lib.Checkpointer(tmp_path / 'multi' / 'checkpoints', tr.config.model)
  assert multi.all_steps() == [2]
  state, _ = multi.restore(2, tr._state_template)  # pylint: disable=protected-access
  worst = max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(jax.device_get(state.params)),
      jax.tree.leaves(jax.device_get(single['state'].params))))
  assert worst <= 1e-5, worst
  assert int(state.step) == 2
