"""Pipeline: generated dataset, determinism, resume, sharding, buckets, eval padding, targets."""
import json
import logging

import numpy as np
import pytest
from PIL import Image
from pycocotools import coco as coco_api

import batch_helpers
from configs import solq_r50
from configs import tiny
from solq_jax import box_ops
from solq_jax import data
from solq_jax import masks as masks_lib
from solq_jax.data import synthetic
from solq_jax.data import targets as targets_lib
from solq_jax.data import transforms as T


def _train_pipeline(config, **kwargs):
  return data.train_pipeline(config, masks_lib.build_coder(config.model), **kwargs)


def _eval_pipeline(config, **kwargs):
  return data.eval_pipeline(config, masks_lib.build_coder(config.model), **kwargs)


TRAIN, VAL = 'train', 'val'


@pytest.fixture(scope='module')
def gen_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('gen')
  synthetic.write_split(root, TRAIN, 24, seed=3, min_size=192, max_size=320)
  synthetic.write_split(root, VAL, 10, seed=3, min_size=192, max_size=320)
  return root


@pytest.fixture(scope='module')
def gen_coco(gen_root):
  return coco_api.COCO(str(gen_root / 'annotations' / f'instances_{TRAIN}.json'))


def _config(root, **overrides):
  config = tiny.get_config()
  config.data.root = str(root)
  config.data.train_split, config.data.val_split = TRAIN, VAL
  config.data.num_workers = 0
  config.train.batch_size = 4
  config.eval.batch_size = 4
  for k, v in overrides.items():
    section, field = k.split('.')
    config[section][field] = v
  return config


def _batches(pipe, n, start_step=0):
  it = pipe.iterator(start_step)
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(data.BATCH_KEYS)
    for k in data.BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------------ generated dataset


def test_generated_annotations_are_the_visible_parts(gen_root, gen_coco):
  tag = int(synthetic.hashlib.sha256(TRAIN.encode()).hexdigest()[:8], 16)
  for i in range(8):
    rng = np.random.default_rng([3, tag, i])
    h, w = (int(v) for v in rng.integers(192, 321, 2))
    pixels, instances = synthetic._generate_image(rng, h, w, 8)
    anns = gen_coco.imgToAnns[i + 1]
    assert len(anns) == len(instances)
    union = np.zeros((h, w), int)
    for ann, (category, visible, (x0, y0)) in zip(anns, instances):
      full = np.zeros((h, w), bool)
      full[y0:y0 + visible.shape[0], x0:x0 + visible.shape[1]] = visible
      np.testing.assert_array_equal(gen_coco.annToMask(ann).astype(bool), full)
      ys, xs = np.nonzero(full)
      assert ann['bbox'] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
      assert ann['area'] == full.sum() and ann['category_id'] == category
      union += full
    assert union.max() <= 1  # visible parts never overlap: occluded pixels go to the later shape
    stored = np.asarray(Image.open(gen_root / TRAIN / f'{i + 1:06d}.jpg'))
    assert np.abs(stored.astype(int) - pixels).mean() < 12  # JPEG (q 92) of the noisy pixels


def test_generated_dataset_is_not_trivial(tmp_path):
  synthetic.write_split(tmp_path, 's', 48, seed=1, min_size=192, max_size=320)
  c = coco_api.COCO(str(tmp_path / 'annotations' / 'instances_s.json'))
  per_image = np.array([len(c.imgToAnns[i]) for i in c.imgs])
  assert per_image.max() <= 8 and np.mean(per_image >= 1) > 0.95 and np.mean(per_image >= 4) > 0.3
  cats = {a['category_id'] for a in c.anns.values()}
  assert len(cats) >= 4 and max(cats) < tiny.get_config().model.num_classes
  areas = np.array([a['area'] for a in c.anns.values()])
  # COCO small/large (32^2, 96^2 at 640 px) scaled to the ~256 px generated images
  assert np.mean(areas < (32 * 0.4) ** 2) > 0.1 and np.mean(areas > (96 * 0.4) ** 2) > 0.1
  border, overlapping, multipart = 0, 0, 0
  for img_id, img in c.imgs.items():
    boxes = [a['bbox'] for a in c.imgToAnns[img_id]]
    for x, y, bw, bh in boxes:
      border += x == 0 or y == 0 or x + bw == img['width'] or y + bh == img['height']
    xyxy = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in boxes]).reshape(-1, 4)
    if len(xyxy) > 1:
      iou = box_ops.pairwise_iou(xyxy.astype(float), xyxy.astype(float))
      overlapping += (iou[np.triu_indices(len(xyxy), 1)] > 0).sum()
    multipart += sum(len(a['segmentation']) > 1 for a in c.imgToAnns[img_id])
  n = len(c.anns)
  assert border / n > 0.15 and overlapping > 20 and multipart > 0


def test_generated_object_count_and_size_knobs(tmp_path):
  """max_objects caps the annotations per image; min_object / max_object_frac bound the drawn
  shape sizes (a visible part is at most the shape: a rotated rectangle's box is at most its
  diagonal, sqrt(2) * size); bad values are named."""
  synthetic.write_split(tmp_path, 's', 24, seed=2, min_size=96, max_size=128, max_objects=2,
                        min_object=30.0, max_object_frac=0.5)
  c = coco_api.COCO(str(tmp_path / 'annotations' / 'instances_s.json'))
  assert max(len(c.imgToAnns[i]) for i in c.imgs) == 2
  sides = np.array([max(a['bbox'][2:]) for a in c.anns.values()])
  caps = np.array([np.sqrt(2) * 0.5 * min(c.imgs[a['image_id']]['height'],
                                         c.imgs[a['image_id']]['width']) + 2
                   for a in c.anns.values()])
  assert (sides <= caps).all()
  assert np.median(sides) > 20  # shapes start at 30 px (occlusion and borders cut some)
  with pytest.raises(ValueError, match='min_object'):
    synthetic.write_split(tmp_path, 't', 1, seed=2, min_size=96, max_size=128, min_object=90.0)


def test_generated_split_is_the_same_bytes_in_worker_processes(tmp_path, monkeypatch):
  """Images generated in 2 processes: every jpg and the annotation json (ids numbered over the
  split in image order) are byte for byte those of one process."""
  monkeypatch.setattr(synthetic, '_MIN_IMAGES_PER_POOL', 4)
  kw = dict(seed=5, min_size=64, max_size=96, max_objects=3, min_object=12.0)
  synthetic.write_split(tmp_path / 'one', 's', 13, **kw)
  synthetic.write_split(tmp_path / 'two', 's', 13, workers=2, **kw)
  one = sorted(p.relative_to(tmp_path / 'one') for p in (tmp_path / 'one').rglob('*.*'))
  two = sorted(p.relative_to(tmp_path / 'two') for p in (tmp_path / 'two').rglob('*.*'))
  assert one == two and len(one) == 14
  for rel in one:
    assert (tmp_path / 'one' / rel).read_bytes() == (tmp_path / 'two' / rel).read_bytes(), rel
  anns = json.loads((tmp_path / 'two' / 'annotations' / 'instances_s.json').read_text())
  assert [a['id'] for a in anns['annotations']] == list(range(1, len(anns['annotations']) + 1))
  assert len({a['image_id'] for a in anns['annotations']}) >= 10


def test_ensure_dataset_writes_once_reuses_and_repairs(tmp_path):
  config = tiny.get_config()
  d = config.data
  d.cache_dir = str(tmp_path / 'cache')
  d.synthetic_train_images, d.synthetic_val_images = 6, 3
  root = synthetic.ensure_dataset(d)
  manifest = root / 'manifest.json'
  stamp = manifest.stat().st_mtime_ns
  assert synthetic.ensure_dataset(d) == root and manifest.stat().st_mtime_ns == stamp
  source = data.build_source(config, d.train_split)
  assert len(source) == 6
  image = root / d.train_split / '000002.jpg'
  original = image.read_bytes()
  for damage in (lambda: image.unlink(), lambda: image.write_bytes(original[:100])):
    damage()  # a missing or truncated image: the cache is rewritten
    assert synthetic.ensure_dataset(d) == root
    assert image.read_bytes() == original
  # deterministic: a second cache gets identical annotations
  d2 = tiny.get_config().data
  d2.cache_dir = str(tmp_path / 'cache2')
  d2.synthetic_train_images, d2.synthetic_val_images = 6, 3
  root2 = synthetic.ensure_dataset(d2)
  ann = f'annotations/instances_{d.train_split}.json'
  assert json.loads((root / ann).read_text()) == json.loads((root2 / ann).read_text())


# ------------------------------------------------------------------------ batches


def test_same_seed_same_batches_and_seed_changes_order(gen_root):
  a = _batches(_train_pipeline(_config(gen_root), process_count=1, process_index=0), 3)
  b = _batches(_train_pipeline(_config(gen_root), process_count=1, process_index=0), 3)
  _assert_batches_equal(a, b)
  config = _config(gen_root)
  config.seed = 7
  c = _batches(_train_pipeline(config, process_count=1, process_index=0), 1)
  assert not np.array_equal(a[0]['image_id'], c[0]['image_id'])


def test_batch_shapes_and_epoch_coverage(gen_root):
  pipe = _train_pipeline(_config(gen_root), process_count=1, process_index=0, num_epochs=2)
  assert pipe.steps_per_epoch == 6 and len(pipe) == 12
  batches = _batches(pipe, 12)
  g, k = 16, 64
  for b in batches:
    n, h, w, _ = b['images'].shape
    assert n == 4 and (h, w) in {(256, 256), (256, 320), (320, 256), (320, 320)}
    assert b['pad_mask'].shape == (4, h, w) and b['vectors'].shape == (4, g, k)
    for row in range(4):
      sh, sw = batch_helpers.unpadded_hw(b['pad_mask'][row])
      assert not b['pad_mask'][row, :sh, :sw].any() and b['pad_mask'][row].sum() == h * w - sh * sw
      assert (b['images'][row][b['pad_mask'][row]] == 0).all()
      v = b['valid'][row]
      assert ((b['boxes'][row][v] > 0) & (b['boxes'][row][v] <= 1)).all()
  for epoch in range(2):
    ids = np.concatenate([b['image_id'] for b in batches[6 * epoch:6 * (epoch + 1)]])
    assert sorted(ids.tolist()) == list(range(1, 25))


def test_group_by_orientation():
  rng = np.random.default_rng(0)
  for n, b in [(50, 4), (37, 5), (9, 4), (64, 8)]:
    plan = [data.pipeline.PlannedRecord(i, [], tuple(int(v) for v in rng.integers(100, 200, 2)))
            for i in range(n)]
    batches = data.pipeline.group_by_orientation(plan, b)
    assert len(batches) == n // b and all(len(x) == b for x in batches)
    used = [r.index for x in batches for r in x]
    assert len(set(used)) == len(used)
    mixed = [x for x in batches if len({r.hw[0] <= r.hw[1] for r in x}) > 1]
    assert len(mixed) <= 1 and (not mixed or mixed[0] is batches[-1])


def test_grouped_train_batches_pad_to_one_orientation(gen_root):
  config = _config(gen_root, **{'train.batch_size': 2})
  pipe = _train_pipeline(config, process_count=1, process_index=0, num_epochs=1)
  mixed = 0
  for b in _batches(pipe, len(pipe)):
    sizes = batch_helpers.unpadded_sizes(b['pad_mask'])
    orient = set((sizes[:, 0] <= sizes[:, 1]).tolist())
    mixed += len(orient) > 1
    if len(orient) == 1:
      short_axis = 1 if orient == {True} else 2   # the short side pads to the short bucket
      assert b['images'].shape[short_axis] == 256
  assert mixed <= 1


def test_resume_continues_with_exactly_the_next_batch(gen_root):
  pipe = _train_pipeline(_config(gen_root), process_count=1, process_index=0)
  it = pipe.iterator()
  next(it), next(it)
  state = it.get_state()
  expected = [next(it), next(it)]
  resumed = pipe.iterator()
  resumed.set_state(state)
  _assert_batches_equal([next(resumed), next(resumed)], expected)
  _assert_batches_equal(_batches(pipe, 2, start_step=2), expected)


def test_worker_process_gives_the_same_batches_and_resumes(gen_root):
  pipe0 = _train_pipeline(_config(gen_root), process_count=1, process_index=0)
  pipe1 = _train_pipeline(_config(gen_root, **{'data.num_workers': 1}),
                              process_count=1, process_index=0)
  expected = _batches(pipe0, 4)
  it = pipe1.iterator()
  got = [next(it), next(it)]
  state = it.get_state()
  it.close()
  resumed = pipe1.iterator()
  resumed.set_state(state)
  got += [next(resumed), next(resumed)]
  resumed.close()
  _assert_batches_equal(got, expected)


def test_processes_take_disjoint_rows_of_one_global_batch(gen_root):
  whole = _batches(_train_pipeline(_config(gen_root), process_count=1, process_index=0), 2)
  parts = [_batches(_train_pipeline(_config(gen_root), process_count=2, process_index=p), 2)
           for p in range(2)]
  for step in range(2):
    for k in data.BATCH_KEYS:  # same padded shape on both processes, rows split in order
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][k], parts[1][step][k]]), whole[step][k])
  with pytest.raises(ValueError, match='not divisible'):
    _train_pipeline(_config(gen_root), process_count=3, process_index=0)


def test_eval_last_batch_is_padded_with_invalid_entries(gen_root):
  pipe = _eval_pipeline(_config(gen_root), process_count=1, process_index=0)
  assert len(pipe) == 3
  batches = _batches(pipe, 3)
  ids = np.concatenate([b['image_id'] for b in batches])
  assert sorted(ids[:10].tolist()) == list(range(1, 11)) and ids[10:].tolist() == [-1, -1]
  sizes = np.concatenate([batch_helpers.unpadded_sizes(b['pad_mask']) for b in batches])[:10]
  landscape = (sizes[:, 0] <= sizes[:, 1]).tolist()
  assert landscape == sorted(landscape, reverse=True)  # grouped: landscape images first
  config = _config(gen_root, **{'data.group_by_aspect': False})
  plain = _batches(_eval_pipeline(config, process_count=1, process_index=0), 3)
  assert np.concatenate([b['image_id'] for b in plain]).tolist() == list(range(1, 11)) + [-1, -1]
  last = batches[-1]
  assert not last['valid'][2:].any() and last['valid'][:2].any()
  assert not last['pad_mask'][2:].any() and (last['images'][2:] == 0).all()


def test_eval_targets_equal_an_independent_computation(gen_root):
  config = _config(gen_root)
  coder = masks_lib.build_coder(config.model)
  c = coco_api.COCO(str(gen_root / 'annotations' / f'instances_{VAL}.json'))
  batch = _batches(_eval_pipeline(config, process_count=1, process_index=0), 1)[0]
  for row, image_id in enumerate(batch['image_id']):
    img = c.imgs[int(image_id)]
    h0, w0 = img['height'], img['width']
    h, w = batch_helpers.unpadded_hw(batch['pad_mask'][row])
    assert (h, w) == T.resized_hw((h0, w0), 256, 320)
    assert batch['orig_size'][row].tolist() == [h0, w0]
    anns = c.imgToAnns[int(image_id)]
    n = len(anns)
    assert batch['valid'][row].sum() == n and not batch['valid'][row, n:].any()
    rows = np.minimum((np.arange(h) * (h0 / h)).astype(int), h0 - 1)
    cols = np.minimum((np.arange(w) * (w0 / w)).astype(int), w0 - 1)
    ref_masks = np.stack([c.annToMask(a).astype(bool)[rows][:, cols] for a in anns])
    ref_xyxy = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in (a['bbox'] for a in anns)],
                        np.float32) * np.array([w / w0, h / h0] * 2, np.float32)
    np.testing.assert_allclose(batch_helpers.boxes_xyxy(batch, row)[:n], ref_xyxy, rtol=1e-5)
    cx, cy = (ref_xyxy[:, 0] + ref_xyxy[:, 2]) / 2 / w, (ref_xyxy[:, 1] + ref_xyxy[:, 3]) / 2 / h
    np.testing.assert_allclose(batch['boxes'][row, :n, 0], cx, rtol=1e-5)
    np.testing.assert_allclose(batch['boxes'][row, :n, 1], cy, rtol=1e-5)
    assert batch['labels'][row, :n].tolist() == [a['category_id'] for a in anns]
    np.testing.assert_allclose(batch['vectors'][row, :n], coder.encode_np(ref_masks, ref_xyxy),
                               atol=1e-4)
    image = Image.open(gen_root / VAL / img['file_name']).convert('RGB')
    ref_image = np.asarray(image.resize((w, h), Image.BILINEAR), np.float32) / 255
    ref_image = (ref_image - [0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(batch['images'][row, :h, :w], ref_image, atol=1e-5)


# ------------------------------------------------------------------------ buckets, max_gt


def test_bucket_sizes_and_shapes(r50_config):
  assert data.bucket_sizes(r50_config.data) == (800, 1344)
  assert data.bucket_sizes(tiny.get_config().data) == (256, 320)
  sizes = (800, 1344)
  assert data.bucket_shape([(800, 1066), (600, 800)], sizes, 32) == (800, 1344)
  assert data.bucket_shape([(800, 1066), (1201, 800)], sizes, 32) == (1344, 1344)
  assert data.bucket_shape([(100, 1333)], sizes, 32) == (800, 1344)
  assert data.bucket_shape([(100, 1400)], sizes, 32) == (800, 1408)  # beyond: multiple of 32
  d = solq_r50.get_config().data
  d.bucket_extra_sizes = (512, 640)
  assert data.bucket_sizes(d) == (512, 640, 800, 1344)
  d.bucket_sizes = (500, 1000)
  assert data.bucket_sizes(d) == (512, 1024)


def test_more_instances_than_max_gt_keeps_the_largest(caplog):
  boxes = np.array([[0, 0, 10, 10], [0, 0, 50, 50], [0, 0, 2, 2], [0, 0, 30, 30]], np.float32)
  m = np.zeros((4, 60, 60), bool)
  for i, b in enumerate(boxes.astype(int)):
    m[i, b[1]:b[3], b[0]:b[2]] = True
  sample = dict(masks=m, boxes=boxes, labels=np.array([1, 2, 3, 4], np.int32), image_id=9)
  coder = masks_lib.build_coder(tiny.get_config().model)
  with caplog.at_level(logging.WARNING):
    out = targets_lib.make_targets(sample, coder, max_gt=2)
  assert 'image 9 has 4 instances' in caplog.text and 'max_gt=2' in caplog.text
  assert out['labels'].tolist() == [2, 4] and out['valid'].all()
  np.testing.assert_allclose(out['vectors'], coder.encode_np(m[[1, 3]], boxes[[1, 3]]))
