"""Denoising queries (DN-DETR, Li et al. 2022; DINO's contrastive negatives, Zhang et al. 2023).

In training the decoder also runs `model.dn_groups` groups of queries made from the ground truth
with noise: a query's content is the embedding of its (possibly flipped) class and its initial
reference is its noised box (`models/dn_queries.py`). Each query learns to reconstruct its own
ground truth, so no matching is needed: slot `s` of every group belongs to target `s mod G`
(G = `data.max_gt`, the static target count). With `loss.dn_contrastive` a group holds G
positive slots followed by G negative slots whose boxes are noised further (between one and two
times the noise scale); negatives learn "no object" and get no box or vector term.

The noise is a pure function of a key (`noised_queries`); the train step draws that key from the
step's dropout key (`training/step.py`), so a resumed run repeats it. The loss (`dn_losses`) is a
pure function of the DN outputs and the targets: focal class, L1 + GIoU box and SOLQ's vector
loss (new for SOLQ: the DN queries also reconstruct their ground truth's mask vector), every
decoder layer, normalised per group as the one-to-one terms are (the ground-truth count of the
whole step), and added to the total with `loss.dn_weight`. Padded ground-truth slots are ignored
by the loss and hidden from every query in self-attention (`models/solq.py`).
"""
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from solq_jax import box_ops, matching

OUTPUT_KEY = 'dn_outputs'
SUFFIX = '_dn'


def check_settings(groups, box_noise, label_noise, contrastive, weight) -> None:
  if isinstance(groups, bool) or not isinstance(groups, int) or groups < 0:
    raise ValueError(f'config.model.dn_groups must be an integer >= 0 (0 = off), got {groups!r}')
  if isinstance(box_noise, bool) or not isinstance(box_noise, (int, float)) or box_noise < 0:
    raise ValueError(f'config.loss.dn_box_noise must be a number >= 0, got {box_noise!r}')
  if (isinstance(label_noise, bool) or not isinstance(label_noise, (int, float))
      or not 0 <= label_noise <= 1):
    raise ValueError(f'config.loss.dn_label_noise must be a probability in [0, 1], got '
                     f'{label_noise!r}')
  if not isinstance(contrastive, bool):
    raise ValueError(f'config.loss.dn_contrastive must be True or False, got {contrastive!r}')
  if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
    raise ValueError(f'config.loss.dn_weight must be a number >= 0, got {weight!r}')


def slot_layout(num_targets: int, groups: int, contrastive: bool):
  """numpy `(target_index [N], positive [N])` of the N = groups x P DN slots (P = G, or 2G
  with negatives): slot `s` of a group reconstructs target `s mod G`; the first G slots of a
  group are positives, the next G (contrastive) negatives."""
  per_group = 2 * num_targets if contrastive else num_targets
  slots = np.arange(per_group)
  return (np.tile(slots % num_targets, groups).astype(np.int32),
          np.tile(slots < num_targets, groups))


def noised_queries(key, targets, *, groups: int, box_noise: float, label_noise: float,
                   num_classes: int, contrastive: bool = False):
  """The DN queries of a batch: dict `labels [B,N]` int32, `boxes [B,N,4]` cxcywh in [0, 1],
  `valid [B,N]` (N = groups x G, or x 2G with negatives; layout `slot_layout`).

  Labels: each is replaced, with probability `label_noise`, by a different class drawn
  uniformly. Boxes (DN-DETR's noise): centre moved by up to `box_noise` x half the size and
  width and height scaled by a factor in [1 - box_noise, 1 + box_noise], each coordinate
  independently; negatives by between one and two times that, then clipped to [0, 1]. Padded
  slots hold zeros.
  """
  labels, boxes, valid = targets['labels'], targets['boxes'], targets['valid']
  index, positive = slot_layout(labels.shape[1], groups, contrastive)
  labels, boxes, valid = labels[:, index], boxes[:, index].astype(jnp.float32), valid[:, index]
  k_flip, k_class, k_size, k_sign = jax.random.split(key, 4)
  flip = jax.random.uniform(k_flip, labels.shape) < label_noise
  # An offset in 1..C-1 makes the replacement a different class.
  other = (labels + jax.random.randint(k_class, labels.shape, 1, max(num_classes, 2))
           ) % num_classes
  labels = jnp.where(flip & (num_classes > 1), other, labels).astype(jnp.int32)
  size = jax.random.uniform(k_size, boxes.shape)
  size = jnp.where(positive[None, :, None], size, 1.0 + size)
  sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, boxes.shape), 1.0, -1.0)
  wh = boxes[..., 2:]
  scale = jnp.concatenate([wh / 2, wh], axis=-1)
  boxes = jnp.clip(boxes + sign * size * scale * box_noise, 0.0, 1.0)
  return dict(labels=jnp.where(valid, labels, 0), boxes=jnp.where(valid[..., None], boxes, 0.0),
              valid=valid)


def denoiser_from_config(config) -> Optional[Callable]:
  """`(key, batch) -> DN queries` (`noised_queries` with `config.model.dn_groups`,
  `config.loss.dn_*`), or None when `dn_groups` is 0 (the default: no DN queries)."""
  m, lc = config.model, config.loss
  check_settings(m.dn_groups, lc.dn_box_noise, lc.dn_label_noise, lc.dn_contrastive,
                 lc.dn_weight)
  if not m.dn_groups:
    return None
  return functools.partial(noised_queries, groups=m.dn_groups, box_noise=lc.dn_box_noise,
                           label_noise=lc.dn_label_noise, num_classes=m.num_classes,
                           contrastive=lc.dn_contrastive)


def _layer_terms(layer, slots, num_boxes, num_pairs, *, focal_loss, vector_loss,
                 vector_loss_scale):
  """Unweighted terms of one decoder layer of the DN queries against their own targets."""
  labels, boxes, vectors, valid, pos = slots
  logits = layer['pred_logits']
  onehot = jax.nn.one_hot(jnp.where(pos, labels, -1), logits.shape[-1], dtype=logits.dtype)
  focal = focal_loss(logits, onehot).sum(-1)
  out = {'loss_ce': jnp.where(valid, focal, 0).sum() / num_boxes}
  pred = matching.safe_boxes(layer['pred_boxes'], pos)
  tgt = matching.safe_boxes(boxes.astype(pred.dtype), pos)
  giou = box_ops.elementwise_giou(box_ops.cxcywh_to_xyxy(pred), box_ops.cxcywh_to_xyxy(tgt))
  out['loss_bbox'] = jnp.where(pos, jnp.abs(pred - tgt).sum(-1), 0).sum() / num_boxes
  out['loss_giou'] = jnp.where(pos, 1 - giou, 0).sum() / num_boxes
  if vector_loss is not None:
    pred_vec = jnp.where(pos[..., None], layer['pred_vectors'], 1.0)
    tgt_vec = jnp.where(pos[..., None], vectors.astype(pred_vec.dtype), 1.0)
    value = (vector_loss(pred_vec, tgt_vec, pos) if num_pairs is None
             else vector_loss(pred_vec, tgt_vec, pos, num_pairs=num_pairs))
    out['loss_vector'] = vector_loss_scale * value
  return out


def dn_losses(dn_outputs, targets, *, focal_loss: Callable, vector_loss: Optional[Callable],
              contrastive: bool = False, aux_loss: bool = True, vector_start_stage: int = 0,
              vector_loss_scale: float = 1.0, step_valid=None):
  """Unweighted DN terms of every decoder layer (`loss_ce`, `loss_bbox`, `loss_giou`,
  `loss_vector`; aux layer i suffixed `_i`, no suffix for the last layer).

  Args:
    dn_outputs: the model's `dn_outputs` (`pred_logits [B,N,C]`, ..., `aux_outputs`).
    targets: `labels [B,G]`, `boxes [B,G,4]`, `vectors [B,G,K]`, `valid [B,G]`.
    focal_loss: elementwise `(logits, onehot) -> [B,N,C]` (the criterion's focal loss).
    vector_loss: `(pred, tgt, pair_valid, num_pairs=None) -> scalar`, or None (detection only).
    contrastive: whether each group holds negatives (`slot_layout`).
    step_valid: `valid` of the whole optimizer step under gradient accumulation (see
      `losses.solq_losses`); None: this batch's own counts.
  Normalisation: (ground-truth count, clamped at 1) x groups, the count of positive slots.
  """
  num_targets = targets['valid'].shape[1]
  per_group = 2 * num_targets if contrastive else num_targets
  n = dn_outputs['pred_logits'].shape[1]
  if n % per_group:
    raise ValueError(f'{n} DN queries are not whole groups of {per_group} slots '
                     f'(config.loss.dn_contrastive={contrastive}, G={num_targets})')
  groups = n // per_group
  index, positive = slot_layout(num_targets, groups, contrastive)
  valid = targets['valid'][:, index]
  slots = (targets['labels'][:, index], targets['boxes'][:, index],
           targets['vectors'][:, index] if vector_loss is not None else None,
           valid, valid & positive)
  counted = targets['valid'] if step_valid is None else step_valid
  num_boxes = jnp.maximum(counted.sum().astype(jnp.float32), 1.0) * groups
  num_pairs = None if step_valid is None else step_valid.sum() * groups
  aux = list(dn_outputs.get('aux_outputs', ()))
  layers = [(f'_{i}', i, a) for i, a in enumerate(aux)] if aux_loss else []
  layers.append(('', len(aux), dn_outputs))
  losses = {}
  for suffix, stage, layer in layers:
    terms = _layer_terms(layer, slots, num_boxes, num_pairs, focal_loss=focal_loss,
                         vector_loss=vector_loss if stage >= vector_start_stage else None,
                         vector_loss_scale=vector_loss_scale)
    losses.update({name + suffix: value for name, value in terms.items()})
  return losses


def with_denoising(criterion: Callable, dn_terms: Callable, total: Callable,
                   weight: float) -> Callable:
  """`criterion(outputs, targets, step_valid=None)` plus, when `outputs` holds `dn_outputs`,
  the terms of `dn_terms(dn_outputs, targets, step_valid=...)` suffixed `_dn`, with
  `weight x total(terms)` added to `total`. Otherwise this is `criterion` itself."""

  def full(outputs, targets, step_valid=None):
    losses = criterion(outputs, targets, step_valid=step_valid)
    if OUTPUT_KEY not in outputs:
      return losses
    terms = dn_terms(outputs[OUTPUT_KEY], targets, step_valid=step_valid)
    losses.update({name + SUFFIX: value for name, value in terms.items()})
    losses['total'] = losses['total'] + weight * total(terms)
    return losses

  return full
