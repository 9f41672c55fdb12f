"""The SOLQ criterion (spec section 4) and its research variants, as pure functions.

`solq_losses(outputs, targets, config)` matches every decoder layer independently
(`solq_jax.matching`) and returns the unweighted terms `loss_ce`, `loss_bbox`, `loss_giou`,
`loss_vector` for the final layer, the same with suffixes `_0`, `_1`, ... for the auxiliary
layers, and `total`, the weighted sum. It is meant to run under `jax.jit` on the GLOBAL,
batch-sharded batch: every sum below is then a global sum, so `num_boxes` is the global ground-
truth count (the official all-reduced count), with no collective written here.

Deliberate fix (vector loss): the official code takes the element mean of the vector loss per
GPU and DDP then averages those per-GPU means (a mean of means, which depends on how the
targets fall on the devices). Here the mean is over ALL matched pairs x K elements of the global
batch, which is invariant to the device count and equals the official value on one device.

Padded targets never produce NaN, in the values or in the gradients: padded pairs are replaced
by a dummy valid box / vector before any math and then masked out. A batch without any target
gives finite losses and zero box/vector gradients.
"""
import jax
import jax.numpy as jnp

from solq_jax import box_ops
from solq_jax import matching

TERMS = ('loss_ce', 'loss_bbox', 'loss_giou', 'loss_vector')


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


def _masked_mean(values, mask):
  """Mean of `values` over the entries where `mask` (broadcast) is True; 0 if there are none."""
  mask = jnp.broadcast_to(mask, values.shape)
  return jnp.where(mask, values, 0).sum() / jnp.maximum(mask.sum(), 1)


# ----------------------------------------------------------------------------------------------
# Vector-loss variants: (pred [B,G,K], target [B,G,K], pair_valid [B,G], config) -> scalar,
# before `vector_loss_scale`. Padded pairs hold finite dummy values.


def _vector_l1(pred, tgt, ok, config):
  del config
  return _masked_mean(jnp.abs(pred - tgt), ok[..., None])


def _vector_smooth_l1(pred, tgt, ok, config):
  """Huber with beta 1 (torch `smooth_l1_loss` default), element mean."""
  del config
  d = jnp.abs(pred - tgt)
  return _masked_mean(jnp.where(d < 1.0, 0.5 * d ** 2, d - 0.5), ok[..., None])


def _vector_l2(pred, tgt, ok, config):
  """Squared error, element mean (torch `mse_loss`)."""
  del config
  return _masked_mean((pred - tgt) ** 2, ok[..., None])


def _safe_norm(x, eps=1e-12):
  return jnp.sqrt((x * x).sum(-1) + eps)


def _vector_cosine(pred, tgt, ok, config):
  """1 - cosine similarity per matched pair, mean over pairs."""
  del config
  cos = (pred * tgt).sum(-1) / (_safe_norm(pred) * _safe_norm(tgt))
  return _masked_mean(1.0 - cos, ok)


def dice_loss(pred_masks, tgt_masks, smooth=1.0):
  """`1 - (2|P.T| + s) / (|P| + |T| + s)` per mask over the trailing two axes."""
  inter = (pred_masks * tgt_masks).sum((-2, -1))
  total = pred_masks.sum((-2, -1)) + tgt_masks.sum((-2, -1))
  return 1.0 - (2.0 * inter + smooth) / (total + smooth)


def _vector_dice(pred, tgt, ok, config):
  """Dice between masks decoded from the vectors with the model's mask coder.

  Target: `coder.decode(gt_vector)`, the binary mask the coder itself defines (for DCT the
  mid-range threshold of the inverse transform). Prediction: the soft reconstruction mapped
  through `sigmoid(sharpness * (rec - 0.5))`. A sigmoid rather than a clip to [0, 1], because a
  clip has zero gradient wherever the reconstruction undershoots 0 or overshoots 1, so pixels
  predicted far outside the mask could never be pulled back in; the sigmoid is smooth, gives a
  gradient at every pixel, and maps an ideal 0/1 reconstruction to ~0/1 (0.007/0.993 for
  sharpness 10, `config.loss.dice_sharpness`).
  """
  from solq_jax import masks  # helper D's package; imported only for this variant
  coder = masks.build_coder(config.model)
  b, g, k = pred.shape
  rec = coder.reconstruct(pred.reshape(b * g, k))
  soft = jax.nn.sigmoid(config.loss.dice_sharpness * (rec - 0.5))
  hard = jax.lax.stop_gradient(coder.decode(tgt.reshape(b * g, k))).astype(soft.dtype)
  return _masked_mean(dice_loss(soft, hard).reshape(b, g), ok)


VECTOR_LOSSES = {
    'l1': _vector_l1,
    'smooth_l1': _vector_smooth_l1,
    'l2': _vector_l2,
    'cosine': _vector_cosine,
    'dice': _vector_dice,
}


# ----------------------------------------------------------------------------------------------
# One decoder layer


def layer_losses(layer_out, targets, match, num_boxes, config, with_vector=True):
  """The four unweighted terms of one decoder layer given its matching.

  Args:
    layer_out: dict `pred_logits [B,Q,C]`, `pred_boxes [B,Q,4]`, `pred_vectors [B,Q,K]`.
    targets: dict `labels [B,G]`, `boxes [B,G,4]`, `vectors [B,G,K]`, `valid [B,G]`.
    match: `(src_idx, tgt_idx, ok)` each `[B,G]` from `solq_jax.matching`.
    num_boxes: the (global) ground-truth count, >= 1.
    config: the whole config (`config.loss`, and `config.model` for the dice variant).
    with_vector: whether this decoder stage gets the vector loss.
  """
  lc = config.loss
  src, tgt, ok = match
  logits = layer_out['pred_logits']
  num_classes = logits.shape[-1]

  # Focal classification loss: one-hot [B,Q,C] of the matched labels, all-zero elsewhere.
  labels = gather_pairs(targets['labels'], tgt)
  onehot = jax.nn.one_hot(jnp.where(ok, labels, -1), num_classes, dtype=logits.dtype)
  batch_idx = jnp.arange(logits.shape[0])[:, None]
  target_classes = jnp.zeros_like(logits).at[batch_idx, src].add(onehot)
  focal = sigmoid_focal_loss(logits, target_classes, lc.focal_alpha, lc.focal_gamma)
  out = {'loss_ce': focal.sum() / num_boxes}

  # Box losses over matched pairs; padded pairs compare two dummy boxes.
  pred_boxes = matching.safe_boxes(gather_pairs(layer_out['pred_boxes'], src), ok)
  tgt_boxes = matching.safe_boxes(
      gather_pairs(targets['boxes'], tgt).astype(pred_boxes.dtype), ok)
  l1 = jnp.abs(pred_boxes - tgt_boxes).sum(-1)
  giou = box_ops.elementwise_giou(box_ops.cxcywh_to_xyxy(pred_boxes),
                                  box_ops.cxcywh_to_xyxy(tgt_boxes))
  out['loss_bbox'] = jnp.where(ok, l1, 0).sum() / num_boxes
  out['loss_giou'] = jnp.where(ok, 1 - giou, 0).sum() / num_boxes

  if with_vector:
    if lc.vector_loss not in VECTOR_LOSSES:
      raise ValueError(f'unknown config.loss.vector_loss {lc.vector_loss!r}; '
                       f'expected one of {sorted(VECTOR_LOSSES)}')
    pred_vec = gather_pairs(layer_out['pred_vectors'], src)
    tgt_vec = gather_pairs(targets['vectors'], tgt).astype(pred_vec.dtype)
    pred_vec = jnp.where(ok[..., None], pred_vec, 1.0)
    tgt_vec = jnp.where(ok[..., None], tgt_vec, 1.0)
    out['loss_vector'] = lc.vector_loss_scale * VECTOR_LOSSES[lc.vector_loss](
        pred_vec, tgt_vec, ok, config)
  return out


# ----------------------------------------------------------------------------------------------
# The criterion


def decoder_layers(outputs, config):
  """`[(suffix, stage, layer_out), ...]`: the aux layers `_0`.. (if `config.loss.aux_loss`)
  followed by the final layer (suffix '')."""
  aux = list(outputs.get('aux_outputs', ())) if config.loss.aux_loss else []
  num_stages = len(outputs.get('aux_outputs', ())) + 1
  layers = [(f'_{i}', i, a) for i, a in enumerate(aux)]
  layers.append(('', num_stages - 1, outputs))
  return layers


def match_layers(layers, targets, config, mesh=None):
  """Match every decoder layer independently, in ONE solver call -> list of `(src, tgt, ok)`."""
  logits = jnp.stack([l['pred_logits'] for _, _, l in layers])
  boxes = jnp.stack([l['pred_boxes'] for _, _, l in layers])
  match_fn = matching.matcher_from_config(config.loss)
  src, tgt, ok = match_fn(logits, boxes, targets['labels'], targets['boxes'], targets['valid'],
                          mesh=mesh)
  return [(src[i], tgt[i], ok[i]) for i in range(len(layers))]


def weighted_total(losses, loss_config):
  """`total = sum_k weight(k) * losses[k]` over all layers' terms."""
  weights = {'loss_ce': loss_config.cls_weight, 'loss_bbox': loss_config.bbox_weight,
             'loss_giou': loss_config.giou_weight, 'loss_vector': loss_config.vector_weight}
  total = 0.0
  for name, value in losses.items():
    base = name.rsplit('_', 1)[0] if name.rsplit('_', 1)[-1].isdigit() else name
    total = total + weights[base] * value
  return total


def solq_losses(outputs, targets, config, mesh=None):
  """The SOLQ criterion over the final and every auxiliary decoder layer.

  Args:
    outputs: the model's dict (`pred_logits`, `pred_boxes`, `pred_vectors`, `aux_outputs`).
    targets: dict `labels [B,G]` int, `boxes [B,G,4]` cxcywh, `vectors [B,G,K]`, `valid [B,G]`.
    config: the whole config; reads `config.loss` (and `config.model` for the dice variant).
    mesh: optional `Mesh` with a `'data'` axis; the scipy matching then runs per shard.

  Returns:
    dict of unweighted terms (`loss_ce`, `loss_bbox`, `loss_giou`, `loss_vector`, suffixed
    `_i` for aux layer i; stages below `config.loss.vector_start_stage` have no vector term)
    plus `total`. `num_boxes` = global GT count clamped at 1; the vector loss is
    `vector_loss_scale` x the GLOBAL element mean (see the module docstring).
  """
  layers = decoder_layers(outputs, config)
  matches = match_layers(layers, targets, config, mesh=mesh)
  num_boxes = jnp.maximum(targets['valid'].sum().astype(jnp.float32), 1.0)
  losses = {}
  for (suffix, stage, layer_out), match in zip(layers, matches):
    terms = layer_losses(layer_out, targets, match, num_boxes, config,
                         with_vector=stage >= config.loss.vector_start_stage)
    losses.update({k + suffix: v for k, v in terms.items()})
  losses['total'] = weighted_total(losses, config.loss)
  return losses
