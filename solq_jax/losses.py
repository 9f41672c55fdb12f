"""The SOLQ criterion (the official `SetCriterion`) and its research variants, as pure functions.

`criterion_from_config(config.loss, coder)` reads the loss settings once and returns
`criterion(outputs, targets)`, which is `solq_losses` with those settings: it matches every
decoder layer independently (`solq_jax.matching`) and returns the unweighted terms `loss_ce`,
`loss_bbox`, `loss_giou`, `loss_vector` for the final layer, the same with suffixes `_0`, `_1`,
... for the auxiliary layers, and `total`, the weighted sum. It is meant to run under `jax.jit`
on the GLOBAL, batch-sharded batch: every sum below is then a global sum, so `num_boxes` is the
global ground-truth count (the official all-reduced count), with no collective written here.
With gradient accumulation the criterion sees one micro-batch at a time and is given the whole
step's `valid` (`step_valid`), so that every term is normalised by the whole step's counts.

Deliberate fix (vector loss): the official code takes the element mean of the vector loss per
GPU and DDP then averages those per-GPU means (a mean of means, which depends on how the
targets fall on the devices). Here the mean is over ALL matched pairs x K elements of the global
batch, which is invariant to the device count and equals the official value on one device.

Padded targets never produce NaN, in the values or in the gradients: padded pairs are replaced
by a dummy valid box / vector before any math and then masked out. A batch without any target
gives finite losses and zero box/vector gradients.
"""
import functools
import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from solq_jax import box_ops
from solq_jax import denoising
from solq_jax import group_detr
from solq_jax import hybrid_matching
from solq_jax import matching
from solq_jax import two_stage


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
  """Element-wise sigmoid focal loss (Lin et al. 2017), the official form; `alpha < 0` = none."""
  p = jax.nn.sigmoid(logits)
  ce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  p_t = p * targets + (1 - p) * (1 - targets)
  loss = ce * (1 - p_t) ** gamma
  if alpha >= 0:
    loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
  return loss


def gather_pairs(x, idx):
  """`x [B, N, ...]` gathered at `idx [B, G]` along axis 1 -> `[B, G, ...]`."""
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def _masked_mean(values, mask, num_pairs=None):
  """Mean of `values [B,G,...]` over the entries where `mask` (broadcast) is True; 0 if there
  are none.

  `num_pairs`: the matched-pair count to divide by instead of this batch's own (the whole
  optimizer step's count when the batch is one micro-batch of it); each pair holds
  `prod(values.shape[2:])` entries.
  """
  mask = jnp.broadcast_to(mask, values.shape)
  if num_pairs is None:
    count = mask.sum()
  else:
    count = num_pairs * math.prod(values.shape[2:])
  return jnp.where(mask, values, 0).sum() / jnp.maximum(count, 1)


# ----------------------------------------------------------------------------------------------
# Vector-loss variants: (pred [B,G,K], target [B,G,K], pair_valid [B,G], num_pairs=None) ->
# scalar, before `vector_loss_scale`. Padded pairs hold finite dummy values. `num_pairs`: see
# `_masked_mean`.


def _vector_l1(pred, tgt, pair_valid, num_pairs=None):
  return _masked_mean(jnp.abs(pred - tgt), pair_valid[..., None], num_pairs)


def _vector_smooth_l1(pred, tgt, pair_valid, num_pairs=None):
  """Huber with beta 1 (torch `smooth_l1_loss` default), element mean."""
  d = jnp.abs(pred - tgt)
  return _masked_mean(jnp.where(d < 1.0, 0.5 * d ** 2, d - 0.5), pair_valid[..., None],
                      num_pairs)


def _vector_l2(pred, tgt, pair_valid, num_pairs=None):
  """Squared error, element mean (torch `mse_loss`)."""
  return _masked_mean((pred - tgt) ** 2, pair_valid[..., None], num_pairs)


def _safe_norm(x, eps=1e-12):
  return jnp.sqrt((x * x).sum(-1) + eps)


def _vector_cosine(pred, tgt, pair_valid, num_pairs=None):
  """1 - cosine similarity per matched pair, mean over pairs."""
  cos = (pred * tgt).sum(-1) / (_safe_norm(pred) * _safe_norm(tgt))
  return _masked_mean(1.0 - cos, pair_valid, num_pairs)


def dice_loss(pred_masks, tgt_masks, smooth=1.0):
  """`1 - (2|P.T| + s) / (|P| + |T| + s)` per mask over the trailing two axes."""
  inter = (pred_masks * tgt_masks).sum((-2, -1))
  total = pred_masks.sum((-2, -1)) + tgt_masks.sum((-2, -1))
  return 1.0 - (2.0 * inter + smooth) / (total + smooth)


def _vector_dice(pred, tgt, pair_valid, num_pairs=None, *, coder, sharpness):
  """Dice between masks decoded from the vectors with the model's mask coder.

  Target: `coder.decode(gt_vector)`, the binary mask the coder itself defines (for DCT the
  mid-range threshold of the inverse transform). Prediction: the soft reconstruction mapped
  through `sigmoid(sharpness * (rec - 0.5))`. A sigmoid rather than a clip to [0, 1], because a
  clip has zero gradient wherever the reconstruction undershoots 0 or overshoots 1, so pixels
  predicted far outside the mask could never be pulled back in; the sigmoid is smooth, gives a
  gradient at every pixel, and maps an ideal 0/1 reconstruction to ~0/1 (0.007/0.993 for
  sharpness 10, `config.loss.dice_sharpness`).
  """
  b, g, k = pred.shape
  rec = coder.reconstruct(pred.reshape(b * g, k))
  soft = jax.nn.sigmoid(sharpness * (rec - 0.5))
  hard = jax.lax.stop_gradient(coder.decode(tgt.reshape(b * g, k))).astype(soft.dtype)
  return _masked_mean(dice_loss(soft, hard).reshape(b, g), pair_valid, num_pairs)


VECTOR_LOSSES = {
    'l1': _vector_l1,
    'smooth_l1': _vector_smooth_l1,
    'l2': _vector_l2,
    'cosine': _vector_cosine,
    'dice': _vector_dice,
}


def _weighted_terms(pred, tgt, pair_valid, num_pairs=None, *, terms):
  """`sum_i w_i * f_i(pred, tgt, ...)` over `terms = ((w_i, f_i), ...)`."""
  return sum(w * f(pred, tgt, pair_valid, num_pairs) for w, f in terms)


def vector_loss_fn(kind: str, coder=None, dice_sharpness: float = 10.0,
                   weights=()) -> Callable:
  """The vector-loss variant `kind` as `(pred, tgt, pair_valid, num_pairs=None) -> scalar`.

  'dice' decodes the vectors with `coder` (the model's mask coder, `solq_jax.masks`), which it
  then requires; the other variants compare the vectors themselves. Variants joined by '+'
  (e.g. 'l2+dice', the paper's flatten training) are summed with `weights` (one per variant;
  empty = 1 each).
  """
  if '+' in kind or weights:
    kinds = kind.split('+')
    weights = tuple(weights) or (1.0,) * len(kinds)
    if len(weights) != len(kinds):
      raise ValueError(f'config.loss.vector_loss_weights={weights} needs one weight per term of '
                       f'config.loss.vector_loss={kind!r} ({len(kinds)})')
    return functools.partial(_weighted_terms, terms=tuple(
        (float(w), vector_loss_fn(k, coder, dice_sharpness)) for w, k in zip(weights, kinds)))
  if kind not in VECTOR_LOSSES:
    raise ValueError(f'unknown config.loss.vector_loss {kind!r}; '
                     f'expected one of {sorted(VECTOR_LOSSES)}')
  if kind == 'dice':
    if coder is None:
      raise ValueError("config.loss.vector_loss='dice' needs the model's mask coder")
    return functools.partial(_vector_dice, coder=coder, sharpness=dice_sharpness)
  return VECTOR_LOSSES[kind]


# ----------------------------------------------------------------------------------------------
# One decoder layer


def layer_losses(layer_out, targets, match, num_boxes, *, vector_loss=None,
                 vector_loss_scale=1.0, focal_alpha=0.25, focal_gamma=2.0, num_pairs=None):
  """The unweighted terms of one decoder layer given its matching.

  Args:
    layer_out: dict `pred_logits [B,Q,C]`, `pred_boxes [B,Q,4]`, `pred_vectors [B,Q,K]`.
    targets: dict `labels [B,G]`, `boxes [B,G,4]`, `vectors [B,G,K]`, `valid [B,G]`.
    match: `(src_idx, tgt_idx, matched)` each `[B,G]` from `solq_jax.matching`.
    num_boxes: the (global) ground-truth count, >= 1.
    vector_loss: `(pred, tgt, pair_valid) -> scalar` (`vector_loss_fn`), or None for a decoder
      stage without the vector term.
    vector_loss_scale: the factor of the vector term.
    focal_alpha, focal_gamma: the focal classification loss.
    num_pairs: the matched-pair count the vector loss divides by; None = this layer's own.
  """
  src, tgt, matched = match
  logits = layer_out['pred_logits']
  num_classes = logits.shape[-1]

  # Focal classification loss: one-hot [B,Q,C] of the matched labels, all-zero elsewhere.
  labels = gather_pairs(targets['labels'], tgt)
  onehot = jax.nn.one_hot(jnp.where(matched, labels, -1), num_classes, dtype=logits.dtype)
  batch_idx = jnp.arange(logits.shape[0])[:, None]
  target_classes = jnp.zeros_like(logits).at[batch_idx, src].add(onehot)
  focal = sigmoid_focal_loss(logits, target_classes, focal_alpha, focal_gamma)
  out = {'loss_ce': focal.sum() / num_boxes}

  # Box losses over matched pairs; padded pairs compare two dummy boxes.
  pred_boxes = matching.safe_boxes(gather_pairs(layer_out['pred_boxes'], src), matched)
  tgt_boxes = matching.safe_boxes(
      gather_pairs(targets['boxes'], tgt).astype(pred_boxes.dtype), matched)
  l1 = jnp.abs(pred_boxes - tgt_boxes).sum(-1)
  giou = box_ops.elementwise_giou(box_ops.cxcywh_to_xyxy(pred_boxes),
                                  box_ops.cxcywh_to_xyxy(tgt_boxes))
  out['loss_bbox'] = jnp.where(matched, l1, 0).sum() / num_boxes
  out['loss_giou'] = jnp.where(matched, 1 - giou, 0).sum() / num_boxes

  if vector_loss is not None:
    pred_vec = gather_pairs(layer_out['pred_vectors'], src)
    tgt_vec = gather_pairs(targets['vectors'], tgt).astype(pred_vec.dtype)
    pred_vec = jnp.where(matched[..., None], pred_vec, 1.0)
    tgt_vec = jnp.where(matched[..., None], tgt_vec, 1.0)
    if num_pairs is None:
      value = vector_loss(pred_vec, tgt_vec, matched)
    else:
      value = vector_loss(pred_vec, tgt_vec, matched, num_pairs=num_pairs)
    out['loss_vector'] = vector_loss_scale * value
  return out


# ----------------------------------------------------------------------------------------------
# The criterion


def decoder_layers(outputs, aux_loss=True):
  """`[(suffix, stage, layer_out), ...]`: the aux layers `_0`.. (if `aux_loss`) followed by the
  final layer (suffix '')."""
  aux = list(outputs.get('aux_outputs', ())) if aux_loss else []
  num_stages = len(outputs.get('aux_outputs', ())) + 1
  layers = [(f'_{i}', i, a) for i, a in enumerate(aux)]
  layers.append(('', num_stages - 1, outputs))
  return layers


def match_layers(layers, targets, matcher):
  """Match every decoder layer independently, in ONE solver call -> list of
  `(src, tgt, matched)`. `matcher`: `hungarian_match` with its settings
  (`matching.matcher_from_config`)."""
  logits = jnp.stack([l['pred_logits'] for _, _, l in layers])
  boxes = jnp.stack([l['pred_boxes'] for _, _, l in layers])
  src, tgt, matched = matcher(logits, boxes, targets['labels'], targets['boxes'],
                              targets['valid'])
  return [(src[i], tgt[i], matched[i]) for i in range(len(layers))]


def loss_weights(loss_config) -> dict:
  """The weight of each term (`config.loss.*_weight`), by term name."""
  return {'loss_ce': loss_config.cls_weight, 'loss_bbox': loss_config.bbox_weight,
          'loss_giou': loss_config.giou_weight, 'loss_vector': loss_config.vector_weight}


def weighted_total(losses, weights: Mapping[str, float]):
  """`total = sum_k weights[term(k)] * losses[k]` over all layers' terms."""
  total = 0.0
  for name, value in losses.items():
    base = name.rsplit('_', 1)[0] if name.rsplit('_', 1)[-1].isdigit() else name
    total = total + weights[base] * value
  return total


def matched_pair_count(valid, num_queries: int):
  """The number of matched pairs of one decoder layer for targets `valid [N,G]`, known before
  matching: the assignment of each image pairs min(its valid targets, Q) queries and targets
  (`matching.assign` solves a rectangular problem over the valid targets only)."""
  return jnp.minimum(valid.sum(-1), num_queries).sum()


def solq_losses(outputs, targets, *, matcher: Callable, vector_loss: Callable,
                weights: Mapping[str, float], aux_loss=True, vector_start_stage=0,
                vector_loss_scale=1.0, focal_alpha=0.25, focal_gamma=2.0, step_valid=None):
  """The SOLQ criterion over the final and every auxiliary decoder layer.

  Args:
    outputs: the model's dict (`pred_logits`, `pred_boxes`, `pred_vectors`, `aux_outputs`).
    targets: dict `labels [B,G]` int, `boxes [B,G,4]` cxcywh, `vectors [B,G,K]`, `valid [B,G]`.
    matcher: `hungarian_match` with its weights and solver (`matching.matcher_from_config`).
    vector_loss: `(pred, tgt, pair_valid) -> scalar` (`vector_loss_fn`), or None (detection
      only: no vector term, no `pred_vectors` needed).
    weights: the weight of each term by name (`loss_weights`).
    aux_loss: whether the auxiliary layers get losses.
    vector_start_stage: decoder stages below this one get no vector term.
    vector_loss_scale, focal_alpha, focal_gamma: see `layer_losses`.
    step_valid: optional `valid [N,G]` of ALL the targets of the optimizer step when `targets`
      is one micro-batch of it (gradient accumulation): `num_boxes` and the vector loss's pair
      count are then those of the whole step, so the terms of the micro-batches add up to the
      terms of the whole step as one batch. None: this batch's own counts.

  Returns:
    dict of unweighted terms (`loss_ce`, `loss_bbox`, `loss_giou`, `loss_vector`, suffixed
    `_i` for aux layer i) plus `total`. `num_boxes` = global GT count clamped at 1; the vector
    loss is `vector_loss_scale` x the GLOBAL element mean (see the module docstring).
  """
  layers = decoder_layers(outputs, aux_loss)
  matches = match_layers(layers, targets, matcher)
  if step_valid is None:
    num_boxes = jnp.maximum(targets['valid'].sum().astype(jnp.float32), 1.0)
    num_pairs = None
  else:
    num_boxes = jnp.maximum(step_valid.sum().astype(jnp.float32), 1.0)
    num_pairs = matched_pair_count(step_valid, outputs['pred_logits'].shape[1])
  losses = {}
  for (suffix, stage, layer_out), match in zip(layers, matches):
    terms = layer_losses(layer_out, targets, match, num_boxes,
                         vector_loss=(vector_loss if vector_loss is not None
                                      and stage >= vector_start_stage else None),
                         vector_loss_scale=vector_loss_scale, focal_alpha=focal_alpha,
                         focal_gamma=focal_gamma, num_pairs=num_pairs)
    losses.update({k + suffix: v for k, v in terms.items()})
  losses['total'] = weighted_total(losses, weights)
  return losses


def vector_start_stage(loss_config, num_decoder_layers=None) -> int:
  """The first decoder stage with the vector loss: `loss.vector_stages = k > 0` counts as the
  paper's Table 3c does (the last k of the `num_decoder_layers` layers, official
  `6 - vector_start_stage`); 0 defers to `loss.vector_start_stage`."""
  k = int(loss_config.vector_stages)
  if not k:
    return loss_config.vector_start_stage
  if num_decoder_layers is None or not 0 < k <= num_decoder_layers:
    raise ValueError(f'config.loss.vector_stages={k} must be in 1..config.model.dec_layers '
                     f'({num_decoder_layers})')
  return num_decoder_layers - k


def criterion_from_config(loss_config, coder=None, num_decoder_layers=None,
                          with_masks=True) -> Callable:
  """`criterion(outputs, targets, step_valid=None) -> dict of terms incl. 'total'`:
  `solq_losses` with the settings of `config.loss`. `coder`: the model's mask coder (needed by
  the 'dice' variant). `num_decoder_layers` (`config.model.dec_layers`): needed by
  `loss.vector_stages`. `with_masks=False` (`config.model.with_masks`, detection only): no
  vector term at any stage. Outputs of extra query sets get their own terms
  (`hybrid_matching`, `group_detr`, `denoising`), as do a two-stage model's encoder
  proposals (`two_stage`)."""
  lc = loss_config
  if not with_masks:
    vector_loss, start, scale = None, 0, 1.0
    one_to_one = functools.partial(
        solq_losses, matcher=matching.matcher_from_config(lc), vector_loss=None,
        weights=loss_weights(lc), aux_loss=lc.aux_loss, focal_alpha=lc.focal_alpha,
        focal_gamma=lc.focal_gamma)
  else:
    vector_loss = vector_loss_fn(lc.vector_loss, coder, lc.dice_sharpness,
                                 lc.vector_loss_weights)
    start, scale = vector_start_stage(lc, num_decoder_layers), lc.vector_loss_scale
    one_to_one = functools.partial(
        solq_losses, matcher=matching.matcher_from_config(lc), vector_loss=vector_loss,
        weights=loss_weights(lc), aux_loss=lc.aux_loss, vector_start_stage=start,
        vector_loss_scale=scale, focal_alpha=lc.focal_alpha, focal_gamma=lc.focal_gamma)
  criterion = hybrid_matching.with_one_to_many(one_to_one, lc.one_to_many_k,
                                               lc.one_to_many_weight)
  criterion = group_detr.with_groups(criterion, one_to_one)
  denoising.check_settings(0, lc.dn_box_noise, lc.dn_label_noise, lc.dn_contrastive,
                           lc.dn_weight)
  dn_terms = functools.partial(
      denoising.dn_losses,
      focal_loss=functools.partial(sigmoid_focal_loss, alpha=lc.focal_alpha,
                                   gamma=lc.focal_gamma),
      vector_loss=vector_loss, contrastive=lc.dn_contrastive, aux_loss=lc.aux_loss,
      vector_start_stage=start, vector_loss_scale=scale)
  criterion = denoising.with_denoising(
      criterion, dn_terms, functools.partial(weighted_total, weights=loss_weights(lc)),
      lc.dn_weight)
  encoder_proposals = functools.partial(
      solq_losses, matcher=matching.matcher_from_config(lc), vector_loss=None,
      weights=loss_weights(lc), aux_loss=False, focal_alpha=lc.focal_alpha,
      focal_gamma=lc.focal_gamma)
  return two_stage.with_encoder_loss(criterion, encoder_proposals)
