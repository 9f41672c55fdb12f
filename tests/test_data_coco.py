"""COCO source and pipeline on the real coco_val158 subset."""
import numpy as np
import pytest
from pycocotools import coco as coco_api

import batch_helpers
from configs import tiny
from solq_jax import box_ops
from solq_jax import data
from solq_jax import masks as masks_lib
from solq_jax.data import transforms as T



def _eval_pipeline(config, **kwargs):
  return data.eval_pipeline(config, masks_lib.build_coder(config.model), **kwargs)


SPLIT = 'val2017'


@pytest.fixture(scope='module')
def source(coco_val158):
  return data.CocoSource(coco_val158, SPLIT, num_classes=91)


@pytest.fixture(scope='module')
def api(coco_val158):
  return coco_api.COCO(str(coco_val158 / 'annotations' / f'instances_{SPLIT}.json'))


def _tight_box(mask):
  ys, xs = np.nonzero(mask)
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_targets_agree_with_pycocotools(source, api):
  total = 0
  for i in range(0, len(source), 3):
    image_id = int(source.image_ids[i])
    img = api.imgs[image_id]
    assert source.hw(i) == (img['height'], img['width'])
    got = source.annotations(i)
    anns = [a for a in api.imgToAnns[image_id] if not a['iscrowd']]
    want_boxes = []
    for a in anns:
      x, y, w, h = a['bbox']
      box = np.clip([x, y, x + w, y + h], 0, [img['width'], img['height']] * 2)
      want_boxes.append(box)
    keep = [b[2] > b[0] and b[3] > b[1] for b in want_boxes]
    anns = [a for a, k in zip(anns, keep) if k]
    assert got['labels'].tolist() == [a['category_id'] for a in anns]
    np.testing.assert_allclose(got['boxes'], np.array([b for b, k in zip(want_boxes, keep) if k],
                                                      np.float32).reshape(-1, 4), atol=1e-4)
    for mask, a in zip(got['masks'], anns):
      np.testing.assert_array_equal(mask, api.annToMask(a).astype(bool))
    total += len(anns)
  assert total > 400


def test_crowd_annotations_are_dropped(source, api):
  assert len(api.anns) == 1424
  assert sum(len(source.annotations(i)['labels']) for i in range(len(source))) == 1408


def test_num_classes_must_exceed_the_largest_category_id(coco_val158):
  with pytest.raises(data.DataError, match=r'category id 90 needs config\.model\.num_classes > 90'):
    data.CocoSource(coco_val158, SPLIT, num_classes=8)


def test_train_ops_keep_masks_and_boxes_consistent(source, r50_config):
  rng = np.random.default_rng(0)
  checked = 0
  for i in rng.choice(len(source), 12, replace=False):
    sample = source.load(int(i))
    sample['boxes'] = np.stack([_tight_box(m) for m in sample['masks']]).reshape(-1, 4)
    ops, hw = T.plan_train(rng, source.hw(int(i)), r50_config.data)
    resizes = [op for op in ops if op[0] == 'resize']
    out = T.apply_ops(sample, [op for op in ops if op[0] == 'flip'] + resizes[-1:])
    for mask, box in zip(out['masks'], out['boxes']):  # flip + one resize: within a pixel
      np.testing.assert_allclose(_tight_box(mask), box, atol=1.0)
      checked += 1
    # the full plan (the official double / triple resizes): each resize rescales the pixel error
    # of the ones before it and adds its own
    slack, hw_prev = 0.0, source.hw(int(i))
    for op in ops:
      if op[0] == 'resize':
        slack = slack * max(op[1][0] / hw_prev[0], op[1][1] / hw_prev[1]) + 1
      hw_prev = op[1] if op[0] == 'resize' else op[1][2:] if op[0] == 'crop' else hw_prev
    out = T.apply_ops(sample, ops)
    assert (out['image'].height, out['image'].width) == hw
    for mask, box in zip(out['masks'], out['boxes']):
      if not mask.any():
        continue
      mb = _tight_box(mask)
      if not any(op[0] == 'crop' for op in ops):
        np.testing.assert_allclose(mb, box, atol=slack)
      else:  # a crop clips the box, not the shape: the mask lies inside the clipped box
        assert (mb[:2] >= box[:2] - slack).all() and (mb[2:] <= box[2:] + slack).all()
  assert checked > 50


def test_eval_batches_on_coco(coco_val158, api):
  config = tiny.get_config()
  config.model.num_classes = 91
  config.data.root = str(coco_val158)
  config.data.val_split = SPLIT
  config.data.num_workers = 0
  config.eval.batch_size = 4
  config.data.max_gt = 100
  coder = masks_lib.build_coder(config.model)
  pipe = _eval_pipeline(config, process_count=1, process_index=0)
  assert len(pipe) == 40  # 158 images -> 39 full batches + one with 2 fillers
  batch = next(pipe.iterator(start_step=3))
  for row, image_id in enumerate(batch['image_id']):
    img = api.imgs[int(image_id)]
    h0, w0 = img['height'], img['width']
    h, w = T.resized_hw((h0, w0), 256, 320)
    assert batch_helpers.unpadded_hw(batch['pad_mask'][row]) == (h, w)
    anns = [a for a in api.imgToAnns[int(image_id)] if not a['iscrowd']]
    n = len(anns)
    assert batch['valid'][row].sum() == n
    rows = box_ops.legacy_nearest_indices(h0, h)
    cols = box_ops.legacy_nearest_indices(w0, w)
    ref_masks = np.stack([api.annToMask(a).astype(bool)[rows][:, cols] for a in anns])
    xyxy = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in (a['bbox'] for a in anns)],
                    np.float32)
    xyxy = np.clip(xyxy, 0, np.array([w0, h0, w0, h0], np.float32))
    xyxy *= np.array([w / w0, h / h0] * 2, np.float32)
    np.testing.assert_allclose(batch_helpers.boxes_xyxy(batch, row)[:n], xyxy, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(batch['vectors'][row, :n], coder.encode_np(ref_masks, xyxy),
                               atol=1e-4)
  last = next(pipe.iterator(start_step=39))
  assert last['image_id'].tolist()[2:] == [-1, -1] and not last['valid'][2:].any()
