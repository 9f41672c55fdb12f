"""Two-stage Deformable DETR (Zhu et al. 2021, the official `--two_stage`): decoder queries
from the encoder's best proposals instead of learned query embeddings.

Every encoder token proposes a box: its pixel centre on its level (normalised by the level's
valid size) with a level-dependent size `0.05 * 2**level`. A linear layer + LayerNorm of the
memory (`enc_output`, `enc_output_norm`) feeds an extra class head and box head (the model's
heads at index `dec_layers`), which score the tokens and refine their proposals. The top
`num_queries` tokens by the logit of class 0 give the decoder's initial reference boxes (gradient
stopped) and, through a sine embedding of those boxes and `pos_trans` + `pos_trans_norm`, its
query positions and contents. The encoder outputs get their own class-agnostic loss
(`solq_jax.two_stage`).

Proposals off the valid area (padding, or a centre or size outside (0.01, 0.99)) are +inf in
logit space (their boxes sigmoid to 1) and their memory rows are zeroed, as the official code.
The official embedding has 128 sine features per coordinate, which only fits `pos_trans` at
hidden_dim 256; here it has hidden_dim / 2, the same at 256 and defined for every width.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from solq_jax.models.position_encoding import sine_features
from solq_jax.models.transformer import ffn_linear, layer_norm

BASE_SIZE = 0.05              # proposal w = h = BASE_SIZE * 2**level
VALID_RANGE = (0.01, 0.99)    # proposals with every coordinate inside are used


def encoder_proposals(spatial_shapes, padding_mask):
  """The fixed proposal of every encoder token.

  Args:
    spatial_shapes: static `((H_l, W_l), ...)`.
    padding_mask: `[B, S]` bool, the flattened levels' padding (True = padding).

  Returns:
    `(proposals [B, S, 4], usable [B, S])`: cxcywh in logit space (inverse sigmoid), +inf where
    not `usable` (padding, or a coordinate outside `VALID_RANGE`).
  """
  b = padding_mask.shape[0]
  boxes, start = [], 0
  for level, (h, w) in enumerate(spatial_shapes):
    mask = padding_mask[:, start:start + h * w].reshape(b, h, w)
    start += h * w
    valid_h = jnp.sum(~mask[:, :, 0], axis=1).astype(jnp.float32)
    valid_w = jnp.sum(~mask[:, 0, :], axis=1).astype(jnp.float32)
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                          indexing='ij')
    cx = (xs[None] + 0.5) / valid_w[:, None, None]
    cy = (ys[None] + 0.5) / valid_h[:, None, None]
    size = jnp.full_like(cx, BASE_SIZE * 2.0 ** level)
    boxes.append(jnp.stack([cx, cy, size, size], axis=-1).reshape(b, h * w, 4))
  boxes = jnp.concatenate(boxes, axis=1)
  lo, hi = VALID_RANGE
  usable = jnp.all((boxes > lo) & (boxes < hi), axis=-1) & ~padding_mask
  # Unusable boxes may lie outside (0, 1) where the log is undefined: take it of a safe value.
  safe = jnp.where(usable[..., None], boxes, 0.5)
  return jnp.where(usable[..., None], jnp.log(safe / (1 - safe)), jnp.inf), usable


def proposal_embedding(boxes_unact, num_pos_feats: int, temperature=10000.0,
                       scale=2 * math.pi):
  """Sine embedding `[..., 4 * num_pos_feats]` of boxes given in logit space `[..., 4]`:
  each coordinate (cx, cy, w, h order) of `sigmoid(boxes) * scale` gets `num_pos_feats`
  interleaved sin/cos features (the image position encoding's formula)."""
  coords = jax.nn.sigmoid(boxes_unact) * scale
  feats = sine_features(coords, num_pos_feats, temperature)     # [..., 4, F]
  return feats.reshape(feats.shape[:-2] + (-1,))


def select_top_k(scores, boxes_unact, k: int):
  """The `k` tokens of highest `scores [B, S]`: their boxes `[B, k, 4]` (logit space) with the
  gradient stopped (the decoder's references are not trained through the selection)."""
  if k > scores.shape[1]:
    raise ValueError(f'config.model.num_queries={k} exceeds the number of encoder tokens '
                     f'({scores.shape[1]}) that two-stage queries are selected from')
  _, index = jax.lax.top_k(scores, k)
  return jax.lax.stop_gradient(jnp.take_along_axis(boxes_unact, index[..., None], axis=1))


class ProposalQueries(nn.Module):
  """The two-stage layers: `memory(...)` maps the encoder memory to the proposal heads' input,
  `queries(...)` turns the selected proposals into the decoder's queries."""
  d_model: int
  dtype: Any = jnp.float32      # computation dtype; LayerNorm statistics stay float32

  def setup(self):
    # Official init: xavier kernels, torch-default biases, unit LayerNorms. Built unnamed:
    # setup names them after the attributes.
    d = self.d_model
    self.enc_output = ffn_linear(d, d, None, self.dtype)
    self.enc_output_norm = layer_norm(None, self.dtype)
    self.pos_trans = ffn_linear(2 * d, 2 * d, None, self.dtype)
    self.pos_trans_norm = layer_norm(None, self.dtype)

  def memory(self, memory, usable):
    """`LN(W memory + b)` with the rows of unusable proposals zeroed first: `[B, S, D]`."""
    return self.enc_output_norm(self.enc_output(jnp.where(usable[..., None], memory, 0)))

  def queries(self, boxes_unact):
    """Selected boxes `[B, k, 4]` (logit space) -> `(tgt, query_pos)`, each `[B, k, D]`."""
    d = self.d_model
    out = self.pos_trans_norm(self.pos_trans(proposal_embedding(boxes_unact, d // 2)
                                             .astype(self.dtype)))
    return out[..., d:], out[..., :d]
