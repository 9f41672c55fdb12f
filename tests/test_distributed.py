"""Multi-process data parallelism on one machine: two processes with 4 CPU devices each join
through `jax.distributed` (gloo collectives), each feeds its half of every global batch, and
after two steps their checkpoint equals a single process with 8 devices."""
import json
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


def run_two_processes(args, tmp_path):
  """Runs `python ARGS` as 2 processes of 4 CPU devices joined through jax.distributed on
  localhost; asserts both exit 0 (their stderr is kept in tmp_path)."""
  port = free_port()
  flags = os.environ['XLA_FLAGS'].replace('device_count=8', 'device_count=4')   # conftest's
  env = dict(os.environ, XLA_FLAGS=flags,
             JAX_PLATFORMS='cpu')
  procs = []
  for pid in range(2):
    cmd = [sys.executable, *args, '--config.train.distributed=True',
           f'--config.train.coordinator_address=localhost:{port}',
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


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_processes_match_one(tmp_path):
  run_two_processes(['train.py', '--config', train_helpers.CONFIG_FILE,
                     '--workdir', str(tmp_path / 'multi'), '--config.train.stop_at_step=2'],
                    tmp_path)

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


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_process_evaluation_equals_one(tmp_path, coco_val158, tiny_config):
  """eval.py in 2 processes x 4 devices: the same detections and metrics as 1 process x 8
  devices; the result files are written once, by process 0."""
  from solq_jax.inference import evaluate  # pylint: disable=g-import-not-at-top
  from solq_jax import sharding  # pylint: disable=g-import-not-at-top
  overrides = {'data.root': str(coco_val158), 'data.num_workers': 0, 'model.num_classes': 91,
               'eval.max_images': 11, 'eval.batch_size': 8, 'data.eval_size': 128,
               'data.eval_max_size': 160}   # 2 batches, the second with 5 filler rows
  run_two_processes(['eval.py', '--config', 'configs/tiny.py', '--out_dir',
                     str(tmp_path / 'multi')] +
                    [f'--config.{k}={v}' for k, v in overrides.items()], tmp_path)

  config = tiny_config.copy_and_resolve_references()
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  single = evaluate.run(config, '', str(tmp_path / 'single'), sharding.make_mesh(8))
  multi = json.loads((tmp_path / 'multi' / 'metrics.json').read_text())
  assert multi['num_images'] == single['num_images'] == 11 and multi['processes'] == 2
  for t in ('bbox', 'segm'):
    assert multi[t] == pytest.approx(single[t], abs=1e-9), t

    def records(run, t=t):
      rows = json.loads((tmp_path / run / f'{t}_results.json').read_text())
      return sorted(rows, key=lambda r: (r['image_id'], -r['score'], r['category_id']))
    a, b = records('multi'), records('single')
    assert len(a) == len(b) == 11 * config.eval.top_k
    assert [r['image_id'] for r in a] == [r['image_id'] for r in b]
    np.testing.assert_allclose([r['score'] for r in a], [r['score'] for r in b], atol=1e-5)
  assert not (tmp_path / 'multi' / 'process_parts').exists()
