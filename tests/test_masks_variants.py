"""Coder selection from the config, the flatten and PCA coders, and the PCA fitting entry point."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from solq_jax import masks
from solq_jax.masks import fit_pca as fit_pca_main
from solq_jax.masks import pca


def _model_config(**overrides):
  cfg = base.model_config()
  cfg.update(overrides)
  return cfg


def _ellipse_masks(rng, num, height=40, width=56):
  """Random axis-aligned ellipses (full-image masks) and their tight boxes."""
  yy, xx = np.mgrid[:height, :width] + 0.5
  out, boxes = [], []
  for _ in range(num):
    cy, cx = rng.uniform(12, height - 12), rng.uniform(12, width - 12)
    ry, rx = rng.uniform(4, 11), rng.uniform(4, 11)
    m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    ys, xs = np.nonzero(m)
    out.append(m)
    boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
  return np.stack(out), np.array(boxes, np.float32)


@pytest.fixture(scope='module')
def ellipses():
  return _ellipse_masks(np.random.default_rng(0), 64)


@pytest.fixture(scope='module')
def pca_file(tmp_path_factory, ellipses):
  mask, boxes = ellipses
  crops = masks.crop_masks_np(mask, boxes, 16)
  path = tmp_path_factory.mktemp('pca') / 'pca16.npz'
  pca.save_pca(path, pca.fit_pca(crops, 24))
  return str(path)


def test_build_coder_dct_default_and_tiny(tiny_config):
  coder = masks.build_coder(base.model_config())
  assert isinstance(coder, masks.DCTCoder) and (coder.mask_size, coder.num_coeffs) == (128, 256)
  tiny = masks.build_coder(tiny_config)     # a whole config works too
  assert (tiny.mask_size, tiny.num_coeffs) == (tiny_config.model.mask_size, tiny_config.model.num_coeffs)


def test_build_coder_errors(tmp_path):
  with pytest.raises(ValueError, match="mask_coder 'jpeg'"):
    masks.build_coder(_model_config(mask_coder='jpeg'))
  with pytest.raises(ValueError, match='num_coeffs == mask_size'):
    masks.build_coder(_model_config(mask_coder='flatten'))      # 128 / 256 do not fit
  with pytest.raises(ValueError, match='pca_path'):
    masks.build_coder(_model_config(mask_coder='pca'))
  missing = str(tmp_path / 'nope.npz')
  with pytest.raises(ValueError, match='nope.npz'):
    masks.build_coder(_model_config(mask_coder='pca', pca_path=missing))
  corrupt = tmp_path / 'corrupt.npz'
  corrupt.write_bytes(b'not an npz at all')
  with pytest.raises(ValueError, match='corrupt.npz'):
    masks.build_coder(_model_config(mask_coder='pca', pca_path=str(corrupt)))
  partial = tmp_path / 'partial.npz'
  np.savez(partial, mean=np.zeros(4))
  with pytest.raises(ValueError, match='partial.npz'):
    masks.build_coder(_model_config(mask_coder='pca', pca_path=str(partial)))


def test_pca_file_mismatch_errors(pca_file):
  with pytest.raises(ValueError, match='mask_size 16'):
    masks.build_coder(_model_config(mask_coder='pca', pca_path=pca_file, mask_size=28, num_coeffs=8))
  with pytest.raises(ValueError, match='24 components'):
    masks.build_coder(_model_config(mask_coder='pca', pca_path=pca_file, mask_size=16, num_coeffs=25))


def test_flatten_coder_round_trip(ellipses):
  mask, boxes = ellipses
  coder = masks.build_coder(_model_config(mask_coder='flatten', mask_size=28, num_coeffs=784))
  assert isinstance(coder, masks.FlattenCoder) and coder.num_coeffs == 784
  vectors = coder.encode(mask, boxes)
  assert vectors.shape == (64, 784) and vectors.dtype == jnp.float32
  crops = masks.crop_masks_np(mask, boxes, 28)
  np.testing.assert_array_equal(np.asarray(vectors), crops.reshape(64, -1).astype(np.float32))
  np.testing.assert_array_equal(coder.encode_np(mask, boxes), np.asarray(vectors))
  np.testing.assert_array_equal(np.asarray(coder.decode(vectors)), crops)
  soft = np.asarray(coder.reconstruct(vectors * 0.7))
  np.testing.assert_array_equal(soft, crops * np.float32(0.7))


def test_pca_fit_properties(ellipses):
  mask, boxes = ellipses
  crops = masks.crop_masks_np(mask, boxes, 16).astype(np.float64)
  fitted = pca.fit_pca(crops, 24)
  comps = fitted['components'].astype(np.float64)
  np.testing.assert_allclose(comps @ comps.T, np.eye(24), atol=1e-5)
  np.testing.assert_allclose(fitted['mean'], crops.reshape(64, -1).mean(0), atol=1e-6)
  assert np.all(np.diff(fitted['explained_variance']) <= 1e-6)
  # Variance along component k equals its explained variance.
  proj = (crops.reshape(64, -1) - fitted['mean']) @ comps.T
  np.testing.assert_allclose(proj.var(axis=0, ddof=1), fitted['explained_variance'], rtol=1e-3, atol=1e-6)
  # Full rank: lossless.
  full = pca.fit_pca(crops[:10], 10)
  coder = masks.PCACoder(full)
  rec = np.asarray(coder.reconstruct(coder.transform_np(crops[:10].astype(np.float32))))
  np.testing.assert_allclose(rec, crops[:10], atol=1e-4)
  with pytest.raises(ValueError, match='rank'):
    pca.fit_pca(crops[:5], 6)


@pytest.mark.parametrize('whiten', [False, True])
def test_pca_coder_encode_decode(tmp_path, ellipses, whiten):
  mask, boxes = ellipses
  crops = masks.crop_masks_np(mask, boxes, 16)
  path = str(tmp_path / 'pca.npz')
  pca.save_pca(path, pca.fit_pca(crops[:48], 20, whiten=whiten))
  coder = masks.build_coder(_model_config(mask_coder='pca', pca_path=path, mask_size=16, num_coeffs=20))
  assert isinstance(coder, masks.PCACoder) and coder.whiten == whiten
  vectors = coder.encode(mask, boxes)
  np.testing.assert_allclose(coder.encode_np(mask, boxes), np.asarray(vectors), atol=1e-4)
  if whiten:   # unit variance per component on the fitting set
    np.testing.assert_allclose(np.asarray(vectors[:48]).var(axis=0, ddof=1), 1.0, rtol=1e-3)
  decoded = np.asarray(coder.decode(vectors))
  held_out = [(d & c).sum() / (d | c).sum() for d, c in zip(decoded[48:], crops[48:])]
  assert min(held_out) >= 0.85, held_out
  # Projection is idempotent: encoding a reconstruction gives the same vector.
  again = coder.transform_np(np.asarray(coder.reconstruct(vectors)))
  np.testing.assert_allclose(again, np.asarray(vectors), atol=2e-3)


def test_fit_pca_entry_point(tmp_path):
  """`python -m solq_jax.masks.fit_pca` on a tiny COCO json (polygons) -> a loadable coder."""
  rng = np.random.default_rng(1)
  images, anns = [], []
  for image_id in (1, 2, 3):
    images.append(dict(id=image_id, width=64, height=48, file_name=f'{image_id}.jpg'))
    for k in range(4):
      x, y = rng.uniform(2, 30), rng.uniform(2, 20)
      w, h = rng.uniform(8, 30), rng.uniform(8, 25)
      poly = [x, y, x + w, y + h * 0.3, x + w * 0.6, y + h, x, y + h * 0.8]
      anns.append(dict(id=len(anns) + 1, image_id=image_id, category_id=1, iscrowd=0,
                       segmentation=[poly], area=w * h / 2, bbox=[x, y, w, h]))
  anns.append(dict(id=99, image_id=1, category_id=1, iscrowd=0, segmentation=[[1, 1, 2, 1, 2, 2]],
                   area=0.0, bbox=[1, 1, 0, 0]))   # degenerate box: skipped
  ann_file = tmp_path / 'instances.json'
  ann_file.write_text(json.dumps(dict(images=images, annotations=anns,
                                      categories=[dict(id=1, name='thing')])))
  out = tmp_path / 'pca.npz'
  fit_pca_main.main(['--annotations', str(ann_file), '--output', str(out), '--mask_size', '12',
                     '--num_coeffs', '6', '--whiten'])
  coder = masks.build_coder(_model_config(mask_coder='pca', pca_path=str(out), mask_size=12, num_coeffs=6))
  assert coder.num_coeffs == 6 and coder.whiten
  assert len(fit_pca_main.coco_crops(str(ann_file), 12)) == 12
