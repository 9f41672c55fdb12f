"""Inference on image files: PNG overlays and a json of detections (`predict.py` calls `run`).

The weights come from `solq_jax.weights.load` (a training run's checkpoints, a converted
directory, an official `.pth`, or nothing: random weights, only for benchmarking).
"""
import json
import logging
import os
import pathlib
import time

import numpy as np

from solq_jax import masks as masks_lib
from solq_jax import models
from solq_jax import weights
from solq_jax.data import coco as coco_data
from solq_jax.data import pipeline
from solq_jax.data import transforms
from solq_jax.inference import export as export_lib
from solq_jax.inference import postprocess as postprocess_lib
from solq_jax.inference import visualize

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')


def list_images(inputs):
  """Image files named by `inputs` (files, or folders searched non-recursively), in order."""
  files = []
  for item in inputs:
    p = pathlib.Path(item)
    if p.is_dir():
      found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
      if not found:
        log.warning('no images in folder %s', p)
      files.extend(found)
    elif p.is_file():
      files.append(p)
    else:
      raise FileNotFoundError(f'input image or folder not found: {p}')
  return files


def prepare_image(image, data_config, padded_hw=None):
  """PIL RGB -> (normalised `[1,H',W',3]`, pad mask `[1,H',W']`) with the eval resize and a
  bucketed padding (the input pipeline's buckets, so few shapes compile), or padded to
  `padded_hw` (an exported model's fixed size)."""
  hw = (image.height, image.width)
  ops, out_hw = transforms.plan_eval(hw, data_config)
  sample = dict(image=image, masks=np.zeros((0, *hw), bool), boxes=np.zeros((0, 4), np.float32),
                labels=np.zeros((0,), np.int32))
  resized = transforms.apply_ops(sample, ops)['image']
  padded = padded_hw or pipeline.bucket_shape([out_hw], pipeline.bucket_sizes(data_config),
                                              data_config.bucket_multiple)
  if out_hw[0] > padded[0] or out_hw[1] > padded[1]:
    raise ValueError(f'the eval-resized image is {out_hw}, larger than the padded input '
                     f'{tuple(padded)}')
  images = np.zeros((1, *padded, 3), np.float32)
  pad_mask = np.ones((1, *padded), bool)
  images[0, :out_hw[0], :out_hw[1]] = transforms.normalize_image(resized)
  pad_mask[0, :out_hw[0], :out_hw[1]] = False
  return images, pad_mask


def detections_record(detections, names, score_threshold):
  """JSON-ready detections with `score >= score_threshold`, best first (masks as RLE)."""
  keep = visualize.select(detections, score_threshold)[::-1]
  rles = (postprocess_lib.encode_rle(np.asarray(detections['masks'])[keep])
          if 'masks' in detections else [])
  out = []
  for j, i in enumerate(keep):
    label = int(detections['labels'][i])
    rec = dict(category_id=label, category=names.get(label, str(label)),
               score=float(detections['scores'][i]),
               box_xyxy=[float(v) for v in detections['boxes'][i]],
               query_index=int(detections['query_index'][i]))
    if rles:
      rec['segmentation'] = rles[j]
    out.append(rec)
  return out


def _model_detector(config, checkpoint, loaded, coder):
  """`detect(image) -> detections` of a model (loaded here from `checkpoint` unless given)."""
  if loaded is None:
    model = models.build_model(config.model)
    variables = weights.load(checkpoint, config.model, model=model, seed=config.seed,
                             use_ema=config.eval.use_ema)
  else:
    model, variables = loaded
  forward = postprocess_lib.make_forward(model)
  postprocessor = postprocess_lib.Postprocessor.from_config(
      config.eval, coder or masks_lib.build_coder(config.model))

  def detect(image):
    images, pad_mask = prepare_image(image, config.data)
    return postprocessor(forward(variables, images, pad_mask), [[image.height, image.width]])[0]
  return detect


def _exported_detector(config, directory):
  """(`detect(image) -> detections`, category names) of an exported directory
  (`solq_jax.inference.export`)."""
  exported = export_lib.ExportedModel(directory)
  pasting = postprocess_lib.Postprocessor(None, size_multiple=config.eval.paste_size_multiple,
                                          max_exact_sizes=config.eval.paste_exact_sizes)

  def detect(image):
    images, pad_mask = prepare_image(image, config.data, padded_hw=exported.hw)
    out = {k: v[0] for k, v in exported(images, pad_mask).items()}
    if not (np.isfinite(out['scores']).all() and np.isfinite(out['boxes']).all()):
      raise postprocess_lib.NonFiniteOutputError('the exported model output is not finite')
    h, w = image.height, image.width
    boxes = out['boxes'] * np.array([w, h, w, h], np.float32)
    return dict(scores=out['scores'], labels=out['labels'], boxes=boxes,
                query_index=out['query_index'],
                masks=pasting.paste_image_masks(out['masks'], boxes, (h, w)))
  return detect, exported.class_names


def run(config, checkpoint, inputs, out_dir, *, loaded=None, coder=None, draw_boxes=True,
        draw_labels=True):
  """Predicts every image of `inputs`; writes `<out_dir>/<stem>.png` overlays and
  `<out_dir>/detections.json`. Returns the json's content (a list, one entry per image; an
  image that cannot be decoded is skipped with a logged error and an `error` entry).

  `checkpoint`: anything `solq_jax.weights.load` takes, or an exported directory.
  `loaded`: an already loaded `(model, variables)` (then `checkpoint` is not read).
  `coder`: the run's mask coder (default: built from `config.model`).
  """
  ec = config.eval
  files = list_images(inputs)
  if not files:
    raise ValueError(f'no input images in {list(inputs)}')
  if loaded is None and export_lib.is_export_dir(checkpoint):
    detect, names = _exported_detector(config, checkpoint)
  else:
    detect = _model_detector(config, checkpoint, loaded, coder)
    names = visualize.category_names(config)
  os.makedirs(out_dir, exist_ok=True)
  records, used = [], set()
  for path in files:
    start = time.perf_counter()
    try:
      image = coco_data.load_rgb(path, image_id=path.name)
    except coco_data.DataError as e:   # one unreadable file does not stop a folder's run
      log.error('skipped: %s', e)
      records.append(dict(file=str(path), error=str(e)))
      continue
    try:
      det = detect(image)
    except postprocess_lib.NonFiniteOutputError as e:
      source = 'the given model' if loaded is not None else (
          f'checkpoint {checkpoint}' if checkpoint else 'random weights')
      raise postprocess_lib.NonFiniteOutputError(f'{source} on {path}: {e}') from None
    overlay = visualize.draw_detections(np.asarray(image), det, names, ec.score_threshold,
                                        draw_boxes=draw_boxes, draw_labels=draw_labels)
    stem = path.stem if path.stem not in used else f'{path.stem}_{len(used)}'
    used.add(stem)
    png = os.path.join(os.fspath(out_dir), f'{stem}.png')
    visualize.save_png(png, overlay)
    dets = detections_record(det, names, ec.score_threshold)
    records.append(dict(file=str(path), overlay=png, height=image.height, width=image.width,
                        score_threshold=float(ec.score_threshold), detections=dets))
    log.info('%s: %d detections >= %.2f (%.2fs) -> %s', path, len(dets), ec.score_threshold,
             time.perf_counter() - start, png)
  with open(os.path.join(out_dir, 'detections.json'), 'w') as f:
    json.dump(records, f)
  return records
