"""One encoder layer of SOLQ-R50 at a training image size, split into pieces (fwd, fwd+bwd).

  python benchmarks/encoder_profile.py --size 512 --runs 3

Pieces: the deformable-attention core (its custom_vjp backward), the whole MSDeformAttn module,
and the whole encoder layer with and without dropout (train=True / False). Gradients are of
the sum of the outputs w.r.t. parameters and inputs.
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import timing  # pylint: disable=g-import-not-at-top,wrong-import-position
from solq_jax.models import transformer  # pylint: disable=g-import-not-at-top,wrong-import-position
from solq_jax.models.deformable_attention import MSDeformAttn  # pylint: disable=g-import-not-at-top,wrong-import-position
from solq_jax.ops import ms_deform_attn as msda  # pylint: disable=g-import-not-at-top,wrong-import-position

D, M, L, P, FFN = 384, 8, 4, 4, 1024


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--size', type=int, default=512)
  p.add_argument('--runs', type=int, default=3)
  p.add_argument('--pieces', default='core,attn,layer,layer_eval')
  args = p.parse_args()
  pieces = args.pieces.split(',')
  side = args.size
  shapes = []
  for k in range(L):
    side_k = -(-side // (8 * 2 ** k))
    shapes.append((side_k, side_k))
  shapes = tuple(shapes)
  s = sum(h * w for h, w in shapes)
  rng = np.random.default_rng(0)
  src = jnp.asarray(rng.normal(size=(1, s, D)), jnp.float32)
  pos = jnp.asarray(rng.normal(size=(1, s, D)), jnp.float32)
  pad = jnp.zeros((1, s), bool)
  ratios = jnp.ones((1, L, 2), jnp.float32)
  ref = transformer.encoder_reference_points(shapes, ratios)
  key = jax.random.PRNGKey(0)
  fns = {}
  grad_sum = lambda f, argnums: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)), argnums=argnums))

  if 'core' in pieces:
    value = jnp.asarray(rng.normal(size=(1, s, M, D // M)), jnp.float32)
    loc = jnp.asarray(rng.uniform(-0.05, 1.05, (1, s, M, L, P, 2)), jnp.float32)
    attn = jnp.asarray(rng.uniform(size=(1, s, M, L, P)), jnp.float32)
    core = lambda v, l, a: msda.ms_deform_attn_core(v, shapes, l, a)
    f = jax.jit(core)
    g = grad_sum(core, (0, 1, 2))
    fns['core fwd'] = lambda f=f: f(value, loc, attn)
    fns['core fwd+bwd'] = lambda g=g: g(value, loc, attn)

  if 'attn' in pieces:
    mod = MSDeformAttn(D, L, M, P)
    v = mod.init(key, src + pos, ref, src, shapes, pad)
    fa = lambda v_, x, q: mod.apply(v_, x + q, ref, x, shapes, pad)
    f = jax.jit(fa)
    g = grad_sum(fa, (0, 1, 2))
    fns['msdeformattn fwd'] = lambda f=f, v=v: f(v, src, pos)
    fns['msdeformattn fwd+bwd'] = lambda g=g, v=v: g(v, src, pos)

  for name, train in (('layer', True), ('layer_eval', False)):
    if name not in pieces:
      continue
    layer = transformer.EncoderLayer(D, FFN, 0.1, L, M, P)
    v = layer.init(key, src, pos, ref, shapes, pad, False)
    fl = lambda v_, x, q, train=train: layer.apply(v_, x, q, ref, shapes, pad, train,
                                                  rngs={'dropout': key})
    f = jax.jit(fl)
    g = grad_sum(fl, (0, 1, 2))
    fns[f'{name} fwd'] = lambda f=f, v=v: f(v, src, pos)
    fns[f'{name} fwd+bwd'] = lambda g=g, v=v: g(v, src, pos)

  print(f'levels {shapes}, {s} tokens', flush=True)
  samples = timing.interleaved(fns, args.runs, verbose=True)
  timing.print_table(samples, unit='ms', cpu=True)


if __name__ == '__main__':
  main()
