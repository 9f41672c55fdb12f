"""Inference on image files: PNG overlays and a json of detections (`predict.py` calls `run`).

Also home of `load_model`, the weight loading shared by `eval.py` and `predict.py`:
a training checkpoint directory (orbax, `solq_jax.training.checkpoint`), a converted variables
directory (`solq_jax.convert.save_variables`), an official SOLQ `.pth` (converted on the fly),
or nothing (random initialisation, with a loud warning: only for benchmarking).
"""
import json
import logging
import os
import pathlib
import time

import jax
import numpy as np

from solq_jax import masks as masks_lib
from solq_jax import models
from solq_jax import postprocess as postprocess_lib
from solq_jax import visualize
from solq_jax.data import coco as coco_data
from solq_jax.data import pipeline
from solq_jax.data import synthetic
from solq_jax.data import transforms

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')


def _restore_train_checkpoint(directory, config):
  """`{'params', 'buffers'}` of the newest step of a training run's checkpoint directory.

  Restored onto this process's first device whatever mesh saved it (orbax needs a target
  when the topology differs), after checking that the run's model config equals ours.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from solq_jax.training import checkpoint as train_ckpt  # pylint: disable=g-import-not-at-top
  checkpointer = train_ckpt.Checkpointer(directory, config.model, async_save=False)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise ValueError(f'{directory} holds no complete training checkpoint step')
    meta = checkpointer.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']
  finally:
    checkpointer.close()
  if meta.get('model') != checkpointer.model_config:
    diff = sorted(k for k in set(meta.get('model', {})) | set(checkpointer.model_config)
                  if meta.get('model', {}).get(k) != checkpointer.model_config.get(k))
    raise ValueError(f'checkpoint {directory} step {step} was trained with another model config '
                     f'(fields differ: {diff})')
  item = os.path.join(os.fspath(directory), str(step), 'state')
  try:
    reader = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          reader.metadata(item).item_metadata.tree)
    restored = reader.restore(item, target)
  except Exception as e:  # noqa: BLE001 - orbax raises many types; name the path
    raise ValueError(f'cannot restore {item}: {type(e).__name__}: {e}') from e
  log.info('restored training step %d from %s', step, directory)
  return jax.tree.map(np.asarray, {'params': restored['params'], 'buffers': restored['buffers']})


def _is_train_checkpoint(directory):
  return any(p.name.isdigit() and (p / 'state').is_dir() for p in pathlib.Path(directory).iterdir())


def load_variables(config, checkpoint, model=None):
  """Model variables for inference from `checkpoint` (see the module docstring)."""
  if not checkpoint:
    banner = '*' * 78
    log.warning('%s\nNO CHECKPOINT GIVEN: using RANDOMLY INITIALISED weights (seed %d). The '
                'detections are meaningless; this is only for benchmarking.\n%s',
                banner, config.seed, banner)
    return models.init_variables(model or models.build_model(config), jax.random.key(config.seed))
  path = os.path.abspath(os.fspath(checkpoint))  # orbax metadata needs an absolute path
  if os.path.isfile(path):
    if not path.endswith(('.pth', '.pt', '.bin')):
      raise ValueError(f'checkpoint file {path} is not an official SOLQ .pth')
    from solq_jax import convert  # pylint: disable=g-import-not-at-top
    return convert.load_official_checkpoint(path, config)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'checkpoint not found: {path}')
  if _is_train_checkpoint(path):
    return _restore_train_checkpoint(path, config)
  from solq_jax import convert  # pylint: disable=g-import-not-at-top
  return convert.load_variables(path, config)


def load_model(config, checkpoint):
  """(model, variables) for inference."""
  model = models.build_model(config)
  return model, load_variables(config, checkpoint, model)


def load_category_names(path=''):
  """`{category_id: name}`: COCO's 80 by default, else from a COCO json or a text file.

  A text file has one category per line, either `ID NAME` or just `NAME` (numbered from 1 in
  file order, as COCO-style ids); blank lines are ignored.
  """
  if not path:
    return dict(visualize.COCO_CATEGORIES)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'category names file not found: {path}')
  if path.endswith('.json'):
    with open(path) as f:
      try:
        categories = json.load(f)['categories']
        return {int(c['id']): str(c['name']) for c in categories}
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{path} is not a COCO json with a `categories` list ({e!r})') from e
  names = {}
  with open(path) as f:
    lines = [line.strip() for line in f if line.strip()]
  for number, line in enumerate(lines, start=1):
    head, _, rest = line.partition(' ')
    if head.isdigit() and rest.strip():
      names[int(head)] = rest.strip()
    else:
      names[number] = line
  return names


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


def prepare_image(image, data_config):
  """PIL RGB -> (normalised `[1,H',W',3]`, pad mask `[1,H',W']`) with the eval resize and a
  bucketed padding (the input pipeline's buckets, so few shapes compile)."""
  hw = (image.height, image.width)
  ops, out_hw = transforms.plan_eval(hw, data_config)
  sample = dict(image=image, masks=np.zeros((0, *hw), bool), boxes=np.zeros((0, 4), np.float32),
                labels=np.zeros((0,), np.int32))
  resized = transforms.apply_ops(sample, ops)['image']
  padded = pipeline.bucket_shape([out_hw], pipeline.bucket_sizes(data_config),
                                 data_config.bucket_multiple)
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


def run(config, checkpoint, inputs, out_dir, *, loaded=None, draw_boxes=True, draw_labels=True):
  """Predicts every image of `inputs`; writes `<out_dir>/<stem>.png` overlays and
  `<out_dir>/detections.json`. Returns the json's content (a list, one entry per image; an
  image that cannot be decoded is skipped with a logged error and an `error` entry).

  `loaded`: an already loaded `(model, variables)` (then `checkpoint` is not read).
  """
  ec = config.eval
  if ec.names_file or config.data.root or config.data.source != 'coco':
    names = load_category_names(ec.names_file)
  else:  # the config trains on the generated dataset: its shape names, not COCO's
    names = {c['id']: c['name'] for c in synthetic.CATEGORIES}
  files = list_images(inputs)
  if not files:
    raise ValueError(f'no input images in {list(inputs)}')
  model, variables = loaded or load_model(config, checkpoint)
  forward = postprocess_lib.make_forward(model)
  coder = masks_lib.build_coder(config.model)
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
    images, pad_mask = prepare_image(image, config.data)
    outputs = forward(variables, images, pad_mask)
    det = postprocess_lib.postprocess(
        outputs, [[image.height, image.width]], coder, ec.top_k,
        size_multiple=ec.paste_size_multiple, max_exact_sizes=ec.paste_exact_sizes)[0]
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
