"""Mask coding on real COCO masks: the quality table (segm AP upper bound) and the speed ratio.

    .venv/bin/python benchmarks/mask_coding.py --part quality      # the table (a few minutes)
    .venv/bin/python benchmarks/mask_coding.py --part speed        # masks/s, batched vs loop
    .venv/bin/python benchmarks/mask_coding.py --part crop_check --torchvision_crops F.npz

Data: `../shared/data/coco_val158` (158 val2017 images, 1,408 non-crowd instances).

Quality: every non-crowd ground-truth instance is encoded from its full-image mask and GT box
(the host pipeline's `encode_np`), decoded (`decode`), pasted back into the GT box at the
original image size (`paste_masks`, on device), and scored as a prediction (score 1, GT category) with pycocotools
COCOeval segm. The AP is the upper bound the coding allows (paper Table 3a/3d/3e asked of the
coding alone). Rows: DCT over N x n_k, PCA (fitted on these same instances: in-sample, so an
optimistic figure), flatten (the crop itself; also the ceiling of crop + paste at that N).

Speed (interleaved rounds, medians; a shared 2-core machine, so noisy):
* encode: batched jnp (`DCTCoder.encode`, chunks of 256 masks on a 640x640 canvas with
  `image_hw` giving each mask's true size) vs a per-mask loop in the official style (crop of one
  mask with numpy, `scipy.fft.dctn(norm='ortho')`, zigzag gather).
* decode + paste: batched jnp (`decode` then `paste_masks` on the canvas) vs a per-mask loop
  (zero-fill, `scipy.fft.idctn`, mid-range threshold, bilinear paste restricted to the box's
  pixel range as detectron2 does on CPU).
* the evaluation shape: 100 masks pasted at 800x1066 (official PostProcess: 0.33 s).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.fft  # noqa: E402
from pycocotools import coco as coco_api  # noqa: E402
from pycocotools import cocoeval  # noqa: E402
from pycocotools import mask as mask_api  # noqa: E402

from solq_jax import masks  # noqa: E402
from solq_jax.masks import fit_pca  # noqa: E402
from solq_jax.masks import pca  # noqa: E402
import timing  # noqa: E402  (benchmarks/timing.py)

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared',
                    'data', 'coco_val158')
CANVAS = 640          # every coco_val158 image fits
CHUNK = 256


def _instances(dataset):
  """Per image: (image_id, (h, w), masks bool [n,h,w], boxes xyxy [n,4], category ids [n])."""
  out = []
  for image_id in sorted(dataset.getImgIds()):
    info = dataset.loadImgs(image_id)[0]
    anns = [a for a in dataset.loadAnns(dataset.getAnnIds(imgIds=image_id, iscrowd=False))
            if a['bbox'][2] > 0 and a['bbox'][3] > 0]
    if not anns:
      continue
    mask = np.stack([dataset.annToMask(a).astype(bool) for a in anns])
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a['bbox'] for a in anns)], np.float32)
    out.append((image_id, (info['height'], info['width']), mask, boxes,
                [a['category_id'] for a in anns]))
  return out


def _pad_rows(a, multiple=8):
  extra = -len(a) % multiple
  return np.concatenate([a, np.zeros((extra,) + a.shape[1:], a.dtype)]) if extra else a


def evaluate_coder(dataset, instances, coder):
  """COCOeval segm of decode(encode(gt)) pasted into the GT boxes -> (AP, AP50, AP75, mean IoU).

  Encoding is the host pipeline's `encode_np` per image; decode and paste run batched on device
  (chunks of CHUNK on the CANVAS x CANVAS canvas, sliced back to each image's size).
  """
  vectors = np.concatenate([coder.encode_np(mask, boxes) for _, _, mask, boxes, _ in instances])
  boxes = np.concatenate([b for *_, b, _ in instances])
  num = len(vectors)
  vectors, boxes_padded = _pad_rows(vectors, CHUNK), _pad_rows(boxes, CHUNK)
  decode_paste = jax.jit(lambda v, b: masks.paste_masks(coder.decode(v), b, (CANVAS, CANVAS)))
  pasted = np.concatenate([np.asarray(decode_paste(vectors[i:i + CHUNK], boxes_padded[i:i + CHUNK]))
                           for i in range(0, len(vectors), CHUNK)])[:num]
  results, ious, k = [], [], 0
  for image_id, (height, width), mask, _, cats in instances:
    for gt, cat in zip(mask, cats):
      m = pasted[k, :height, :width]
      k += 1
      union = (m | gt).sum()
      ious.append((m & gt).sum() / union if union else 1.0)
      rle = mask_api.encode(np.asfortranarray(m[:, :, None].astype(np.uint8)))[0]
      rle['counts'] = rle['counts'].decode('utf-8')
      results.append(dict(image_id=image_id, category_id=cat, segmentation=rle, score=1.0))
  evaluator = cocoeval.COCOeval(dataset, dataset.loadRes(results), 'segm')
  with open(os.devnull, 'w') as devnull:
    stdout, sys.stdout = sys.stdout, devnull
    try:
      evaluator.evaluate()
      evaluator.accumulate()
      evaluator.summarize()
    finally:
      sys.stdout = stdout
  return evaluator.stats[0], evaluator.stats[1], evaluator.stats[2], float(np.mean(ious))


def quality(data_dir, sizes, coeffs, pca_specs):
  dataset = coco_api.COCO(os.path.join(data_dir, 'annotations', 'instances_val2017.json'))
  instances = _instances(dataset)
  print(f'{sum(len(i[2]) for i in instances)} non-crowd instances in {len(instances)} images')
  print('| coder | N | n_k | segm AP | AP50 | AP75 | mean IoU |')
  print('|---|---|---|---|---|---|---|')
  rows = []
  for size in sizes:
    for num in coeffs:
      rows.append(('dct', size, num, masks.DCTCoder(size, num)))
  ann_file = os.path.join(data_dir, 'annotations', 'instances_val2017.json')
  for size, num in pca_specs:
    crops = fit_pca.coco_crops(ann_file, size)
    rows.append(('pca (in-sample)', size, num, masks.PCACoder(pca.fit_pca(crops, num))))
  rows.append(('flatten', 28, 784, masks.FlattenCoder(28)))
  rows.append(('crop only (flatten)', 128, 128 * 128, masks.FlattenCoder(128)))
  for name, size, num, coder in rows:
    t0 = time.perf_counter()
    ap, ap50, ap75, miou = evaluate_coder(dataset, instances, coder)
    print(f'| {name} | {size} | {num} | {100 * ap:.1f} | {100 * ap50:.1f} | {100 * ap75:.1f} | '
          f'{miou:.4f} |  ({time.perf_counter() - t0:.0f} s)', flush=True)


# --- speed ------------------------------------------------------------------------------------
def loop_encode(mask, boxes, size, zigzag):
  """Official style: one mask at a time; crop, 2-D orthonormal DCT, zigzag gather."""
  out = []
  for m, b in zip(mask, boxes):
    crop = masks.crop_masks_np(m[None], b[None], size)[0]
    out.append(scipy.fft.dctn(crop.astype(np.float32), norm='ortho').reshape(-1)[zigzag])
  return out


def loop_decode_paste(vectors, boxes, hw, size, zigzag):
  """Official style: per mask zero-fill, idct, mid-range threshold, paste inside the box's range."""
  out = []
  for v, b in zip(vectors, boxes):
    full = np.zeros(size * size, np.float32)
    full[zigzag] = v
    rec = scipy.fft.idctn(full.reshape(size, size), norm='ortho')
    crop = rec > (rec.max() + rec.min()) / 2
    x0 = int(max(np.floor(b[0]) - 1, 0))
    y0 = int(max(np.floor(b[1]) - 1, 0))
    x1 = int(min(np.ceil(b[2]) + 1, hw[1]))
    y1 = int(min(np.ceil(b[3]) + 1, hw[0]))
    image = np.zeros(hw, bool)
    if x1 > x0 and y1 > y0:
      shifted = b - np.array([x0, y0, x0, y0], np.float32)
      image[y0:y1, x0:x1] = masks.paste_masks_np(crop[None], shifted[None], (y1 - y0, x1 - x0))[0]
    out.append(image)
  return out


def _canvas_chunks(instances):
  """All masks on a CANVAS x CANVAS canvas in chunks of CHUNK (zero-padded tail)."""
  mask = np.concatenate([np.pad(m, ((0, 0), (0, CANVAS - hw[0]), (0, CANVAS - hw[1])))
                         for _, hw, m, _, _ in instances])
  boxes = np.concatenate([b for *_, b, _ in instances])
  hws = np.concatenate([np.tile(hw, (len(m), 1)) for _, hw, m, _, _ in instances]).astype(np.int32)
  num = len(mask)
  mask, boxes, hws = (_pad_rows(a, CHUNK) for a in (mask, boxes, hws))
  hws[num:] = CANVAS
  chunks = [(jnp.asarray(mask[i:i + CHUNK]), jnp.asarray(boxes[i:i + CHUNK]),
             jnp.asarray(hws[i:i + CHUNK])) for i in range(0, len(mask), CHUNK)]
  return chunks, num


def speed(data_dir, rounds, size=128, num_coeffs=256):
  dataset = coco_api.COCO(os.path.join(data_dir, 'annotations', 'instances_val2017.json'))
  instances = _instances(dataset)
  coder = masks.DCTCoder(size, num_coeffs)
  zigzag = masks.zigzag_indices(size, num_coeffs)
  chunks, num = _canvas_chunks(instances)
  print(f'{num} instances, {len(chunks)} chunks of {CHUNK} on a {CANVAS}x{CANVAS} canvas; '
        f'{jax.device_count()} device(s), backend {jax.default_backend()}')

  encode = jax.jit(coder.encode)
  decode_paste = jax.jit(lambda v, b: masks.paste_masks(coder.decode(v), b, (CANVAS, CANVAS)))
  vectors = [encode(m, b, hw) for m, b, hw in chunks]
  # Check: the batched results equal the per-mask loop (up to float32 ties).
  got = np.concatenate([np.asarray(v) for v in vectors])[:num]
  want = np.concatenate([loop_encode(m, b, size, zigzag) for _, _, m, b, _ in instances])
  print(f'encode: max |batched - loop| = {np.abs(got - want).max():.2e}')
  first = instances[0]
  pasted = np.asarray(decode_paste(vectors[0], chunks[0][1]))[:len(first[2]), :first[1][0], :first[1][1]]
  ref = np.stack(loop_decode_paste(got[:len(first[2])], first[3], first[1], size, zigzag))
  print(f'decode+paste: {int((pasted != ref).sum())} differing pixels on image {first[0]}')

  per_image = [(got[sum(len(i[2]) for i in instances[:k]):][:len(inst[2])], inst) for k, inst in
               enumerate(instances)]
  fns = {
      'encode batched jnp': lambda: [encode(m, b, hw) for m, b, hw in chunks],
      'encode per-mask loop': lambda: [loop_encode(m, b, size, zigzag) for _, _, m, b, _ in instances],
      'decode+paste batched jnp': lambda: [decode_paste(v, c[1]) for v, c in zip(vectors, chunks)],
      'decode+paste per-mask loop': lambda: [loop_decode_paste(v, inst[3], inst[1], size, zigzag)
                                             for v, inst in per_image],
  }
  # Already compiled above (the check); the loops need no warm-up.
  med = timing.medians(fns, rounds, warmup=False)
  for name, sec in med.items():
    print(f'{name:28s} {sec:8.3f} s  {num / sec:9.0f} masks/s')
  print(f'encode speed-up:       {med["encode per-mask loop"] / med["encode batched jnp"]:.1f}x')
  print(f'decode+paste speed-up: '
        f'{med["decode+paste per-mask loop"] / med["decode+paste batched jnp"]:.1f}x')

  # The evaluation shape: 100 detections pasted at 800x1066.
  rng = np.random.default_rng(0)
  vec100 = jnp.asarray(np.concatenate([got] * 2)[:100])
  x0, y0 = rng.uniform(0, 800, 100), rng.uniform(0, 600, 100)
  box100 = np.stack([x0, y0, x0 + rng.uniform(10, 400, 100), y0 + rng.uniform(10, 300, 100)], 1)
  box100 = jnp.asarray(box100.astype(np.float32))
  def eval_paste(impl):
    fn = jax.jit(lambda v, b: masks.paste_masks(coder.decode(v), b, (800, 1066), impl=impl))
    jax.block_until_ready(fn(vec100, box100))
    return lambda: fn(vec100, box100)
  vec_np, box_np = np.asarray(vec100), np.asarray(box100)
  med = timing.medians({
      'tiled': eval_paste('tiled'), 'dense': eval_paste('dense'),
      'loop': lambda: loop_decode_paste(vec_np, box_np, (800, 1066), size, zigzag)},
      rounds, warmup=False)
  print(f'100 masks at 800x1066, decode+paste: jnp tiled {med["tiled"]:.3f} s, jnp dense '
        f'{med["dense"]:.3f} s, per-mask loop {med["loop"]:.3f} s '
        f'({med["loop"] / med["tiled"]:.1f}x); official PostProcess 0.33 s')


def crop_check(data_dir, torchvision_crops, size=128):
  """Count crop pixels that differ from torchvision's (crops saved by the fixture script's venv)."""
  dataset = coco_api.COCO(os.path.join(data_dir, 'annotations', 'instances_val2017.json'))
  instances = _instances(dataset)
  want = np.unpackbits(np.load(torchvision_crops)['crops'], axis=-1)[..., :size].astype(bool)
  got_np = np.concatenate([masks.crop_masks_np(m, b, size) for _, _, m, b, _ in instances])
  got_jnp = np.concatenate([np.asarray(masks.crop_masks(m, b, size)) for _, _, m, b, _ in instances])
  print(f'{len(want)} crops of {size}x{size} ({want.size} pixels): numpy twin vs torchvision '
        f'{int((got_np != want).sum())} px, jnp vs torchvision {int((got_jnp != want).sum())} px, '
        f'numpy vs jnp {int((got_np != got_jnp).sum())} px')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--part', choices=('quality', 'speed', 'crop_check'), default='speed')
  parser.add_argument('--data', default=DATA)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--sizes', default='64,96,128,256')
  parser.add_argument('--coeffs', default='144,256,300,400')
  parser.add_argument('--pca', default='28x256,64x256', help='NxK list of PCA coders')
  parser.add_argument('--torchvision_crops', default='')
  args = parser.parse_args()
  if not os.path.isdir(args.data):
    raise SystemExit(f'dataset not found: {args.data}')
  if args.part == 'quality':
    pca_specs = [tuple(int(v) for v in s.split('x')) for s in args.pca.split(',') if s]
    quality(args.data, [int(v) for v in args.sizes.split(',')],
            [int(v) for v in args.coeffs.split(',')], pca_specs)
  elif args.part == 'speed':
    speed(args.data, args.rounds)
  else:
    crop_check(args.data, args.torchvision_crops)


if __name__ == '__main__':
  main()
