"""COCO evaluation: exact AP on hand-made cases, empty predictions, the GT oracle on coco_val158."""
import contextlib
import io
import json

import jax
import numpy as np
import pytest
from pycocotools import coco as coco_lib
from pycocotools import cocoeval

from solq_jax.inference import coco_eval as evaluation
from solq_jax.inference import evaluate as evaluate_lib
from solq_jax.inference import postprocess as pp
from solq_jax import sharding
from solq_jax.masks import DCTCoder, paste_masks_np

# --- a tiny hand-made ground truth --------------------------------------------------------------


def _gt():
  """Two 40x30 images, categories 1 ('cat') and 3 ('dog'); image 2 has no annotations."""
  images = [dict(id=1, height=30, width=40, file_name='a.jpg'),
            dict(id=2, height=30, width=40, file_name='b.jpg')]
  anns = []
  for i, (x, y, w, h) in enumerate([(2, 2, 10, 8), (20, 10, 12, 15)]):
    poly = [x, y, x + w, y, x + w, y + h, x, y + h]
    anns.append(dict(id=i + 1, image_id=1, category_id=1, bbox=[x, y, w, h], area=w * h,
                     iscrowd=0, segmentation=[poly]))
  coco = coco_lib.COCO()
  coco.dataset = dict(images=images, annotations=anns,
                      categories=[dict(id=1, name='cat'), dict(id=3, name='dog')])
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def _rect_mask(box, hw=(30, 40)):
  m = np.zeros(hw, bool)
  x0, y0, x1, y1 = box
  m[y0:y1, x0:x1] = True
  return m


def _dets(boxes, scores, labels):
  boxes = np.asarray(boxes, np.float32)
  return dict(scores=np.asarray(scores, np.float32), labels=np.asarray(labels, np.int32),
              boxes=boxes, masks=np.stack([_rect_mask(b.astype(int)) for b in boxes]))


def test_known_ap_with_a_false_positive_first():
  """FP (0.9), TP (0.8), TP (0.7) on 2 GT: interpolated precision 2/3 at every recall -> AP 2/3."""
  ev = evaluation.CocoEvaluator(_gt())
  ev.add(_dets([[30, 0, 38, 6], [2, 2, 12, 10], [20, 10, 32, 25]], [0.9, 0.8, 0.7], [1, 1, 1]), 1)
  ev.add(_dets([[0, 0, 5, 5]], [0.1], [3]), -1)        # batch padding: ignored
  metrics = ev.evaluate(log=lambda s: None)
  assert metrics['num_images'] == 1
  for t in ('bbox', 'segm'):
    assert metrics[t]['AP'] == pytest.approx(2 / 3, abs=1e-6)
    assert metrics[t]['AR100'] == pytest.approx(1.0)
    assert metrics['per_category'][t] == {'cat': pytest.approx(2 / 3, abs=1e-6), 'dog': -1.0}
  assert metrics['summary']['segm/AP'] == metrics['segm']['AP']


def test_detections_to_coco_records():
  det = _dets([[2, 2, 12, 10]], [0.5], [3])
  rec = evaluation.detections_to_coco(det, 7)
  assert rec['bbox'] == [dict(image_id=7, category_id=3, bbox=[2.0, 2.0, 10.0, 8.0], score=0.5)]
  seg = rec['segm'][0]
  assert seg['category_id'] == 3 and isinstance(seg['segmentation']['counts'], str)
  assert seg['segmentation']['size'] == [30, 40]


def test_empty_predictions_give_zero_ap(tmp_path):
  gt = _gt()
  stats, per_cat, text = evaluation.coco_evaluate(gt, [], 'segm', image_ids=[1, 2])
  assert stats['AP'] == 0.0 and stats['AR100'] == 0.0
  assert stats['APl'] == -1.0                 # no GT in that area range: undefined, as COCOeval
  assert per_cat == {1: 0.0, 3: -1.0}
  assert 'Average Precision' in text
  ev = evaluation.CocoEvaluator(gt)
  ev.add(dict(scores=np.zeros(0, np.float32), labels=np.zeros(0, np.int32),
              boxes=np.zeros((0, 4), np.float32), masks=np.zeros((0, 30, 40), bool)), 1)
  metrics = ev.evaluate(out_dir=str(tmp_path), log=lambda s: None)
  assert metrics['bbox']['AP'] == 0.0 and metrics['segm']['AP'] == 0.0
  assert json.loads((tmp_path / 'segm_results.json').read_text()) == []
  assert json.loads((tmp_path / 'metrics.json').read_text())['bbox']['AP'] == 0.0


def test_no_images_evaluated_gives_undefined_metrics():
  metrics = evaluation.CocoEvaluator(_gt()).evaluate(log=lambda s: None)
  assert metrics['num_images'] == 0 and metrics['bbox']['AP'] == -1.0


def test_unknown_image_id_is_named():
  ev = evaluation.CocoEvaluator(_gt())
  ev.add(_dets([[2, 2, 12, 10]], [0.5], [1]), 99)
  with pytest.raises(ValueError, match='99'):
    ev.evaluate(log=lambda s: None)


def test_category_table():
  table = evaluation.format_category_table({'bbox': {1: 0.5, 3: -1.0}}, {1: 'cat', 3: 'dog'})
  assert table.splitlines()[1].split() == ['cat', '50.0']
  assert table.splitlines()[2].split() == ['dog', '-']


def test_missing_annotations_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.json'):
    evaluation.load_coco_gt(tmp_path / 'nope.json')


# --- the ground-truth oracle on real data -------------------------------------------------------

ORACLE_IMAGES = 12     # of 158: the R50 coder (N=128, n_k=256) at full image size costs ~1 s/image
ORACLE_BATCH = 8


def _encoded_gt(coco, image_ids, coder):
  """Per image: (info, non-crowd annotations, GT xyxy boxes, coder vectors of the GT masks)."""
  out = []
  for i in image_ids:
    anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=i)) if not a['iscrowd']]
    xywh = np.array([a['bbox'] for a in anns], np.float32).reshape(-1, 4)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], -1)
    masks = np.stack([coco.annToMask(a).astype(bool) for a in anns])
    out.append((coco.imgs[i], anns, xyxy, coder.encode_np(masks, xyxy)))
  return out


def _oracle_batches(encoded, num_coeffs, num_classes=91):
  """GT as model outputs: the true class scores first, true boxes, encoded mask vectors."""
  batches = []
  for start in range(0, len(encoded), ORACLE_BATCH):
    chunk = encoded[start:start + ORACLE_BATCH]
    q = max(len(anns) for _, anns, _, _ in chunk) + 1   # one spare query with no object
    logits = np.full((ORACLE_BATCH, q, num_classes), -8.0, np.float32)
    boxes = np.tile(np.array([0.5, 0.5, 0.0, 0.0], np.float32), (ORACLE_BATCH, q, 1))
    vectors = np.zeros((ORACLE_BATCH, q, num_coeffs), np.float32)
    sizes = np.ones((ORACLE_BATCH, 2), np.int32)
    image_id = np.full((ORACLE_BATCH,), -1, np.int32)     # short last batch: padded entries
    for row, (info, anns, xyxy, vecs) in enumerate(chunk):
      h, w = info['height'], info['width']
      sizes[row], image_id[row], n = (h, w), info['id'], len(anns)
      logits[row, np.arange(n), [a['category_id'] for a in anns]] = 8.0
      cxcywh = np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], -1)
      boxes[row, :n] = cxcywh / np.array([w, h, w, h], np.float32)
      vectors[row, :n] = vecs
    batches.append(dict(outputs=dict(pred_logits=logits, pred_boxes=boxes, pred_vectors=vectors),
                        images=np.zeros((ORACLE_BATCH, 8, 8, 3), np.float32),
                        pad_mask=np.zeros((ORACLE_BATCH, 8, 8), bool),
                        image_id=image_id, orig_size=sizes))
  return batches


def _upper_bound_segm_ap(coco, encoded, coder):
  """Independently: decode the GT vectors, paste (numpy twin) into the GT boxes, COCOeval."""
  results = []
  for info, anns, xyxy, vecs in encoded:
    padded = np.zeros((64, vecs.shape[1]), np.float32)   # one decode shape for every image
    padded[:len(vecs)] = vecs
    decoded = np.asarray(coder.decode(padded))[:len(vecs)]
    pasted = paste_masks_np(decoded, xyxy, (info['height'], info['width']))
    for a, rle in zip(anns, pp.encode_rle(pasted)):
      results.append(dict(image_id=info['id'], category_id=a['category_id'], segmentation=rle,
                          score=1.0))
  with contextlib.redirect_stdout(io.StringIO()):
    ev = cocoeval.COCOeval(coco, coco.loadRes(results), 'segm')
    ev.params.imgIds = [info['id'] for info, _, _, _ in encoded]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev.stats[0]


def test_oracle_on_coco_val158(coco_val158, r50_config, tmp_path):
  """GT through postprocess + evaluate: bbox AP 1.0; segm AP = the coding's upper bound."""
  coco = evaluation.load_coco_gt(coco_val158 / 'annotations' / 'instances_val2017.json')
  image_ids = sorted(coco.getImgIds())[:ORACLE_IMAGES]
  coder = DCTCoder(r50_config.model.mask_size, r50_config.model.num_coeffs)
  encoded = _encoded_gt(coco, image_ids, coder)
  batches = _oracle_batches(encoded, coder.num_coeffs)
  queue = [b['outputs'] for b in batches]

  def forward(variables, images, pad_mask):     # the "model": replays the oracle outputs
    assert images.shape[0] == ORACLE_BATCH and variables == {}
    assert dict(jax.sharding.get_abstract_mesh().shape) == {sharding.AXIS: ORACLE_BATCH}  # per shard
    return queue.pop(0)

  postprocessor = pp.Postprocessor.from_config(r50_config.eval, coder)
  mesh = sharding.make_mesh(ORACLE_BATCH)
  metrics = evaluate_lib.evaluate(forward, {}, batches, coco, postprocessor,
                                  max_images=ORACLE_IMAGES - 2,   # stops inside the last batch
                                  mesh=mesh, out_dir=str(tmp_path), progress=False,
                                  log=lambda s: None)
  used = image_ids[:ORACLE_IMAGES - 2]
  assert metrics['num_images'] == len(used)
  bbox = metrics['bbox']
  assert bbox['AP'] == pytest.approx(1.0) and bbox['AP75'] == pytest.approx(1.0)
  at_100 = [k for k in bbox if k not in ('AR1', 'AR10')]   # AR1/AR10 cap detections per image
  assert all(bbox[k] == pytest.approx(1.0) or bbox[k] == -1.0 for k in at_100), bbox
  upper = _upper_bound_segm_ap(coco, encoded[:len(used)], coder)
  assert 0.5 < upper < 1.0
  assert metrics['segm']['AP'] == pytest.approx(upper, abs=0.005)
  saved = json.loads((tmp_path / 'segm_results.json').read_text())
  assert len(saved) == 100 * len(used) and {r['image_id'] for r in saved} == set(used)
  assert json.loads((tmp_path / 'metrics.json').read_text())['segm']['AP'] == metrics['segm']['AP']
  assert set(metrics['time']) == {'model', 'model_first_calls', 'postprocess', 'encode', 'cocoeval'}


@pytest.mark.slow
def test_run_tiny_model_on_coco_val158(coco_val158, tiny_config, tmp_path):
  """eval.py's library path: data pipeline, random tiny model, sharded forward, both jsons."""
  config = tiny_config.copy_and_resolve_references()
  config.data.root = str(coco_val158)
  config.data.num_workers = 0
  config.model.num_classes = 91                 # COCO ids up to 90
  config.eval.max_images = 5                     # one batch of 8 with 3 padded rows
  mesh = sharding.make_mesh(config.eval.batch_size)
  metrics = evaluate_lib.run(config, '', str(tmp_path), mesh)
  assert metrics['num_images'] == 5
  for t in ('bbox', 'segm'):
    assert 0.0 <= metrics[t]['AP'] <= 1.0
    records = json.loads((tmp_path / f'{t}_results.json').read_text())
    assert len(records) == 5 * config.eval.top_k
  assert json.loads((tmp_path / 'metrics.json').read_text())['num_images'] == 5


def test_nan_predictions_are_refused_and_nothing_is_written(tmp_path):
  """A diverged model predicts NaN; COCOeval would rank NaN scores first and report a good AP."""
  coco = _gt()
  batch = dict(images=np.zeros((2, 8, 8, 3), np.float32), pad_mask=np.zeros((2, 8, 8), bool),
               image_id=np.array([1, 2], np.int32), orig_size=np.array([[30, 40]] * 2, np.int32))

  def forward(variables, images, pad_mask):
    del variables, images, pad_mask
    return dict(pred_logits=np.full((2, 4, 4), np.nan, np.float32),
                pred_boxes=np.full((2, 4, 4), np.nan, np.float32),
                pred_vectors=np.full((2, 4, 24), np.nan, np.float32))

  post = pp.Postprocessor(DCTCoder(16, 24), top_k=4)
  with pytest.raises(pp.NonFiniteOutputError, match='not finite'):
    evaluate_lib.evaluate(forward, {}, [batch], coco, post, out_dir=str(tmp_path / 'out'),
                          progress=False, log=lambda s: None)
  assert not (tmp_path / 'out').exists()


def test_empty_polygons_in_the_eval_json_are_dropped_as_in_training(tmp_path, caplog):
  """pycocotools crashed on a ground-truth polygon `[]` or `[[]]` (no result files written);
  those instances, and boxes of negative width, are now dropped as the training source drops
  them, one log line per reason, and the remaining ground truth scores as usual."""
  gt = _gt().dataset
  extra = [dict(id=10, image_id=1, category_id=1, bbox=[2, 2, 5, 5], area=25, iscrowd=0,
                segmentation=[]),
           dict(id=11, image_id=1, category_id=1, bbox=[2, 2, 5, 5], area=25, iscrowd=0,
                segmentation=[[]]),
           dict(id=12, image_id=1, category_id=3, bbox=[30, 2, -5, 5], area=25, iscrowd=0,
                segmentation=[[25, 2, 30, 2, 30, 7, 25, 7]])]
  path = tmp_path / 'instances.json'
  path.write_text(json.dumps(dict(gt, annotations=gt['annotations'] + extra)))
  with caplog.at_level('WARNING'):
    coco = evaluation.load_coco_gt(path)
  assert sorted(coco.anns) == [1, 2]
  assert 'dropped 2 instance(s): empty polygon' in caplog.text
  assert 'dropped 1 instance(s): box with no area' in caplog.text
  perfect = _dets([[2, 2, 12, 10], [20, 10, 32, 25]], [0.9, 0.8], [1, 1])
  ev = evaluation.CocoEvaluator(coco)
  ev.add(perfect, 1)
  metrics = ev.evaluate(out_dir=str(tmp_path / 'out'), log=lambda s: None)
  assert metrics['bbox']['AP'] == pytest.approx(1.0) and metrics['segm']['AP'] > 0.9
  assert (tmp_path / 'out' / 'segm_results.json').exists()
