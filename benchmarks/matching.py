"""Matching time per train step on 8 simulated CPU devices, and its share of a tiny train step.

    .venv/bin/python benchmarks/matching.py              # both parts
    .venv/bin/python benchmarks/matching.py --no-step    # matching only (fast)

Part 1, the official-scale matching: global batch 32 over 8 devices, 300 queries, 91 classes,
6 decoder layers matched independently, max_gt 50 with 1..50 real targets per image. Timed
variants (interleaved rounds, medians): the scipy solver per shard (under the mesh context,
shard_map), the same under plain jit without it (the batch is gathered to one host call), the
exact pure-JAX solver (per shard and under plain jit), the cost matrix alone, scipy alone on host
numpy (the floor of the callback path), and the whole criterion (`solq_losses`, value and gradient
w.r.t. the outputs of all 6 layers, K = 256) with either matcher.

Part 2, the tiny config (configs/tiny.py) train step (`solq_jax.training.step`, global batch 32
over 8 devices; matcher 'hungarian', add 'jax' with --step-matchers), and the matching alone at
the same shapes: the matching's share of the step. Compiling the step takes minutes here.

Figures are wall-clock on a shared 2-core machine: noisy, compare within one run.
"""
import argparse
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from solq_jax import losses  # noqa: E402
from solq_jax import matching  # noqa: E402
from solq_jax import sharding  # noqa: E402
import timing  # noqa: E402  (benchmarks/timing.py)


def random_matching_inputs(rng, layers, batch, queries, classes, max_gt):
  logits = rng.normal(0, 2, (layers, batch, queries, classes)).astype(np.float32)
  boxes = np.concatenate([rng.uniform(0.1, 0.9, (layers, batch, queries, 2)),
                          rng.uniform(0.02, 0.5, (layers, batch, queries, 2))], -1)
  counts = rng.integers(1, max_gt + 1, batch)
  valid = np.arange(max_gt)[None, :] < counts[:, None]
  labels = rng.integers(1, classes, (batch, max_gt)).astype(np.int32)
  tgt = np.concatenate([rng.uniform(0.1, 0.9, (batch, max_gt, 2)),
                        rng.uniform(0.02, 0.5, (batch, max_gt, 2))], -1).astype(np.float32)
  tgt[~valid] = 0
  return logits, boxes.astype(np.float32), labels, tgt, valid


def shard_inputs(mesh, args):
  specs = (P(None, 'data'), P(None, 'data'), P('data'), P('data'), P('data'))
  return [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]


def matching_variants(mesh, args, device_args):
  """name -> zero-arg callable running one matching of all layers (compiled on first call)."""
  with_mesh = sharding.under_mesh(mesh, jax.jit(matching.hungarian_match))
  plain = jax.jit(matching.hungarian_match)
  pure = sharding.under_mesh(
      mesh, jax.jit(lambda *a: matching.hungarian_match(*a, solver='jax')))
  pure_plain = jax.jit(lambda *a: matching.hungarian_match(*a, solver='jax'))
  cost = jax.jit(matching.match_cost)
  costs_np = np.asarray(cost(*device_args))
  fns = {
      'scipy, shard_map per device': lambda: with_mesh(*device_args),
      'scipy, plain jit (gathered)': lambda: plain(*device_args),
      'pure-JAX exact, shard_map': lambda: pure(*device_args),
      'pure-JAX exact, plain jit': lambda: pure_plain(*device_args),
      'cost matrix only': lambda: cost(*device_args),
      'scipy on host numpy only': lambda: matching.assign_np(costs_np, args[-1]),
  }
  return fns, costs_np


def check_agreement(fns, costs_np):
  """Prints how the pure-JAX assignment compares with scipy's on the benchmark problem."""
  ref = [np.asarray(x) for x in fns['scipy, shard_map per device']()]
  got = [np.asarray(x) for x in fns['pure-JAX exact, shard_map']()]
  layer_idx = np.arange(costs_np.shape[0])[:, None, None]
  image_idx = np.arange(costs_np.shape[1])[None, :, None]
  take = lambda s, t, ok: costs_np[layer_idx, image_idx, s, t][ok]
  gap = abs(take(*got).sum() - take(*ref).sum()) / abs(take(*ref).sum())
  print(f'  pure-JAX vs scipy total cost: relative gap {gap:.2e}; same pairs: '
        f'{all((a == b).all() for a, b in zip(got, ref))}', flush=True)


def criterion_variants(mesh, args, rng):
  """name -> zero-arg callable: value and gradient of `solq_losses` w.r.t. the outputs of all
  decoder layers (the whole criterion around the matching), per matcher."""
  from configs import base
  logits, boxes, labels, tgt, valid = args
  layers, batch, queries = logits.shape[:3]
  k = 256
  vectors = rng.normal(size=(layers, batch, queries, k)).astype(np.float32)
  layer_outs = [dict(pred_logits=logits[l], pred_boxes=boxes[l], pred_vectors=vectors[l])
                for l in range(layers)]
  outputs = dict(layer_outs[-1], aux_outputs=layer_outs[:-1])
  targets = dict(labels=labels, boxes=tgt, valid=valid,
                 vectors=rng.normal(size=(batch, labels.shape[1], k)).astype(np.float32))
  batch_sharding = NamedSharding(mesh, P('data'))
  outputs, targets = jax.device_put((outputs, targets), batch_sharding)
  fns = {}
  for matcher in ('hungarian', 'jax'):
    config = base.base_config()
    config.loss.matcher = matcher
    criterion = losses.criterion_from_config(config.loss)
    grad_fn = sharding.under_mesh(mesh, jax.jit(jax.value_and_grad(
        lambda o, t, criterion=criterion: criterion(o, t)['total'])))
    fns[f'criterion value+grad, {matcher}'] = (lambda g=grad_fn: g(outputs, targets))
  return fns


def part1(mesh, rounds):
  print('Part 1: batch 32 / 8 devices, 300 queries, 91 classes, 6 layers, max_gt 50 '
        '(1..50 targets per image)', flush=True)
  rng = np.random.default_rng(0)
  args = random_matching_inputs(rng, 6, 32, 300, 91, 50)
  print(f'  targets in batch: {int(args[-1].sum())}', flush=True)
  fns, costs_np = matching_variants(mesh, args, shard_inputs(mesh, args))
  fns.update(criterion_variants(mesh, args, rng))
  medians = timing.medians(fns, rounds, verbose=True)
  check_agreement(fns, costs_np)
  base = medians['scipy, shard_map per device']
  for name, t in medians.items():
    print(f'  {name:32s} {1e3 * t:9.2f} ms   ({t / base:5.2f} x shard_map scipy)', flush=True)
  return medians


def synthetic_batch(rng, config, batch, size):
  m, g = config.model, config.data.max_gt
  counts = rng.integers(1, g + 1, batch)
  valid = np.arange(g)[None, :] < counts[:, None]
  boxes = np.concatenate([rng.uniform(0.2, 0.8, (batch, g, 2)),
                          rng.uniform(0.05, 0.4, (batch, g, 2))], -1).astype(np.float32)
  return dict(
      images=rng.normal(size=(batch, size, size, 3)).astype(np.float32),
      pad_mask=np.zeros((batch, size, size), bool),
      labels=rng.integers(1, m.num_classes, (batch, g)).astype(np.int32),
      boxes=boxes, vectors=rng.normal(size=(batch, g, m.num_coeffs)).astype(np.float32),
      valid=valid)


def part2(mesh, rounds, size, matchers):
  from configs import tiny
  from solq_jax import masks
  from solq_jax import models
  from solq_jax.training import optimizer as optimizer_lib
  from solq_jax.training import state as state_lib
  from solq_jax.training import step as step_lib

  batch = 32
  print(f'\nPart 2: tiny config train step, global batch {batch} / 8 devices, '
        f'{size}x{size} images', flush=True)
  rng = np.random.default_rng(1)
  steps, states, data = {}, {}, None
  for matcher in matchers:
    config = tiny.get_config()
    config.loss.matcher = matcher
    config.train.batch_size = batch
    model = models.build_model(config.model)
    data = data or synthetic_batch(rng, config, batch, size)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), data['images'][:1],
                                    data['pad_mask'][:1])
    tx = optimizer_lib.build_optimizer(config.train, variables['params'], 1000,
                                     config.model.backbone_frozen_stages)
    schedule = optimizer_lib.group_schedules(config.train, 1000)[optimizer_lib.DEFAULT]
    states[matcher] = sharding.replicate(state_lib.create(variables, tx, np.array([0, 42])), mesh)
    criterion = losses.criterion_from_config(config.loss, masks.build_coder(config.model))
    steps[matcher] = step_lib.make_train_step(model, tx, mesh, criterion, schedule,
                                              donate=False)
  sharded = sharding.shard_batch(data, mesh)
  # The matching alone at the step's shapes (dec_layers x batch x queries x max_gt), timed in its
  # own interleaved rounds: interleaved with train steps, the host-callback call measured ~100x
  # slower than alone (292-392 ms vs 4 ms; cause not established), a figure that would not
  # represent the matching inside a step.
  config = tiny.get_config()
  r = np.random.default_rng(2)
  margs = random_matching_inputs(r, config.model.dec_layers, batch, config.model.num_queries,
                                 config.model.num_classes, config.data.max_gt)
  dargs = shard_inputs(mesh, margs)
  with_mesh = sharding.under_mesh(mesh, jax.jit(matching.hungarian_match))
  pure = sharding.under_mesh(
      mesh, jax.jit(lambda *a: matching.hungarian_match(*a, solver='jax')))
  medians = timing.medians({'matching only, scipy shard_map': lambda: with_mesh(*dargs),
                            'matching only, pure-JAX shard_map': lambda: pure(*dargs)},
                           9, verbose=True)
  steps_fns = {f'train step, matcher={m}': (lambda m=m: steps[m](states[m], sharded))
               for m in steps}
  medians.update(timing.medians(steps_fns, rounds, verbose=True))
  for name, t in medians.items():
    print(f'  {name:34s} {1e3 * t:9.2f} ms', flush=True)
  step_t = medians['train step, matcher=hungarian']
  for name in ('matching only, scipy shard_map', 'matching only, pure-JAX shard_map'):
    print(f'  share of the step: {name}: {100 * medians[name] / step_t:.2f} %', flush=True)
  return medians


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--step-rounds', type=int, default=3)
  parser.add_argument('--size', type=int, default=192, help='tiny step image side')
  parser.add_argument('--no-step', action='store_true', help='skip part 2')
  parser.add_argument('--step-matchers', default='hungarian',
                      help="comma list of train steps to time: hungarian,jax (each compiles for "
                           "minutes on 2 cores)")
  args = parser.parse_args()
  mesh = Mesh(np.array(jax.devices()[:8]), ('data',))
  m1 = part1(mesh, args.rounds)
  if not args.no_step:
    m2 = part2(mesh, args.step_rounds, args.size, args.step_matchers.split(','))
    share = m1['scipy, shard_map per device'] / m2['train step, matcher=hungarian']
    print(f'\nofficial-scale matching (part 1) / tiny train step: {100 * share:.2f} %')


if __name__ == '__main__':
  main()
