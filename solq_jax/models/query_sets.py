"""Extra decoder query sets trained beside the one-to-one queries (H-DETR's one-to-many queries,
Group DETR's groups, DN-DETR's denoising queries).

The sets run through the decoder as one concatenated query sequence, the one-to-one queries
first; a self-attention mask keeps the sets apart (a query attends only to its own set, plus
the sets it is explicitly allowed to see), and cross-attention, FFN and heads are per query, so
the one-to-one outputs do not depend on any extra query. The per-layer outputs are then split
back by rows: the one-to-one set stays the model's top-level output (what post-processing,
evaluation and export read) and each extra set goes under its own key for the criterion.
"""
from typing import Iterable, Sequence, Tuple

import numpy as np



def block_attention_mask(sizes: Sequence[int],
                         visible: Iterable[Tuple[int, int]] = ()) -> np.ndarray:
  """bool `[N, N]` (N = sum(sizes)) for the concatenated blocks of `sizes`: True where a query of
  block i may attend to a key of block j, i.e. when i == j or (i, j) is in `visible`."""
  allowed = np.eye(len(sizes), dtype=bool)
  for i, j in visible:
    allowed[i, j] = True
  block_of = np.repeat(np.arange(len(sizes)), sizes)
  return allowed[block_of[:, None], block_of[None, :]]


def stack_layers(layers):
  """Per-decoder-layer output dicts -> the model's layout: the last layer's keys at the top
  level and the earlier layers in `aux_outputs`."""
  out = dict(layers[-1])
  out['aux_outputs'] = list(layers[:-1])
  return out


def split_rows(layers, sizes: Sequence[int]):
  """Per-layer dicts of `[B, sum(sizes), ...]` arrays -> one list of per-layer dicts per block,
  each holding that block's rows (every per-query output a layer has: no `pred_vectors`
  with `with_masks=False`)."""
  bounds = np.cumsum((0,) + tuple(sizes))
  return [[{k: v[:, start:stop] for k, v in layer.items()} for layer in layers]
          for start, stop in zip(bounds[:-1], bounds[1:])]
