"""The TFDS source (solq_jax/data/tfds.py) against the COCO source, without TensorFlow.

The generated shapes dataset is written once (module fixture) as COCO json and, by
`tfds_builder.write_tfds`, as an ArrayRecord TFDS dataset in the LVIS layout; both are read back
and compared image by image.
"""
import json
import pickle
import sys

import numpy as np
import pytest

pytest.importorskip('tensorflow_datasets')
pytest.importorskip('array_record')

from pycocotools import mask as mask_api  # noqa: E402

from solq_jax import masks as masks_lib  # noqa: E402
from solq_jax.data import coco  # noqa: E402
from solq_jax.data import pipeline  # noqa: E402
from solq_jax.data import synthetic  # noqa: E402
from solq_jax.data import targets as targets_lib  # noqa: E402
from solq_jax.data import tfds as tfds_source  # noqa: E402
from solq_jax.data import tfds_builder  # noqa: E402
from solq_jax.data import transforms  # noqa: E402
import train_micro_config  # noqa: E402


def _train_pipeline(config, **kwargs):
  return pipeline.train_pipeline(config, masks_lib.build_coder(config.model), **kwargs)


def _eval_pipeline(config, **kwargs):
  return pipeline.eval_pipeline(config, masks_lib.build_coder(config.model), **kwargs)


NAME = 'solq_shapes'
SPLITS = {'train': 'train2017', 'validation': 'val2017'}


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """(coco root, tfds data_dir, cache dir) of a small generated dataset, in both formats."""
  base = tmp_path_factory.mktemp('tfds_data')
  root = base / 'coco'
  synthetic.write_split(root, 'train2017', 8, seed=3, min_size=64, max_size=96)
  synthetic.write_split(root, 'val2017', 6, seed=4, min_size=64, max_size=96)
  data_dir = base / 'tfds'
  out = tfds_builder.write_tfds(root, SPLITS, data_dir, name=NAME)
  assert (out / 'dataset_info.json').is_file()
  assert list(out.glob(f'{NAME}-validation.array_record-*'))
  return root, data_dir, base / 'cache'


def make_config(dataset, **data):
  root, data_dir, cache = dataset
  config = train_micro_config.get_config()
  d = config.data
  d.root = str(root)
  d.cache_dir = str(cache)
  d.tfds_name = NAME
  d.tfds_data_dir = str(data_dir)
  for k, v in data.items():
    setattr(d, k, v)
  return config


def tfds_config(dataset, **data):
  return make_config(dataset, source='tfds', **data)


def pairs(dataset, split='val2017'):
  """(tfds source, coco source, [(tfds index, coco index)] matched by image id)."""
  config = tfds_config(dataset)
  t = tfds_source.build_source(config, split)
  c = coco.CocoSource(dataset[0], split)
  where = {int(i): j for j, i in enumerate(c.image_ids)}
  return t, c, [(i, where[t.load(i)['image_id']]) for i in range(len(t))]


def test_no_tensorflow_needed(dataset):
  """Everything here (writing included) ran without TensorFlow being imported."""
  pairs(dataset)
  assert 'tensorflow' not in sys.modules


def test_pickled_source_reads_the_same(dataset):
  """grain workers get a pickled copy: it reopens the files and gives the same samples."""
  t, _, _ = pairs(dataset)
  t.sizes()
  copy = pickle.loads(pickle.dumps(t))
  assert copy._ds is None and copy.builder is None  # pylint: disable=protected-access
  for i in range(len(t)):
    a, b = t.load(i), copy.load(i)
    assert a['image_id'] == b['image_id']
    np.testing.assert_array_equal(a['masks'], b['masks'])


def test_records_equal_coco(dataset):
  """Same images (pixels), sizes, ids, masks, labels and boxes as the COCO json, per image."""
  t, c, matched = pairs(dataset)
  assert len(t) == len(c) == 6
  assert sorted(j for _, j in matched) == list(range(len(c)))
  num_instances = 0
  for i, j in matched:
    a, b = t.load(i), c.load(j)
    assert t.hw(i) == c.hw(j)
    np.testing.assert_array_equal(a['orig_size'], b['orig_size'])
    np.testing.assert_array_equal(np.asarray(a['image']), np.asarray(b['image']))
    np.testing.assert_array_equal(a['masks'], b['masks'])
    np.testing.assert_array_equal(a['labels'], b['labels'])
    np.testing.assert_array_equal(a['boxes'], b['boxes'])  # data.tfds_box_decimals=2
    num_instances += len(b['labels'])
  assert num_instances >= len(c)  # the comparison saw objects, not just empty images


def test_targets_equal_coco_after_augmentation(dataset):
  """The train plan (flip, resizes, crop) and the targets (boxes, labels, DCT vectors) agree."""
  config = tfds_config(dataset)
  coder = masks_lib.build_coder(config.model)
  t, c, matched = pairs(dataset)
  for i, j in matched:
    for trial in range(3):
      rng_seed = [7, trial, j]
      ops, hw = transforms.plan_train(np.random.default_rng(rng_seed), c.hw(j), config.data)
      ops_t, hw_t = transforms.plan_train(np.random.default_rng(rng_seed), t.hw(i), config.data)
      assert ops == ops_t and hw == hw_t
      out = [targets_lib.make_targets(transforms.apply_ops(s, ops), coder, config.data.max_gt)
             for s in (t.load(i), c.load(j))]
      np.testing.assert_array_equal(out[0]['valid'], out[1]['valid'])
      np.testing.assert_array_equal(out[0]['labels'], out[1]['labels'])
      for k in ('boxes', 'vectors'):
        np.testing.assert_array_equal(out[0][k], out[1][k], err_msg=k)


def test_eval_batches_equal_coco(dataset):
  """Eval batches of both sources hold the same rows (image, targets) for every image id."""
  rows = []
  for config in (tfds_config(dataset), make_config(dataset)):
    config.eval.batch_size = 4
    pipe = _eval_pipeline(
        config, process_index=0, process_count=1,
        source=(tfds_source.build_source(config, config.data.val_split)
                if config.data.source == 'tfds' else None))
    by_id = {}
    for batch in pipe.iterator():
      for r, image_id in enumerate(batch['image_id']):
        if image_id >= 0:
          by_id[int(image_id)] = {k: v[r] for k, v in batch.items()}
    rows.append(by_id)
  assert sorted(rows[0]) == sorted(rows[1]) and len(rows[0]) == 6
  for image_id, a in rows[0].items():
    b = rows[1][image_id]
    assert sorted(a) == sorted(b) == sorted(pipeline.BATCH_KEYS)
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f'{k} of image {image_id}')


def test_ground_truth_coco_matches_json(dataset):
  """The in-memory GT has the json's images, categories and (non-crowd) instances."""
  t, c, _ = pairs(dataset)
  gt = t.coco_gt
  with open(c.ann_file) as f:
    ref = json.load(f)
  assert [x['id'] for x in gt.dataset['categories']] == [x['id'] for x in ref['categories']]
  assert sorted(gt.getImgIds()) == sorted(x['id'] for x in ref['images'])
  sizes = {x['id']: (x['height'], x['width']) for x in ref['images']}
  for image_id in gt.getImgIds():
    h, w = sizes[image_id]
    assert (gt.imgs[image_id]['height'], gt.imgs[image_id]['width']) == (h, w)
    ours = gt.loadAnns(gt.getAnnIds(imgIds=[image_id]))
    theirs = [a for a in ref['annotations'] if a['image_id'] == image_id]
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):  # both in the json's order
      assert a['category_id'] == b['category_id']
      rle = mask_api.merge(mask_api.frPyObjects(b['segmentation'], h, w))
      np.testing.assert_array_equal(mask_api.decode(a['segmentation']), mask_api.decode(rle))
      np.testing.assert_allclose(a['bbox'], b['bbox'], atol=1e-4)
      assert a['area'] == pytest.approx(b['area'])


def test_ground_truth_scores_perfect_detections(dataset):
  """COCOeval (solq_jax.inference.coco_eval) on the in-memory GT: the GT as detections has AP 1."""
  from solq_jax.inference import coco_eval  # pylint: disable=g-import-not-at-top
  t, _, _ = pairs(dataset)
  gt = t.coco_gt
  anns = list(gt.anns.values())
  for iou_type, field in (('bbox', 'bbox'), ('segm', 'segmentation')):
    results = [{'image_id': a['image_id'], 'category_id': a['category_id'], field: a[field],
                'score': 0.9} for a in anns]
    stats, _, _ = coco_eval.coco_evaluate(gt, results, iou_type)
    assert stats['AP'] == pytest.approx(1.0), iou_type
    wrong = [dict(r, category_id=r['category_id'] % 5 + 1) for r in results]
    assert coco_eval.coco_evaluate(gt, wrong, iou_type)[0]['AP'] < 0.5


def test_label_map_and_num_classes(dataset):
  config = tfds_config(dataset)
  t = tfds_source.build_source(config, 'val2017')
  m = t.label_map()
  assert m['label_offset'] == 1 and m['num_labels'] == 5
  assert m['categories'] == list(synthetic.CATEGORIES)  # class index = LVIS-style label + 1
  json.dumps(m)
  config.model.num_classes = 5  # needs > 5 (class indices 1..5)
  with pytest.raises(coco.DataError, match=r'num_classes must be > 5, but it is 5'):
    tfds_source.build_source(config, 'val2017')
  config = tfds_config(dataset, tfds_label_offset=0)
  config.model.num_classes = 5
  t0 = tfds_source.build_source(config, 'val2017')
  i = next(i for i in range(len(t0)) if len(t0.annotations(i)['labels']))
  np.testing.assert_array_equal(t0.annotations(i)['labels'] + 1, t.annotations(i)['labels'])


@pytest.mark.parametrize('field, value, message', [
    ('tfds_name', 'no_such_dataset', r"'no_such_dataset'.*is not in data.tfds_data_dir.*"
                                     r"solq_shapes"),
    ('tfds_data_dir', '/nonexistent/tfds', r"tfds_data_dir='/nonexistent/tfds' is not a dir"),
    ('tfds_data_dir', '', r'needs data.tfds_data_dir'),
    ('tfds_name', f'{NAME}:9.9.9', r'cannot open TFDS dataset'),
    ('tfds_mask_key', 'objects/mask', r"tfds_mask_key='objects/mask' names no feature.*"
                                      r"objects/segmentation"),
    ('tfds_id_key', 'image/identifier', r"tfds_id_key='image/identifier' names no feature"),
    ('tfds_label_key', 'objects/area', r"'objects/area'.*not a ClassLabel"),
    ('tfds_val_split', 'test', r"no split 'test'.*\['train', 'validation'\]"),
])
def test_clear_errors(dataset, field, value, message):
  config = tfds_config(dataset, **{field: value})
  with pytest.raises(coco.DataError, match=message):
    tfds_source.build_source(config, 'val2017')


def test_renamed_features_work_by_config(dataset):
  """`lookup` resolves nested and '/'-containing keys; a remapped id key changes image ids."""
  example = {'image/id': 3, 'objects': {'bbox': 1, 'a/b': {'c': 2}}}
  assert tfds_source.lookup(example, 'image/id') == 3
  assert tfds_source.lookup(example, 'objects/bbox') == 1
  assert tfds_source.lookup(example, 'objects/a/b/c') == 2
  with pytest.raises(KeyError):
    tfds_source.lookup(example, 'objects/c')
  config = tfds_config(dataset, tfds_id_key='')  # ids = record index + 1
  t = tfds_source.build_source(config, 'val2017')
  assert [t.load(i)['image_id'] for i in range(len(t))] == list(range(1, len(t) + 1))


@pytest.mark.slow
def test_train_steps_and_evaluation_from_tfds(dataset):
  """Two train steps of the micro config (the step compiled once per session, shared with the
  training tests) on TFDS batches, then COCO bbox + segm evaluation against the in-memory GT."""
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from solq_jax import sharding
  from solq_jax.inference import evaluate
  from solq_jax.inference import postprocess
  import train_helpers  # pylint: disable=g-import-not-at-top
  tr = train_helpers.trainer(1)
  config = tfds_config(dataset)
  source = tfds_source.build_source(config, config.data.train_split)
  train = _train_pipeline(config, source=source, num_epochs=2, process_index=0,
                          process_count=1)
  assert train.steps_per_epoch == 1 and len(train) == 2
  state = tr.initial_state()
  losses = []
  for batch in train.iterator():
    assert batch['valid'].any() and set(batch['labels'][batch['valid']]) <= set(range(1, 6))
    device_batch = pipeline.train_device_batch(batch)
    state, metrics = tr.train_step(state, sharding.shard_batch(device_batch, tr.mesh))
    losses.append(float(jax.device_get(metrics['total'])))
  assert len(losses) == 2 and np.all(np.isfinite(losses)), losses
  val = tfds_source.build_source(config, config.data.val_split)
  batches = _eval_pipeline(config, source=val, process_index=0, process_count=1).iterator()
  ev = evaluate.evaluate(postprocess.make_forward(tr.model), state.variables, batches,
                         val.coco_gt, postprocess.Postprocessor.from_config(config.eval, tr.coder),
                         mesh=tr.mesh, progress=False, log=lambda *_: None)
  assert ev['num_images'] == 6
  for key in ('bbox/AP', 'segm/AP'):
    assert 0.0 <= ev['summary'][key] <= 1.0, (key, ev['summary'][key])
  assert 'tensorflow' not in sys.modules


def test_trainer_records_the_label_map_in_the_workdir(dataset, tmp_path):
  """The training loop writes the TFDS label -> class mapping next to its checkpoints; a COCO
  source (raw category ids, no remapping) writes none."""
  import types  # pylint: disable=g-import-not-at-top
  from solq_jax.training import loop  # pylint: disable=g-import-not-at-top
  config = tfds_config(dataset)
  source = tfds_source.build_source(config, 'val2017')
  loop.Trainer._record_label_map(types.SimpleNamespace(data=types.SimpleNamespace(source=source)),
                                 tmp_path / 'tfds_run')
  assert json.loads((tmp_path / 'tfds_run' / 'label_map.json').read_text()) == json.loads(
      json.dumps(source.label_map()))
  coco_source = types.SimpleNamespace()  # no label_map attribute, like data.coco.CocoSource
  assert not hasattr(coco.CocoSource, 'label_map')
  loop.Trainer._record_label_map(
      types.SimpleNamespace(data=types.SimpleNamespace(source=coco_source)), tmp_path / 'coco_run')
  assert not (tmp_path / 'coco_run').exists()
