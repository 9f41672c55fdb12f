"""COCO evaluation (bbox and segm) of SOLQ detections with pycocotools (spec section 5).

Pieces, from the bottom up:
- `detections_to_coco`: one image's `postprocess` dict -> COCO result records (bbox as xywh,
  segm as an RLE of the pasted mask with `counts` as str, `category_id` = the raw label).
- `coco_evaluate`: `COCO.loadRes` + `COCOeval` for one iou type over the given image ids.
  An empty result list is evaluated too (no crash): every category with ground truth then
  scores AP 0; metrics that have no ground truth at all are -1, as in COCOeval.
- `CocoEvaluator`: accumulates detections image by image, then evaluates both types, writes the
  `bbox` and `segm` result jsons (the official code dumps bbox only, spec quirk 13) and a metrics
  json, and prints the summaries and a per-category AP table.
- `evaluate`: runs a model over a batch iterator (contract 4), post-processes on device and
  evaluates; used by `eval.py` and the training loop's periodic evaluation.
"""
import contextlib
import io
import json
import os
import sys
import time

import jax
import numpy as np
from pycocotools import coco as coco_lib
from pycocotools import cocoeval

from solq_jax import data as data_lib
from solq_jax import masks as masks_lib
from solq_jax import postprocess as postprocess_lib
from solq_jax import predict

IOU_TYPES = ('bbox', 'segm')
STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
              'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')


@contextlib.contextmanager
def _quiet():
  """Silences pycocotools' progress prints."""
  with contextlib.redirect_stdout(io.StringIO()):
    yield


def load_coco_gt(annotations):
  """A pycocotools `COCO` from an instances json path (or an existing `COCO`, returned as is)."""
  if isinstance(annotations, coco_lib.COCO):
    return annotations
  path = os.fspath(annotations)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'COCO annotations json not found: {path}')
  try:
    with _quiet():
      return coco_lib.COCO(path)
  except (ValueError, KeyError, TypeError) as e:
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


def per_category_ap(coco_eval):
  """`{category_id: AP}` at IoU .50:.95, area all, 100 dets; -1 where a category has no GT."""
  precision = coco_eval.eval['precision'][:, :, :, 0, -1]  # [T, R, K]
  out = {}
  for k, cat_id in enumerate(coco_eval.params.catIds):
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

  def save(self, out_dir, metrics):
    os.makedirs(out_dir, exist_ok=True)
    for t in self.iou_types:
      with open(os.path.join(out_dir, f'{t}_results.json'), 'w') as f:
        json.dump(self.results[t], f)
    with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
      json.dump(metrics, f, indent=1)


class _Progress:
  """A one-line progress bar with images/s on stderr."""

  def __init__(self, total, enabled=True):
    self.total, self.enabled, self.start, self.done = total, enabled, time.perf_counter(), 0

  def update(self, n):
    self.done += n
    if not self.enabled:
      return
    elapsed = time.perf_counter() - self.start
    rate = self.done / max(elapsed, 1e-9)
    total = f'/{self.total}' if self.total else ''
    frac = f' {100 * self.done / self.total:5.1f}%' if self.total else ''
    sys.stderr.write(f'\reval {self.done}{total}{frac}  {rate:.2f} img/s  {elapsed:.0f}s')
    sys.stderr.flush()

  def close(self):
    if self.enabled:
      sys.stderr.write('\n')


class _Clock:
  """Accumulates wall and process-CPU seconds per phase: `with clock('model'): ...`."""

  PHASES = ('model', 'model_first_calls', 'postprocess', 'encode', 'cocoeval')

  def __init__(self):
    self.wall = dict.fromkeys(self.PHASES, 0.0)
    self.cpu = dict.fromkeys(self.PHASES, 0.0)

  @contextlib.contextmanager
  def __call__(self, phase):
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    self.wall[phase] += time.perf_counter() - wall
    self.cpu[phase] += time.process_time() - cpu


def evaluate(model, variables, batches, coco_gt, config, *, mesh=None, out_dir=None,
             forward_fn=None, progress=True, log=print):
  """Runs the model over `batches` and evaluates bbox and segm AP.

  Args:
    model: the Flax module (`solq_jax.models.build_model(config)`); unused with `forward_fn`.
    variables: `{'params', 'buffers'}` (replicated over `mesh` here when a mesh is given).
    batches: iterable of contract-4 batches (`images`, `pad_mask`, `image_id`, `orig_size`);
      entries with `image_id < 0` are batch padding and skipped.
    coco_gt: pycocotools `COCO` or the path of the instances json of the evaluated split.
    config: the whole ConfigDict (`config.eval.top_k`, `max_images`, `paste_size_multiple`,
      `with_masks`; `config.model` for the mask coder).
    mesh: optional `jax.sharding.Mesh` with a 'data' axis; batches are split along it.
    out_dir: where result and metrics jsons go (None: not written).
    forward_fn: optional jitted `(variables, images, pad_mask) -> outputs` replacing the model's.
    progress: show the progress bar.
    log: text sink for the summaries.

  Returns:
    The metrics dict of `CocoEvaluator.evaluate` plus `time` (wall seconds of the model,
    `model_first_calls` (the first batch of each input shape: compilation included),
    postprocess (compilations of new paste canvases included), RLE/json encoding and
    COCOeval), `cpu_time` (the same phases in process CPU seconds, all threads), `batches`
    (`total`, `first_calls`) and `images_per_s` (images over model + postprocess + encoding).
  """
  ec = config.eval
  coder = masks_lib.build_coder(config.model)
  iou_types = IOU_TYPES if ec.with_masks else ('bbox',)
  evaluator = CocoEvaluator(coco_gt, iou_types)
  forward = forward_fn or postprocess_lib.make_forward(model)
  put = _device_putter(mesh)
  if mesh is not None:
    variables = jax.device_put(
        variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  max_images = int(ec.max_images) or None
  total = len(evaluator.coco_gt.getImgIds())
  bar = _Progress(min(total, max_images) if max_images else total, progress)
  clock = _Clock()
  shapes_seen, num_batches = set(), 0
  for batch in batches:
    if max_images is not None and len(evaluator.image_ids) >= max_images:
      break
    image_ids = np.asarray(batch['image_id'])
    keep = image_ids >= 0
    if max_images is not None:
      keep &= np.cumsum(keep) <= max_images - len(evaluator.image_ids)
    shape = tuple(batch['images'].shape)
    with clock('model' if shape in shapes_seen else 'model_first_calls'), _mesh_context(mesh):
      outputs = jax.block_until_ready(
          forward(variables, put(batch['images']), put(batch['pad_mask'])))
    with clock('postprocess'):
      dets = postprocess_lib.postprocess(
          outputs, batch['orig_size'], coder, ec.top_k, with_masks=ec.with_masks,
          size_multiple=ec.paste_size_multiple, max_exact_sizes=ec.paste_exact_sizes, keep=keep)
    with clock('encode'):
      for det, image_id in zip(dets, image_ids):
        if det is not None:
          evaluator.add(det, image_id)
    num_batches += 1
    shapes_seen.add(shape)
    bar.update(int(keep.sum()))
  bar.close()
  with clock('cocoeval'):
    metrics = evaluator.evaluate(out_dir=None, log=log)
  busy = sum(clock.wall[k] for k in ('model', 'model_first_calls', 'postprocess', 'encode'))
  metrics['time'] = clock.wall
  metrics['cpu_time'] = clock.cpu
  metrics['batches'] = dict(total=num_batches, first_calls=len(shapes_seen))
  metrics['images_per_s'] = metrics['num_images'] / busy if busy > 0 else 0.0
  log('time: ' + ', '.join(f'{k} {v:.2f}s' for k, v in clock.wall.items())
      + f'; {metrics["images_per_s"]:.2f} img/s (model incl. compilation + postprocess + '
      'encode)')
  if out_dir:
    evaluator.save(out_dir, metrics)
  return metrics


def _mesh_context(mesh):
  """`jax.set_mesh(mesh)` (the forward traces per batch shard, as the train step does; see
  solq_jax.ops.ms_deform_attn.per_batch_shard), or nothing without a mesh."""
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def _device_putter(mesh):
  """Places host arrays on the mesh, split along 'data' (identity without a mesh)."""
  if mesh is None:
    return lambda x: x
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  size = mesh.shape['data']

  def put(x):
    if x.shape[0] % size:
      raise ValueError(f'eval batch of {x.shape[0]} images does not split over the {size} '
                       "devices of the 'data' mesh axis: set config.eval.batch_size to a multiple")
    return jax.device_put(x, sharding)
  return put


def eval_batches(config):
  """(batch iterator, ground truth) of `config.data`'s eval split (contract 4).

  The ground truth is the annotations json path of a COCO source, or the in-memory pycocotools
  `COCO` object of a TFDS source (`TfdsSource.coco_gt`).

  Single process: evaluation gathers every detection in this process (multi-host evaluation
  would need the detections gathered across processes; not supported yet).
  """
  if jax.process_count() > 1:
    raise NotImplementedError('evaluation runs in a single process (got '
                              f'{jax.process_count()} processes)')
  pipe = data_lib.eval_pipeline(config, process_index=0, process_count=1)
  return pipe.iterator(), getattr(pipe.source, 'coco_gt', None) or pipe.source.ann_file


def run(config, checkpoint, out_dir, mesh=None):
  """`eval.py`: loads the weights, evaluates the eval split and writes jsons to `out_dir`."""
  model, variables = predict.load_model(config, checkpoint)
  batches, ann_file = eval_batches(config)
  return evaluate(model, variables, batches, ann_file, config, mesh=mesh, out_dir=out_dir)
