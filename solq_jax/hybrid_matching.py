"""Hybrid matching (H-DETR, Jia et al. 2023): a one-to-many loss on extra queries.

The model's `one_to_many_queries` extra queries (`outputs['one_to_many_outputs']`, same layout
as the model's outputs) are matched one-to-one to the ground truth repeated `k` times, so up to
`k` of them learn each object; the resulting terms (every decoder layer, as the one-to-one
criterion) are added to the total with a factor (`loss.one_to_many_weight`, lambda = 1 in the
paper). The repeated targets are an ordinary padded target set (`[B, k*G]`), so the Hungarian
matcher, its per-shard solving and the criterion's normalisation (the repeated ground-truth
count, as H-DETR) apply unchanged.
"""
from typing import Callable

import jax.numpy as jnp

OUTPUT_KEY = 'one_to_many_outputs'
TARGET_KEYS = ('labels', 'boxes', 'vectors', 'valid')
SUFFIX = '_one_to_many'


def repeat_targets(targets, k: int):
  """The target arrays (`labels`, `boxes`, `vectors`, `valid`, each `[B, G, ...]`) with every
  slot repeated `k` times along G -> `[B, k*G, ...]` (slot `r*G + g` is a copy of slot `g`)."""
  return {name: jnp.concatenate([targets[name]] * k, axis=1) for name in TARGET_KEYS}


def check_settings(k, weight) -> None:
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f'config.loss.one_to_many_k must be an integer >= 1, got {k!r}')
  if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
    raise ValueError(f'config.loss.one_to_many_weight must be a number >= 0, got {weight!r}')


def with_one_to_many(criterion: Callable, k: int, weight: float) -> Callable:
  """`criterion(outputs, targets, step_valid=None)` extended by the one-to-many loss.

  When `outputs` holds `one_to_many_outputs`, their terms (`criterion` on the targets repeated
  `k` times) are added with the suffix `_one_to_many`, and `total` becomes the one-to-one total
  plus `weight` x the one-to-many total. Otherwise this is `criterion` itself.
  """
  check_settings(k, weight)

  def full(outputs, targets, step_valid=None):
    losses = criterion(outputs, targets, step_valid=step_valid)
    if OUTPUT_KEY not in outputs:
      return losses
    repeated_valid = None if step_valid is None else jnp.concatenate([step_valid] * k, axis=1)
    extra = criterion(outputs[OUTPUT_KEY], repeat_targets(targets, k),
                      step_valid=repeated_valid)
    losses.update({name + SUFFIX: value for name, value in extra.items() if name != 'total'})
    losses['total'] = losses['total'] + weight * extra['total']
    return losses

  return full
