"""Deformable transformer: valid ratios, reference points, layer order, MHA, box refinement,
detached references (via gradients) and dropout."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solq_jax.models.deformable_attention import MSDeformAttn
from solq_jax.models.layers import MLP
from solq_jax.models.transformer import (DecoderLayer, DeformableTransformer, EncoderLayer,
                                         MultiheadAttention, encoder_reference_points,
                                         refine_boxes, valid_ratios)

RNG = np.random.default_rng(2)
D, M, P, FFN = 16, 2, 2, 24
SHAPES = ((6, 8), (3, 4))


def _masks(b=2):
  """Per-level padding masks: image 0 unpadded, image 1 padded bottom/right."""
  masks = []
  for h, w in SHAPES:
    m = np.zeros((b, h, w), bool)
    m[1, h - h // 3:, :] = True
    m[1, :, w - w // 4:] = True
    masks.append(m)
  return masks


def _randomise(tree, scale=0.5):
  return jax.tree_util.tree_map(
      lambda a: (np.asarray(a) + scale * RNG.standard_normal(a.shape)).astype(np.float32), tree)


def _layer_norm(x, p):
  x = np.asarray(x, np.float64)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * np.asarray(p['scale']) + np.asarray(p['bias'])


def _linear(x, p):
  return np.asarray(x, np.float64) @ np.asarray(p['kernel']) + np.asarray(p['bias'])


def test_valid_ratios_w_first():
  masks = _masks()
  got = np.asarray(valid_ratios(masks))
  assert got.shape == (2, 2, 2)
  np.testing.assert_allclose(got[0], 1.0)
  for l, (h, w) in enumerate(SHAPES):
    np.testing.assert_allclose(got[1, l], [(w - w // 4) / w, (h - h // 3) / h], rtol=1e-6)


def test_encoder_reference_points_against_loops():
  masks = _masks()
  ratios = np.asarray(valid_ratios(masks))
  got = np.asarray(encoder_reference_points(SHAPES, ratios))
  assert got.shape == (2, sum(h * w for h, w in SHAPES), len(SHAPES), 2)
  for n in range(2):
    t = 0
    for l, (h, w) in enumerate(SHAPES):
      for i in range(h):
        for j in range(w):
          x = (j + 0.5) / (ratios[n, l, 0] * w)
          y = (i + 0.5) / (ratios[n, l, 1] * h)
          np.testing.assert_allclose(got[n, t], [[x * ratios[n, k, 0], y * ratios[n, k, 1]]
                                                 for k in range(len(SHAPES))], rtol=1e-5)
          t += 1


def test_refine_boxes_formulas():
  delta = RNG.standard_normal((3, 5, 4)).astype(np.float32)
  ref4 = RNG.uniform(0.05, 0.95, (3, 5, 4)).astype(np.float32)
  sig = lambda t: 1 / (1 + np.exp(-t))
  logit = lambda t: np.log(t / (1 - t))
  np.testing.assert_allclose(np.asarray(refine_boxes(delta, ref4)), sig(delta + logit(ref4)),
                             rtol=1e-5)
  got = np.asarray(refine_boxes(delta, ref4[..., :2]))
  np.testing.assert_allclose(got[..., :2], sig(delta[..., :2] + logit(ref4[..., :2])), rtol=1e-5)
  np.testing.assert_allclose(got[..., 2:], sig(delta[..., 2:]), rtol=1e-5)


def test_multihead_attention_against_numpy_and_packed_init():
  mha = MultiheadAttention(D, M, 0.1)
  q = RNG.standard_normal((2, 5, D)).astype(np.float32)
  v = RNG.standard_normal((2, 5, D)).astype(np.float32)
  variables = mha.init(jax.random.key(0), q, q, v, False)
  p = variables['params']
  # xavier on the packed [3D, D] in_proj: every third has the packed bound sqrt(6 / (D + 3D))
  packed = math.sqrt(6.0 / (4 * D))
  for name in ('query', 'key', 'value'):
    k = np.abs(np.asarray(p[name]['kernel']))
    assert k.max() <= packed and k.max() > 0.85 * packed
    assert np.all(np.asarray(p[name]['bias']) == 0)
  assert np.abs(np.asarray(p['out']['kernel'])).max() > packed  # plain xavier [D, D] bound
  p = _randomise(p)
  got = np.asarray(mha.apply({'params': p}, q, q, v, False))
  dh = D // M
  qq, kk, vv = (_linear(x, p[n]).reshape(2, 5, M, dh) for x, n in
                ((q, 'query'), (q, 'key'), (v, 'value')))
  logits = np.einsum('bqhd,bkhd->bhqk', qq / math.sqrt(dh), kk)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  want = _linear(np.einsum('bhqk,bkhd->bqhd', w, vv).reshape(2, 5, D), p['out'])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _flat(masks):
  return np.concatenate([m.reshape(m.shape[0], -1) for m in masks], 1)


def test_encoder_layer_is_post_norm():
  masks = _masks()
  s = sum(h * w for h, w in SHAPES)
  src = RNG.standard_normal((2, s, D)).astype(np.float32)
  pos = RNG.standard_normal((2, s, D)).astype(np.float32)
  ref = np.asarray(encoder_reference_points(SHAPES, valid_ratios(masks)))
  layer = EncoderLayer(D, FFN, 0.1, len(SHAPES), M, P)
  pad = _flat(masks)
  p = _randomise(layer.init(jax.random.key(1), src, pos, ref, SHAPES, pad, False)['params'])
  got = np.asarray(layer.apply({'params': p}, src, pos, ref, SHAPES, pad, False))
  attn = MSDeformAttn(D, len(SHAPES), M, P).apply({'params': p['self_attn']}, src + pos, ref, src,
                                                 SHAPES, pad)
  x = _layer_norm(src + np.asarray(attn), p['norm1'])
  want = _layer_norm(x + _linear(np.maximum(_linear(x, p['linear1']), 0), p['linear2']),
                     p['norm2'])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_decoder_layer_order_and_norm_names():
  """self-attn -> norm2, deformable cross-attn -> norm1, FFN -> norm3 (official names)."""
  masks = _masks()
  s = sum(h * w for h, w in SHAPES)
  memory = RNG.standard_normal((2, s, D)).astype(np.float32)
  tgt = RNG.standard_normal((2, 4, D)).astype(np.float32)
  qpos = RNG.standard_normal((2, 4, D)).astype(np.float32)
  ref = RNG.uniform(0.2, 0.8, (2, 4, len(SHAPES), 4)).astype(np.float32)
  pad = _flat(masks)
  layer = DecoderLayer(D, FFN, 0.1, len(SHAPES), M, P)
  p = _randomise(layer.init(jax.random.key(2), tgt, qpos, ref, memory, SHAPES, pad,
                            False)['params'])
  got = np.asarray(layer.apply({'params': p}, tgt, qpos, ref, memory, SHAPES, pad, False))
  sa = MultiheadAttention(D, M, 0.1).apply({'params': p['self_attn']}, tgt + qpos, tgt + qpos,
                                           tgt, False)
  x = _layer_norm(tgt + np.asarray(sa), p['norm2'])
  x32 = x.astype(np.float32)
  ca = MSDeformAttn(D, len(SHAPES), M, P).apply({'params': p['cross_attn']}, x32 + qpos, ref,
                                               memory, SHAPES, pad)
  x = _layer_norm(x + np.asarray(ca), p['norm1'])
  want = _layer_norm(x + _linear(np.maximum(_linear(x, p['linear1']), 0), p['linear2']),
                     p['norm3'])
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


class _Refining(nn.Module):
  """Three decoder layers (no encoder layer: memory = inputs) with box heads, like SOLQ's."""

  @nn.compact
  def __call__(self, srcs, masks, pos, train=False):
    heads = [MLP(D, 4, 3, name=f'bbox_embed_{i}') for i in range(3)]
    query = self.param('query_embed', nn.initializers.normal(1.0), (5, 2 * D))
    return DeformableTransformer(D, M, 0, 3, FFN, 0.1, len(SHAPES), P, P, name='transformer')(
        srcs, masks, pos, query, train, heads)


@pytest.fixture(scope='module')
def refining():
  masks = _masks()
  srcs = [RNG.standard_normal((2, h, w, D)).astype(np.float32) for h, w in SHAPES]
  pos = [RNG.standard_normal((2, h, w, D)).astype(np.float32) for h, w in SHAPES]
  model = _Refining()
  params = _randomise(model.init(jax.random.key(3), srcs, masks, pos)['params'], 0.3)
  return model, params, (srcs, masks, pos)


def test_box_refinement_chain(refining):
  model, params, args = refining
  hs, refs, boxes = model.apply({'params': params}, *args)
  assert len(hs) == len(refs) == len(boxes) == 3
  query_pos = np.asarray(params['query_embed'])[:, :D]
  init_ref = 1 / (1 + np.exp(-_linear(query_pos, params['transformer']['reference_points'])))
  np.testing.assert_allclose(np.asarray(refs[0])[0], init_ref, rtol=1e-5)
  assert refs[0].shape[-1] == 2 and refs[1].shape[-1] == 4
  for l in range(3):
    head = MLP(D, 4, 3).apply({'params': params[f'bbox_embed_{l}']}, hs[l])
    np.testing.assert_allclose(np.asarray(boxes[l]), np.asarray(refine_boxes(head, refs[l])),
                               rtol=1e-5, atol=1e-6)
    if l < 2:
      np.testing.assert_array_equal(np.asarray(refs[l + 1]), np.asarray(boxes[l]))


def test_references_are_detached(refining):
  model, params, args = refining
  weights = jnp.asarray(RNG.standard_normal((2, 5, 4)), jnp.float32)
  (hs, refs, boxes), backward = jax.vjp(lambda p: model.apply({'params': p}, *args), params)

  def grad_of(hs_seed=(), box_seed=()):
    """Gradient of sum(hs[l]) for l in hs_seed plus sum(boxes[l] * weights) for l in box_seed."""
    zeros = lambda xs: [jnp.zeros_like(x) for x in xs]
    d_hs, d_boxes = zeros(hs), zeros(boxes)
    for l in hs_seed:
      d_hs[l] = jnp.ones_like(hs[l])
    for l in box_seed:
      d_boxes[l] = weights
    return backward((d_hs, zeros(refs), d_boxes))[0]

  norm = lambda tree: float(sum(jnp.abs(g).sum() for g in jax.tree_util.tree_leaves(tree)))
  # layer 2's outputs reach bbox_embed_1 only through the (detached) reference: no gradient
  late = grad_of(hs_seed=(2,), box_seed=(2,))
  assert norm(late['bbox_embed_1']) == 0.0 and norm(late['bbox_embed_0']) == 0.0
  assert norm(late['bbox_embed_2']) > 0
  # layer 1's boxes: bbox_embed_1 gets exactly the gradient of its own head
  own = grad_of(box_seed=(1,))
  head_only = jax.grad(lambda q: jnp.sum(refine_boxes(
      MLP(D, 4, 3).apply({'params': q}, hs[1]), refs[1]) * weights))(params['bbox_embed_1'])
  assert norm(own['bbox_embed_1']) > 0
  for a, b in zip(jax.tree_util.tree_leaves(own['bbox_embed_1']),
                  jax.tree_util.tree_leaves(head_only)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  # the initial (2-d) reference is not detached: layer 0 boxes train reference_points
  first = grad_of(box_seed=(0,))
  assert norm(first['transformer']['reference_points']) > 0


def test_dropout_train_vs_eval():
  """Dropout (MHA weights, attention outputs, FFN) only in train mode, driven by the rng."""
  masks = _masks()
  s = sum(h * w for h, w in SHAPES)
  memory = RNG.standard_normal((2, s, D)).astype(np.float32)
  tgt = RNG.standard_normal((2, 4, D)).astype(np.float32)
  ref = RNG.uniform(0.2, 0.8, (2, 4, len(SHAPES), 2)).astype(np.float32)
  layer = DecoderLayer(D, FFN, 0.1, len(SHAPES), M, P)
  args = (tgt, tgt, ref, memory, SHAPES, _flat(masks))
  variables = layer.init(jax.random.key(4), *args, False)
  run = lambda seed, train: np.asarray(layer.apply(variables, *args, train,
                                                   rngs={'dropout': jax.random.key(seed)}))
  np.testing.assert_array_equal(run(1, False), run(2, False))
  np.testing.assert_array_equal(run(1, True), run(1, True))
  assert not np.allclose(run(1, True), run(2, True))
  assert not np.allclose(run(1, True), run(1, False))
