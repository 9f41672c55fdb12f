"""COCO evaluation (bbox and segm) of SOLQ detections with pycocotools, and its result files.

Pieces, from the bottom up:
- `detections_to_coco`: one image's detections (`Postprocessor` output) -> COCO result records
  (bbox as xywh, segm as an RLE of the pasted mask with `counts` as str, `category_id` = the raw
  label).
- `coco_evaluate`: `COCO.loadRes` + `COCOeval` for one iou type over the given image ids.
  An empty result list is evaluated too (no crash): every category with ground truth then
  scores AP 0; metrics that have no ground truth at all are -1, as in COCOeval.
- `CocoEvaluator`: accumulates detections image by image, then evaluates both types, writes the
  `bbox` and `segm` result jsons (the official code dumps bbox only) and a metrics json, and
  prints the summaries and a per-category AP table.
"""
import contextlib
import io
import json
import os

import numpy as np
from pycocotools import coco as coco_lib
from pycocotools import cocoeval
from pycocotools import mask as mask_api

from solq_jax.data import coco as coco_data
from solq_jax.inference import postprocess as postprocess_lib

IOU_TYPES = ('bbox', 'segm')
STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
              'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')


@contextlib.contextmanager
def _quiet():
  """Silences pycocotools' progress prints."""
  with contextlib.redirect_stdout(io.StringIO()):
    yield


def _drop_reason(ann, image):
  """Why the training source drops this annotation (`solq_jax.data.coco`), or None."""
  if ann.get('iscrowd') or image is None:
    return None   # crowd regions stay: COCOeval uses them as ignore regions
  h, w = image['height'], image['width']
  reason = coco_data.json_drop_reason(ann, h, w)
  if reason is None and isinstance(ann['segmentation'], list):
    parts = [p for p in ann['segmentation'] if len(p) >= 6 and len(p) % 2 == 0]
    if len(parts) != len(ann['segmentation']):
      ann['segmentation'] = parts   # degenerate parts: dropped, as in training
    area = mask_api.area(mask_api.merge(mask_api.frPyObjects(parts, h, w)))
    if area == 0:
      reason = coco_data.EMPTY_MASK
  return reason


def load_coco_gt(annotations):
  """A pycocotools `COCO` from an instances json path (or an existing `COCO`, returned as is).

  Non-crowd instances that training drops (empty polygons, boxes with no area inside the
  image, masks with no pixel; `solq_jax.data.coco`) are dropped here too, counted in the log
  once per reason, so the ground truth scored against is the one the model learns from (and
  pycocotools never meets an empty polygon, on which it crashes)."""
  if isinstance(annotations, coco_lib.COCO):
    return annotations
  path = os.fspath(annotations)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'COCO annotations json not found: {path}')
  try:
    with open(path) as f:
      dataset = json.load(f)
    images = {im['id']: im for im in dataset.get('images', [])}
    kept, counts, examples = [], {}, {}
    for ann in dataset.get('annotations', []):
      reason = _drop_reason(ann, images.get(ann['image_id']))
      if reason is None:
        kept.append(ann)
      else:
        counts[reason] = counts.get(reason, 0) + 1
        examples.setdefault(reason, ann.get('id'))
    coco_data.log_drops(path, counts, examples)
    dataset['annotations'] = kept
    gt = coco_lib.COCO()
    gt.dataset = dataset
    with _quiet():
      gt.createIndex()
    return gt
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f'not a COCO instances json: {path} ({e!r})') from e


def detections_to_coco(detections, image_id, iou_types=IOU_TYPES):
  """One image's detections -> `{iou_type: [COCO result records]}`."""
  image_id = int(image_id)
  scores = np.asarray(detections['scores'], np.float64).tolist()
  labels = np.asarray(detections['labels']).astype(int).tolist()
  out = {}
  if 'bbox' in iou_types:
    xywh = np.asarray(detections['boxes'], np.float64).copy()
    xywh[:, 2:] -= xywh[:, :2]
    out['bbox'] = [dict(image_id=image_id, category_id=c, bbox=b, score=s)
                   for c, b, s in zip(labels, xywh.tolist(), scores)]
  if 'segm' in iou_types:
    rles = postprocess_lib.encode_rle(detections['masks'])
    out['segm'] = [dict(image_id=image_id, category_id=c, segmentation=r, score=s)
                   for c, r, s in zip(labels, rles, scores)]
  return out


def _empty_results(coco_gt):
  """A result `COCO` with no annotations (`loadRes` cannot take an empty list)."""
  res = coco_lib.COCO()
  res.dataset = dict(images=list(coco_gt.dataset.get('images', [])),
                     categories=list(coco_gt.dataset.get('categories', [])), annotations=[])
  with _quiet():
    res.createIndex()
  return res


def _load_results(coco_gt, results):
  if not results:
    return _empty_results(coco_gt)
  unknown = {r['image_id'] for r in results} - set(coco_gt.getImgIds())
  if unknown:
    raise ValueError(f'results name image ids absent from the annotations: {sorted(unknown)[:10]}')
  with _quiet():  # loadRes adds keys (area, id, numpy bbox) to the records: give it copies
    return coco_gt.loadRes([dict(r) for r in results])


def per_category_ap(evaluator):
  """`{category_id: AP}` at IoU .50:.95, area all, 100 dets; -1 where a category has no GT."""
  precision = evaluator.eval['precision'][:, :, :, 0, -1]  # [T, R, K]
  out = {}
  for k, cat_id in enumerate(evaluator.params.catIds):
    p = precision[:, :, k]
    p = p[p > -1]
    out[int(cat_id)] = float(np.mean(p)) if p.size else -1.0
  return out


def coco_evaluate(coco_gt, results, iou_type, image_ids=None):
  """Runs COCOeval for one iou type.

  Args:
    coco_gt: pycocotools `COCO` with the ground truth.
    results: list of COCO result records (may be empty).
    iou_type: 'bbox' or 'segm'.
    image_ids: the images evaluated (default: all of `coco_gt`); GT of other images is ignored.

  Returns:
    (stats dict over `STAT_NAMES`, per-category AP dict, summary text).
  """
  if iou_type not in IOU_TYPES:
    raise ValueError(f'iou_type must be one of {IOU_TYPES}, got {iou_type!r}')
  coco_dt = _load_results(coco_gt, results)
  evaluator = cocoeval.COCOeval(coco_gt, coco_dt, iou_type)
  if image_ids is not None:
    evaluator.params.imgIds = sorted(int(i) for i in image_ids)
  with _quiet():
    evaluator.evaluate()
    evaluator.accumulate()
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    evaluator.summarize()
  stats = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
  return stats, per_category_ap(evaluator), text.getvalue()


def format_category_table(per_category, names):
  """Per-category AP table (bbox and segm columns), one category per line."""
  types = [t for t in IOU_TYPES if t in per_category]
  cat_ids = sorted(set().union(*(per_category[t].keys() for t in types)))
  width = max([len('category')] + [len(names.get(c, str(c))) for c in cat_ids])
  lines = ['  '.join(['category'.ljust(width)] + [f'{t:>6}' for t in types])]
  for c in cat_ids:
    cells = []
    for t in types:
      ap = per_category[t].get(c, -1.0)
      cells.append(f'{100 * ap:6.1f}' if ap >= 0 else f'{"-":>6}')
    lines.append('  '.join([names.get(c, str(c)).ljust(width)] + cells))
  return '\n'.join(lines)


class CocoEvaluator:
  """Collects detections of images and evaluates them with COCOeval (bbox and segm)."""

  def __init__(self, coco_gt, iou_types=IOU_TYPES):
    self.coco_gt = load_coco_gt(coco_gt)
    self.iou_types = tuple(iou_types)
    self.results = {t: [] for t in self.iou_types}
    self.image_ids = []

  def add(self, detections, image_id):
    """Adds one image's `postprocess` dict; `image_id < 0` (batch padding) is skipped."""
    if int(image_id) < 0:
      return
    for t, records in detections_to_coco(detections, image_id, self.iou_types).items():
      self.results[t].extend(records)
    self.image_ids.append(int(image_id))

  def evaluate(self, out_dir=None, log=print):
    """Evaluates all types; writes `{bbox,segm}_results.json` and `metrics.json` to `out_dir`.

    Returns:
      dict: `{iou_type: stats}`, `per_category: {iou_type: {category name: AP}}` (-1: no GT),
      `num_images`, `summary: {'bbox/AP': ..., ...}` (flat, for loggers).
    """
    names = {c['id']: c['name'] for c in self.coco_gt.dataset.get('categories', [])}
    metrics = dict(num_images=len(self.image_ids), per_category={}, summary={})
    per_cat_ids = {}
    for t in self.iou_types:
      stats, per_cat, text = coco_evaluate(self.coco_gt, self.results[t], t, self.image_ids)
      metrics[t] = stats
      metrics['per_category'][t] = {names.get(c, str(c)): ap for c, ap in per_cat.items()}
      metrics['summary'].update({f'{t}/{k}': v for k, v in stats.items()})
      log(f'COCOeval {t} ({len(self.image_ids)} images, {len(self.results[t])} detections):\n'
          + text.rstrip())
      per_cat_ids[t] = per_cat
    log('per-category AP (IoU .50:.95):\n' + format_category_table(per_cat_ids, names))
    if out_dir:
      self.save(out_dir, metrics)
    return metrics

  def save_part(self, path):
    """Writes this evaluator's detections (one process's share) for `load_part`."""
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
      json.dump({'image_ids': self.image_ids, 'results': self.results}, f)
    os.replace(tmp, path)   # a reader never sees half a file

  def load_part(self, path):
    """Adds the detections another process wrote with `save_part`."""
    with open(path) as f:
      part = json.load(f)
    overlap = set(part['image_ids']) & set(self.image_ids)
    if overlap:
      raise ValueError(f'{path}: images evaluated twice: {sorted(overlap)[:10]}')
    self.image_ids.extend(part['image_ids'])
    for t in self.iou_types:
      self.results[t].extend(part['results'][t])

  def save(self, out_dir, metrics):
    os.makedirs(out_dir, exist_ok=True)
    for t in self.iou_types:
      with open(os.path.join(out_dir, f'{t}_results.json'), 'w') as f:
        json.dump(self.results[t], f)
    with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
      json.dump(metrics, f, indent=1)
