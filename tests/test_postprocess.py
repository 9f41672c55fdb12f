"""Postprocessor: top-k selection, boxes at the original size, masks pasted per image."""
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from solq_jax.inference import postprocess as pp
from solq_jax.masks import DCTCoder, paste_masks_np


def _reference_topk(logits, boxes_cxcywh, sizes, top_k):
  """Plain numpy: sort (-score, flat index), i.e. ties by the lower flat index first."""
  out = []
  for b in range(logits.shape[0]):
    prob = 1 / (1 + np.exp(-logits[b].astype(np.float64)))
    flat = prob.reshape(-1)
    order = sorted(range(flat.size), key=lambda i: (-flat[i], i))[:top_k]
    q = np.array(order) // logits.shape[2]
    lab = np.array(order) % logits.shape[2]
    h, w = sizes[b]
    cx, cy, bw, bh = boxes_cxcywh[b, q].T
    box = np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
    out.append((flat[order], lab, q, box))
  return out


@pytest.fixture(scope='module')
def coder():
  return DCTCoder(mask_size=16, num_coeffs=24)


@pytest.fixture(scope='module')
def outputs():
  rng = np.random.default_rng(0)
  b, q, c = 2, 6, 5
  centres = rng.uniform(0.2, 0.8, (b, q, 2))
  sizes = rng.uniform(0.1, 0.6, (b, q, 2))
  return dict(pred_logits=rng.normal(size=(b, q, c)).astype(np.float32),
              pred_boxes=np.concatenate([centres, sizes], -1).astype(np.float32),
              pred_vectors=(rng.normal(size=(b, q, 24)) * 4).astype(np.float32))


SIZES = np.array([[37, 50], [64, 21]])


def test_topk_boxes_against_numpy(outputs, coder):
  dets = pp.Postprocessor(coder, top_k=7, size_multiple=32)(outputs, SIZES)
  ref = _reference_topk(outputs['pred_logits'], outputs['pred_boxes'], SIZES, 7)
  for det, (scores, labels, query, boxes) in zip(dets, ref):
    np.testing.assert_allclose(det['scores'], scores, rtol=1e-6)
    np.testing.assert_array_equal(det['labels'], labels)
    np.testing.assert_array_equal(det['query_index'], query)
    np.testing.assert_allclose(det['boxes'], boxes, rtol=1e-5, atol=1e-4)
    assert det['labels'].dtype == np.int32 and det['boxes'].shape == (7, 4)


@pytest.mark.parametrize('max_exact_sizes', [0, 32])   # bucketed canvas + crop / exact canvas
def test_masks_equal_decode_then_paste_at_exact_size(outputs, coder, max_exact_sizes):
  """Canvas choice, crop and transposed layout must not change a pixel vs a plain paste."""
  dets = pp.Postprocessor(coder, top_k=7, size_multiple=32,
                          max_exact_sizes=max_exact_sizes)(outputs, SIZES)
  for b, det in enumerate(dets):
    vectors = outputs['pred_vectors'][b, det['query_index']]
    box_masks = np.asarray(coder.decode(vectors))
    want = paste_masks_np(box_masks, det['boxes'], tuple(SIZES[b]))
    assert det['masks'].shape == (7, *SIZES[b]) and det['masks'].dtype == bool
    np.testing.assert_array_equal(det['masks'], want)
    assert want.any(axis=(1, 2)).sum() >= 3     # the check is not vacuous
    assert det['masks'].transpose(1, 2, 0).flags.f_contiguous   # ready for RLE encoding


def test_soft_decoding_pastes_the_reconstruction_and_keeps_box_filling_masks(outputs, coder):
  """`mask_decode='soft'` (official fast_solq.py): the soft reconstruction pasted, >= 0.5. A
  box-filling mask's vector reconstructs to a constant: empty under the mid-range threshold,
  the whole box under the soft decoding."""
  soft = pp.Postprocessor(coder, top_k=7, size_multiple=32, mask_decode='soft')
  dets = soft(outputs, SIZES)
  for b, det in enumerate(dets):
    rec = np.asarray(coder.reconstruct(outputs['pred_vectors'][b, det['query_index']]))
    want = paste_masks_np(rec, det['boxes'], tuple(SIZES[b]))
    np.testing.assert_array_equal(det['masks'], want)
    mid_range = paste_masks_np(np.asarray(coder.decode(
        outputs['pred_vectors'][b, det['query_index']])), det['boxes'], tuple(SIZES[b]))
    assert (want != mid_range).any()           # the two decodings differ on these vectors
  full = coder.transform_np(np.ones((1, 16, 16), np.float32))     # a box-filling mask
  one = dict(pred_logits=np.array([[[5.0, -5.0]]], np.float32),
             pred_boxes=np.array([[[0.5, 0.5, 0.5, 0.5]]], np.float32),
             pred_vectors=full[None])
  assert not pp.Postprocessor(coder, top_k=1)(one, [[40, 40]])[0]['masks'][0].any()
  pasted = pp.Postprocessor(coder, top_k=1, mask_decode='soft')(one, [[40, 40]])[0]['masks'][0]
  want = np.zeros((40, 40), bool)
  want[10:30, 10:30] = True
  np.testing.assert_array_equal(pasted, want)
  with pytest.raises(ValueError, match='mask_decode'):
    pp.Postprocessor(coder, mask_decode='mid')


def test_ties_ordered_by_flat_index_and_fewer_candidates_than_k(coder):
  logits = np.zeros((1, 3, 4), np.float32)        # all 12 scores tie at 0.5
  logits[0, 2, 1] = 1.0                            # one clear winner
  logits[0, 0, 3] = -1.0                           # one clear loser
  boxes = np.tile(np.array([0.5, 0.5, 0.2, 0.2], np.float32), (1, 3, 1))
  out = dict(pred_logits=logits, pred_boxes=boxes,
             pred_vectors=np.zeros((1, 3, 24), np.float32))
  det = pp.Postprocessor(coder, top_k=100)(out, [[10, 20]])[0]
  assert len(det['scores']) == 12                  # Q * C < top_k: every candidate, once
  flat = det['query_index'] * 4 + det['labels']
  np.testing.assert_array_equal(flat, [9, 0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 3])
  det5 = pp.Postprocessor(coder, top_k=5, with_masks=False)(out, [[10, 20]])[0]
  np.testing.assert_array_equal(det5['query_index'] * 4 + det5['labels'], [9, 0, 1, 2, 4])
  assert 'masks' not in det5


def test_rows_not_kept_are_skipped(outputs, coder):
  dets = pp.Postprocessor(coder, top_k=3)(outputs, SIZES, keep=np.array([False, True]))
  assert dets[0] is None and dets[1]['masks'].shape == (3, *SIZES[1])


def test_exact_canvases_are_counted_per_postprocessor(outputs, coder):
  """The cap on exact canvases belongs to one Postprocessor: a new one starts afresh."""
  first = pp.Postprocessor(coder, top_k=2, max_exact_sizes=1)
  first(outputs, SIZES)
  assert first._exact_sizes == {tuple(SIZES[0])}     # the second size went to a bucket
  second = pp.Postprocessor(coder, top_k=2, max_exact_sizes=1)
  second(outputs, SIZES[::-1])
  assert second._exact_sizes == {tuple(SIZES[1])}


def test_canvas_size():
  assert pp.canvas_size((800, 1066), 128) == (896, 1152)
  assert pp.canvas_size((800, 1066), 1) == (800, 1066)
  assert pp.canvas_size((128, 1), 128) == (128, 128)


def test_bad_target_sizes(outputs, coder):
  with pytest.raises(ValueError, match='target_sizes'):
    pp.Postprocessor(coder)(outputs, [[10, 10]])
  with pytest.raises(ValueError, match='positive'):
    pp.Postprocessor(coder)(outputs, [[10, 10], [0, 5]])


def test_encode_rle_round_trip():
  rng = np.random.default_rng(1)
  masks = rng.random((3, 9, 7)) > 0.5
  rles = pp.encode_rle(masks)
  assert all(isinstance(r['counts'], str) for r in rles)
  decoded = mask_utils.decode([dict(size=r['size'], counts=r['counts'].encode()) for r in rles])
  np.testing.assert_array_equal(decoded.transpose(2, 0, 1), masks)
  assert pp.encode_rle(np.zeros((0, 9, 7), bool)) == []


def test_non_finite_outputs_are_refused_naming_the_rows(outputs, coder):
  """NaN logits sort first in top-k and would score as confident detections: refused."""
  bad = {k: np.array(v) for k, v in outputs.items()}
  bad['pred_boxes'][1, 3, 0] = np.nan
  post = pp.Postprocessor(coder, top_k=3)
  with pytest.raises(pp.NonFiniteOutputError, match=r'pred_boxes in batch rows \[1\]'):
    post(bad, SIZES)
  assert post(bad, SIZES, keep=np.array([True, False]))[1] is None   # a padded row is ignored
  bad['pred_vectors'][0, 0, 0] = np.inf
  with pytest.raises(pp.NonFiniteOutputError, match=r'pred_vectors in batch rows \[0\]'):
    post(bad, SIZES)
  assert pp.Postprocessor(coder, top_k=3, with_masks=False)(bad, SIZES, keep=[True, False])
