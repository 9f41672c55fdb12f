"""The evaluation loop: a model over the eval split's batches, post-processed on device, scored
by COCOeval (`solq_jax.inference.coco_eval`).

- `evaluate`: runs a forward over batches (docs/design.md, "Batch"), post-processes and
  evaluates; used by `eval.py` and, through `make_evaluation`, by the training loop.
- `make_evaluation`: the callable `Trainer.fit` takes (`train.py` wires it in), so training never
  imports inference code.
- `run`: `eval.py`.
"""
import contextlib
import json
import os
import shutil
import sys
import time

import jax
from jax.experimental import multihost_utils
import numpy as np

from solq_jax import data as data_lib
from solq_jax import masks as masks_lib
from solq_jax import models
from solq_jax import sharding
from solq_jax import weights
from solq_jax.inference import coco_eval
from solq_jax.inference import postprocess as postprocess_lib

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


def evaluate(forward, variables, batches, coco_gt, postprocessor, *, max_images=0, mesh=None,
             out_dir=None, progress=True, log=print):
  """Runs `forward` over `batches` and evaluates bbox (and segm) AP.

  Args:
    forward: a jitted `(variables, images, pad_mask) -> outputs`
      (`postprocess.make_forward(model)`; keep it across calls to reuse its compilation).
    variables: `{'params', 'buffers'}` (replicated over `mesh` here when a mesh is given).
    batches: iterable of eval batches (`images`, `pad_mask`, `image_id`, `orig_size`; see
      docs/design.md); entries with `image_id < 0` are batch padding and skipped.
    coco_gt: pycocotools `COCO` or the path of the instances json of the evaluated split.
    postprocessor: a `postprocess.Postprocessor` (its `with_masks` decides whether segm is
      evaluated).
    max_images: stop after this many images (0: all).
    mesh: optional mesh (`solq_jax.sharding`); batches are split over its batch axis.
    out_dir: where result and metrics jsons go (None: not written).
    progress: show the progress bar.
    log: text sink for the summaries.

  Returns:
    The metrics dict of `CocoEvaluator.evaluate` plus `time` (wall seconds of the model,
    `model_first_calls` (the first batch of each input shape: compilation included),
    postprocess (compilations of new paste canvases included), RLE/json encoding and
    COCOeval), `cpu_time` (the same phases in process CPU seconds, all threads), `batches`
    (`total`, `first_calls`) and `images_per_s` (images over model + postprocess + encoding).
  """
  iou_types = coco_eval.IOU_TYPES if postprocessor.with_masks else ('bbox',)
  evaluator = coco_eval.CocoEvaluator(coco_gt, iou_types)
  put = sharding.device_putter(mesh)
  if mesh is not None:
    variables = sharding.replicate(variables, mesh)
  max_images = int(max_images) or None
  total = len(evaluator.coco_gt.getImgIds())
  bar = _Progress(min(total, max_images) if max_images else total,
                  progress and jax.process_index() == 0)
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
    # Under the mesh context the deformable-attention core runs per batch shard, as in training.
    with clock('model' if shape in shapes_seen else 'model_first_calls'), \
        sharding.mesh_context(mesh):
      outputs = jax.block_until_ready(
          forward(variables, put(batch['images']), put(batch['pad_mask'])))
      outputs = {k: sharding.local_rows(v) for k, v in outputs.items()}
    with clock('postprocess'):
      dets = postprocessor(outputs, batch['orig_size'], keep=keep)
    with clock('encode'):
      for det, image_id in zip(dets, image_ids):
        if det is not None:
          evaluator.add(det, image_id)
    num_batches += 1
    shapes_seen.add(shape)
    bar.update(int(keep.sum()))
  bar.close()
  if jax.process_count() > 1:
    return _evaluate_on_main_process(evaluator, out_dir, clock, log)
  with clock('cocoeval'):
    metrics = evaluator.evaluate(out_dir=None, log=log)
  return _finish(metrics, evaluator, out_dir, clock, num_batches, shapes_seen, log)


def _finish(metrics, evaluator, out_dir, clock, num_batches, shapes_seen, log):
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


def _evaluate_on_main_process(evaluator, out_dir, clock, log):
  """Multi-process: every process writes its detections to `out_dir`; process 0 gathers them,
  runs COCOeval once and writes the result files; every process returns its metrics."""
  if not out_dir:
    raise ValueError('a multi-process evaluation gathers detections through files: give it an '
                     'output directory')
  parts = os.path.join(out_dir, 'process_parts')
  os.makedirs(parts, exist_ok=True)
  evaluator.save_part(os.path.join(parts, f'{jax.process_index()}.json'))
  multihost_utils.sync_global_devices('solq_jax evaluation: detections written')
  metrics_file = os.path.join(out_dir, 'metrics.json')
  if jax.process_index() == 0:
    for index in range(1, jax.process_count()):
      evaluator.load_part(os.path.join(parts, f'{index}.json'))
    with clock('cocoeval'):
      metrics = evaluator.evaluate(out_dir=None, log=log)
    metrics['time'], metrics['cpu_time'] = clock.wall, clock.cpu
    metrics['processes'] = jax.process_count()
    evaluator.save(out_dir, metrics)
  multihost_utils.sync_global_devices('solq_jax evaluation: metrics written')
  if jax.process_index() == 0:
    shutil.rmtree(parts, ignore_errors=True)
    return metrics
  with open(metrics_file) as f:
    return json.load(f)


def eval_batches(config, coder):
  """(batch iterator, ground truth) of `config.data`'s eval split.

  The ground truth is the annotations json path of a COCO source, or the in-memory pycocotools
  `COCO` object of a TFDS source (`TfdsSource.coco_gt`).

  Each process reads its own rows of every global batch (the training's slicing); the filler
  rows of the last batch (image id -1) are skipped by every process.
  """
  pipe = data_lib.eval_pipeline(config, coder)
  return pipe.iterator(), getattr(pipe.source, 'coco_gt', None) or pipe.source.ann_file


def make_evaluation(config, model, coder, mesh=None, *, progress=True, log=print):
  """`evaluation(variables, out_dir) -> metrics or None`: the periodic and final evaluation of a
  training run (what `Trainer.fit` takes). The forward and the post-processor are built once.

  In a multi-process run every process evaluates its share and process 0 scores them all.
  """
  forward = postprocess_lib.make_forward(model)
  postprocessor = postprocess_lib.Postprocessor.from_config(config.eval, coder)

  def evaluation(variables, out_dir):
    batches, ground_truth = eval_batches(config, coder)
    return evaluate(forward, variables, batches, ground_truth, postprocessor,
                    max_images=config.eval.max_images, mesh=mesh, out_dir=str(out_dir),
                    progress=progress, log=log)
  return evaluation


def run(config, checkpoint, out_dir, mesh=None):
  """`eval.py`: loads the weights, evaluates the eval split and writes jsons to `out_dir`."""
  model = models.build_model(config.model)
  variables = weights.load(checkpoint, config.model, model=model, seed=config.seed,
                           use_ema=config.eval.use_ema)
  coder = masks_lib.build_coder(config.model)
  evaluation = make_evaluation(config, model, coder, mesh)
  try:
    return evaluation(variables, out_dir)
  except postprocess_lib.NonFiniteOutputError as e:
    source = f'checkpoint {checkpoint}' if checkpoint else 'random weights'
    raise postprocess_lib.NonFiniteOutputError(
        f'{source}: {e}. Nothing was scored or written; evaluate an earlier checkpoint') from None
