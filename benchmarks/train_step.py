"""Train-step speed: the R50 step at 512x512 batch 1 (against the official step:
`official_step.py`), and images/s of the tiny config on 1 vs 8 simulated CPU devices.

  python benchmarks/train_step.py                      # both parts, each in its own process
  python benchmarks/train_step.py --part r50 --runs 5
  python benchmarks/train_step.py --part tiny --devices 8
  python benchmarks/train_step.py --part tiny --config.model.dtype=bfloat16 --config.train.remat=all

A step = forward + criterion (with the Hungarian matching) + backward + clip + AdamW, compiled,
on random weights and a random batch of 10 objects per image; the median of `--runs` timed
steps after one warm-up (compile) step.
"""
import argparse
import os
import resource
import subprocess
import sys


def parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--part', default='all', choices=('all', 'r50', 'tiny'))
  p.add_argument('--devices', type=int, default=1, help='simulated CPU devices (sets XLA_FLAGS)')
  p.add_argument('--runs', type=int, default=5)
  p.add_argument('--size', type=int, default=0, help='image side (default: r50 512, tiny 256)')
  p.add_argument('--batch', type=int, default=0, help='global batch (default: r50 1, tiny 8)')
  args, overrides = p.parse_known_args()
  args.overrides = overrides
  return args


def apply_overrides(config, overrides):
  """Applies `--config.section.field=value` arguments to `config` (values parsed as the field's
  type); an unknown field or any other argument raises."""
  for arg in overrides:
    if not arg.startswith('--config.') or '=' not in arg:
      raise SystemExit(f'unknown argument {arg!r} (expected --config.section.field=value)')
    path, value = arg[len('--config.'):].split('=', 1)
    *parents, field = path.split('.')
    node = config
    for name in parents:
      if name not in node:
        raise SystemExit(f'unknown config section {path!r}')
      node = node[name]
    if field not in node:
      raise SystemExit(f'unknown config field {path!r}')
    old = node[field]
    if isinstance(old, bool):
      if value.lower() not in ('true', 'false'):
        raise SystemExit(f'--config.{path} must be true or false, got {value!r}')
      node[field] = value.lower() == 'true'
    else:
      node[field] = type(old)(value)
  return config


def random_batch(config, batch, height, width=None, seed=0):
  """A batch of `batch` random images of height x width with 10 random objects each."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  width = width or height
  rng = np.random.default_rng(seed)
  g, k = config.data.max_gt, config.model.num_coeffs
  n = min(10, g)
  valid = np.zeros((batch, g), bool)
  valid[:, :n] = True
  cxcy = rng.uniform(0.2, 0.8, (batch, g, 2))
  wh = rng.uniform(0.05, 0.3, (batch, g, 2))
  boxes = np.concatenate([cxcy, wh], -1).astype(np.float32)
  return dict(images=rng.standard_normal((batch, height, width, 3)).astype(np.float32),
              pad_mask=np.zeros((batch, height, width), bool),
              labels=rng.integers(1, config.model.num_classes, (batch, g)).astype(np.int32),
              boxes=boxes, vectors=rng.standard_normal((batch, g, k)).astype(np.float32),
              valid=valid)


def build(config, mesh, abstract=False):
  """(jitted step, state, step kwargs) of `config` on `mesh`: random weights, the real optimiser,
  criterion and EMA/accumulation settings; `abstract`: the state as ShapeDtypeStructs (for
  lowering and compiling without allocating it). Call and lower the step inside
  `sharding.mesh_context(mesh)` (and not this call: the model initialises on one batch row)."""
  import jax  # pylint: disable=g-import-not-at-top
  from solq_jax import losses  # pylint: disable=g-import-not-at-top
  from solq_jax import masks  # pylint: disable=g-import-not-at-top
  from solq_jax import models  # pylint: disable=g-import-not-at-top
  from solq_jax import sharding  # pylint: disable=g-import-not-at-top
  from solq_jax.training import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from solq_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from solq_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  model = models.build_model(config.model, remat=config.train.remat)
  init = lambda: models.init_variables(model, jax.random.PRNGKey(0))
  variables = jax.eval_shape(init) if abstract else jax.device_get(init())
  tx = optimizer_lib.build_optimizer(config.train, variables['params'], 1000,
                                     config.model.backbone_frozen_stages)
  schedule = optimizer_lib.group_schedules(config.train, 1000)[optimizer_lib.DEFAULT]
  ema, rng = config.train.ema_decay > 0, jax.random.PRNGKey(1)
  if abstract:  # create() copies on the host, so its shapes come from a state without EMA
    state = jax.eval_shape(lambda v: state_lib.create(v, tx, rng), variables)
    state = sharding.abstract_state(state.replace(ema_params=state.params if ema else None), mesh)
  else:
    state = sharding.replicate(state_lib.create(variables, tx, rng, ema=ema), mesh)
  criterion = losses.criterion_from_config(config.loss, masks.build_coder(config.model))
  step = step_lib.train_step_fn(model, tx, criterion, schedule,
                                grad_accum_steps=config.train.grad_accum_steps,
                                ema_decay=config.train.ema_decay)
  jitted = jax.jit(step, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                   out_shardings=(sharding.replicated(mesh),) * 2, donate_argnums=(0,))
  return jitted, state


def measure(config, devices, batch, side, runs):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from solq_jax import sharding  # pylint: disable=g-import-not-at-top
  import timing  # pylint: disable=g-import-not-at-top  (benchmarks/timing.py; imports jax)
  mesh = sharding.make_mesh(devices)
  step, state = build(config, mesh)
  step = sharding.under_mesh(mesh, step)
  data = sharding.shard_batch(random_batch(config, batch, side), mesh)
  carry = {'state': state}

  def one_step():  # the state threads through the calls, as in training
    carry['state'], carry['metrics'] = step(carry['state'], data)
    return carry['state'], carry['metrics']

  t = timing.interleaved({'step': one_step}, 0)['step']  # the first (compile) step: t.first
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  t.wall = timing.interleaved({'step': one_step}, runs, warmup=False)['step'].wall
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / max(runs, 1)
  return t.first, float(np.median(t.wall)), t.wall, float(carry['metrics']['total']), faults


def main():
  args = parse()
  if args.part == 'all':
    for part, devices in (('r50', 1), ('tiny', 1), ('tiny', 8)):
      subprocess.run([sys.executable, __file__, '--part', part, '--devices', str(devices),
                      '--runs', str(args.runs)] + args.overrides, check=True)
    return
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={args.devices}')
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import solq_r50, tiny  # pylint: disable=g-import-not-at-top
  config = apply_overrides(solq_r50.get_config() if args.part == 'r50' else tiny.get_config(),
                           args.overrides)
  side = args.size or (512 if args.part == 'r50' else 256)
  batch = args.batch or (1 if args.part == 'r50' else 8)
  compile_s, median, times, loss, faults = measure(config, args.devices, batch, side, args.runs)
  line = (f'{args.part} (dtype {config.model.dtype}, remat {config.train.remat}): {side}x{side} batch {batch} on {args.devices} device(s): median step '
          f'{median:.3f} s ({batch / median:.2f} images/s) over {args.runs} runs '
          f'[{", ".join(f"{t:.2f}" for t in times)}]; first step (compile) {compile_s:.1f} s; '
          f'loss {loss:.3f}; {faults:.0f} page faults per step')
  print(line, flush=True)


if __name__ == '__main__':
  main()
