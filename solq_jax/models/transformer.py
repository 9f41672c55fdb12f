"""The deformable transformer, as the official code builds it: post-norm encoder and decoder, box refinement.

Token layout: levels flattened in order, each row-major, `[B, S, D]`. Reference points are
normalised (x, y) of the padded map; valid ratios are `(valid_W / W, valid_H / H)`, w first.
"""
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from solq_jax.box_ops import inverse_sigmoid
from solq_jax.models.deformable_attention import MSDeformAttn
from solq_jax.models.dropout import Dropout
from solq_jax.models.layers import torch_linear_bias, xavier_uniform

LN_EPS = 1e-5
REMAT_CHOICES = ('none', 'encoder', 'decoder', 'backbone', 'all')  # backbone: Swin blocks


def layer_norm(name, dtype=jnp.float32):
  """LayerNorm with float32 statistics (Flax reduces in at least float32), output in `dtype`."""
  return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=dtype, name=name)


def ffn_linear(features, fan_in, name, dtype=jnp.float32):
  """Transformer linear: xavier kernel (transformer reset), torch-default bias."""
  return nn.Dense(features, kernel_init=xavier_uniform, bias_init=torch_linear_bias(fan_in),
                  dtype=dtype, name=name)


# Rematerialisation of a transformer layer saves nothing but the layer's inputs and recomputes
# its forward during the backward pass. The large activations of a layer are exactly the outputs
# of its matrix products (value projection, sampling offsets, attention logits, the FFN's hidden
# layer over every token), so a policy that keeps the products (`dots_saveable`) would keep most
# of the memory that remat is meant to free; the price is one more forward of the layer.
REMAT_POLICY = jax.checkpoint_policies.nothing_saveable


def maybe_remat(layer_cls, remat: bool, static_argnums):
  """`layer_cls`, or its `nn.remat` (same parameter names) when `remat`; `static_argnums`
  count `self` as 0 (the spatial shapes and the `train` flag)."""
  if not remat:
    return layer_cls
  return nn.remat(layer_cls, policy=REMAT_POLICY, static_argnums=static_argnums)


def valid_ratios(masks):
  """`[B, L, 2]` (valid_W / W, valid_H / H) from per-level padding masks `[B, H_l, W_l]`."""
  ratios = []
  for mask in masks:
    h, w = mask.shape[1:]
    valid_h = jnp.sum(~mask[:, :, 0], axis=1).astype(jnp.float32)
    valid_w = jnp.sum(~mask[:, 0, :], axis=1).astype(jnp.float32)
    ratios.append(jnp.stack([valid_w / w, valid_h / h], axis=-1))
  return jnp.stack(ratios, axis=1)


def encoder_reference_points(spatial_shapes, ratios):
  """`[B, S, L, 2]`: every pixel centre, normalised by its level's valid size, times each
  level's valid ratio."""
  refs = []
  for lvl, (h, w) in enumerate(spatial_shapes):
    ref_y, ref_x = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5,
                                jnp.arange(w, dtype=jnp.float32) + 0.5, indexing='ij')
    ref_y = ref_y.reshape(-1)[None] / (ratios[:, None, lvl, 1] * h)
    ref_x = ref_x.reshape(-1)[None] / (ratios[:, None, lvl, 0] * w)
    refs.append(jnp.stack([ref_x, ref_y], axis=-1))
  return jnp.concatenate(refs, axis=1)[:, :, None] * ratios[:, None]


def level_references(reference_points, ratios):
  """`[B, Q, 2|4]` references -> `[B, Q, L, 2|4]`, scaled by each level's valid ratios."""
  if reference_points.shape[-1] == 4:
    return reference_points[:, :, None] * jnp.concatenate([ratios, ratios], -1)[:, None]
  return reference_points[:, :, None] * ratios[:, None]


def map_row_blocks(fn, x, references):
  """`fn(rows, reference)` on the consecutive row blocks of `x [B, Q, ...]` that the per-block
  `references` (`[B, Q_i, ...]`, in order) cover, concatenated along the rows."""
  bounds = np.cumsum([0] + [r.shape[1] for r in references])
  return jnp.concatenate([fn(x[:, a:b], r) for a, b, r in
                          zip(bounds[:-1], bounds[1:], references)], axis=1)


def refine_boxes(delta, reference):
  """sigmoid(delta + inverse_sigmoid(ref)) for 4-d boxes; for 2-d points only delta's (x, y)
  get the reference and (w, h) are sigmoid(delta) alone. `delta [..., 4]` -> boxes `[..., 4]`."""
  if reference.shape[-1] == 4:
    return jax.nn.sigmoid(delta + inverse_sigmoid(reference))
  xy = delta[..., :2] + inverse_sigmoid(reference)
  return jax.nn.sigmoid(jnp.concatenate([xy, delta[..., 2:]], axis=-1))


class _Layer(nn.Module):
  """Fields and the post-norm sub-blocks shared by the encoder and decoder layers."""
  d_model: int
  d_ffn: int
  dropout: float
  n_levels: int
  n_heads: int
  n_points: int
  impl: str = 'xla'
  dtype: Any = jnp.float32      # computation dtype; LayerNorm statistics stay float32

  def drop(self, x, train):
    return Dropout(self.dropout)(x, not train)

  def norm(self, name):
    return layer_norm(name, self.dtype)

  def deformable_attention(self, name):
    return MSDeformAttn(self.d_model, self.n_levels, self.n_heads, self.n_points, self.impl,
                        self.dtype, name=name)

  def ffn(self, x, norm_name, train):
    """x -> LN(x + drop(W2 drop(relu(W1 x))))."""
    hidden = self.drop(nn.relu(ffn_linear(self.d_ffn, self.d_model, 'linear1', self.dtype)(x)),
                       train)
    return self.norm(norm_name)(
        x + self.drop(ffn_linear(self.d_model, self.d_ffn, 'linear2', self.dtype)(hidden), train))


class EncoderLayer(_Layer):
  """src = LN1(src + drop(MSDA(src + pos, ref, src))); src = LN2(src + drop(FFN(src)))."""

  @nn.compact
  def __call__(self, src, pos, reference_points, spatial_shapes, padding_mask, train):
    attn = self.deformable_attention('self_attn')
    src = self.norm('norm1')(src + self.drop(
        attn(src + pos, reference_points, src, spatial_shapes, padding_mask), train))
    return self.ffn(src, 'norm2', train)


class MultiheadAttention(nn.Module):
  """torch `nn.MultiheadAttention` with q/k/v/out as separate `[D, D]` Dense layers.

  `mask` (call argument): None, or bool `[Lq, Lk]` (or `[B, 1, Lq, Lk]`), True where a query
  may attend to a key (every query must see at least one key); masked keys get exactly zero
  weight.

  Init as the official decoder: the packed q|k|v matrix `[3D, D]` is xavier-initialised as a
  whole (so each third has the packed bound), the out projection xavier, all biases zero.
  """
  d_model: int
  n_heads: int
  dropout: float
  dtype: Any = jnp.float32      # projections in `dtype`, the softmax in float32

  @nn.compact
  def __call__(self, query, key, value, train, mask=None):
    d, m = self.d_model, self.n_heads
    bound = math.sqrt(6.0 / (d + 3 * d))
    packed_init = lambda k, shape, dtype=jnp.float32: jax.random.uniform(
        k, shape, dtype, -bound, bound)
    proj = lambda name, init=packed_init: nn.Dense(d, kernel_init=init,
                                                   bias_init=nn.initializers.zeros,
                                                   dtype=self.dtype, name=name)
    b, lq, _ = query.shape
    heads = lambda x: x.reshape(b, x.shape[1], m, d // m)
    q = heads(proj('query')(query)) * (1.0 / math.sqrt(d // m))
    k = heads(proj('key')(key))
    v = heads(proj('value')(value))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = Dropout(self.dropout)(weights, not train)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, lq, d)
    return proj('out', xavier_uniform)(out)


class DecoderLayer(_Layer):
  """Self-attention -> norm2, deformable cross-attention -> norm1, FFN -> norm3 (official
  names), each post-norm with dropout on the residual branch. `self_attn_mask`: see
  `MultiheadAttention`'s `mask`. `reference_points`: one array, or a tuple of per-row-block
  arrays (consecutive query rows) when the blocks' references differ in kind (points, boxes);
  cross-attention is per query, so it runs block by block."""

  @nn.compact
  def __call__(self, tgt, query_pos, reference_points, memory, spatial_shapes, padding_mask,
               train, self_attn_mask=None):
    q = tgt + query_pos
    tgt = self.norm('norm2')(tgt + self.drop(MultiheadAttention(
        self.d_model, self.n_heads, self.dropout, self.dtype, name='self_attn')(q, q, tgt, train,
                                                                   self_attn_mask),
        train))
    cross = self.deformable_attention('cross_attn')
    q = tgt + query_pos
    if isinstance(reference_points, tuple):
      attended = map_row_blocks(
          lambda rows, r: cross(rows, r, memory, spatial_shapes, padding_mask), q,
          reference_points)
    else:
      attended = cross(q, reference_points, memory, spatial_shapes, padding_mask)
    tgt = self.norm('norm1')(tgt + self.drop(attended, train))
    return self.ffn(tgt, 'norm3', train)


class Encoder(nn.Module):
  num_layers: int
  layer_kwargs: dict
  remat: bool = False           # rematerialise every layer (REMAT_POLICY)

  @nn.compact
  def __call__(self, src, pos, spatial_shapes, ratios, padding_mask, train):
    reference_points = encoder_reference_points(spatial_shapes, ratios)
    layer_cls = maybe_remat(EncoderLayer, self.remat, static_argnums=(4, 6))
    for i in range(self.num_layers):
      src = layer_cls(**self.layer_kwargs, name=f'layers_{i}')(
          src, pos, reference_points, spatial_shapes, padding_mask, train)
    return src


class Decoder(nn.Module):
  """Decoder with optional iterative box refinement.

  `bbox_embed` (call argument): per-layer box heads `delta = head(hs_l)` shared with the model's
  outputs, or None (no refinement: every layer keeps the initial 2-d reference). Returns
  `(hs, references, boxes)`: per layer the output, the reference it read, and (with refinement)
  `refine_boxes(head(hs_l), reference_l)`, whose stop-gradient is the next layer's reference.
  `self_attn_mask`: None or bool `[Q, Q]` (True = may attend), for every layer's self-attention.
  The references and boxes are float32 whatever the layers' dtype. `reference_points` may be a
  tuple of per-row-block references (points `[B, Q_i, 2]` beside boxes `[B, Q_j, 4]`: learned
  queries beside denoising queries); with refinement the blocks are one 4-d array after layer 0.
  """
  num_layers: int
  layer_kwargs: dict
  remat: bool = False           # rematerialise every layer (REMAT_POLICY)

  @nn.compact
  def __call__(self, tgt, query_pos, reference_points, memory, spatial_shapes, ratios,
               padding_mask, train, bbox_embed: Optional[Sequence[Callable]] = None,
               self_attn_mask=None):
    hs, references, boxes = [], [], []
    layer_cls = maybe_remat(DecoderLayer, self.remat, static_argnums=(5, 7))
    for i in range(self.num_layers):
      if isinstance(reference_points, tuple):
        ref_input = tuple(level_references(r, ratios) for r in reference_points)
      else:
        ref_input = level_references(reference_points, ratios)
      tgt = layer_cls(**self.layer_kwargs, name=f'layers_{i}')(
          tgt, query_pos, ref_input, memory, spatial_shapes, padding_mask, train,
          self_attn_mask)
      hs.append(tgt)
      references.append(reference_points)
      if bbox_embed is not None:
        delta = bbox_embed[i](tgt).astype(jnp.float32)
        if isinstance(reference_points, tuple):
          boxes.append(map_row_blocks(refine_boxes, delta, reference_points))
        else:
          boxes.append(refine_boxes(delta, reference_points))
        reference_points = jax.lax.stop_gradient(boxes[-1])
    return hs, references, boxes


def flatten_levels(maps):
  """Per-level `[B, H_l, W_l, ...]` -> `[B, S, ...]`, levels in order, each row-major."""
  return jnp.concatenate([m.reshape((m.shape[0], -1) + m.shape[3:]) for m in maps], axis=1)


class DeformableTransformer(nn.Module):
  """Flattens the levels, runs the encoder, splits the queries and runs the decoder.

  `encode` and `decode` are also usable on their own (e.g. to time or inspect the stages).
  `dtype`: the layers' computation dtype (position encodings and queries are cast to it; the
  reference points stay float32). `remat`: 'none' | 'encoder' | 'decoder' | 'all', the layers
  rematerialised in the backward pass.
  """
  d_model: int
  n_heads: int
  enc_layers: int
  dec_layers: int
  d_ffn: int
  dropout: float
  n_levels: int
  enc_n_points: int
  dec_n_points: int
  impl: str = 'xla'
  dtype: Any = jnp.float32
  remat: str = 'none'

  def setup(self):
    if self.remat not in REMAT_CHOICES:
      raise ValueError(f'config.train.remat must be one of {REMAT_CHOICES}, got {self.remat!r}')
    common = dict(d_model=self.d_model, d_ffn=self.d_ffn, dropout=self.dropout,
                  n_levels=self.n_levels, n_heads=self.n_heads, impl=self.impl,
                  dtype=self.dtype)
    self.level_embed = self.param('level_embed', nn.initializers.normal(1.0),
                                  (self.n_levels, self.d_model))
    self.encoder = Encoder(self.enc_layers, dict(common, n_points=self.enc_n_points),
                           self.remat in ('encoder', 'all'))
    self.decoder = Decoder(self.dec_layers, dict(common, n_points=self.dec_n_points),
                           self.remat in ('decoder', 'all'))
    self.reference_points = nn.Dense(2, kernel_init=xavier_uniform,
                                     bias_init=nn.initializers.zeros)

  def encode(self, srcs, masks, pos_embeds, train):
    """srcs / pos_embeds `[B, H_l, W_l, D]`, masks `[B, H_l, W_l]` -> memory `[B, S, D]`."""
    spatial_shapes = tuple((int(s.shape[1]), int(s.shape[2])) for s in srcs)
    pos_flat = flatten_levels([p + self.level_embed[lvl] for lvl, p in enumerate(pos_embeds)])
    return self.encoder(flatten_levels(srcs).astype(self.dtype), pos_flat.astype(self.dtype),
                        spatial_shapes, valid_ratios(masks), flatten_levels(masks), train)

  def decode(self, memory, masks, query_embed, train, bbox_embed=None, self_attn_mask=None,
             extra_queries=None):
    """memory `[B, S, D]`, per-level masks, query_embed `[Q, 2D]` -> (hs, references, boxes).
    `self_attn_mask`: None or bool `[Q, Q]` (or `[B, 1, Q, Q]`), True where query i may attend
    to query j. `extra_queries`: None or `(tgt, query_pos, boxes)` `[B, N, D|D|4]`, queries
    appended after the learned ones with their own boxes as initial references (denoising)."""
    d = self.d_model
    b = memory.shape[0]
    query_pos = jnp.broadcast_to(query_embed[:, :d], (b,) + query_embed[:, :d].shape)
    tgt = jnp.broadcast_to(query_embed[:, d:], (b,) + query_embed[:, d:].shape)
    reference_points = jax.nn.sigmoid(self.reference_points(query_pos))   # float32
    if extra_queries is not None:
      extra_tgt, extra_pos, extra_boxes = extra_queries
      tgt = jnp.concatenate([tgt, extra_tgt.astype(tgt.dtype)], axis=1)
      query_pos = jnp.concatenate([query_pos, extra_pos.astype(query_pos.dtype)], axis=1)
      reference_points = (reference_points, extra_boxes.astype(jnp.float32))
    return self.decode_queries(memory, masks, tgt, query_pos, reference_points, train,
                               bbox_embed, self_attn_mask)

  def decode_queries(self, memory, masks, tgt, query_pos, reference_points, train,
                     bbox_embed=None, self_attn_mask=None):
    """The decoder on explicit queries `tgt`, `query_pos` `[B, Q, D]` and float32 references
    `[B, Q, 2 or 4]` (two-stage: boxes from the encoder's proposals)."""
    spatial_shapes = tuple((int(m.shape[1]), int(m.shape[2])) for m in masks)
    return self.decoder(tgt.astype(self.dtype), query_pos.astype(self.dtype), reference_points,
                        memory.astype(self.dtype), spatial_shapes, valid_ratios(masks),
                        flatten_levels(masks), train, bbox_embed, self_attn_mask)

  def __call__(self, srcs, masks, pos_embeds, query_embed, train, bbox_embed=None):
    memory = self.encode(srcs, masks, pos_embeds, train)
    return self.decode(memory, masks, query_embed, train, bbox_embed)
