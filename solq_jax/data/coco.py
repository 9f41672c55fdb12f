"""A COCO-format instance-segmentation source (standard layout, read with pycocotools).

`root/annotations/instances_<split>.json` and the images in `root/<split>/`. Each record becomes
a sample (see `transforms.py`) exactly as the official `ConvertCocoPolysToMask`: crowd
annotations dropped, polygons / RLEs decoded to full-image masks (union of the parts), xywh boxes
converted to xyxy and clamped to the image, zero-width or zero-height boxes dropped, raw category
ids as labels.

Bad input, decided per case:
* json missing, an annotation with a category id absent from `categories`, a category id the
  model cannot predict (>= `model.num_classes`), images missing on disk: `DataError` at
  construction, naming the file / ids.
* an image that does not decode (truncated, corrupt) or whose size disagrees with the json:
  `DataError` naming the file, raised when it is loaded.
* grayscale, CMYK, RGBA, palette images: converted to RGB (as the official `convert('RGB')`).
* polygon parts with fewer than 3 points or an odd number of coordinates: dropped, logged
  (pycocotools would read a 4-number part as a box, silently wrong); an instance whose mask is
  then empty (zero-area polygon): dropped, logged.
* boxes partly outside the image: clamped (official); fully outside, or of non-positive width
  or height: dropped, counted in the log once per run (as empty polygons, `[]` or `[[]]`).
* evaluation scores against ground truth with the same instances dropped
  (`json_drop_reason`, `annotation_mask`).
* images with no annotations: kept (DETR trains on empty images).
"""
import contextlib
import io
import json
import logging
import pathlib

import numpy as np
from PIL import Image
from pycocotools import coco as coco_api
from pycocotools import mask as mask_api

log = logging.getLogger(__name__)


class DataError(ValueError):
  """Bad dataset input; the message names the offending file or annotation."""


def _valid_polygon_parts(segm, ann_id):
  parts = [p for p in segm if len(p) >= 6 and len(p) % 2 == 0]
  if len(parts) != len(segm):
    log.warning('annotation %s: dropped %d degenerate polygon part(s) (< 3 points or odd length)',
                ann_id, len(segm) - len(parts))
  return parts


# Why a non-crowd instance is dropped; the same rules decide the training targets and the
# ground truth that evaluation scores against (`solq_jax.inference.coco_eval.load_coco_gt`).
NO_BOX = 'box with no area inside the image (non-positive width/height, or outside)'
EMPTY_POLYGON = 'empty polygon (no part with >= 3 points)'
EMPTY_MASK = 'mask with no pixel'


def clamped_box(bbox, h, w):
  """xywh -> xyxy in float32, clamped to the image (as the official code); None if empty."""
  box = np.array(bbox, np.float32)
  box[2:] += box[:2]
  box[0::2] = np.clip(box[0::2], 0, w)
  box[1::2] = np.clip(box[1::2], 0, h)
  return box if box[2] > box[0] and box[3] > box[1] else None


def json_drop_reason(ann, h, w):
  """The reason a non-crowd annotation is dropped that the json alone shows (no mask is
  decoded), or None."""
  if clamped_box(ann['bbox'], h, w) is None:
    return NO_BOX
  segm = ann['segmentation']
  if isinstance(segm, list) and not any(len(p) >= 6 and len(p) % 2 == 0 for p in segm):
    return EMPTY_POLYGON
  return None


def log_drops(source, counts, examples) -> None:
  """One log line per reason: how many instances of `source` it dropped, and an example id."""
  for reason, n in sorted(counts.items()):
    log.warning('%s: dropped %d instance(s): %s (e.g. annotation %s)', source, n, reason,
                examples[reason])


def annotation_mask(segm, h, w, ann_id):
  """Full-image bool mask of a COCO segmentation (polygons or RLE); None if it is empty."""
  if isinstance(segm, list):
    parts = _valid_polygon_parts(segm, ann_id)
    if not parts:
      return None
    rle = mask_api.merge(mask_api.frPyObjects(parts, h, w))
  elif isinstance(segm, dict) and isinstance(segm.get('counts'), list):
    rle = mask_api.frPyObjects(segm, h, w)
  elif isinstance(segm, dict):
    rle = segm
  else:
    raise DataError(f'annotation {ann_id}: unsupported segmentation {type(segm).__name__}')
  mask = mask_api.decode(rle).astype(bool)
  if mask.shape != (h, w):
    raise DataError(f'annotation {ann_id}: RLE size {mask.shape} differs from the image {(h, w)}')
  return mask if mask.any() else None


def load_rgb(path, image_id):
  """Decode an image file to PIL RGB; a clear `DataError` naming the file when it fails."""
  try:
    with Image.open(path) as im:
      im.load()
      return im.convert('RGB')
  except FileNotFoundError as e:
    raise DataError(f'image file missing: {path} (image id {image_id})') from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f'cannot decode image {path} (image id {image_id}): {e}') from e


def _compact(anns):
  """An image's annotations (the fields the source reads) as one json-encoded bytes blob."""
  keys = ('id', 'bbox', 'segmentation', 'category_id', 'iscrowd')
  return json.dumps([{k: a.get(k) for k in keys} for a in anns]).encode()



def instances(masks, boxes, labels, h, w):
  """The per-image targets record every source returns: bool masks [N,h,w], float32 xyxy boxes
  [N,4] and int32 labels [N] (well-formed empty arrays when N = 0)."""
  return dict(
      masks=np.stack(masks) if masks else np.zeros((0, h, w), bool),
      boxes=np.stack(boxes).astype(np.float32) if boxes else np.zeros((0, 4), np.float32),
      labels=np.array(labels, np.int32))

class CocoSource:
  """Random access to the samples of one split of a COCO-format dataset."""

  def __init__(self, root, split, num_classes=None, check_files=True):
    self.root = pathlib.Path(root)
    self.split = split
    self.ann_file = self.root / 'annotations' / f'instances_{split}.json'
    self.image_dir = self.root / split
    if not self.ann_file.exists():
      raise DataError(f'annotation file not found: {self.ann_file} (expected the COCO layout '
                      f'root/annotations/instances_<split>.json; data.root={root!r})')
    coco = self._load_json()
    self._validate_categories(coco, num_classes)
    self.image_ids = np.array(sorted(coco.imgs), np.int64)
    imgs = [coco.imgs[int(i)] for i in self.image_ids]
    self.heights = np.array([im['height'] for im in imgs], np.int64)
    self.widths = np.array([im['width'] for im in imgs], np.int64)
    self.file_names = [im['file_name'] for im in imgs]
    bad = np.flatnonzero((self.heights < 1) | (self.widths < 1))
    if bad.size:
      raise DataError(f'{self.ann_file}: image {self.file_names[bad[0]]} (id '
                      f'{self.image_ids[bad[0]]}) has size {self.heights[bad[0]]}x'
                      f'{self.widths[bad[0]]} (h x w); {bad.size} image(s) with an empty size')
    self.category_ids = sorted(coco.cats)
    # Each image's annotations as one json blob: a compact, cheaply pickled copy for the grain
    # workers (the parsed pycocotools index of COCO train2017 takes gigabytes per process).
    self._annotations = [_compact(coco.imgToAnns.get(int(i), [])) for i in self.image_ids]
    self._log_json_drops(coco)
    if check_files:
      self._check_files()

  def _log_json_drops(self, coco):
    """Counts, once per run, the instances `annotations` drops for a reason the json shows
    (it drops them silently at every load)."""
    counts, examples = {}, {}
    for ann in coco.anns.values():
      im = coco.imgs.get(ann['image_id'])
      if ann.get('iscrowd') or im is None:
        continue
      reason = json_drop_reason(ann, im['height'], im['width'])
      if reason:
        counts[reason] = counts.get(reason, 0) + 1
        examples.setdefault(reason, ann['id'])
    log_drops(self.ann_file, counts, examples)

  def _load_json(self):
    with contextlib.redirect_stdout(io.StringIO()):
      try:
        return coco_api.COCO(str(self.ann_file))
      except ValueError as e:  # json.JSONDecodeError
        raise DataError(f'cannot parse {self.ann_file}: {e}') from e

  def _validate_categories(self, coco, num_classes):
    known = set(coco.cats)
    for ann in coco.anns.values():
      if ann['category_id'] not in known:
        raise DataError(
            f'{self.ann_file}: annotation {ann["id"]} (image {ann["image_id"]}) has category id '
            f'{ann["category_id"]}, which is not in the json\'s "categories" '
            f'(known ids: {sorted(known)})')
    if num_classes is not None and known and max(known) >= num_classes:
      raise DataError(
          f'{self.ann_file}: category id {max(known)} needs config.model.num_classes > '
          f'{max(known)} (labels are raw category ids), but it is {num_classes}')

  def _check_files(self):
    missing = [n for n in self.file_names if not (self.image_dir / n).is_file()]
    if missing:
      raise DataError(f'{len(missing)} image file(s) listed in {self.ann_file} are missing from '
                      f'{self.image_dir}, e.g. {missing[:5]}')

  def __len__(self):
    return len(self.image_ids)

  def hw(self, index):
    """(h, w) of record `index` as the json states it (no decoding)."""
    return int(self.heights[index]), int(self.widths[index])

  def path(self, index):
    return self.image_dir / self.file_names[index]

  def annotations(self, index):
    """Targets of record `index` from the json alone: masks, boxes (xyxy), labels."""
    image_id = int(self.image_ids[index])
    h, w = self.hw(index)
    masks, boxes, labels = [], [], []
    for ann in json.loads(self._annotations[index]):
      if ann['iscrowd']:
        continue
      if json_drop_reason(ann, h, w):
        continue   # counted in the log at construction
      box = clamped_box(ann['bbox'], h, w)
      mask = annotation_mask(ann['segmentation'], h, w, ann['id'])
      if mask is None:
        log.warning('annotation %s (image %s): dropped: %s', ann['id'], image_id, EMPTY_MASK)
        continue
      masks.append(mask)
      boxes.append(box)
      labels.append(ann['category_id'])
    return instances(masks, boxes, labels, h, w)

  def load(self, index):
    """Sample of record `index`: PIL RGB image, masks, boxes, labels, image_id, orig_size."""
    image_id = int(self.image_ids[index])
    path = self.path(index)
    image = load_rgb(path, image_id)
    if (image.height, image.width) != self.hw(index):
      raise DataError(f'{path}: image is {image.height}x{image.width} (h x w) but {self.ann_file} '
                      f'says {self.hw(index)[0]}x{self.hw(index)[1]} (image id {image_id})')
    sample = self.annotations(index)
    sample.update(image=image, image_id=image_id, orig_size=np.array(self.hw(index), np.int32))
    return sample
