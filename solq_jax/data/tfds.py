"""A TFDS instance-segmentation source (LVIS feature layout), read without TensorFlow.

The dataset must have been prepared as ArrayRecord (`file_format='array_record'`), which
`tfds.data_source` reads with random access and tfds's numpy example parser (images decoded by
pillow). `TfdsSource` has the interface of `coco.CocoSource` (`__len__`, `hw`, `path`,
`annotations`, `load`), so the same transforms, targets and batches apply unchanged:

    source = TfdsSource(config.data, config.data.tfds_val_split, config.model.num_classes)
    pipe = eval_pipeline(config, coder, source=source)
    coco_gt = source.coco_gt       # in-memory pycocotools COCO (RLE masks) for COCOeval

Features are found through `data.tfds_*_key` (defaults: the LVIS layout of `tfds`'s `lvis`):
`image` (Image), `image/id` (int), `objects/bbox` (BBoxFeature, normalised ymin,xmin,ymax,xmax),
`objects/label` (ClassLabel, 0-based), `objects/segmentation` (per-object Image [H,W,1]).
Per image, as the COCO source: boxes scaled to pixels (xyxy) and clamped to the image, objects
with a zero-width or zero-height box or an empty mask dropped (logged), crowd objects dropped
when `data.tfds_crowd_key` names a feature. Labels: model class index = TFDS label +
`data.tfds_label_offset` (LVIS: label + 1 = the LVIS category id); `label_map()` records it.
"""
import contextlib
import hashlib
import io
import json
import logging
import pathlib

import numpy as np
from PIL import Image
from pycocotools import coco as coco_api
from pycocotools import mask as mask_api

from solq_jax.data import coco as coco_source

log = logging.getLogger(__name__)

DataError = coco_source.DataError


def _import_tfds():
  try:
    import tensorflow_datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("data.source='tfds' needs tensorflow-datasets and array-record: "
                      "pip install 'solq-jax[tfds]' (TensorFlow itself is not needed)") from e
  return tensorflow_datasets


def lookup(tree, key):
  """`tree[key]` for a '/'-joined feature key, in a nested dict or a tfds FeaturesDict.

  A key is matched whole first ('image/id' is one top-level key in LVIS), then split at each
  '/' (left to right) into a key of this level and the rest of a nested one; tfds `Sequence`
  features are entered through their `.feature`. Raises KeyError when nothing matches.
  """
  tree = getattr(tree, 'feature', tree)
  if key in tree:
    return tree[key]
  parts = key.split('/')
  for i in range(1, len(parts)):
    head = '/'.join(parts[:i])
    if head in tree:
      try:
        return lookup(tree[head], '/'.join(parts[i:]))
      except (KeyError, TypeError):
        continue
  raise KeyError(key)


def _mapped_keys(data_config):
  d = data_config
  keys = dict(image=d.tfds_image_key, id=d.tfds_id_key, bbox=d.tfds_bbox_key,
              label=d.tfds_label_key, mask=d.tfds_mask_key, crowd=d.tfds_crowd_key)
  for field in ('image', 'bbox', 'label', 'mask'):
    if not keys[field]:
      raise DataError(f'data.tfds_{field}_key is empty: the TFDS source needs that feature')
  return keys


def _split_name(data_config, split):
  """The TFDS split for a pipeline split name: data.train_split / data.val_split are mapped
  to data.tfds_train_split / data.tfds_val_split; any other name is a TFDS split as is."""
  d = data_config
  return {d.train_split: d.tfds_train_split, d.val_split: d.tfds_val_split}.get(split, split)


def open_builder(data_config):
  """The prepared tfds builder of `data.tfds_name` in `data.tfds_data_dir` (no download)."""
  tfds = _import_tfds()
  d = data_config
  if not d.tfds_data_dir:
    raise DataError("data.source='tfds' needs data.tfds_data_dir (the folder that holds "
                    f'{d.tfds_name}/<version>/); it is empty')
  data_dir = pathlib.Path(d.tfds_data_dir).expanduser()
  if not data_dir.is_dir():
    raise DataError(f'data.tfds_data_dir={d.tfds_data_dir!r} is not a directory')
  base = d.tfds_name.split(':')[0].split('/')[0]
  if not (data_dir / base).is_dir():
    found = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and p.name != 'downloads')
    raise DataError(f'TFDS dataset {d.tfds_name!r} (data.tfds_name) is not in data.tfds_data_dir='
                    f'{str(data_dir)!r}; datasets there: {found}. Prepare it first (README: TFDS)')
  try:
    builder = tfds.builder(d.tfds_name, data_dir=str(data_dir))
  except Exception as e:  # DatasetNotFoundError, bad version / config
    raise DataError(f'cannot open TFDS dataset {d.tfds_name!r} in {str(data_dir)!r}: '
                    f'{str(e).splitlines()[0]}') from e
  if not builder.is_prepared():
    raise DataError(f'TFDS dataset {d.tfds_name!r} is not prepared in {str(data_dir)!r} '
                    f'(no dataset_info.json under {builder.data_dir})')
  file_format = str(getattr(builder.info.file_format, 'value', builder.info.file_format))
  if file_format != 'array_record':
    raise DataError(f'TFDS dataset {d.tfds_name!r} in {builder.data_dir} is stored as '
                    f'{file_format!r}; random access without TensorFlow needs array_record '
                    '(re-prepare with file_format="array_record", or convert it with '
                    '`tfds convert_format`)')
  return builder


class TfdsSource:
  """Random access to the samples of one split of an ArrayRecord TFDS dataset."""

  def __init__(self, data_config, split, num_classes=None):
    self.data_config = data_config
    self.keys = _mapped_keys(data_config)
    self.builder = open_builder(data_config)
    self.name = data_config.tfds_name
    self.split = _split_name(data_config, split)
    splits = self.builder.info.splits
    if self.split not in splits:
      raise DataError(f'TFDS dataset {self.name!r} has no split {self.split!r} (from {split!r}); '
                      f'its splits: {sorted(splits)}')
    features = self.builder.info.features
    for field, key in self.keys.items():
      if not key:
        continue
      try:
        lookup(features, key)
      except (KeyError, TypeError):
        raise DataError(f'data.tfds_{field}_key={key!r} names no feature of TFDS dataset '
                        f'{self.name!r} (its features: {_feature_keys(features)})') from None
    label_feature = lookup(features, self.keys['label'])
    names = getattr(label_feature, 'names', None)
    if not names:
      raise DataError(f'{self.keys["label"]!r} of {self.name!r} is not a ClassLabel feature; '
                      'the label count and names come from it')
    self.label_names = list(names)
    self.box_decimals = int(data_config.tfds_box_decimals)
    self.label_offset = int(data_config.tfds_label_offset)
    if self.label_offset < 0:
      raise DataError(f'data.tfds_label_offset must be >= 0, got {self.label_offset}')
    top = len(self.label_names) - 1 + self.label_offset
    if num_classes is not None and top >= num_classes:
      raise DataError(
          f'TFDS dataset {self.name!r} has {len(self.label_names)} labels, mapped to class '
          f'indices {self.label_offset}..{top} (data.tfds_label_offset={self.label_offset}); '
          f'config.model.num_classes must be > {top}, but it is {num_classes}')
    self.builder_dir = str(self.builder.data_dir)
    self._num = int(splits[self.split].num_examples)
    self._ds = None
    self._coco = None
    self._sizes = None

  def __getstate__(self):  # grain workers reopen the ArrayRecord files lazily
    state = dict(self.__dict__)
    state.update(_ds=None, _coco=None, builder=None)
    return state

  @property
  def ds(self):
    if self._ds is None:
      self._ds = _import_tfds().data_source(self.name, split=self.split, download=False,
                                            data_dir=str(self.data_config.tfds_data_dir))
    return self._ds

  def __len__(self):
    return self._num

  @property
  def categories(self):
    """COCO-style categories: `{'id': class index, 'name': label name}` for every label."""
    return [{'id': i + self.label_offset, 'name': n} for i, n in enumerate(self.label_names)]

  def label_map(self):
    """The dataset label -> model class mapping (json-able; store it with the checkpoint)."""
    return {'source': 'tfds', 'tfds_name': self.name, 'label_key': self.keys['label'],
            'label_offset': self.label_offset, 'num_labels': len(self.label_names),
            'categories': self.categories}

  def path(self, index):
    return f'tfds:{self.name}/{self.split}[{int(index)}]'

  def _raw_image(self, index):
    """Encoded image bytes of record `index`, from the serialized example (no decoding)."""
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
    example = tf_example_pb2.Example.FromString(self.ds.data_source[int(index)])
    feature = example.features.feature.get(self.keys['image'])
    if feature is None or not feature.bytes_list.value:
      raise DataError(f'{self.path(index)}: no image bytes under {self.keys["image"]!r}')
    return feature.bytes_list.value[0]

  def _size_cache_file(self):
    d = self.data_config
    tag = json.dumps([self.builder_dir, self.split, self._num, self.keys['image']])
    digest = hashlib.sha256(tag.encode()).hexdigest()[:12]
    safe = self.name.replace('/', '_').replace(':', '_')
    return pathlib.Path(d.cache_dir) / 'tfds_sizes' / f'{safe}_{self.split}_{digest}.npy'

  def sizes(self):
    """int64 [N, 2] (h, w) of every record: image headers only, cached in `data.cache_dir`."""
    if self._sizes is not None:
      return self._sizes
    cache = self._size_cache_file()
    if cache.is_file():
      sizes = np.load(cache)
      if sizes.shape == (self._num, 2):
        self._sizes = sizes
        return sizes
    sizes = np.zeros((self._num, 2), np.int64)
    for i in range(self._num):
      try:
        with Image.open(io.BytesIO(self._raw_image(i))) as im:
          sizes[i] = im.height, im.width
      except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f'{self.path(i)}: cannot read the image header: {e}') from e
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f'.tmp{np.random.default_rng().integers(1 << 30)}.npy')
    np.save(tmp, sizes)
    tmp.replace(cache)
    self._sizes = sizes
    return sizes

  def hw(self, index):
    """(h, w) of record `index` (from the image header, not decoded)."""
    h, w = self.sizes()[int(index)]
    return int(h), int(w)

  def _example(self, index):
    try:
      return self.ds[int(index)]
    except Exception as e:  # corrupt record or undecodable image
      raise DataError(f'{self.path(index)}: cannot decode the example: {e}') from e

  def _image_id(self, example, index):
    if not self.keys['id']:
      return int(index) + 1
    return int(lookup(example, self.keys['id']))

  def _targets(self, example, index, h, w):
    """masks bool [N,H,W], boxes float32 [N,4] (abs xyxy, clamped), labels int32 [N]."""
    bbox = np.asarray(lookup(example, self.keys['bbox']), np.float64).reshape(-1, 4)
    labels = np.asarray(lookup(example, self.keys['label']), np.int64).reshape(-1)
    masks = lookup(example, self.keys['mask'])
    crowd = (np.asarray(lookup(example, self.keys['crowd'])).reshape(-1) != 0
             if self.keys['crowd'] else np.zeros(len(labels), bool))
    if not len(bbox) == len(labels) == len(masks) == len(crowd):
      raise DataError(f'{self.path(index)}: {len(bbox)} boxes, {len(labels)} labels, '
                      f'{len(masks)} masks, {len(crowd)} crowd flags: the object features differ '
                      'in length')
    # normalised (ymin, xmin, ymax, xmax) -> absolute (x0, y0, x1, y1), clamped to the image
    xyxy = bbox[:, [1, 0, 3, 2]] * np.array([w, h, w, h], np.float64)
    if self.box_decimals >= 0:  # undo the float32 normalisation error (see data_config)
      xyxy = np.round(xyxy, self.box_decimals)
    xyxy = xyxy.astype(np.float32)
    xyxy[:, 0::2] = np.clip(xyxy[:, 0::2], 0, w)
    xyxy[:, 1::2] = np.clip(xyxy[:, 1::2], 0, h)
    keep_m, keep_b, keep_l = [], [], []
    for k in range(len(labels)):
      if crowd[k]:
        continue
      box = xyxy[k]
      if not (box[2] > box[0] and box[3] > box[1]):
        continue
      mask = np.asarray(masks[k])
      mask = (mask[..., 0] if mask.ndim == 3 else mask) != 0
      if mask.shape != (h, w):
        raise DataError(f'{self.path(index)}: object {k} mask is {mask.shape}, the image {(h, w)}')
      if not mask.any():
        log.warning('%s: object %d has an empty mask, dropped', self.path(index), k)
        continue
      if not 0 <= labels[k] < len(self.label_names):
        raise DataError(f'{self.path(index)}: object {k} label {labels[k]} outside the '
                        f'{len(self.label_names)} labels of {self.keys["label"]!r}')
      keep_m.append(mask)
      keep_b.append(box)
      keep_l.append(labels[k] + self.label_offset)
    return coco_source.instances(keep_m, keep_b, keep_l, h, w)

  def annotations(self, index):
    """Targets of record `index`: masks, boxes (xyxy), labels (model class indices)."""
    h, w = self.hw(index)
    return self._targets(self._example(index), index, h, w)

  def load(self, index):
    """Sample of record `index`: PIL RGB image, masks, boxes, labels, image_id, orig_size."""
    example = self._example(index)
    pixels = np.asarray(lookup(example, self.keys['image']))
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
      pixels = pixels[..., 0]
    image = Image.fromarray(pixels).convert('RGB')
    h, w = image.height, image.width
    if (h, w) != self.hw(index):
      raise DataError(f'{self.path(index)}: decoded image is {h}x{w}, its header says '
                      f'{self.hw(index)} (stale size cache {self._size_cache_file()}?)')
    sample = self._targets(example, index, h, w)
    sample.update(image=image, image_id=self._image_id(example, index),
                  orig_size=np.array((h, w), np.int32))
    return sample

  @property
  def coco_gt(self):
    """The split's ground truth as an in-memory pycocotools `COCO` (RLE masks)."""
    if self._coco is None:
      self._coco = ground_truth_coco(self)
    return self._coco


def _feature_keys(features, prefix=''):
  out = []
  tree = getattr(features, 'feature', features)
  for k in tree.keys():
    sub = tree[k]
    inner = getattr(sub, 'feature', sub)
    if hasattr(inner, 'keys') and callable(inner.keys):
      out += _feature_keys(inner, f'{prefix}{k}/')
    else:
      out.append(prefix + k)
  return out


def ground_truth_coco(source, num_images=None):
  """pycocotools `COCO` of the first `num_images` records (all by default) of a source.

  Instances are the source's own targets (crowd, degenerate and empty objects already
  dropped): `segmentation` an RLE of the mask, `bbox` xywh of the box, `area` the mask's pixel
  count, `iscrowd` 0, `category_id` the model class index. Categories: `source.categories`.
  """
  n = len(source) if num_images is None else min(int(num_images), len(source))
  images, annotations = [], []
  ids = set()
  for index in range(n):
    example = source._example(index)  # pylint: disable=protected-access
    h, w = source.hw(index)
    image_id = source._image_id(example, index)  # pylint: disable=protected-access
    if image_id in ids:
      raise DataError(f'{source.path(index)}: image id {image_id} repeats '
                      f'({source.keys["id"]!r} must be unique for evaluation)')
    ids.add(image_id)
    images.append({'id': image_id, 'height': h, 'width': w, 'file_name': source.path(index)})
    t = source._targets(example, index, h, w)  # pylint: disable=protected-access
    for mask, box, label in zip(t['masks'], t['boxes'], t['labels']):
      rle = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
      rle['counts'] = rle['counts'].decode('ascii')
      x0, y0, x1, y1 = (float(v) for v in box)
      annotations.append({'id': len(annotations) + 1, 'image_id': image_id,
                          'category_id': int(label), 'segmentation': rle,
                          'area': float(mask.sum()), 'bbox': [x0, y0, x1 - x0, y1 - y0],
                          'iscrowd': 0})
  gt = coco_api.COCO()
  gt.dataset = {'images': images, 'annotations': annotations,
                'categories': source.categories}
  with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
  return gt


def build_source(config, split):
  """The TFDS source of pipeline split `split` (see `_split_name`) for `config`."""
  return TfdsSource(config.data, split, num_classes=config.model.num_classes)
