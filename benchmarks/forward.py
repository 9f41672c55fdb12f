"""Forward-pass time of SOLQ (eval mode, random weights), whole model and per stage.

    .venv/bin/python benchmarks/forward.py                      # R50, batch 1, 800x1066
    .venv/bin/python benchmarks/forward.py --config=configs/tiny.py --height=256 --width=320
    .venv/bin/python benchmarks/forward.py --config.model.dtype=bfloat16   # any config field

Prints the median (and min/max) wall time of `--runs` timed calls after one warm-up call, for
the jitted whole model and for jitted stages fed with precomputed inputs: backbone, input
projections (+ masks, position encodings), encoder, decoder + heads. It also prints the median
process CPU time per call divided by the number of cores: on a machine shared with other jobs
the wall time is inflated by the contention, the CPU time much less. The official PyTorch model
takes 7.36 s for the R50 forward at 800x1066 on this 2-core CPU (../shared/spec/perf_notes.md).
"""
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from solq_jax.models import build_model, init_variables
from solq_jax.ops.ms_deform_attn import ms_deform_attn_core
import timing  # benchmarks/timing.py

# The config files import `configs.base`: the repository root must be importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CONFIG = config_flags.DEFINE_config_file('config', 'configs/solq_r50.py', 'experiment config')
_HEIGHT = flags.DEFINE_integer('height', 800, 'image height')
_WIDTH = flags.DEFINE_integer('width', 1066, 'image width')
_BATCH = flags.DEFINE_integer('batch', 1, 'batch size')
_RUNS = flags.DEFINE_integer('runs', 5, 'timed runs per function (after one warm-up)')
_STAGES = flags.DEFINE_bool('stages', True, 'also time the stages separately')


def _time(fn, *args, runs):
  """(median, min, max wall s, median CPU s) of `runs` calls after a timed first (compile) call,
  and that first call's wall seconds."""
  t = timing.interleaved({'fn': lambda: fn(*args)}, runs)['fn']
  return t.median, t.min, t.max, t.cpu_median, t.first


def _report(name, stats):
  med, lo, hi, cpu, first = stats
  cores = os.cpu_count()
  print(f'{name:<18} median {med:7.3f} s  min {lo:7.3f}  max {hi:7.3f}  '
        f'cpu/{cores} {cpu / cores:7.3f} s  (first call {first:6.1f} s)', flush=True)


def main(argv):
  del argv
  config = _CONFIG.value
  model = build_model(config.model)
  b, h, w = _BATCH.value, _HEIGHT.value, _WIDTH.value
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((b, h, w, 3)), jnp.float32)
  pad = jnp.zeros((b, h, w), bool)
  print(f'{config.model.backbone}, hidden {config.model.hidden_dim}, batch {b} at {h}x{w}, '
        f'attention_impl={config.model.attention_impl}, devices {jax.devices()}', flush=True)
  t0 = time.perf_counter()
  variables = init_variables(model, jax.random.key(0))
  jax.block_until_ready(variables)
  print(f'init {time.perf_counter() - t0:.1f} s', flush=True)

  runs = _RUNS.value
  forward = jax.jit(model.apply)
  _report('full forward', _time(forward, variables, images, pad, runs=runs))
  if not _STAGES.value:
    return

  backbone = jax.jit(lambda v, x: model.apply(v, x, method=lambda m, x: m.body(x)))
  project = jax.jit(lambda v, f, p: model.apply(v, f, p, method=lambda m, f, p: m.project(f, p)))
  encode = jax.jit(lambda v, s, k, p: model.apply(
      v, s, k, p, method=lambda m, s, k, p: m.transformer.encode(s, k, p, False)))
  decode = jax.jit(lambda v, mem, k: model.apply(v, mem, k, method=lambda m, mem, k: m.decode(
      mem, k)))
  feats = backbone(variables, images)
  srcs, masks, pos = project(variables, feats, pad)
  memory = encode(variables, srcs, masks, pos)
  stages = [('backbone', backbone, (variables, images)),
            ('input proj + pos', project, (variables, feats, pad)),
            ('encoder', encode, (variables, srcs, masks, pos)),
            ('decoder + heads', decode, (variables, memory, masks))]
  total = 0.0
  for name, fn, args in stages:
    stats = _time(fn, *args, runs=runs)
    total += stats[0]
    _report(name, stats)
  print(f'sum of stage medians {total:.3f} s', flush=True)

  # the deformable-attention core alone, at the encoder's shapes (times the number of layers)
  m = config.model
  shapes = tuple((int(k.shape[1]), int(k.shape[2])) for k in masks)
  s = sum(hh * ww for hh, ww in shapes)
  heads, levels, points = m.nheads, m.num_feature_levels, m.enc_n_points
  value = jnp.asarray(rng.standard_normal((b, s, heads, m.hidden_dim // heads)), jnp.float32)
  locations = jnp.asarray(rng.uniform(-0.05, 1.05, (b, s, heads, levels, points, 2)), jnp.float32)
  weights = jax.nn.softmax(jnp.asarray(rng.standard_normal((b, s, heads, levels * points)),
                                       jnp.float32)).reshape(b, s, heads, levels, points)
  core = jax.jit(lambda v, l, a: ms_deform_attn_core(v, shapes, l, a, impl=m.attention_impl))
  med, lo, hi, cpu, first = _time(core, value, locations, weights, runs=runs)
  _report(f'encoder core x{m.enc_layers}', (med * m.enc_layers, lo * m.enc_layers,
                                          hi * m.enc_layers, cpu * m.enc_layers, first))


if __name__ == '__main__':
  app.run(main)
