"""The accelerator check: one command for the first GPU (or TPU) that comes, one table out.

    python benchmarks/accelerator_check.py              # everything; target < 5 min on one GPU
    python benchmarks/accelerator_check.py --smoke      # tiny sizes on the CPU (the test suite)
    python benchmarks/accelerator_check.py --part memory --batch 4   # compile only (CPU is fine)
    python benchmarks/accelerator_check.py --part step --variants bfloat16/xla/all,float32/xla/none

Parts (`--part`, default all):
* core: the Pallas kernel against the XLA core on this device, forward and backward, float32
  and bfloat16 (largest difference relative to the largest value of the XLA core's result);
  the Pallas kernel runs compiled on CUDA GPUs of compute capability >= 8.0 and in interpret
  mode elsewhere (smaller shapes then: interpret mode is a correctness mode).
* step: the R50 train step (forward, matching, criterion, backward, AdamW) at `--height` x
  `--width`, `--batch` images per device, for each variant dtype/attention/remat: images/s,
  the compiled executable's peak-memory estimate (arguments + outputs + temporaries - aliased),
  and on devices that report it the process's peak device memory so far.
* forward: R50 inference images/s on one device, float32 and bfloat16.
* memory: the step's compiled peak-memory estimate only, from abstract inputs (nothing is
  allocated or run, so the 4 x 800x1333 table can be made on a CPU).
Exits with status 1 when an agreement check fails its tolerance.
"""
import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)                      # timing.py, train_step.py
sys.path.insert(0, os.path.dirname(_HERE))     # configs, solq_jax, kernels

# (dtype, attention_impl, remat) of the step variants; pallas rows are skipped where the
# kernel would run in interpret mode (hours for an R50 step), except in --smoke.
DEFAULT_VARIANTS = ('float32/xla/none', 'float32/xla/all', 'bfloat16/xla/none',
                    'bfloat16/xla/all', 'float32/pallas/none', 'bfloat16/pallas/none',
                    'bfloat16/pallas/all')
SMOKE_VARIANTS = ('bfloat16/xla/all',)  # the Pallas kernel in a whole step is too slow in
# interpret mode; the core part checks it
# Agreement tolerances, relative to the largest magnitude of the XLA core's result: float32
# differs only by summation order; bfloat16 adds one rounding of the output (8 mantissa bits)
# and of the gradients.
TOLERANCE = {'float32': 1e-4, 'bfloat16': 2e-2}


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--smoke', action='store_true', help='tiny model and sizes (CPU, tests)')
  p.add_argument('--part', default='all', choices=('all', 'core', 'step', 'forward', 'memory'))
  p.add_argument('--config', default=None, help='config file (default: configs/solq_r50.py, '
                 'configs/tiny.py with --smoke)')
  p.add_argument('--height', type=int, default=None, help='default 800 (smoke 64)')
  p.add_argument('--width', type=int, default=None, help='default 1333 (smoke 96)')
  p.add_argument('--batch', type=int, default=2, help='images per device')
  p.add_argument('--devices', type=int, default=0, help='devices to use (default: all)')
  p.add_argument('--runs', type=int, default=None, help='timed calls (default 5, smoke 1)')
  p.add_argument('--variants', default=None,
                 help='comma-separated dtype/impl/remat list (default: all; smoke: bf16 + remat)')
  args, overrides = p.parse_known_args(argv)
  args.overrides = overrides
  args.height = args.height or (64 if args.smoke else 800)
  args.width = args.width or (96 if args.smoke else 1333)
  args.runs = args.runs if args.runs is not None else (1 if args.smoke else 5)
  default = SMOKE_VARIANTS if args.smoke else DEFAULT_VARIANTS
  args.variants = tuple(args.variants.split(',')) if args.variants else default
  for v in args.variants:
    parts = v.split('/')
    if len(parts) != 3 or parts[0] not in TOLERANCE or parts[1] not in ('xla', 'pallas'):
      raise SystemExit(f'--variants: {v!r} is not dtype/impl/remat '
                       '(float32|bfloat16 / xla|pallas / none|encoder|decoder|all)')
  return args


def load_config(args, dtype='float32', impl='xla', remat='none'):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import train_step  # pylint: disable=g-import-not-at-top
  path = args.config or os.path.join(os.path.dirname(_HERE), 'configs',
                                     'tiny.py' if args.smoke else 'solq_r50.py')
  spec = importlib.util.spec_from_file_location('check_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if args.smoke:  # the smallest model that still has every part: compiles in seconds
    config.model.update(hidden_dim=32, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=64,
                        num_queries=10, vector_hidden_dim=32, num_coeffs=16, mask_size=16)
    config.data.max_gt = 4
  config = train_step.apply_overrides(config, args.overrides)
  config.model.dtype, config.model.attention_impl, config.train.remat = dtype, impl, remat
  return config


def _mib(n):
  return f'{n / 2**20:,.0f} MiB' if n is not None else '-'


def compiled_peak_bytes(compiled):
  """Arguments + outputs + temporaries - donated (aliased) bytes of a compiled executable."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)


def device_peak_bytes(device):
  """The process's peak device memory so far, where the backend reports it (GPU, TPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without memory stats)
    return None
  return (stats or {}).get('peak_bytes_in_use')


def relative_error(got, want):
  import numpy as np  # pylint: disable=g-import-not-at-top
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def check_core(args, device):
  """Rows (dtype, direction, tensor, error, tolerance, ok) of Pallas vs XLA on `device`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from kernels import ms_deform_attn as kernel  # pylint: disable=g-import-not-at-top
  from solq_jax.ops import ms_deform_attn as msda  # pylint: disable=g-import-not-at-top
  native = kernel.device_supported(device)
  if native and not args.smoke:
    # The R50 encoder's four levels at 800x1333 (strides 8-64), 8 heads x 32, 4 points.
    levels = ((100, 167), (50, 84), (25, 42), (13, 21))
    batch, queries, heads, head_dim, points = 2, 4096, 8, 32, 4
  else:
    levels = ((5, 7), (3, 4), (1, 1))
    batch, queries, heads, head_dim, points = 2, 6, 2, 8, 2
  rng = np.random.default_rng(0)
  s = sum(h * w for h, w in levels)
  value = rng.normal(size=(batch, s, heads, head_dim)).astype(np.float32)
  loc = rng.uniform(-0.1, 1.1, (batch, queries, heads, len(levels), points, 2)).astype(np.float32)
  attn = rng.uniform(size=(batch, queries, heads, len(levels), points)).astype(np.float32)
  attn /= attn.sum((-1, -2), keepdims=True)
  cot = rng.normal(size=(batch, queries, heads * head_dim)).astype(np.float32)

  def pallas(v, l, a):
    return kernel.ms_deform_attn_pallas(v, levels, l, a, interpret=not native)

  def xla(v, l, a):
    return msda.ms_deform_attn_xla(v, levels, l, a)

  rows = []
  for dtype in ('float32', 'bfloat16'):
    v = jnp.asarray(value, dtype)
    outs, grads = {}, {}
    for name, core in (('pallas', pallas), ('xla', xla)):
      loss = lambda v, l, a, core=core: jnp.sum(core(v, l, a).astype(jnp.float32) * cot)
      outs[name] = jax.jit(core)(v, loc, attn)
      grads[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(v, loc, attn)
    checks = [('forward', 'output', outs['pallas'], outs['xla'])]
    checks += [('backward', f'd {n}', g, w) for n, g, w in
               zip(('value', 'locations', 'weights'), grads['pallas'], grads['xla'])]
    for direction, tensor, got, want in checks:
      err = relative_error(got, want)
      rows.append((dtype, direction, tensor, err, TOLERANCE[dtype], err <= TOLERANCE[dtype]))
  mode = 'compiled' if native else 'interpret mode'
  shape = f'batch {batch}, {queries} queries, {heads}x{head_dim}, levels {levels}, {points} pts'
  return rows, f'Pallas ({mode}) vs XLA core on {device.device_kind}: {shape}'


def step_variant(args, variant, mesh, run=True):
  """{variant, images/s, compile s, compiled peak, device peak} of one train-step variant."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from solq_jax import sharding  # pylint: disable=g-import-not-at-top
  import timing  # pylint: disable=g-import-not-at-top
  import train_step  # pylint: disable=g-import-not-at-top
  dtype, impl, remat = variant.split('/')
  config = load_config(args, dtype, impl, remat)
  devices = mesh.devices.size
  batch = args.batch * devices
  host_batch = train_step.random_batch(config, batch, args.height, args.width)
  step, state = train_step.build(config, mesh, abstract=not run)
  with sharding.mesh_context(mesh):
    t0 = time.perf_counter()
    if run:
      data = sharding.shard_batch(host_batch, mesh)
      compiled = step.lower(state, data).compile()
    else:
      data = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
              for k, v in host_batch.items()}
      compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    row = dict(variant=variant, compile_s=compile_s, compiled_peak=compiled_peak_bytes(compiled),
               images_per_s=None, device_peak=None, loss=None)
    if not run:
      return row
    carry = {'state': state}

    def one_step():
      carry['state'], carry['metrics'] = compiled(carry['state'], data)
      return carry['metrics']

    t = timing.interleaved({'step': one_step}, args.runs)['step']
    row.update(images_per_s=batch / float(np.median(t.wall)),
               device_peak=device_peak_bytes(jax.devices()[0]),
               loss=float(carry['metrics']['total']))
  return row


def forward_rows(args):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from solq_jax import models  # pylint: disable=g-import-not-at-top
  import timing  # pylint: disable=g-import-not-at-top
  rows = []
  batch = args.batch  # one device: jit places the whole batch on it
  images = jnp.asarray(np.random.default_rng(0).standard_normal(
      (batch, args.height, args.width, 3)), jnp.float32)
  pad = jnp.zeros(images.shape[:3], bool)
  for dtype in ('float32', 'bfloat16'):
    config = load_config(args, dtype, 'auto')
    model = models.build_model(config.model)
    variables = models.init_variables(model, jax.random.PRNGKey(0))
    forward = jax.jit(model.apply)
    t = timing.interleaved({'f': lambda: forward(variables, images, pad)}, args.runs)['f']
    rows.append((dtype, batch / t.median, t.first))
  return rows


def main(argv=None):
  """Runs the check and prints its tables; returns {'core', 'step', 'forward', 'memory'} rows
  and whether every agreement check passed."""
  args = parse(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from kernels import ms_deform_attn as kernel  # pylint: disable=g-import-not-at-top
  from solq_jax import sharding  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  native = kernel.device_supported(device)
  print(f'# accelerator check: {jax.device_count()} x {device.device_kind} '
        f'({jax.default_backend()}), jax {jax.__version__}; {args.batch} image(s) of '
        f'{args.height}x{args.width} per device', flush=True)
  result = dict(core=[], step=[], forward=[], memory=[], ok=True)
  start = time.perf_counter()
  if args.part in ('all', 'core'):
    rows, title = check_core(args, device)
    print(f'\n## {title}\n\n| dtype | pass | tensor | max error / max value | tolerance | ok |'
          '\n|---|---|---|---|---|---|')
    for dtype, direction, tensor, err, tol, ok in rows:
      print(f'| {dtype} | {direction} | {tensor} | {err:.2e} | {tol:.0e} | '
            f'{"yes" if ok else "NO"} |', flush=True)
    result['core'] = rows
    result['ok'] = all(r[-1] for r in rows)
  mesh = sharding.make_mesh(args.devices or jax.device_count())
  if args.part in ('all', 'step'):
    print('\n## train step\n\n| dtype / attention / remat | images/s | compile s | '
          'compiled peak per device | device peak so far | loss |\n|---|---|---|---|---|---|')
    for variant in args.variants:
      if variant.split('/')[1] == 'pallas' and not (native or args.smoke):
        print(f'| {variant} | skipped: no Pallas-capable GPU here | | | | |', flush=True)
        continue
      row = step_variant(args, variant, mesh)
      result['step'].append(row)
      print(f'| {variant} | {row["images_per_s"]:.2f} | {row["compile_s"]:.0f} | '
            f'{_mib(row["compiled_peak"])} | {_mib(row["device_peak"])} | {row["loss"]:.3f} |',
            flush=True)
  if args.part in ('all', 'forward'):
    print('\n## forward (attention auto)\n\n| dtype | images/s | first call s |\n|---|---|---|')
    for dtype, ips, first in forward_rows(args):
      result['forward'].append((dtype, ips))
      print(f'| {dtype} | {ips:.2f} | {first:.0f} |', flush=True)
  if args.part == 'memory':
    print('\n## compiled peak memory of the train step, per device (nothing run)\n\n'
          '| dtype / attention / remat | compiled peak per device | compile s |\n|---|---|---|')
    for variant in args.variants:
      if variant.split('/')[1] == 'pallas' and not native:
        continue  # the interpret-mode program is not what a GPU would run
      row = step_variant(args, variant, mesh, run=False)
      result['memory'].append(row)
      print(f'| {variant} | {_mib(row["compiled_peak"])} | {row["compile_s"]:.0f} |', flush=True)
  print(f'\ntotal {time.perf_counter() - start:.0f} s; agreement '
        f'{"passed" if result["ok"] else "FAILED"}', flush=True)
  return result


if __name__ == '__main__':
  sys.exit(0 if main()['ok'] else 1)
