"""SOLQ: Deformable DETR with iterative box refinement plus a DCT mask-vector head (spec 1).

`SOLQ.__call__(images [B,H,W,3], pad_mask [B,H,W], train=False)` returns per decoder layer the
class logits, boxes (cx, cy, w, h of the unpadded image, in [0, 1]) and mask vectors; the last
layer at the top level and layers 0..L-2 in `aux_outputs`.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from solq_jax.models.backbone import ResNet
from solq_jax.models.layers import (MLP, Conv2d, box_bias_quirk, torch_dense,
                                    xavier_uniform)
from solq_jax.models.position_encoding import downsample_mask, sine_position_encoding
from solq_jax.models.transformer import DeformableTransformer, refine_boxes

PRIOR_PROB = 0.01
GN_GROUPS = 32
GN_EPS = 1e-5


class InputProj(nn.Module):
  """Conv (1x1, or 3x3 stride 2 for the extra levels) + GroupNorm(32) to `hidden_dim`."""
  features: int
  kernel: int = 1
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    x = Conv2d(self.features, self.kernel, self.stride, use_bias=True,
               kernel_init=xavier_uniform, name='conv')(x)
    return nn.GroupNorm(num_groups=GN_GROUPS, epsilon=GN_EPS, use_fast_variance=False,
                        name='norm')(x)


class SOLQ(nn.Module):
  """The whole network; `config` is the model section (`config.model`)."""
  config: dict

  def setup(self):
    c = self.config
    d = c.hidden_dim
    if d % GN_GROUPS:
      raise ValueError(f'config.model.hidden_dim={d} must be a multiple of {GN_GROUPS} '
                       '(GroupNorm groups)')
    if d % c.nheads:
      raise ValueError(f'config.model.hidden_dim={d} must be divisible by nheads={c.nheads}')
    if c.num_feature_levels == 2 or c.num_feature_levels < 1:
      raise ValueError('config.model.num_feature_levels must be 1 (layer4 only) or >= 3 '
                       f'(layer2..4 plus extra levels), got {c.num_feature_levels}')
    self.backbone = ResNet(c.backbone, norm=c.backbone_norm,
                           frozen_stages=c.backbone_frozen_stages)
    n_backbone = self.num_backbone_levels
    self.input_proj = [InputProj(d, 1, 1) if l < n_backbone else InputProj(d, 3, 2)
                       for l in range(c.num_feature_levels)]
    self.transformer = DeformableTransformer(
        d_model=d, n_heads=c.nheads, enc_layers=c.enc_layers, dec_layers=c.dec_layers,
        d_ffn=c.dim_feedforward, dropout=c.dropout, n_levels=c.num_feature_levels,
        enc_n_points=c.enc_n_points, dec_n_points=c.dec_n_points, impl=c.attention_impl)
    n_heads = c.dec_layers if c.with_box_refine else 1
    class_bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
    self.class_embed = [
        torch_dense(c.num_classes, d, bias_init=nn.initializers.constant(class_bias))
        for _ in range(n_heads)]
    self.bbox_embed = [MLP(d, 4, 3, box_bias_quirk(4) if i == 0 else None)
                       for i in range(n_heads)]
    self.vector_embed = MLP(c.vector_hidden_dim, c.num_coeffs, 3, box_bias_quirk(c.num_coeffs))
    self.query_embed = nn.Embed(c.num_queries, 2 * d, embedding_init=nn.initializers.normal(1.0))

  @property
  def num_backbone_levels(self):
    return 3 if self.config.num_feature_levels > 1 else 1

  def features(self, images, pad_mask):
    """Backbone, input projections, padding masks and position encodings of every level."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be [B,H,W,3], got shape {images.shape}')
    if pad_mask.shape != images.shape[:3]:
      raise ValueError(f'pad_mask must be {images.shape[:3]} (bool, True on padding), got '
                       f'{pad_mask.shape}')
    return self.project(self.backbone(images), pad_mask)

  def project(self, feats, pad_mask):
    """Backbone maps (layer2..4) -> per-level `srcs [B,H_l,W_l,D]`, `masks`, `pos`."""
    c = self.config
    pad_mask = pad_mask.astype(bool)
    feats = feats[-self.num_backbone_levels:]
    srcs, masks = [], []
    for l in range(c.num_feature_levels):
      # the first extra level reads the raw last backbone map, later ones the previous level
      x = feats[l] if l < len(feats) else (feats[-1] if l == len(feats) else srcs[-1])
      srcs.append(self.input_proj[l](x))
      masks.append(downsample_mask(pad_mask, srcs[-1].shape[1:3]))
    pos = [sine_position_encoding(m, c.hidden_dim // 2) for m in masks]
    return srcs, masks, pos

  def decode(self, memory, masks, train=False):
    """Decoder and heads: memory `[B, S, D]` and per-level masks -> the output dict."""
    c = self.config
    refine = self.bbox_embed if c.with_box_refine else None
    hs, references, boxes = self.transformer.decode(memory, masks, self.query_embed.embedding,
                                                    train, refine)
    outputs = []
    for l, h in enumerate(hs):
      head = l if c.with_box_refine else 0
      box = boxes[l] if c.with_box_refine else refine_boxes(self.bbox_embed[0](h), references[l])
      outputs.append({'pred_logits': self.class_embed[head](h), 'pred_boxes': box,
                      'pred_vectors': self.vector_embed(h)})
    out = dict(outputs[-1])
    out['aux_outputs'] = outputs[:-1]
    return out

  def __call__(self, images, pad_mask, train=False):
    srcs, masks, pos = self.features(images, pad_mask)
    memory = self.transformer.encode(srcs, masks, pos, train)
    return self.decode(memory, masks, train)


def init_variables(model, rng, image_size=(64, 64), batch_size=1):
  """`model.init` on a small dummy batch, compiled with XLA's cheapest optimisation level.

  The variables do not depend on the image size, and initialisation runs once, so this gives
  the same values as `model.init(rng, images, pad_mask)` at any size while compiling several
  times faster (the random initialisers dominate the compile time of a full `jit(init)`).
  """
  images = jnp.zeros((batch_size,) + tuple(image_size) + (3,), jnp.float32)
  pad_mask = jnp.zeros((batch_size,) + tuple(image_size), bool)
  compiled = jax.jit(model.init).lower(rng, images, pad_mask).compile(
      compiler_options={'xla_backend_optimization_level': 0,
                        'xla_llvm_disable_expensive_passes': True})
  return compiled(rng, images, pad_mask)


def count_params(params) -> int:
  """Number of scalars in a parameter tree."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
