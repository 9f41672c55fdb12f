"""Sine position encoding and legacy-nearest mask down-sampling against independent numpy."""
import math

import numpy as np

from solq_jax import box_ops
from solq_jax.models.position_encoding import downsample_mask, sine_position_encoding


def _numpy_sine(mask, f):
  """The sine encoding written out with explicit loops over pixels (float64)."""
  b, h, w = mask.shape
  out = np.zeros((b, h, w, 2 * f))
  for n in range(b):
    valid = ~mask[n]
    for i in range(h):
      for j in range(w):
        y = valid[:i + 1, j].sum()
        x = valid[i, :j + 1].sum()
        y = (y - 0.5) / (valid[:, j].sum() + 1e-6) * 2 * math.pi
        x = (x - 0.5) / (valid[i, :].sum() + 1e-6) * 2 * math.pi
        for k in range(f):
          t = 10000.0 ** (2 * (k // 2) / f)
          fn = math.sin if k % 2 == 0 else math.cos
          out[n, i, j, k] = fn(y / t)
          out[n, i, j, f + k] = fn(x / t)
  return out


def test_sine_encoding_matches_numpy_formula():
  rng = np.random.default_rng(0)
  mask = np.zeros((2, 7, 9), bool)
  mask[0, 5:, :] = True          # bottom padding: fully padded rows
  mask[0, :, 7:] = True          # right padding: fully padded columns
  mask[1] = rng.random((7, 9)) < 0.3   # irregular mask: cumsum, not a box
  mask[1, 0, :] = False
  mask[1, :, 0] = False
  f = 6
  got = np.asarray(sine_position_encoding(mask, f))
  want = _numpy_sine(mask, f)
  assert got.shape == (2, 7, 9, 2 * f)
  # as the official code, fully padded rows/cols divide by 1e-6; compare everywhere else
  row_ok = (~mask).any(axis=2)[:, :, None]
  col_ok = (~mask).any(axis=1)[:, None, :]
  np.testing.assert_allclose(got[..., :f][np.broadcast_to(col_ok, mask.shape)],
                             want[..., :f][np.broadcast_to(col_ok, mask.shape)], atol=2e-5)
  np.testing.assert_allclose(got[..., f:][np.broadcast_to(row_ok, mask.shape)],
                             want[..., f:][np.broadcast_to(row_ok, mask.shape)], atol=2e-5)
  # the comparison covers padded pixels too (mask 0 has 10 padded pixels in valid rows)
  assert (mask & np.broadcast_to(row_ok, mask.shape)).sum() > 10


def test_sine_encoding_offset_and_order():
  """Unpadded 1-row map: channel 0 is sin of the y term, channel F is sin((x - 0.5)/W * 2pi)."""
  mask = np.zeros((1, 1, 4), bool)
  got = np.asarray(sine_position_encoding(mask, 4))
  x = (np.arange(1, 5) - 0.5) / (4 + 1e-6) * 2 * np.pi
  np.testing.assert_allclose(got[0, 0, :, 4], np.sin(x), atol=1e-6)
  np.testing.assert_allclose(got[0, 0, :, 5], np.cos(x), atol=1e-6)
  np.testing.assert_allclose(got[0, 0, :, 0], np.sin(0.5 / (1 + 1e-6) * 2 * np.pi), atol=1e-6)


def test_legacy_nearest_indices():
  # torch: F.interpolate(size 5 -> 3, 'nearest') reads 0, 1, 3; 8 -> 2 reads 0, 4
  np.testing.assert_array_equal(box_ops.legacy_nearest_indices(5, 3), [0, 1, 3])
  np.testing.assert_array_equal(box_ops.legacy_nearest_indices(8, 2), [0, 4])
  np.testing.assert_array_equal(box_ops.legacy_nearest_indices(800, 100), np.arange(100) * 8)
  for n_in, n_out in [(1066, 134), (333, 42), (517, 17), (7, 13)]:
    idx = box_ops.legacy_nearest_indices(n_in, n_out)
    exact = np.minimum((np.arange(n_out) * n_in) // n_out, n_in - 1)
    # float32 arithmetic may only fall one below the exact floor, at exact multiples
    assert np.all((idx == exact) | ((idx == exact - 1) & ((np.arange(n_out) * n_in) % n_out == 0)))


def test_downsample_mask_is_nearest_not_pooling():
  mask = np.zeros((1, 8, 8), bool)
  mask[0, 1, :] = True      # a padded row that nearest (stride 4, rows 0 and 4) skips
  mask[0, :, 4:] = True      # padded columns 4.. (column 4 is read)
  got = np.asarray(downsample_mask(mask, (2, 2)))
  np.testing.assert_array_equal(got[0], [[False, True], [False, True]])
