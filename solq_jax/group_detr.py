"""Group DETR (Chen et al. 2023): K groups of object queries, each matched one-to-one.

The model's `query_groups` groups run in one decoder pass, each group hidden from the others in
self-attention (`solq_jax.models.query_sets`); group 0 is the model's one-to-one output (the
only one inference reads) and groups 1..K-1 are `outputs['group_outputs']`. Every group is
matched to the ground truth on its own and gets the one-to-one criterion's terms, normalised as
group 0's (the ground-truth count); the total is the sum over groups, so every group is trained
as an independent DETR, and with K = 1 nothing changes.
"""
from typing import Callable

OUTPUT_KEY = 'group_outputs'


def suffix(group: int) -> str:
  return f'_group{group}'


def with_groups(criterion: Callable, one_to_one: Callable) -> Callable:
  """`criterion(outputs, targets, step_valid=None)` plus, for every extra group in
  `outputs['group_outputs']`, the terms of `one_to_one` on that group (suffix `_group<g>`),
  added to `total`. Without extra groups this is `criterion` itself."""

  def full(outputs, targets, step_valid=None):
    losses = criterion(outputs, targets, step_valid=step_valid)
    for group, out in enumerate(outputs.get(OUTPUT_KEY, ()), 1):
      terms = one_to_one(out, targets, step_valid=step_valid)
      losses.update({name + suffix(group): value for name, value in terms.items()
                     if name != 'total'})
      losses['total'] = losses['total'] + terms['total']
    return losses

  return full
