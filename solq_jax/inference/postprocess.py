"""Inference post-processing: top-k detections, absolute boxes, pasted masks.

`Postprocessor(coder, top_k)(outputs, target_sizes)` turns the model's last-layer outputs into
per-image detections at the original image size, as the official `PostProcess` does, but batched
on device:

1. `prob = sigmoid(pred_logits)`; top-k over the flattened `[Q * C]` scores of each image,
   `query = idx // C`, `label = idx % C` (the raw category id). No threshold, no NMS.
2. Boxes: cxcywh -> xyxy, gathered by query, scaled by `(W, H, W, H)` of `target_sizes`
   (`orig_size`, h then w). Not clipped.
3. Masks: the selected queries' vectors are decoded by the mask coder (`coder.decode`) and pasted
   into their boxes at the original size (`solq_jax.masks.paste_masks`). `mask_decode='soft'`
   pastes the coder's soft reconstruction instead and keeps the pasted values >= 0.5, as the
   official `fast_solq.py` does: a DCT vector of a box-filling mask reconstructs to a constant,
   which the official mid-range threshold turns into an empty mask and this keeps.

Compiled shapes: the top-k/decode step depends only on the batch shape. The paste's output
shape is the image size, which differs from image to image. Each image is pasted on a canvas
that is the exact image size for the first `max_exact_sizes` distinct sizes a `Postprocessor`
meets (one compilation each; COCO has a few dozen common sizes), and for any further size the
size rounded up to a multiple of `size_multiple` (default 128), then cropped. A pasted pixel
depends only on its own coordinates and the box, never on the canvas size, so both give
identical masks; the cap bounds the number of compilations, the exact canvas avoids the crop
copy. A `Postprocessor` owns its compiled functions and the sizes it has seen: build one per run
and keep it.

Layout: masks are pasted transposed (`paste_masks` of the transposed box masks into boxes with x
and y swapped, exact since the paste is separable), so every returned `[K,H,W]` mask is a view
of `[K,W,H]` memory: Fortran-ordered per image, as pycocotools' RLE encoder reads it, no copy.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from pycocotools import mask as mask_utils

from solq_jax import box_ops
from solq_jax import masks as masks_lib


class NonFiniteOutputError(ValueError):
  """The model predicted NaN or inf: its weights diverged or are corrupt. Never scored."""


@jax.jit
def _finite_rows(arrays):
  """Per array, bool `[B]`: every value of that batch row is finite."""
  return {k: jnp.isfinite(v).reshape(v.shape[0], -1).all(1) for k, v in arrays.items()}


def check_finite(outputs, keep=None, keys=('pred_logits', 'pred_boxes', 'pred_vectors')):
  """Raises `NonFiniteOutputError` naming the outputs and batch rows that hold NaN or inf
  (rows where `keep` is False, e.g. batch padding, are not checked)."""
  rows = jax.device_get(_finite_rows({k: outputs[k] for k in keys if k in outputs}))
  bad = {}
  for name, finite in rows.items():
    finite = np.asarray(finite) | (np.zeros_like(finite) if keep is None else ~np.asarray(keep))
    if not finite.all():
      bad[name] = np.flatnonzero(~finite).tolist()
  if bad:
    detail = ', '.join(f'{k} in batch rows {v[:8]}' for k, v in bad.items())
    raise NonFiniteOutputError(f'the model output is not finite (NaN or inf): {detail}')


@functools.partial(jax.jit, static_argnames=('top_k',))
def select_detections(pred_logits, pred_boxes, target_sizes, top_k):
  """Top-k (query, class) pairs of every image, with absolute xyxy boxes.

  Args:
    pred_logits: `[B,Q,C]` class logits of the last decoder layer.
    pred_boxes: `[B,Q,4]` cxcywh in [0, 1] of the unpadded image.
    target_sizes: `[B,2]` (h, w) the boxes are scaled to.
    top_k: number of detections kept per image; `min(top_k, Q * C)` are returned.

  Returns:
    scores `[B,K]`, labels `[B,K]` int32, boxes `[B,K,4]` absolute xyxy, query_index `[B,K]`.
    Equal scores are ordered by their flat index `query * C + label`, lowest first.
  """
  batch, num_queries, num_classes = pred_logits.shape
  k = min(top_k, num_queries * num_classes)
  prob = jax.nn.sigmoid(pred_logits.astype(jnp.float32)).reshape(batch, -1)
  scores, flat_index = jax.lax.top_k(prob, k)
  query_index = flat_index // num_classes
  labels = flat_index % num_classes
  boxes = box_ops.cxcywh_to_xyxy(pred_boxes.astype(jnp.float32))
  boxes = jnp.take_along_axis(boxes, query_index[..., None], axis=1)
  sizes = target_sizes.astype(jnp.float32)
  scale = jnp.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], axis=-1)
  return scores, labels.astype(jnp.int32), boxes * scale[:, None, :], query_index.astype(jnp.int32)


MASK_DECODES = ('coder', 'soft')


def check_mask_decode(mask_decode):
  if mask_decode not in MASK_DECODES:
    raise ValueError(f'mask_decode={mask_decode!r} is not one of {MASK_DECODES}')


def decode_vectors(pred_vectors, query_index, coder, mask_decode='coder'):
  """The box masks `[B,K,S,S]` of the queries `query_index [B,K]`: bool with the coder's own
  threshold (`'coder'`), or float, the soft reconstruction for the paste to threshold at 0.5
  (`'soft'`)."""
  check_mask_decode(mask_decode)
  vectors = jnp.take_along_axis(pred_vectors, query_index[..., None], axis=1)
  batch, k, num_coeffs = vectors.shape
  decode = coder.decode if mask_decode == 'coder' else coder.reconstruct
  decoded = decode(vectors.reshape(batch * k, num_coeffs).astype(jnp.float32))
  return decoded.reshape(batch, k, *decoded.shape[1:])


@functools.partial(jax.jit, static_argnames=('canvas_hw',))
def paste_on_canvas(box_masks, boxes_xyxy, canvas_hw):
  """Pastes `[K,S,S]` masks into `[K,4]` xyxy boxes on a `canvas_hw` image -> bool `[K,W,H]`
  (the transposed image masks)."""
  transposed = jnp.swapaxes(box_masks, 1, 2)
  boxes_yxyx = boxes_xyxy[:, jnp.array([1, 0, 3, 2])]
  return masks_lib.paste_masks(transposed, boxes_yxyx, (canvas_hw[1], canvas_hw[0]))


def canvas_size(image_hw, size_multiple):
  """The bucketed paste canvas `(H', W')` >= `image_hw`, sides multiples of `size_multiple`."""
  m = max(int(size_multiple), 1)
  return tuple(-(-int(s) // m) * m for s in image_hw)


class Postprocessor:
  """Detections of a batch of model outputs (see the module docstring).

  Args:
    coder: the `MaskCoder` that produced the vectors (built once per run,
      `solq_jax.masks.build_coder(config.model)`).
    top_k: detections per image (100 in the official code); `min(top_k, Q*C)` are returned.
    with_masks: decode and paste masks (False gives box-only results, without `masks`).
    size_multiple, max_exact_sizes: paste canvases, see the module docstring.
    mask_decode: `'coder'` (the coder's threshold; official) or `'soft'` (the soft
      reconstruction pasted, then >= 0.5; official fast_solq.py), see the module docstring.
  """

  def __init__(self, coder, top_k=100, *, with_masks=True, size_multiple=128,
               max_exact_sizes=8, mask_decode='coder'):
    check_mask_decode(mask_decode)   # now, not at the first batch's trace
    self.coder = coder
    self.top_k = int(top_k)
    self.with_masks = with_masks
    self.size_multiple = size_multiple
    self.max_exact_sizes = max_exact_sizes
    self._decode = jax.jit(functools.partial(decode_vectors, coder=coder,
                                             mask_decode=mask_decode))
    self._exact_sizes = set()   # image sizes pasted on an exact canvas so far

  @classmethod
  def from_config(cls, eval_config, coder):
    """The adapter from `config.eval` (`top_k`, `with_masks`, `paste_*`, `mask_decode`); a
    detection-only coder (`config.model.with_masks=False`) gives box-only results whatever
    `eval.with_masks`."""
    return cls(coder, eval_config.top_k,
               with_masks=eval_config.with_masks and getattr(coder, 'has_masks', True),
               size_multiple=eval_config.paste_size_multiple,
               max_exact_sizes=eval_config.paste_exact_sizes,
               mask_decode=eval_config.mask_decode)

  def decode_selected(self, pred_vectors, query_index):
    """Box-relative masks `[B,K,S,S]` of the selected queries (bool; float for `'soft'`)."""
    return self._decode(pred_vectors, query_index)

  def paste_image_masks(self, box_masks, boxes_xyxy, image_hw):
    """Pastes one image's masks at `image_hw` -> numpy bool `[K,H,W]` (Fortran-ordered per mask).

    Exact canvas if `image_hw` was seen before or fewer than `max_exact_sizes` sizes were; else
    the canvas of `canvas_size(image_hw, size_multiple)`, cropped (always when
    `max_exact_sizes=0`).
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    if h <= 0 or w <= 0:
      raise ValueError(f'target size must be positive, got (h, w) = ({h}, {w})')
    exact = self._exact_sizes
    if self.max_exact_sizes > 0 and ((h, w) in exact or len(exact) < self.max_exact_sizes):
      exact.add((h, w))
      return np.asarray(paste_on_canvas(box_masks, boxes_xyxy, (h, w))).transpose(0, 2, 1)
    canvas = canvas_size((h, w), self.size_multiple)
    pasted = np.asarray(paste_on_canvas(box_masks, boxes_xyxy, canvas))
    return np.ascontiguousarray(pasted[:, :w, :h]).transpose(0, 2, 1)

  def __call__(self, outputs, target_sizes, keep=None):
    """Per-image detections from the model outputs (docs/design.md, "Detections").

    Args:
      outputs: dict with `pred_logits [B,Q,C]`, `pred_boxes [B,Q,4]` and, for masks,
        `pred_vectors [B,Q,K']` (other keys, e.g. `aux_outputs`, are ignored).
      target_sizes: `[B,2]` int (h, w) of the original images.
      keep: optional bool `[B]`; rows that are False (e.g. batch padding) are not pasted and
        come back as None.

    Returns:
      A list of B dicts of numpy arrays: `scores [K]` float32 (descending), `labels [K]` int32,
      `boxes [K,4]` absolute xyxy float32, `query_index [K]` int32 and `masks [K,H,W]` bool.

    Raises:
      NonFiniteOutputError: a kept row holds NaN or inf.
    """
    target_sizes = np.asarray(target_sizes)
    pred_logits = outputs['pred_logits']
    if target_sizes.shape != (pred_logits.shape[0], 2):
      raise ValueError(f'target_sizes must be [B,2] (h, w) with B={pred_logits.shape[0]}, '
                       f'got shape {target_sizes.shape}')
    # NaN scores would sort first and score as confident detections: refuse them instead.
    check_finite(outputs, keep, ('pred_logits', 'pred_boxes') +
                 (('pred_vectors',) if self.with_masks else ()))
    scores, labels, boxes, query_index = select_detections(
        pred_logits, outputs['pred_boxes'], jnp.asarray(target_sizes, jnp.int32), self.top_k)
    box_masks = (self.decode_selected(outputs['pred_vectors'], query_index)
                 if self.with_masks else None)
    scores, labels, boxes_np, query_np = (
        np.asarray(x) for x in (scores, labels, boxes, query_index))
    results = []
    for b in range(len(target_sizes)):
      if keep is not None and not keep[b]:
        results.append(None)
        continue
      det = dict(scores=scores[b], labels=labels[b], boxes=boxes_np[b], query_index=query_np[b])
      if self.with_masks:
        det['masks'] = self.paste_image_masks(box_masks[b], boxes[b], target_sizes[b])
      results.append(det)
    return results


def encode_rle(masks):
  """bool `[K,H,W]` -> K pycocotools RLE dicts with `counts` as str."""
  if len(masks) == 0:
    return []
  # Fortran order per mask; free when `masks` comes from postprocess (already laid out so).
  stacked = np.asfortranarray(np.asarray(masks, dtype=bool).transpose(1, 2, 0)).view(np.uint8)
  rles = mask_utils.encode(stacked)
  return [dict(size=[int(v) for v in r['size']], counts=r['counts'].decode('utf-8')) for r in rles]


def make_forward(model):
  """A jitted `(variables, images, pad_mask) -> last-layer outputs` (no aux) of `model`.

  Keep the returned function for the run: each call of `make_forward` compiles anew.
  """
  def forward(variables, images, pad_mask):
    out = model.apply(variables, images, pad_mask, train=False)
    return {k: out[k] for k in ('pred_logits', 'pred_boxes', 'pred_vectors') if k in out}
  return jax.jit(forward)
