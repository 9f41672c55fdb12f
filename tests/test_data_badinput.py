"""Bad input: each case gets a clear error naming the file, or a logged and documented skip."""
import json
import logging
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import batch_helpers
from configs import solq_r50
from configs import tiny
from solq_jax import masks as masks_lib
from solq_jax import data
from solq_jax.data import transforms as T


def _train_pipeline(config, **kwargs):
  return data.train_pipeline(config, masks_lib.build_coder(config.model), **kwargs)


def _eval_pipeline(config, **kwargs):
  return data.eval_pipeline(config, masks_lib.build_coder(config.model), **kwargs)


REPO = pathlib.Path(__file__).resolve().parents[1]
SPLIT = 'bad'
CATS = [{'id': 1, 'name': 'a'}, {'id': 2, 'name': 'b'}]


def _write(root, images, annotations, categories=CATS):
  """images: [(file_name, PIL image | bytes | None (not written), (h, w) in the json)]."""
  (root / 'annotations').mkdir(parents=True, exist_ok=True)
  (root / SPLIT).mkdir(parents=True, exist_ok=True)
  entries = []
  for i, (name, content, (h, w)) in enumerate(images):
    if isinstance(content, bytes):
      (root / SPLIT / name).write_bytes(content)
    elif content is not None:
      content.save(root / SPLIT / name)
    entries.append({'id': i + 1, 'file_name': name, 'height': h, 'width': w})
  anns = [dict(id=k + 1, iscrowd=0, area=1.0, **a) for k, a in enumerate(annotations)]
  (root / 'annotations' / f'instances_{SPLIT}.json').write_text(json.dumps(
      {'images': entries, 'annotations': anns, 'categories': categories}))
  return root


def _rgb(h, w, seed=0):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8))


def _square(x, y, s):
  return [[x, y, x + s, y, x + s, y + s, x, y + s]]


def _ann(image_id, bbox, segm=None, cat=1):
  x, y, w, h = bbox
  return {'image_id': image_id, 'category_id': cat, 'bbox': bbox,
          'segmentation': segm if segm is not None else _square(max(x, 0), max(y, 0), 4)}


def test_missing_json_and_malformed_json(tmp_path):
  with pytest.raises(data.DataError, match='annotation file not found: .*instances_bad.json'):
    data.CocoSource(tmp_path, SPLIT)
  (tmp_path / 'annotations').mkdir()
  (tmp_path / 'annotations' / f'instances_{SPLIT}.json').write_text('{"images": [')
  with pytest.raises(data.DataError, match='cannot parse .*instances_bad.json'):
    data.CocoSource(tmp_path, SPLIT)


def test_empty_image_size_in_json_is_an_error(tmp_path):
  _write(tmp_path, [('a.jpg', _rgb(4, 4), (0, 4))], [])
  with pytest.raises(data.DataError, match=r'image a\.jpg \(id 1\) has size 0x4'):
    data.CocoSource(tmp_path, SPLIT)


def test_missing_image_is_an_error_at_construction(tmp_path):
  _write(tmp_path, [('ok.jpg', _rgb(40, 50), (40, 50)), ('gone.jpg', None, (40, 50))], [])
  with pytest.raises(data.DataError, match=r"1 image file\(s\).*missing.*gone\.jpg"):
    data.CocoSource(tmp_path, SPLIT)


def test_truncated_and_corrupt_images_name_the_file(tmp_path):
  good = tmp_path / 'good.jpg'
  _rgb(64, 64).save(good, quality=90)
  raw = good.read_bytes()
  _write(tmp_path, [('trunc.jpg', raw[:len(raw) // 2], (64, 64)),
                    ('noise.jpg', bytes(range(256)) * 4, (64, 64)),
                    ('wrong_size.jpg', raw, (60, 64))], [])
  source = data.CocoSource(tmp_path, SPLIT)
  with pytest.raises(data.DataError, match=r'cannot decode image .*trunc\.jpg \(image id 1\)'):
    source.load(0)
  with pytest.raises(data.DataError, match=r'cannot decode image .*noise\.jpg \(image id 2\)'):
    source.load(1)
  with pytest.raises(data.DataError, match=r'wrong_size\.jpg: image is 64x64 .* says 60x64'):
    source.load(2)


def test_error_in_a_worker_process_reaches_the_caller_with_the_file_name(tmp_path):
  good = tmp_path / 'good.jpg'
  _rgb(64, 64).save(good, quality=90)
  raw = good.read_bytes()
  _write(tmp_path, [('a.jpg', raw, (64, 64)), ('trunc.jpg', raw[:len(raw) // 2], (64, 64))], [])
  config = tiny.get_config()
  config.data.root = str(tmp_path)
  config.data.val_split = SPLIT
  config.data.num_workers = 1
  config.eval.batch_size = 2
  it = _eval_pipeline(config, process_count=1, process_index=0).iterator()
  with pytest.raises(Exception, match=r'trunc\.jpg'):
    next(it)
  it.close()


def test_grayscale_cmyk_rgba_palette_become_rgb(tmp_path):
  base = _rgb(30, 40, seed=1)
  images = [('gray.png', base.convert('L')), ('cmyk.jpg', base.convert('CMYK')),
            ('rgba.png', base.convert('RGBA')), ('pal.png', base.convert('P'))]
  _write(tmp_path, [(n, im, (30, 40)) for n, im in images], [])
  source = data.CocoSource(tmp_path, SPLIT)
  for i, (name, _) in enumerate(images):
    got = source.load(i)['image']
    assert got.mode == 'RGB' and got.size == (40, 30)
    with Image.open(tmp_path / SPLIT / name) as f:
      np.testing.assert_array_equal(np.asarray(got), np.asarray(f.convert('RGB')))
  gray = np.asarray(source.load(0)['image'])
  assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_zero_annotation_images_are_kept(tmp_path):
  _write(tmp_path, [('empty.jpg', _rgb(48, 64), (48, 64)), ('one.jpg', _rgb(48, 64), (48, 64))],
         [_ann(2, [4, 4, 10, 10], _square(4, 4, 10))])
  config = tiny.get_config()
  config.data.root, config.data.val_split, config.data.num_workers = str(tmp_path), SPLIT, 0
  config.eval.batch_size = 2
  batch = next(_eval_pipeline(config, process_count=1, process_index=0).iterator())
  assert batch['image_id'].tolist() == [1, 2]
  assert not batch['valid'][0].any() and batch['valid'][1].sum() == 1
  h, w = batch_helpers.unpadded_hw(batch['pad_mask'][0])
  assert (h, w) == T.plan_eval((48, 64), config.data)[1]   # the image itself, unpadded


def test_degenerate_polygons_are_dropped_and_logged(tmp_path, caplog):
  anns = [
      _ann(1, [10, 10, 8, 8], [[0, 0, 30, 30]] + _square(10, 10, 8)),  # 2-point part + a square
      _ann(1, [1, 1, 2, 2], [[1, 1, 2, 2, 3, 3]]),                     # zero-area triangle
      _ann(1, [1, 1, 2, 2], [[1, 1]]),                                 # one point
      _ann(1, [1, 1, 2, 2], [[1, 1, 5, 1, 5]]),                        # odd length
  ]
  _write(tmp_path, [('a.jpg', _rgb(40, 40), (40, 40))], anns)
  with caplog.at_level(logging.WARNING):
    source = data.CocoSource(tmp_path, SPLIT)
    got = source.annotations(0)
  assert got['labels'].tolist() == [1]
  want = np.zeros((40, 40), bool)
  want[10:18, 10:18] = True
  np.testing.assert_array_equal(got['masks'][0], want)  # the 2-point part is not read as a box
  assert 'annotation 1: dropped 1 degenerate polygon part' in caplog.text
  assert 'annotation 2 (image 1): dropped: mask with no pixel' in caplog.text
  assert 'dropped 2 instance(s): empty polygon (no part with >= 3 points) (e.g. annotation 3)' in (
      caplog.text)


def test_dropped_instances_are_counted_once_per_reason(tmp_path, caplog):
  """Empty polygons and negative-width boxes were dropped without a word (or one line per
  instance per epoch); now one line per reason with a count, and none again at each load."""
  anns = [_ann(1, [10, 10, 8, 8]), _ann(1, [10, 10, 8, 8], []), _ann(1, [10, 10, 8, 8], [[]]),
          _ann(1, [20, 10, -5, 8], _square(15, 10, 5)), _ann(1, [60, 60, 5, 5])]
  _write(tmp_path, [('a.jpg', _rgb(40, 40), (40, 40))], anns)
  with caplog.at_level(logging.WARNING):
    source = data.CocoSource(tmp_path, SPLIT)
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 2, lines
  assert any('dropped 2 instance(s): empty polygon' in l and 'annotation 2' in l for l in lines)
  assert any('dropped 2 instance(s): box with no area' in l and 'annotation 4' in l for l in lines)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert source.annotations(0)['labels'].tolist() == [1]
  assert not caplog.records


def test_boxes_outside_the_image_are_clamped_or_dropped(tmp_path):
  anns = [_ann(1, [-10, -5, 30, 20], _square(0, 0, 10)),   # partly outside: clamped
          _ann(1, [45, 10, 10, 10], _square(36, 10, 3)),   # right part outside: clamped
          _ann(1, [60, 60, 10, 10], _square(0, 0, 3))]     # fully outside: zero width, dropped
  _write(tmp_path, [('a.jpg', _rgb(40, 50), (40, 50))], anns)
  got = data.CocoSource(tmp_path, SPLIT).annotations(0)
  np.testing.assert_array_equal(got['boxes'], [[0, 0, 20, 15], [45, 10, 50, 20]])


def test_unknown_category_ids_are_an_error(tmp_path):
  _write(tmp_path, [('a.jpg', _rgb(40, 40), (40, 40))], [_ann(1, [1, 1, 5, 5], cat=2),
                                                           _ann(1, [1, 1, 5, 5], cat=7)])
  with pytest.raises(data.DataError, match=r'annotation 2 \(image 1\) has category id 7, which is '
                                           r'not in the json'):
    data.CocoSource(tmp_path, SPLIT)


def test_panorama(tmp_path):
  pano = _rgb(300, 4000, seed=2)
  _write(tmp_path, [('pano.jpg', pano, (300, 4000))],
         [_ann(1, [100, 50, 3000, 200], _square(100, 50, 200)),
          _ann(1, [3900, 0, 100, 300], [[3900, 0, 4000, 0, 4000, 300, 3900, 300]], cat=2)])
  config = solq_r50.get_config()
  config.data.root, config.data.num_workers = str(tmp_path), 0
  config.data.train_split = config.data.val_split = SPLIT
  config.train.batch_size = config.eval.batch_size = 1
  assert T.plan_eval((300, 4000), config.data)[1] == (100, 1333)
  batch = next(_eval_pipeline(config, process_count=1, process_index=0).iterator())
  assert batch['images'].shape == (1, 800, 1344, 3) and batch_helpers.unpadded_sizes(batch['pad_mask']).tolist() == [[100, 1333]]
  assert batch['valid'].sum() == 2
  np.testing.assert_allclose(batch_helpers.boxes_xyxy(batch, 0)[1], [3900 * 1333 / 4000, 0, 1333, 100],
                             rtol=1e-5)
  pipe = _train_pipeline(config, process_count=1, process_index=0, num_epochs=1)
  for _ in range(len(pipe)):
    batch = next(pipe.iterator())
    h, w = batch_helpers.unpadded_hw(batch['pad_mask'][0])
    assert max(h, w) <= 1340 and batch['images'].shape[1:3] == data.bucket_shape(
        [(h, w)], data.bucket_sizes(config.data), 32)


def _good_and_truncated(tmp_path):
  good = tmp_path / 'src.jpg'
  _rgb(64, 64).save(good)
  raw = good.read_bytes()
  _write(tmp_path, [('a.jpg', raw, (64, 64)), ('trunc.jpg', raw[:len(raw) // 2], (64, 64)),
                    ('b.jpg', raw, (64, 64))], [_ann(3, [4, 4, 10, 10], _square(4, 4, 10))])
  config = tiny.get_config()
  config.data.root = str(tmp_path)
  config.data.train_split = config.data.val_split = SPLIT
  config.data.num_workers = 0
  config.eval.batch_size = 4
  return config


def test_data_check_lists_the_bad_images(tmp_path):
  """A truncated JPEG was found only when training reached it; the check decodes every image
  once, lists the bad ones and exits 1."""
  _good_and_truncated(tmp_path)
  result = subprocess.run(
      [sys.executable, '-m', 'solq_jax.data.check', '--config', 'configs/tiny.py',
       f'--config.data.root={tmp_path}', f'--config.data.train_split={SPLIT}',
       f'--config.data.val_split={SPLIT}'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 2, result.stdout
  assert 'trunc.jpg' in lines[0] and 'image id 2' in lines[0]
  assert lines[1] == f'{SPLIT}: 3 image(s) checked, 1 bad'


def test_skip_bad_images_skips_with_a_log_line(tmp_path, caplog):
  config = _good_and_truncated(tmp_path)
  with pytest.raises(data.DataError, match=r'trunc\.jpg'):
    next(_eval_pipeline(config, process_count=1, process_index=0).iterator())
  config.data.skip_bad_images = True
  with caplog.at_level(logging.WARNING):
    batch = next(_eval_pipeline(config, process_count=1, process_index=0).iterator())
  assert batch['image_id'].tolist() == [1, -1, 3, -1]   # the bad row is a filler, like padding
  assert batch['valid'][2].sum() == 1
  assert 'skipped cannot decode image' in caplog.text and 'trunc.jpg' in caplog.text
  assert '1 bad image(s) skipped so far' in caplog.text
