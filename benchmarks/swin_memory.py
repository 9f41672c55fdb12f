"""Swin SOLQ sizes: parameter counts (Swin-T, Swin-L) and the compiled peak memory of a train step.

  .venv/bin/python benchmarks/swin_memory.py --part params
  .venv/bin/python benchmarks/swin_memory.py --part memory --batch 2 --height 800 --width 1333 \
      --config.train.remat=backbone            # any --config.section.field=value

Parameters: the trainable scalars of `configs/solq_swin_l.py` and of the same recipe with
`swin_t`, from the variable shapes (no initialisation). The official counts come from
scripts/count_official_swin_params.py (torch).

Memory: the train step of benchmarks/train_step.py (forward + criterion with the Hungarian
matching + backward + clip + AdamW) for the Swin-L config on one device, lowered on abstract
inputs and compiled for this machine's default backend; `memory_analysis()` of the compiled
program: arguments + outputs + temporaries - aliased (donated) bytes. Nothing is run.
"""
import argparse
import os
import sys

import train_step   # benchmarks/train_step.py: overrides, the random batch


def parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--part', default='params', choices=('params', 'memory'))
  p.add_argument('--batch', type=int, default=2, help='images per device')
  p.add_argument('--height', type=int, default=800)
  p.add_argument('--width', type=int, default=1333)
  args, overrides = p.parse_known_args()
  args.overrides = overrides
  return args


def abstract_variables(model):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                          jnp.zeros((1, 64, 64), bool))
  return {'params': shapes['params'], 'buffers': shapes.get('buffers', {})}


def count(config):
  from solq_jax import models  # pylint: disable=g-import-not-at-top
  return models.count_params(abstract_variables(models.build_model(config.model))['params'])


def peak_memory(config, batch, height, width):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from solq_jax import losses, masks, models, sharding  # pylint: disable=g-import-not-at-top
  from solq_jax.training import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from solq_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from solq_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(1)
  model = models.build_model(config.model, remat=config.train.remat)
  variables = abstract_variables(model)
  tx = optimizer_lib.build_optimizer(config.train, variables['params'], 1000,
                                     config.model.backbone_frozen_stages)
  schedule = optimizer_lib.group_schedules(config.train, 1000)[optimizer_lib.DEFAULT]
  criterion = losses.criterion_from_config(config.loss, masks.build_coder(config.model))
  state = state_lib.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=variables['params'],
      buffers=variables['buffers'], opt_state=jax.eval_shape(tx.init, variables['params']),
      rng=jax.ShapeDtypeStruct((2,), jnp.uint32), ema_params=None)
  batch_np = train_step.random_batch(config, batch, 8)
  data = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_np.items()}
  for k in ('images', 'pad_mask'):
    data[k] = jax.ShapeDtypeStruct((batch, height, width) + data[k].shape[3:], data[k].dtype)
  step = step_lib.train_step_fn(model, tx, criterion, schedule)
  repl = sharding.replicated(mesh)
  jitted = jax.jit(step, in_shardings=(repl, sharding.batch_sharding(mesh)),
                   out_shardings=(repl, repl), donate_argnums=(0,))
  with sharding.mesh_context(mesh):
    compiled = jitted.lower(state, data).compile()
  m = compiled.memory_analysis()
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
          m.alias_size_in_bytes)
  return peak, m


def main():
  args = parse()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import solq_swin_l  # pylint: disable=g-import-not-at-top
  config = train_step.apply_overrides(solq_swin_l.get_config(), args.overrides)
  if args.part == 'params':
    small = solq_swin_l.get_config()
    small.model.backbone = 'swin_t'
    small.model.drop_path_rate = 0.2
    for name, c in (('swin_t', small), ('swin_l', config)):
      print(f'SOLQ {name}: {count(c):,} parameters', flush=True)
    return
  import jax  # pylint: disable=g-import-not-at-top
  peak, m = peak_memory(config, args.batch, args.height, args.width)
  gib = 2.0 ** 30
  print(f'{config.model.backbone} train step, {args.batch} x {args.height}x{args.width} on one '
        f'{jax.default_backend()} device (dtype {config.model.dtype}, remat {config.train.remat}):'
        f' peak {peak / gib:.2f} GiB = arguments {m.argument_size_in_bytes / gib:.2f} + outputs '
        f'{m.output_size_in_bytes / gib:.2f} + temporaries {m.temp_size_in_bytes / gib:.2f} - '
        f'aliased {m.alias_size_in_bytes / gib:.2f}', flush=True)


if __name__ == '__main__':
  main()
