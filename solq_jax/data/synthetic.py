"""A generated COCO-format instance-segmentation dataset (the embedded default).

Each image has a textured, noisy background and 1..8 shapes (circle, rectangle, triangle, star,
hexagon; one category each, ids 1..5) with random colours, sizes from a few pixels (COCO
"small") to most of the image ("large"), rotations, and positions that often cross the border.
Shapes are painted in order, so later shapes occlude earlier ones; each annotation is the
*visible* part of its shape, written as pixel-exact COCO polygons (holes made by occluders are
encoded with zero-width bridges, which pycocotools' even-odd rasterisation cancels), with the
tight box and the visible area. Fully (or all but a few pixels) occluded shapes are not
annotated. Everything is drawn from `numpy.random.default_rng([seed, split_tag, image_index])`,
so a dataset is a pure function of its parameters.
"""
from concurrent import futures
import functools
import hashlib
import json
import multiprocessing as mp
import os
import pathlib
import shutil
import tempfile

import numpy as np
from PIL import Image
from PIL import ImageDraw
from scipy import ndimage

GENERATOR_VERSION = 1
CATEGORIES = ({'id': 1, 'name': 'circle'}, {'id': 2, 'name': 'rectangle'},
              {'id': 3, 'name': 'triangle'}, {'id': 4, 'name': 'star'},
              {'id': 5, 'name': 'hexagon'})
MIN_VISIBLE_AREA = 6  # pixels; a shape occluded down to fewer is not annotated
_CIRCLE_VERTICES = 48

# Edges of a pixel (r, c) in corner coordinates (x, y), clockwise on screen, for each side whose
# neighbour is outside: (row offset, col offset of that neighbour, start corner, end corner).
_SIDES = ((-1, 0, (0, 0), (1, 0)), (0, 1, (1, 0), (1, 1)),
          (1, 0, (1, 1), (0, 1)), (0, -1, (0, 1), (0, 0)))


def _shape_outline(rng, category, cx, cy, size):
  """Vertices [(x, y)] of a shape of the given category, centre and size (diameter-like)."""
  r = size / 2
  angle = rng.uniform(0, 2 * np.pi)
  if category == 1:
    t = np.linspace(0, 2 * np.pi, _CIRCLE_VERTICES, endpoint=False)
    pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
  elif category == 2:
    aspect = rng.uniform(0.4, 1.0)
    w, h = (size, size * aspect) if rng.random() < 0.5 else (size * aspect, size)
    pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
    if rng.random() < 0.5:
      angle = 0.0  # half of the rectangles stay axis-aligned
  elif category == 3:
    t = angle + np.array([0, 2, 4]) * np.pi / 3 + rng.uniform(-0.3, 0.3, 3)
    pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
  elif category == 4:
    t = np.arange(10) * np.pi / 5
    radius = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.35, 0.55))
    pts = np.stack([radius * np.cos(t), radius * np.sin(t)], 1)
  else:
    t = np.arange(6) * np.pi / 3
    pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
  rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  pts = pts @ rot.T + np.array([cx, cy])
  return [tuple(p) for p in pts]


def _smooth_noise(rng, h, w, amplitude):
  """Low-frequency noise: a coarse random grid upsampled bilinearly (PIL) to (h, w)."""
  gh, gw = max(2, h // 24), max(2, w // 24)
  coarse = rng.standard_normal((3, gh, gw), dtype=np.float32) * np.float32(amplitude)
  return np.stack([np.asarray(Image.fromarray(c, mode='F').resize((w, h), Image.BILINEAR))
                   for c in coarse], -1)


def _texture(rng, h, w, base, amplitude):
  """A colour field: base colour, a random linear gradient, and stripes or blobs or nothing."""
  yy = np.arange(h, dtype=np.float32)[:, None, None]
  xx = np.arange(w, dtype=np.float32)[None, :, None]
  g = rng.normal(0, amplitude / max(h, w), (2, 3)).astype(np.float32)
  field = np.asarray(base, np.float32) + xx * g[0] + yy * g[1]
  kind = rng.integers(3)
  if kind == 0:
    period, phase = rng.uniform(6, 40), rng.uniform(0, 2 * np.pi)
    direction = rng.uniform(0, np.pi)
    s = np.sin((xx * np.cos(direction) + yy * np.sin(direction)) * (2 * np.pi / period) + phase)
    field = field + s.astype(np.float32) * rng.uniform(0, amplitude, 3).astype(np.float32)
  elif kind == 1:
    field = field + _smooth_noise(rng, h, w, amplitude)
  return np.broadcast_to(field, (h, w, 3))


def _trace_loops(mask):
  """Closed pixel-boundary loops (corner coordinates) of a bool mask; all boundary edges once."""
  padded = np.pad(mask, 1)
  outs = {}
  rows, cols = np.nonzero(mask)
  for dr, dc, (sx, sy), (ex, ey) in _SIDES:
    outside = ~padded[rows + 1 + dr, cols + 1 + dc]
    for r, c in zip(rows[outside].tolist(), cols[outside].tolist()):
      outs.setdefault((c + sx, r + sy), []).append((c + ex, r + ey))
  loops = []
  while outs:
    start = next(iter(outs))
    loop, v = [start], start
    while True:
      nxt = outs[v].pop()
      if not outs[v]:
        del outs[v]
      if nxt == start:
        break
      loop.append(nxt)
      v = nxt
    loops.append(_drop_collinear(loop))
  return loops


def _drop_collinear(loop):
  pts = np.array(loop)
  prev, nxt = np.roll(pts, 1, 0), np.roll(pts, -1, 0)
  a, b = pts - prev, nxt - pts
  turn = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0] != 0
  return [tuple(p) for p in pts[turn].tolist()]


def mask_to_polygons(mask, offset=(0, 0)):
  """COCO polygons of a bool mask: one part per 8-connected component, holes bridged.

  All loops of a component go into one ring, each joined to the first loop's start by a
  bridge walked there and back; even-odd rasterisation (pycocotools) cancels the bridges, so
  `annToMask` of the result equals the mask exactly. `offset` (x, y) shifts the vertices (for a
  mask cropped out of a larger image).
  """
  labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
  parts = []
  for k in range(1, n + 1):
    loops = _trace_loops(labels == k)
    anchor = loops[0][0]
    ring = list(loops[0]) + [anchor]
    for loop in loops[1:]:
      ring += list(loop) + [loop[0], anchor]
    parts.append([int(v) for p in ring for v in (p[0] + offset[0], p[1] + offset[1])])
  return parts


def _generate_image(rng, height, width, max_objects, min_object=6.0, max_object_frac=0.9,
                    texture=1.0):
  """uint8 image [H,W,3] and its instances [(category, visible mask, (x0, y0))], each visible
  mask a tight bool crop whose top-left pixel is (x0, y0). Shape sizes (diameter-like) are
  log-uniform in [min_object px, max_object_frac * shorter side]. `texture` scales every
  texture and noise amplitude (0: flat colours)."""
  image = _texture(rng, height, width, rng.uniform(40, 215, 3), 60.0 * texture).copy()
  owner = np.zeros((height, width), np.int32)
  shapes = []
  for k in range(1, int(rng.integers(1, max_objects + 1)) + 1):
    category = int(rng.integers(1, len(CATEGORIES) + 1))
    side = min(height, width)
    size = float(np.exp(rng.uniform(np.log(min_object), np.log(max_object_frac * side))))
    cx = rng.uniform(-0.15 * size, width + 0.15 * size)
    cy = rng.uniform(-0.15 * size, height + 0.15 * size)
    canvas = Image.new('L', (width, height), 0)
    ImageDraw.Draw(canvas).polygon(_shape_outline(rng, category, cx, cy, size), fill=1)
    bbox = canvas.getbbox()
    if bbox is None:
      continue
    box = np.s_[bbox[1]:bbox[3], bbox[0]:bbox[2]]
    drawn = np.asarray(canvas.crop(bbox), bool)
    owner[box][drawn] = k
    fill = _texture(rng, *drawn.shape, rng.uniform(0, 255, 3), rng.uniform(10, 50) * texture)
    image[box][drawn] = fill[drawn]
    shapes.append((k, category, box))
  noise = np.float32(rng.uniform(2, 20) * texture)
  image += rng.standard_normal((height, width, 3), dtype=np.float32) * noise
  instances = []
  for k, category, box in shapes:
    visible = owner[box] == k
    if visible.sum() >= MIN_VISIBLE_AREA:
      ys, xs = np.nonzero(visible)
      y0, x0 = ys.min(), xs.min()
      tight = visible[y0:ys.max() + 1, x0:xs.max() + 1]
      instances.append((category, tight, (int(x0 + box[1].start), int(y0 + box[0].start))))
  return np.clip(image, 0, 255, out=image).astype(np.uint8), instances


def _write_image(folder, seed, tag, index, min_size, max_size, max_objects, min_object,
                 max_object_frac, texture):
  """Generates image `index` of a split, writes its jpg into `folder`; returns its COCO image
  record and its annotations (without ids: those are numbered over the split in order)."""
  rng = np.random.default_rng([seed, tag, index])
  h, w = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
  pixels, instances = _generate_image(rng, h, w, max_objects, min_object, max_object_frac,
                                      texture)
  image_id = index + 1
  file_name = f'{image_id:06d}.jpg'
  Image.fromarray(pixels).save(pathlib.Path(folder) / file_name, quality=92)
  annotations = [{'image_id': image_id, 'category_id': category,
                  'segmentation': mask_to_polygons(visible, (x0, y0)),
                  'area': float(visible.sum()),
                  'bbox': [x0, y0, visible.shape[1], visible.shape[0]], 'iscrowd': 0}
                 for category, visible, (x0, y0) in instances]
  return {'id': image_id, 'file_name': file_name, 'height': h, 'width': w}, annotations


# Given fewer images than this, a worker process costs more to start (it imports the package)
# than it saves.
_MIN_IMAGES_PER_POOL = 512


def default_workers() -> int:
  """The CPU cores this process may run on."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def write_split(root, split, num_images, seed, min_size, max_size, max_objects=8, min_object=6.0,
                max_object_frac=0.9, texture=1.0, workers=1):
  """Write `root/annotations/instances_<split>.json` and `root/<split>/*.jpg` (object count,
  size and texture arguments: see `_generate_image`). `workers` > 1 generates the images in up
  to that many processes, each given at least `_MIN_IMAGES_PER_POOL` images (fewer images stay
  in this process); the files are the same bytes whatever the count, since every image draws
  from its own seeded generator."""
  if not (max_objects >= 1 and 1 <= min_object < max_object_frac * min_size and texture >= 0):
    raise ValueError(
        f'generated dataset: need max_objects >= 1, 1 <= min_object < max_object_frac * '
        f'min_size and texture >= 0; got max_objects={max_objects}, min_object={min_object}, '
        f'max_object_frac={max_object_frac}, min_size={min_size}, texture={texture}')
  root = pathlib.Path(root)
  (root / 'annotations').mkdir(parents=True, exist_ok=True)
  (root / split).mkdir(parents=True, exist_ok=True)
  tag = int(hashlib.sha256(split.encode()).hexdigest()[:8], 16)
  job = functools.partial(_write_image, str(root / split), seed, tag, min_size=min_size,
                          max_size=max_size, max_objects=max_objects, min_object=min_object,
                          max_object_frac=max_object_frac, texture=texture)
  workers = min(int(workers), num_images // _MIN_IMAGES_PER_POOL)
  if workers > 1:
    # spawn, not fork: the caller may already run JAX's threads, which a fork can deadlock.
    with futures.ProcessPoolExecutor(workers, mp_context=mp.get_context('spawn')) as pool:
      results = list(pool.map(job, range(num_images), chunksize=64))
  else:
    results = [job(i) for i in range(num_images)]
  images, annotations = [], []
  for image, anns in results:
    images.append(image)
    for ann in anns:
      annotations.append({'id': len(annotations) + 1, **ann})
  dataset = {'info': {'description': f'solq-jax generated shapes v{GENERATOR_VERSION}',
                      'seed': seed},
             'images': images, 'annotations': annotations, 'categories': list(CATEGORIES)}
  with open(root / 'annotations' / f'instances_{split}.json', 'w') as f:
    f.write(json.dumps(dataset))  # dumps uses the C encoder; dump(f) does not


def _params(data_config):
  d = data_config
  return {'version': GENERATOR_VERSION, 'seed': int(d.synthetic_seed),
          'min_size': int(d.synthetic_min_size), 'max_size': int(d.synthetic_max_size),
          'max_objects': int(d.synthetic_max_objects),
          'min_object': float(d.synthetic_min_object),
          'max_object_frac': float(d.synthetic_max_object_frac),
          'texture': float(d.synthetic_texture),
          'splits': {d.train_split: int(d.synthetic_train_images),
                     d.val_split: int(d.synthetic_val_images)}}


def _fingerprint(root, params):
  """Per split: sha256 of the annotation json, number and total bytes of the images."""
  out = {}
  for split in params['splits']:
    ann = root / 'annotations' / f'instances_{split}.json'
    images = sorted((root / split).glob('*.jpg'))
    out[split] = {'json_sha256': hashlib.sha256(ann.read_bytes()).hexdigest(),
                  'images': len(images), 'image_bytes': sum(p.stat().st_size for p in images)}
  return out


def _intact(root, params):
  """True if `root` holds a complete, unmodified dataset written with exactly `params`."""
  try:
    with open(root / 'manifest.json') as f:
      manifest = json.load(f)
    return manifest['params'] == params and manifest['files'] == _fingerprint(root, params)
  except (OSError, ValueError, KeyError):
    return False


def ensure_dataset(data_config):
  """The generated dataset's root under `data.cache_dir`: reused if intact, else (re)written.

  The folder name hashes the generator parameters; its manifest holds them and a fingerprint
  (json hash, image count and bytes), checked on reuse. Writing goes to a temporary sibling that
  is renamed into place when complete, so concurrent callers and interrupted runs never see a
  partial dataset.
  """
  params = _params(data_config)
  digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
  cache = pathlib.Path(data_config.cache_dir)
  root = cache / f'synthetic_v{GENERATOR_VERSION}_{digest}'
  if _intact(root, params):
    return root
  cache.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=root.name + '.tmp', dir=cache))
  try:
    for split, n in params['splits'].items():
      write_split(tmp, split, n, params['seed'], params['min_size'], params['max_size'],
                  params['max_objects'], params['min_object'], params['max_object_frac'],
                  params['texture'], workers=default_workers())
    with open(tmp / 'manifest.json', 'w') as f:
      json.dump({'params': params, 'files': _fingerprint(tmp, params)}, f)
    if root.exists():
      shutil.rmtree(root, ignore_errors=True)
    try:
      os.rename(tmp, root)
    except OSError:
      if not _intact(root, params):  # another process won the race with a complete copy
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return root
