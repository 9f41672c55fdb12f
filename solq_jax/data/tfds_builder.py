"""Writes a COCO-format dataset as an ArrayRecord TFDS dataset in the LVIS layout, without TF.

A dev tool (used by the tests on the generated shapes dataset; also a way to put a user's own
COCO-format data into TFDS):

    write_tfds(coco_root, {'train': 'train2017', 'validation': 'val2017'}, data_dir,
               name='solq_shapes')

gives `data_dir/solq_shapes/1.0.0/` (dataset_info.json, features.json, label names, ArrayRecord
shards) that `tfds.data_source('solq_shapes', data_dir=...)` and `solq_jax.data.tfds` read.
Features, as tfds's `lvis`: `image` (the image file's bytes, unchanged), `image/id`,
`neg_category_ids` / `not_exhaustive_category_ids` (empty), `objects` = Sequence of `id`,
`area` (mask pixels), `bbox` (normalised ymin, xmin, ymax, xmax), `label` (ClassLabel,
category id - 1, so ids need not be contiguous: unused ids get placeholder names) and
`segmentation` (PNG Image [H,W,1], 255 inside). Objects are the COCO source's instances (crowd,
degenerate and empty ones dropped), so both sources give identical targets.

Why no TensorFlow is needed: tfds encodes `Image` features from bytes or PIL images with pillow
(only numpy arrays go through `tf.image.encode_*`), serialises `tf.train.Example` with its own
protobuf copy, and writes ArrayRecord with `array_record`.
"""
import json
import logging
import pathlib

import numpy as np
from PIL import Image

from solq_jax.data import coco as coco_source
from solq_jax.data import tfds as tfds_source

log = logging.getLogger(__name__)


def lvis_features(label_names):
  """The tfds `FeaturesDict` of the LVIS layout with the given label names."""
  tfds = tfds_source._import_tfds()  # pylint: disable=protected-access
  label = tfds.features.ClassLabel(names=list(label_names))
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(encoding_format='jpeg'),
      'image/id': np.int64,
      'neg_category_ids': tfds.features.Sequence(label),
      'not_exhaustive_category_ids': tfds.features.Sequence(label),
      'objects': tfds.features.Sequence({
          'id': np.int64,
          'area': np.int64,
          'bbox': tfds.features.BBoxFeature(),
          'label': label,
          'segmentation': tfds.features.Image(shape=(None, None, 1)),
      }),
  })


def label_names(categories):
  """ClassLabel names for category ids 1..max id (label = id - 1); gaps get 'unused_<id>'."""
  by_id = {int(c['id']): c['name'] for c in categories}
  if not by_id or min(by_id) < 1:
    raise coco_source.DataError(f'category ids must be >= 1 (label = id - 1), got {sorted(by_id)}')
  return [by_id.get(i, f'unused_{i}') for i in range(1, max(by_id) + 1)]


def coco_examples(source):
  """(key, LVIS-layout example) of every image of a `coco.CocoSource`."""
  tfds = tfds_source._import_tfds()  # pylint: disable=protected-access
  for index in range(len(source)):
    image_id = int(source.image_ids[index])
    h, w = source.hw(index)
    t = source.annotations(index)
    objects = []
    for k, (mask, box, cat) in enumerate(zip(t['masks'], t['boxes'], t['labels'])):
      x0, y0, x1, y1 = (float(v) for v in box)
      objects.append({
          'id': image_id * 1000 + k,
          'area': int(mask.sum()),
          'bbox': tfds.features.BBox(ymin=y0 / h, xmin=x0 / w, ymax=y1 / h, xmax=x1 / w),
          'label': int(cat) - 1,
          'segmentation': Image.fromarray(mask.astype(np.uint8) * 255),
      })
    yield image_id, {'image': source.path(index).read_bytes(), 'image/id': image_id,
                     'neg_category_ids': [], 'not_exhaustive_category_ids': [],
                     'objects': objects}


def write_tfds(coco_root, splits, data_dir, name='solq_shapes', version='1.0.0'):
  """Writes the COCO splits `{tfds split: coco split}` of `coco_root` to `data_dir/name/`.

  Returns the builder's data dir (`data_dir/name/version`). An existing prepared copy is kept
  (tfds skips preparation), so delete it to rewrite.
  """
  tfds = tfds_source._import_tfds()  # pylint: disable=protected-access
  sources = {s: coco_source.CocoSource(coco_root, c) for s, c in splits.items()}
  with open(next(iter(sources.values())).ann_file) as f:
    categories = json.load(f)['categories']
  features = lvis_features(label_names(categories))
  dataset_name, dataset_version = name, version

  class _Writer(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """LVIS-layout builder over COCO-format sources."""
    name = dataset_name
    VERSION = tfds.core.Version(dataset_version)
    # No code folder (no checksums to look up): tfds would otherwise resolve this module's
    # resource path, which needs the `importlib_resources` backport.
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=features,
          description=f'COCO-format data from {coco_root} in the LVIS feature layout')

    def _split_generators(self, dl_manager):
      del dl_manager
      return {s: self._generate_examples(s) for s in sources}

    def _generate_examples(self, split):
      yield from coco_examples(sources[split])

  builder = _Writer(data_dir=str(data_dir), file_format='array_record')
  with _quiet_absl():
    builder.download_and_prepare()
  return pathlib.Path(builder.data_dir)


class _quiet_absl:  # pylint: disable=invalid-name
  """Lowers absl's log level while tfds prepares (it logs every step at INFO)."""

  def __enter__(self):
    self.logger = logging.getLogger('absl')
    self.level = self.logger.level
    self.logger.setLevel(logging.WARNING)

  def __exit__(self, *exc):
    self.logger.setLevel(self.level)

