"""`benchmarks/accelerator_check.py --smoke`: the device check runs end to end on the CPU (the
Pallas kernel in interpret mode) and its figures are the quantities they claim to be."""
import importlib.util
import pathlib

import jax
import numpy as np

from solq_jax import models

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks' / 'accelerator_check.py'


def _load():
  spec = importlib.util.spec_from_file_location('accelerator_check', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_smoke_run_agrees_and_reports_memory(capsys):
  check = _load()
  result = check.main(['--smoke', '--batch', '1', '--devices', '1'])
  out = capsys.readouterr().out
  assert result['ok'] and 'agreement passed' in out
  # Pallas vs XLA: forward and the three gradients, in both dtypes, each within tolerance.
  assert [(r[0], r[2]) for r in result['core']] == [
      (d, t) for d in ('float32', 'bfloat16')
      for t in ('output', 'd value', 'd locations', 'd weights')]
  for dtype, _, tensor, err, tol, ok in result['core']:
    assert ok and 0 <= err <= tol, (dtype, tensor, err)
    if dtype == 'float32':
      assert err < 1e-5, (tensor, err)   # only summation order differs in float32

  (row,) = result['step']
  assert row['variant'] == 'bfloat16/xla/all'
  assert row['images_per_s'] > 0 and np.isfinite(row['loss'])
  # The compiled peak holds at least the state it is handed: parameters and AdamW's two moments
  # (float32 whatever the compute dtype), per device since the state is replicated.
  config = check.load_config(check.parse(['--smoke']), 'bfloat16', 'xla', 'all')
  model = models.build_model(config.model)
  params = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0)))['params']
  param_bytes = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))
  assert row['compiled_peak'] >= 3 * param_bytes
  assert [r[0] for r in result['forward']] == ['float32', 'bfloat16']
  assert all(ips > 0 for _, ips in result['forward'])


def test_bad_variant_is_refused_naming_it():
  check = _load()
  try:
    check.parse(['--variants', 'float16/xla/none'])
  except SystemExit as e:
    assert "'float16/xla/none'" in str(e)
  else:
    raise AssertionError('a bad variant was accepted')
