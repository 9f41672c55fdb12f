"""Where the R50 train step spends its time: each stage jitted on its own, forward and
forward+backward (gradient of a sum of its outputs w.r.t. its trained parameters and inputs).

  python benchmarks/train_profile.py --runs 3                 # all stages, 512x512, batch 1
  python benchmarks/train_profile.py --stages encoder,decoder --fwd
  python benchmarks/train_profile.py --stages step --runs 1 --trace /tmp/trace  # perfetto trace
  python benchmarks/train_profile.py --base demo --size 96 --batch 4 --config.model.backbone_width=32

Stages: backbone (frozen stem + layer1 behind the stop-gradient, as in training), project (input
projections + position encodings), encoder, decoder (decoder + heads), criterion (matching +
losses, gradient w.r.t. the outputs), optimizer (clip + AdamW update of the whole tree), and
step (the whole compiled train step of `benchmarks/train_step.py`). Training mode (dropout on).
"""
import argparse
import os
import resource
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import timing  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step as train_step_bench  # pylint: disable=g-import-not-at-top,wrong-import-position

STAGES = ('backbone', 'project', 'encoder', 'decoder', 'criterion', 'optimizer', 'step')


def parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--stages', default=','.join(STAGES))
  p.add_argument('--runs', type=int, default=3)
  p.add_argument('--size', type=int, default=512)
  p.add_argument('--fwd', action='store_true', help='also time the forward alone')
  p.add_argument('--trace', default='', help='also write a jax.profiler trace (perfetto) here')
  p.add_argument('--base', default='r50', choices=('r50', 'demo'),
                 help='configs/solq_r50.py or configs/demo.py (then --config.x.y=v overrides)')
  p.add_argument('--batch', type=int, default=1)
  args, args.overrides = p.parse_known_args()
  return args


def _sum(tree):
  return sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.floating))


def main():
  args = parse()
  from configs import demo, solq_r50  # pylint: disable=g-import-not-at-top
  from solq_jax import losses as losses_lib  # pylint: disable=g-import-not-at-top
  from solq_jax import masks as masks_lib  # pylint: disable=g-import-not-at-top
  from solq_jax import models  # pylint: disable=g-import-not-at-top
  from solq_jax import sharding  # pylint: disable=g-import-not-at-top
  from solq_jax.training import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from solq_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from solq_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  config = train_step_bench.apply_overrides(
      (solq_r50 if args.base == 'r50' else demo).get_config(), args.overrides)
  model = models.build_model(config.model)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  params, buffers = variables['params'], variables['buffers']
  criterion = losses_lib.criterion_from_config(config.loss, masks_lib.build_coder(config.model))
  batch = {k: jnp.asarray(v) for k, v in
           train_step_bench.random_batch(config, args.batch, args.size).items()}
  key = jax.random.PRNGKey(3)
  stages = args.stages.split(',')

  def apply(p, *inputs, method):
    return model.apply({'params': p, 'buffers': buffers}, *inputs, method=method,
                       rngs={'dropout': key})

  backbone = lambda m, x: m.body(x)
  project = lambda m, f, pm: m.project(f, pm)
  encode = lambda m, s, ms, pos: m.transformer.encode(s, ms, pos, True)
  decode = lambda m, mem, ms: m.decode(mem, ms, True)

  # inputs of every stage, computed once
  feats = jax.jit(lambda p: apply(p, batch['images'], method=backbone))(params)
  srcs, masks, pos = jax.jit(lambda p, f: apply(p, f, batch['pad_mask'], method=project))(
      params, feats)
  memory = jax.jit(lambda p, s, pos: apply(p, s, masks, pos, method=encode))(params, srcs, pos)
  outputs = jax.jit(lambda p, mem: apply(p, mem, masks, method=decode))(params, memory)

  fns = {}

  def add(name, fwd, args_, diff_argnums):
    if name not in stages:
      return
    f = jax.jit(fwd)
    g = jax.jit(jax.grad(lambda *a: _sum(fwd(*a)), argnums=diff_argnums))
    if args.fwd:
      fns[name + ' fwd'] = lambda: f(*args_)
    fns[name + ' fwd+bwd'] = lambda: g(*args_)

  add('backbone', lambda p: apply(p, batch['images'], method=backbone), (params,), 0)
  add('project', lambda p, f: apply(p, f, batch['pad_mask'], method=project)[::2],
      (params, feats), (0, 1))
  add('encoder', lambda p, s, q: apply(p, s, masks, q, method=encode), (params, srcs, pos),
      (0, 1))
  add('decoder', lambda p, mem: apply(p, mem, masks, method=decode), (params, memory), (0, 1))
  add('criterion', lambda o: criterion(o, batch)['total'], (outputs,), 0)

  if 'optimizer' in stages:
    tx = optimizer_lib.build_optimizer(config.train, variables['params'], 1000,
                                       config.model.backbone_frozen_stages)
    opt_state = tx.init(variables['params'])
    grads = jax.tree.map(lambda x: x * 1e-3, variables['params'])
    upd = jax.jit(lambda g, s, p: tx.update(g, s, p))
    fns['optimizer update'] = lambda: upd(grads, opt_state, variables['params'])

  if 'step' in stages:
    tx = optimizer_lib.build_optimizer(config.train, variables['params'], 1000,
                                       config.model.backbone_frozen_stages)
    schedule = optimizer_lib.group_schedules(config.train, 1000)[optimizer_lib.DEFAULT]
    mesh = sharding.make_mesh(1)
    state = state_lib.create(variables, tx, jax.random.PRNGKey(1))
    step = step_lib.make_train_step(model, tx, mesh, criterion, schedule, donate=False)
    fns['train step'] = lambda: step(state, batch)

  samples = timing.interleaved(fns, args.runs, verbose=True)
  timing.print_table(samples, unit='ms', cpu=True)
  for name, fn in fns.items():  # minor page faults of one call (fresh temporaries)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    timing.block(fn())
    print(f'  {name}: {resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults} page faults')
  if args.trace:
    with jax.profiler.trace(args.trace, create_perfetto_trace=True):
      for fn in fns.values():
        timing.block(fn())


if __name__ == '__main__':
  main()
