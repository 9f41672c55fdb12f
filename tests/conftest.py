"""Test set-up: 8 simulated CPU devices, set before jax is first imported."""
import os
import sys

# LLVM's optimisation level 0: the suite's programs are small and compiled once each, so their
# compilation, not their run, is the suite's time; level 0 halves it. Values are checked to the
# same tolerances (benchmarks keep the default level).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for the whole session, inherited by the subprocesses that
# tests start (train.py runs): identical programs compile once per test run.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import tempfile
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='solq_jax_test_cache_')
assert 'jax' not in sys.modules, 'conftest must run before jax is imported'

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
COCO_VAL158 = REPO.parent / 'shared' / 'data' / 'coco_val158'


@pytest.fixture(scope='session')
def coco_val158():
  """Path of the shared 158-image COCO val2017 subset; skips (clearly) when it is absent."""
  if not (COCO_VAL158 / 'annotations' / 'instances_val2017.json').exists():
    pytest.skip(f'shared dataset not found at {COCO_VAL158} (see ../shared/data/README.md)')
  return COCO_VAL158


@pytest.fixture(scope='session')
def tiny_config():
  from configs import tiny
  return tiny.get_config()


@pytest.fixture(scope='session')
def r50_config():
  from configs import solq_r50
  return solq_r50.get_config()
