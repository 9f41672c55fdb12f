"""The sparse-coding coder (paper Table 3a): Lasso codes, the learned dictionary, the file, the
config selection and the fitting entry point."""
import json

import numpy as np
import pytest

from configs import base
from solq_jax import masks
from solq_jax.masks import fit_sparse
from solq_jax.masks import sparse
from test_masks_variants import _ellipse_masks


@pytest.fixture(scope='module')
def crops():
  mask, boxes = _ellipse_masks(np.random.default_rng(1), 160)
  return masks.crop_masks_np(mask, boxes, 16)


@pytest.fixture(scope='module')
def fitted(crops):
  return sparse.fit_dictionary(crops[:120], 24, alpha=0.5, iterations=100, rounds=15)


def _lasso_objective(data, codes, dictionary, alpha):
  return (0.5 * ((data - codes @ dictionary) ** 2).sum(1) + alpha * np.abs(codes).sum(1)).mean()


def test_codes_satisfy_the_lasso_optimality_conditions(crops):
  """With enough FISTA steps the code is the Lasso minimiser: for every atom j the correlation
  r_j = D_j (x - c D) equals alpha sign(c_j) where c_j != 0 and |r_j| <= alpha elsewhere."""
  rng = np.random.default_rng(0)
  d = rng.normal(size=(12, 256)).astype(np.float32)
  d /= np.linalg.norm(d, axis=1, keepdims=True)
  data = crops[:20].reshape(20, -1).astype(np.float32)
  alpha = 2.0
  codes = sparse.lasso_codes_np(data, d, alpha, 3000).astype(np.float64)
  resid = (data - codes @ d) @ d.T
  on = codes != 0
  assert on.any() and (~on).any()
  np.testing.assert_allclose(resid[on], alpha * np.sign(codes[on]), atol=2e-3)
  assert np.abs(resid[~on]).max() <= alpha + 2e-3


def test_learning_lowers_the_objective_and_keeps_unit_atoms(crops, fitted):
  data = crops[:120].reshape(120, -1).astype(np.float32)
  start = sparse.fit_dictionary(crops[:120], 24, alpha=0.5, iterations=100, rounds=0)
  objective = {}
  for name, f in (('svd', start), ('learned', fitted)):
    codes = sparse.lasso_codes_np(data, f['dictionary'], 0.5, 100)
    objective[name] = _lasso_objective(data, codes, f['dictionary'], 0.5)
  assert objective['learned'] < 0.9 * objective['svd'], objective
  assert np.linalg.norm(fitted['dictionary'], axis=1).max() <= 1 + 1e-5


def test_coder_round_trip_and_numpy_twin(crops, fitted):
  coder = sparse.SparseCoder(fitted)
  held_out = crops[120:]
  codes = coder.transform_np(held_out)
  codes_jnp = np.asarray(coder.transform(held_out))
  assert codes.shape == (40, 24) and (codes == 0).mean() > 0.2     # sparse
  np.testing.assert_allclose(codes_jnp, codes, atol=2e-3 * np.abs(codes).max())
  decoded = np.asarray(coder.decode(codes))
  gt = held_out.astype(bool)
  iou = (decoded & gt).sum((1, 2)) / np.maximum((decoded | gt).sum((1, 2)), 1)
  assert iou.mean() > 0.95, iou.mean()
  # reconstruct is the dictionary product
  np.testing.assert_allclose(np.asarray(coder.reconstruct(codes)).reshape(40, -1),
                             codes @ fitted['dictionary'], atol=1e-5)


def test_build_coder_sparse_and_its_errors(tmp_path, fitted):
  path = tmp_path / 'd.npz'
  sparse.save_dictionary(path, fitted)
  cfg = base.model_config()
  cfg.update(mask_coder='sparse', sparse_path=str(path), mask_size=16, num_coeffs=24)
  coder = masks.build_coder(cfg)
  assert isinstance(coder, masks.SparseCoder) and coder.alpha == 0.5 and coder.iterations == 100
  np.testing.assert_array_equal(coder._dictionary, fitted['dictionary'])
  with pytest.raises(ValueError, match='num_coeffs'):
    masks.build_coder(_with(cfg, num_coeffs=8))
  with pytest.raises(ValueError, match='mask_size'):
    masks.build_coder(_with(cfg, mask_size=28))
  with pytest.raises(ValueError, match='sparse_path'):
    masks.build_coder(_with(cfg, sparse_path=''))
  with pytest.raises(ValueError, match='nope.npz'):
    masks.build_coder(_with(cfg, sparse_path=str(tmp_path / 'nope.npz')))


def _with(cfg, **overrides):
  out = cfg.copy_and_resolve_references()
  out.update(overrides)
  return out


def test_fit_sparse_entry_point(tmp_path):
  """The CLI learns a dictionary from a COCO json whose crops it reads itself."""
  from pycocotools import mask as mask_api
  mask, boxes = _ellipse_masks(np.random.default_rng(2), 30)
  images, anns = [], []
  for i, (m, b) in enumerate(zip(mask, boxes)):
    images.append(dict(id=i + 1, height=m.shape[0], width=m.shape[1], file_name=f'{i}.png'))
    rle = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
    rle['counts'] = rle['counts'].decode()
    anns.append(dict(id=i + 1, image_id=i + 1, category_id=1, iscrowd=0, segmentation=rle,
                     area=float(m.sum()), bbox=[float(b[0]), float(b[1]),
                                                float(b[2] - b[0]), float(b[3] - b[1])]))
  ann_file = tmp_path / 'ann.json'
  ann_file.write_text(json.dumps(dict(images=images, annotations=anns,
                                      categories=[dict(id=1, name='e')])))
  out = tmp_path / 's.npz'
  fit_sparse.main(['--annotations', str(ann_file), '--output', str(out), '--mask_size', '12',
                   '--num_coeffs', '10', '--rounds', '3'])
  loaded = sparse.load_dictionary(str(out))
  assert loaded['dictionary'].shape == (10, 144) and int(loaded['iterations']) == 100
