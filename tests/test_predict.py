"""predict: PNG overlays and detections json (tiny random model), overlay drawing, names, inputs."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from solq_jax.inference import predict
from solq_jax.inference import visualize

GREY = 128   # palette colours have a channel >= 100 away from 128: a tinted pixel always changes


@pytest.fixture(scope='module')
def grey_image(tmp_path_factory):
  path = tmp_path_factory.mktemp('inputs') / 'grey.png'
  Image.fromarray(np.full((90, 120, 3), GREY, np.uint8)).save(path)
  return path


class _TinyDetector(nn.Module):
  """A stand-in for SOLQ with the same output contract (compiles in a moment)."""
  num_queries: int
  num_classes: int
  num_coeffs: int

  @nn.compact
  def __call__(self, images, pad_mask, train=False):
    b = images.shape[0]
    feats = jnp.concatenate([images.mean((1, 2)), pad_mask.mean((1, 2))[:, None]], -1)
    feats = feats + self.param('bias', nn.initializers.normal(1.0), (self.num_queries, 4))[None]
    logits = nn.Dense(self.num_classes)(feats)
    boxes = jax.nn.sigmoid(nn.Dense(4)(feats) * 3)
    vectors = nn.Dense(self.num_coeffs, kernel_init=nn.initializers.normal(8.0))(feats)
    assert logits.shape == (b, self.num_queries, self.num_classes)
    return dict(pred_logits=logits, pred_boxes=boxes, pred_vectors=vectors, aux_outputs=[])


@pytest.fixture(scope='module')
def model_and_config(tiny_config):
  config = tiny_config.copy_and_resolve_references()
  m = config.model
  model = _TinyDetector(m.num_queries, m.num_classes, m.num_coeffs)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32), bool))
  return config, (model, variables)


def _decode(rle):
  return mask_utils.decode(dict(size=rle['size'], counts=rle['counts'].encode())).astype(bool)


def test_drawn_mask_pixels_are_the_predicted_masks(model_and_config, grey_image, tmp_path):
  config, loaded = model_and_config
  config = config.copy_and_resolve_references()
  config.eval.score_threshold = 0.0                # draw every detection
  records = predict.run(config, '', [grey_image], tmp_path, loaded=loaded,
                        draw_boxes=False, draw_labels=False)
  png = Image.open(tmp_path / 'grey.png')
  assert png.format == 'PNG' and png.size == (120, 90) and png.mode == 'RGB'
  saved = json.loads((tmp_path / 'detections.json').read_text())
  assert saved == json.loads(json.dumps(records))
  dets = saved[0]['detections']
  assert len(dets) == config.eval.top_k
  assert [d['score'] for d in dets] == sorted((d['score'] for d in dets), reverse=True)
  # The tiny config trains on the generated dataset: its shape names, not COCO's.
  shapes = {1: 'circle', 2: 'rectangle', 3: 'triangle', 4: 'star', 5: 'hexagon'}
  assert all(d['category'] == shapes.get(d['category_id'], str(d['category_id'])) for d in dets)
  assert any(d['category_id'] in shapes for d in dets)
  union = np.zeros((90, 120), bool)
  for d in dets:
    union |= _decode(d['segmentation'])
  assert union.any()
  changed = np.any(np.asarray(png) != GREY, axis=-1)
  np.testing.assert_array_equal(changed, union)


def test_image_without_detections_above_threshold(model_and_config, grey_image, tmp_path):
  config, loaded = model_and_config
  config = config.copy_and_resolve_references()
  config.eval.score_threshold = 0.999              # random weights score ~0.01
  folder = tmp_path / 'in'
  folder.mkdir()
  (folder / 'grey.png').write_bytes(grey_image.read_bytes())
  (folder / 'broken.jpg').write_bytes(b'\xff\xd8 not a jpeg')
  (folder / 'notes.txt').write_text('not an image')
  records = predict.run(config, '', [folder], tmp_path / 'out', loaded=loaded)
  assert len(records) == 2
  assert records[0]['file'] == str(folder / 'broken.jpg') and 'broken.jpg' in records[0]['error']
  assert records[1]['detections'] == [] and records[1]['file'] == str(folder / 'grey.png')
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'out' / 'grey.png')),
                                np.asarray(Image.open(grey_image)))


def test_overlay_pixels():
  image = np.full((60, 50, 3), GREY, np.uint8)
  mask = np.zeros((1, 60, 50), bool)
  mask[0, 25:45, 12:40] = True
  det = dict(scores=np.array([0.9], np.float32), labels=np.array([1]), masks=mask,
             boxes=np.array([[12.0, 25.0, 40.0, 45.0]], np.float32),
             query_index=np.array([0]))
  color = visualize.palette(1)[0].astype(int)
  out = visualize.draw_detections(image, det, score_threshold=0.5, draw_labels=False).astype(int)
  tinted = np.floor((GREY + color) / 2 + 0.5)                 # round half up; no .5 ties here
  np.testing.assert_array_equal(out[35, 25], tinted)          # mask interior
  np.testing.assert_array_equal(out[25, 20], color)           # box outline (top edge)
  np.testing.assert_array_equal(out[26, 39], color)           # 2-pixel outline, right edge
  outside = np.ones((60, 50), bool)
  outside[25:45, 12:40] = False
  assert (out[outside] == GREY).all()
  labelled = visualize.draw_detections(image, det, score_threshold=0.5).astype(int)
  assert (labelled[:25] != GREY).any()                        # the label strip above the box
  assert (labelled[:25, 12:] != GREY).any(axis=-1).any(axis=0)[0]   # starts at the box's left
  assert (labelled[45:] == GREY).all()
  below = visualize.draw_detections(image, det, score_threshold=0.95)
  np.testing.assert_array_equal(below, image)


def test_category_names(tmp_path):
  assert visualize.load_category_names('')[90] == 'toothbrush'
  assert len(visualize.load_category_names('')) == 80
  (tmp_path / 'names.txt').write_text('cat\n\ndog\n')
  assert visualize.load_category_names(str(tmp_path / 'names.txt')) == {1: 'cat', 2: 'dog'}
  (tmp_path / 'ids.txt').write_text('0 background thing\n7 zebra\n')
  assert visualize.load_category_names(str(tmp_path / 'ids.txt')) == {0: 'background thing',
                                                                     7: 'zebra'}
  (tmp_path / 'd.json').write_text(json.dumps({'categories': [{'id': 4, 'name': 'star'}]}))
  assert visualize.load_category_names(str(tmp_path / 'd.json')) == {4: 'star'}
  (tmp_path / 'bad.json').write_text('{"images": []}')
  with pytest.raises(ValueError, match='bad.json'):
    visualize.load_category_names(str(tmp_path / 'bad.json'))
  with pytest.raises(FileNotFoundError, match='nope.txt'):
    visualize.load_category_names(str(tmp_path / 'nope.txt'))


def test_bad_inputs(tmp_path):
  with pytest.raises(FileNotFoundError, match='missing.jpg'):
    predict.list_images([tmp_path / 'missing.jpg'])
