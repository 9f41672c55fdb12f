"""The decoder queries of DN-DETR's denoising groups (the noise and the loss:
`solq_jax.denoising`).

A DN query's content (the decoder's `tgt`) is a learned embedding of its noised class; its
positional query is a sine embedding of its noised box through a two-layer MLP (DAB-DETR's
anchor encoding, which DN-DETR uses); its initial reference is the noised box itself, a 4-d box
where the learned queries have a 2-d point (`models/transformer.py` runs both kinds in one
layer), so the first layer's box head refines the noised box, as in DN-Deformable-DETR.
"""
import math

import flax.linen as nn
import jax.numpy as jnp

from solq_jax.models.layers import xavier_uniform


def box_sine_embedding(boxes, num_feats: int, temperature: float = 10000.0):
  """`boxes [..., 4]` in [0, 1] -> `[..., 4 * num_feats]`: per coordinate (in order), the
  sines and cosines (interleaved) of 2 pi x / temperature^(2i / num_feats)."""
  dim_t = temperature ** (2 * (jnp.arange(num_feats) // 2) / num_feats)
  angles = boxes[..., None].astype(jnp.float32) * (2 * math.pi) / dim_t
  emb = jnp.stack([jnp.sin(angles[..., 0::2]), jnp.cos(angles[..., 1::2])], axis=-1)
  return emb.reshape(boxes.shape[:-1] + (4 * num_feats,))


class DenoisingQueries(nn.Module):
  """`(labels [B,N], boxes [B,N,4]) -> (content [B,N,D], query_pos [B,N,D])`."""
  num_classes: int
  d_model: int

  @nn.compact
  def __call__(self, labels, boxes):
    d = self.d_model
    content = nn.Embed(self.num_classes, d, embedding_init=nn.initializers.normal(1.0),
                       name='label_embed')(labels)
    pos = box_sine_embedding(boxes, d // 2)
    pos = nn.relu(nn.Dense(d, kernel_init=xavier_uniform, name='pos_proj_0')(pos))
    return content, nn.Dense(d, kernel_init=xavier_uniform, name='pos_proj_1')(pos)
