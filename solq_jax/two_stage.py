"""The encoder-proposal loss of two-stage Deformable DETR (the official `--two_stage`).

A two-stage model (`model.two_stage`, `solq_jax.models.two_stage`) also outputs
`outputs['enc_outputs']`: class logits and boxes for every encoder token. As the official
criterion, they are matched to the ground truth with every label replaced by class 0 (a
class-agnostic "object" score in the first logit) and get the focal, L1 and GIoU terms, without
a vector term, normalised by the same ground-truth count as the decoder's terms. The terms carry
the suffix `_enc` and enter `total` with the decoder terms' weights.
"""
from typing import Callable

import jax.numpy as jnp

OUTPUT_KEY = 'enc_outputs'
SUFFIX = '_enc'


def binary_targets(targets):
  """`targets` with every label set to 0 (the class the encoder's proposals are scored on)."""
  return dict(targets, labels=jnp.zeros_like(targets['labels']))


def with_encoder_loss(criterion: Callable, detection_criterion: Callable) -> Callable:
  """`criterion(outputs, targets, step_valid=None)` plus, when `outputs` holds `enc_outputs`,
  `detection_criterion` (the one-layer criterion without vector term: `pred_logits`,
  `pred_boxes` only) on them with binary targets: terms suffixed `_enc`, added to `total`.
  Otherwise this is `criterion` itself."""

  def full(outputs, targets, step_valid=None):
    losses = criterion(outputs, targets, step_valid=step_valid)
    if OUTPUT_KEY not in outputs:
      return losses
    enc = detection_criterion(outputs[OUTPUT_KEY], binary_targets(targets),
                              step_valid=step_valid)
    losses.update({name + SUFFIX: value for name, value in enc.items() if name != 'total'})
    losses['total'] = losses['total'] + enc['total']
    return losses

  return full
