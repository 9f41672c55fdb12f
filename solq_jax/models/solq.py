"""SOLQ: Deformable DETR with iterative box refinement plus a DCT mask-vector head.

`SOLQ.__call__(images [B,H,W,3], pad_mask [B,H,W], train=False)` returns per decoder layer the
class logits, boxes (cx, cy, w, h of the unpadded image, in [0, 1]) and mask vectors (not with
`with_masks=False`: detection only, the paper's Deformable DETR baseline); the last layer at the
top level and layers 0..L-2 in `aux_outputs`. In training, extra query sets
(`one_to_many_queries`, `query_groups`, see `solq_jax.models.query_sets`; `dn_groups` with
the batch's denoising queries, `solq_jax.denoising`) add their outputs, in the same layout,
under their own keys; the top level is always the one-to-one set.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from solq_jax.models.backbone import ResNet, check_width
from solq_jax.models.dn_queries import DenoisingQueries
from solq_jax.models.layers import (MLP, Conv2d, box_bias_quirk, torch_dense,
                                    xavier_uniform)
from solq_jax.models.position_encoding import downsample_mask, sine_position_encoding
from solq_jax.models import query_sets
from solq_jax.models import two_stage
from solq_jax.models.swin import SwinTransformer, is_swin
from solq_jax.models import transformer as transformer_lib
from solq_jax.models.transformer import DeformableTransformer, refine_boxes

PRIOR_PROB = 0.01
GN_GROUPS = 32
GN_EPS = 1e-5
# config.model.dtype -> the computation dtype (parameters are float32 in either case).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class InputProj(nn.Module):
  """Conv (1x1, or 3x3 stride 2 for the extra levels) + GroupNorm(32) to `hidden_dim`."""
  features: int
  kernel: int = 1
  stride: int = 1
  dtype: Any = jnp.float32      # conv and output dtype; GroupNorm statistics stay float32

  @nn.compact
  def __call__(self, x):
    x = Conv2d(self.features, self.kernel, self.stride, use_bias=True,
               kernel_init=xavier_uniform, dtype=self.dtype, name='conv')(x)
    return nn.GroupNorm(num_groups=GN_GROUPS, epsilon=GN_EPS, use_fast_variance=False,
                        dtype=self.dtype, name='norm')(x)


def _count(field: str, value, minimum: int) -> int:
  """`value` of the query-count field `config.model.<field>`, refused unless an int >= minimum."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f'config.model.{field} must be an integer >= {minimum}, got {value!r}')
  return value


class SOLQ(nn.Module):
  """The whole network. The fields are those of the `model` config section of the same names
  (configs/base.py says what each means); `build_model(config.model)` fills them.

  `dtype` ('float32' | 'bfloat16') is the computation dtype of the backbone, the input
  projections, the transformer layers and the heads; parameters, softmaxes, normalisation
  statistics, reference points and boxes stay float32, and the outputs are float32. `remat`
  (not a model-config field: `config.train.remat`, given to `build_model`) rematerialises the
  transformer layers in the backward pass; it changes neither the parameters nor the values.
  """
  backbone: str = 'resnet50'
  backbone_norm: str = 'frozen_bn'
  backbone_frozen_stages: int = 1
  backbone_width: int = 64
  drop_path_rate: float = 0.2
  hidden_dim: int = 384
  nheads: int = 8
  enc_layers: int = 6
  dec_layers: int = 6
  dim_feedforward: int = 1024
  dropout: float = 0.1
  num_queries: int = 300
  num_classes: int = 91
  num_feature_levels: int = 4
  enc_n_points: int = 4
  dec_n_points: int = 4
  with_box_refine: bool = True
  vector_hidden_dim: int = 1024
  num_coeffs: int = 256
  with_masks: bool = True     # False: detection only (Deformable DETR), no vector head
  attention_impl: str = 'xla'
  dtype: str = 'float32'
  one_to_many_queries: int = 0
  query_groups: int = 1
  two_stage: bool = False     # queries from the encoder's top proposals (models/two_stage.py)
  dn_groups: int = 0
  remat: str = 'none'

  def setup(self):
    d = self.hidden_dim
    if self.dtype not in DTYPES:
      raise ValueError(f'config.model.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}')
    dtype = DTYPES[self.dtype]
    if d % GN_GROUPS:
      raise ValueError(f'config.model.hidden_dim={d} must be a multiple of {GN_GROUPS} '
                       '(GroupNorm groups)')
    if d % self.nheads:
      raise ValueError(f'config.model.hidden_dim={d} must be divisible by '
                       f'nheads={self.nheads}')
    if self.num_feature_levels == 2 or self.num_feature_levels < 1:
      raise ValueError('config.model.num_feature_levels must be 1 (layer4 only) or >= 3 '
                       f'(layer2..4 plus extra levels), got {self.num_feature_levels}')
    check_width(self.backbone_width, self.backbone)
    if is_swin(self.backbone):
      if self.backbone_norm != 'frozen_bn':
        raise ValueError(f'config.model.backbone_norm={self.backbone_norm!r} is a ResNet knob; '
                         f'{self.backbone} has LayerNorms (leave it at frozen_bn)')
      self.body = SwinTransformer(self.backbone, frozen_stages=self.backbone_frozen_stages,
                                  drop_path_rate=self.drop_path_rate, dtype=dtype,
                                  remat=self.remat in ('backbone', 'all'), name='backbone')
    else:
      self.body = ResNet(self.backbone, norm=self.backbone_norm,
                         frozen_stages=self.backbone_frozen_stages, dtype=dtype,
                         width=self.backbone_width, name='backbone')
    n_backbone = self.num_backbone_levels
    self.input_proj = [InputProj(d, 1, 1, dtype) if l < n_backbone else InputProj(d, 3, 2, dtype)
                       for l in range(self.num_feature_levels)]
    self.transformer = DeformableTransformer(
        d_model=d, n_heads=self.nheads, enc_layers=self.enc_layers, dec_layers=self.dec_layers,
        d_ffn=self.dim_feedforward, dropout=self.dropout, n_levels=self.num_feature_levels,
        enc_n_points=self.enc_n_points, dec_n_points=self.dec_n_points,
        impl=self.attention_impl, dtype=dtype, remat=self.remat)
    self.check_two_stage()
    # Two-stage with box refinement: one more class and box head, for the encoder's proposals.
    n_heads = self.dec_layers + self.two_stage if self.with_box_refine else 1
    class_bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
    self.class_embed = [
        torch_dense(self.num_classes, d, bias_init=nn.initializers.constant(class_bias),
                    dtype=dtype)
        for _ in range(n_heads)]
    # The official two-stage init sets every box head's last bias to zero.
    self.bbox_embed = [MLP(d, 4, 3, box_bias_quirk(4) if i == 0 and not self.two_stage else None,
                           dtype)
                       for i in range(n_heads)]
    if self.with_masks:
      self.vector_embed = MLP(self.vector_hidden_dim, self.num_coeffs, 3,
                              box_bias_quirk(self.num_coeffs), dtype)
    if self.two_stage:
      self.proposal_queries = two_stage.ProposalQueries(d, dtype)
    else:
      self.query_embed = nn.Embed(self.num_queries, 2 * d,
                                  embedding_init=nn.initializers.normal(1.0))
    n = _count('one_to_many_queries', self.one_to_many_queries, 0)
    if n:
      self.query_embed_one_to_many = nn.Embed(n, 2 * d,
                                              embedding_init=nn.initializers.normal(1.0))
    g = _count('query_groups', self.query_groups, 1)
    if g > 1:   # groups 1..G-1; group 0 is `query_embed`
      self.query_embed_groups = nn.Embed((g - 1) * self.num_queries, 2 * d,
                                         embedding_init=nn.initializers.normal(1.0))
    dn = _count('dn_groups', self.dn_groups, 0)
    if dn and not self.with_box_refine:
      raise ValueError('config.model.dn_groups > 0 needs config.model.with_box_refine (the '
                       'denoising queries refine their noised boxes)')
    if dn:
      self.dn_query_embed = DenoisingQueries(self.num_classes, d)

  def check_two_stage(self):
    if not isinstance(self.two_stage, bool):
      raise ValueError(f'config.model.two_stage must be True or False, got {self.two_stage!r}')
    if self.two_stage and (self.one_to_many_queries or self.query_groups != 1 or
                           self.dn_groups):
      # Their extra queries sit beside learned query embeddings; two-stage has none.
      raise ValueError('config.model.two_stage cannot be combined with '
                       f'config.model.one_to_many_queries={self.one_to_many_queries!r}, '
                       f'config.model.query_groups={self.query_groups!r} or '
                       f'config.model.dn_groups={self.dn_groups!r} (use 0, 1 and 0)')

  @property
  def num_backbone_levels(self):
    return 3 if self.num_feature_levels > 1 else 1

  def features(self, images, pad_mask, train=False):
    """Backbone, input projections, padding masks and position encodings of every level."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be [B,H,W,3], got shape {images.shape}')
    if pad_mask.shape != images.shape[:3]:
      raise ValueError(f'pad_mask must be {images.shape[:3]} (bool, True on padding), got '
                       f'{pad_mask.shape}')
    feats = self.body(images, train)
    return self.project(feats, pad_mask)

  def project(self, feats, pad_mask):
    """Backbone maps (layer2..4) -> per-level `srcs [B,H_l,W_l,D]`, `masks`, `pos`."""
    pad_mask = pad_mask.astype(bool)
    feats = feats[-self.num_backbone_levels:]
    srcs, masks = [], []
    for l in range(self.num_feature_levels):
      # the first extra level reads the raw last backbone map, later ones the previous level
      x = feats[l] if l < len(feats) else (feats[-1] if l == len(feats) else srcs[-1])
      srcs.append(self.input_proj[l](x))
      masks.append(downsample_mask(pad_mask, srcs[-1].shape[1:3]))
    pos = [sine_position_encoding(m, self.hidden_dim // 2) for m in masks]
    return srcs, masks, pos

  def extra_query_sets(self, train):
    """`[(output key, query_embed [N, 2D])]` of the extra query sets run with this call: only
    in training (inference reads the one-to-one set alone). The embeddings are read in any case
    so that `init` creates them."""
    sets = []
    if self.one_to_many_queries:
      sets.append(('one_to_many_outputs', self.query_embed_one_to_many.embedding))
    if self.query_groups > 1:
      groups = self.query_embed_groups.embedding.reshape(self.query_groups - 1, self.num_queries,
                                                         -1)
      sets += [('group_outputs', e) for e in groups]
    return sets if train else []

  def denoising_block(self, dn_queries, train):
    """`(tgt, query_pos, boxes, valid)` of the DN queries (`solq_jax.denoising`) in training
    with `dn_groups`, else None. The DN parameters are created at `init` in any case."""
    if self.dn_groups and self.is_initializing() and dn_queries is None:
      self.dn_query_embed(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1, 4)))
    if not (train and self.dn_groups and dn_queries is not None):
      return None
    labels, boxes, valid = dn_queries['labels'], dn_queries['boxes'], dn_queries['valid']
    if labels.shape[1] % self.dn_groups:
      raise ValueError(f'{labels.shape[1]} denoising queries do not split into '
                       f'config.model.dn_groups={self.dn_groups} groups')
    tgt, query_pos = self.dn_query_embed(labels, boxes)
    return tgt, query_pos, boxes, valid

  def decode(self, memory, masks, train=False, dn_queries=None):
    """Decoder and heads: memory `[B, S, D]` and per-level masks -> the output dict."""
    refine = self.bbox_embed if self.with_box_refine else None
    if self.two_stage:
      return self.decode_two_stage(memory, masks, train, refine)
    extra = self.extra_query_sets(train)
    dn = self.denoising_block(dn_queries, train)
    if dn is not None:
      return self.decode_with_denoising(memory, masks, train, refine, extra, dn)
    if not extra:
      hs, references, boxes = self.transformer.decode(memory, masks, self.query_embed.embedding,
                                                      train, refine)
      return query_sets.stack_layers(self.heads(hs, references, boxes))
    embeds = [self.query_embed.embedding] + [e for _, e in extra]
    sizes = [e.shape[0] for e in embeds]
    hs, references, boxes = self.transformer.decode(
        memory, masks, jnp.concatenate(embeds), train, refine,
        query_sets.block_attention_mask(sizes))
    return self.split_query_sets(self.heads(hs, references, boxes), sizes, extra)

  @staticmethod
  def split_query_sets(layers, sizes, extra):
    """Per-layer outputs of the concatenated learned query sets -> the output dict."""
    blocks = query_sets.split_rows(layers, sizes)
    out = query_sets.stack_layers(blocks[0])
    for (key, _), block in zip(extra, blocks[1:]):
      if key == 'group_outputs':
        out.setdefault(key, []).append(query_sets.stack_layers(block))
      else:
        out[key] = query_sets.stack_layers(block)
    return out

  def decode_two_stage(self, memory, masks, train, refine):
    """The decoder on the encoder's top proposals; adds `enc_outputs` (the proposals' logits
    and boxes over every encoder token) to the output dict, as the official model."""
    padding = transformer_lib.flatten_levels(masks)
    spatial_shapes = tuple((int(m.shape[1]), int(m.shape[2])) for m in masks)
    proposals, usable = two_stage.encoder_proposals(spatial_shapes, padding)
    head = self.dec_layers if self.with_box_refine else 0
    enc_memory = self.proposal_queries.memory(memory, usable)
    enc_logits = self.class_embed[head](enc_memory).astype(jnp.float32)
    enc_boxes_unact = self.bbox_embed[head](enc_memory).astype(jnp.float32) + proposals
    selected = two_stage.select_top_k(enc_logits[..., 0], enc_boxes_unact, self.num_queries)
    tgt, query_pos = self.proposal_queries.queries(selected)
    hs, references, boxes = self.transformer.decode_queries(
        memory, masks, tgt, query_pos, jax.nn.sigmoid(selected), train, refine)
    out = query_sets.stack_layers(self.heads(hs, references, boxes))
    out['enc_outputs'] = {'pred_logits': enc_logits,
                          'pred_boxes': jax.nn.sigmoid(enc_boxes_unact)}
    return out

  def decode_with_denoising(self, memory, masks, train, refine, extra, dn):
    """`decode` with the DN groups after every other query set: they see the one-to-one
    queries (DN-DETR's rule) and their own group's real (unpadded) slots; nothing else sees
    them. Their outputs go under `dn_outputs`."""
    tgt, query_pos, boxes, valid = dn
    embeds = [self.query_embed.embedding] + [e for _, e in extra]
    sizes = [e.shape[0] for e in embeds]
    n_sets = len(sizes)
    group = valid.shape[1] // self.dn_groups
    sizes += [group] * self.dn_groups
    mask = query_sets.block_attention_mask(
        sizes, visible=[(i, 0) for i in range(n_sets, len(sizes))])
    keys = jnp.concatenate([jnp.ones((valid.shape[0], sum(sizes[:n_sets])), bool), valid], 1)
    mask = jnp.asarray(mask)[None, None] & keys[:, None, None, :]
    hs, references, out_boxes = self.transformer.decode(
        memory, masks, jnp.concatenate(embeds), train, refine, mask, (tgt, query_pos, boxes))
    layers = self.heads(hs, references, out_boxes)
    learned, dn_rows = query_sets.split_rows(layers, [sum(sizes[:n_sets]), valid.shape[1]])
    out = self.split_query_sets(learned, sizes[:n_sets], extra)
    out['dn_outputs'] = query_sets.stack_layers(dn_rows)
    return out

  def heads(self, hs, references, boxes):
    """Per decoder layer `{pred_logits, pred_boxes, pred_vectors}` from the decoder's outputs."""
    outputs = []
    for l, h in enumerate(hs):
      head = l if self.with_box_refine else 0
      box = (boxes[l] if self.with_box_refine else
             refine_boxes(self.bbox_embed[0](h).astype(jnp.float32), references[l]))
      # The heads compute in the model's dtype; everything downstream (matching, losses, mask
      # coding, post-processing) reads float32.
      outputs.append({'pred_logits': self.class_embed[head](h).astype(jnp.float32),
                      'pred_boxes': box})
      if self.with_masks:
        outputs[-1]['pred_vectors'] = self.vector_embed(h).astype(jnp.float32)
    return outputs

  def __call__(self, images, pad_mask, train=False, dn_queries=None):
    """`dn_queries`: the denoising queries of this batch (`solq_jax.denoising.noised_queries`),
    read only in training with `dn_groups` > 0; they add `dn_outputs`."""
    srcs, masks, pos = self.features(images, pad_mask, train)
    memory = self.transformer.encode(srcs, masks, pos, train)
    return self.decode(memory, masks, train, dn_queries)


def init_variables(model, rng, image_size=(64, 64), batch_size=1):
  """`{'params', 'buffers'}` of `model.init` on a small dummy batch: the one random
  initialiser (training's step 0, and inference without a checkpoint).

  The variables do not depend on the image size, so a small one keeps initialisation cheap.
  """
  images = jnp.zeros((batch_size,) + tuple(image_size) + (3,), jnp.float32)
  pad_mask = jnp.zeros((batch_size,) + tuple(image_size), bool)
  variables = dict(jax.jit(model.init)(rng, images, pad_mask))
  variables.setdefault('buffers', {})     # a Swin backbone has no frozen batch norms
  return variables


def count_params(params) -> int:
  """Number of scalars in a parameter tree."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
