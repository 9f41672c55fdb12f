"""The DCT mask coder of the official SOLQ.

Encode: RoIAlign crop to the box (`roi_align.py`), orthonormal 2-D DCT-II, keep the first
`num_coeffs` coefficients in JPEG zigzag order. Decode: zero-fill, inverse DCT, threshold each
mask strictly above its mid-range `(max + min) / 2` (so a constant reconstruction is empty).

Both transforms are matrix products with the orthonormal DCT matrix `D` (`coef = D X D^T`,
`X = D^T coef D`). Only the top-left `R x C` block of coefficients is ever kept (R, C = largest
zigzag row/column + 1, 23 x 23 for n_k = 256), so the products use `D[:R]` and `D[:C]` only.
"""
import jax
import jax.numpy as jnp
import numpy as np

from solq_jax.masks import base

_HIGHEST = jax.lax.Precision.HIGHEST


def dct_matrix(size):
  """Orthonormal DCT-II matrix `D [size,size]` (float64): `D[k,n] = a_k cos(pi (2n+1) k / 2size)`."""
  k = np.arange(size)[:, None]
  n = np.arange(size)[None, :]
  mat = np.cos(np.pi * (2 * n + 1) * k / (2 * size)) * np.sqrt(2.0 / size)
  mat[0] /= np.sqrt(2.0)
  return mat


def zigzag_indices(mask_size, num_coeffs):
  """First `num_coeffs` flat row-major indices (`row * mask_size + col`) of the JPEG zigzag scan.

  Anti-diagonal d = row + col is walked from the bottom-left upward for even d and from the
  top-right downward for odd d: (0,0), (0,1), (1,0), (2,0), (1,1), (0,2), (0,3), ...
  """
  if not 1 <= num_coeffs <= mask_size * mask_size:
    raise ValueError(f'num_coeffs={num_coeffs} must be in [1, mask_size**2={mask_size ** 2}]')
  order = []
  for d in range(2 * mask_size - 1):
    rows = range(min(d, mask_size - 1), max(0, d - mask_size + 1) - 1, -1)   # bottom-left first
    if d % 2:
      rows = reversed(rows)
    order.extend(r * mask_size + (d - r) for r in rows)
    if len(order) >= num_coeffs:
      break
  return np.asarray(order[:num_coeffs], np.int64)


class DCTCoder(base.BoxCropCoder):
  """Official SOLQ mask coding: zigzag-truncated orthonormal DCT of the RoIAlign box crop."""

  def __init__(self, mask_size=128, num_coeffs=256):
    self.mask_size = int(mask_size)
    self.num_coeffs = int(num_coeffs)
    flat = zigzag_indices(self.mask_size, self.num_coeffs)
    rows, cols = np.divmod(flat, self.mask_size)
    self.block = (int(rows.max()) + 1, int(cols.max()) + 1)   # kept top-left coefficient block
    self._block_index = rows * self.block[1] + cols          # zigzag -> flat index in the block
    dct = dct_matrix(self.mask_size).astype(np.float32)
    self._d_rows = dct[:self.block[0]]                       # [R,N]
    self._d_cols = dct[:self.block[1]]                       # [C,N]

  def __repr__(self):
    return f'DCTCoder(mask_size={self.mask_size}, num_coeffs={self.num_coeffs})'

  def transform(self, crops):
    """Box crops `[B,N,N]` (any real dtype) -> zigzag DCT vectors float32 `[B,num_coeffs]` (jnp)."""
    return _forward(self._d_rows, self._d_cols, self._block_index, jnp.asarray(crops))

  def transform_np(self, crops):
    """Numpy twin of `transform`."""
    x = np.asarray(crops, np.float32)
    coef = np.matmul(np.matmul(self._d_rows, x), self._d_cols.T)
    return coef.reshape(x.shape[0], -1)[:, self._block_index]

  def reconstruct(self, vectors):
    return _inverse(self._d_rows, self._d_cols, self._block_index, jnp.asarray(vectors))

  def decode(self, vectors):
    return threshold_mid_range(self.reconstruct(vectors))


def threshold_mid_range(rec):
  """Official DCT decode threshold: `rec > (max + min) / 2` per mask (strict), `[B,N,N]` -> bool."""
  hi = jnp.max(rec, axis=(1, 2), keepdims=True)
  lo = jnp.min(rec, axis=(1, 2), keepdims=True)
  return rec > (hi + lo) / 2


@jax.jit
def _forward(d_rows, d_cols, block_index, crops):
  x = crops.astype(jnp.float32)
  coef = jnp.matmul(jnp.matmul(d_rows, x, precision=_HIGHEST), d_cols.T, precision=_HIGHEST)
  return coef.reshape(x.shape[0], -1)[:, block_index]


@jax.jit
def _inverse(d_rows, d_cols, block_index, vectors):
  vectors = vectors.astype(jnp.float32)
  num = vectors.shape[0]
  rows, cols = d_rows.shape[0], d_cols.shape[0]
  coef = jnp.zeros((num, rows * cols), jnp.float32).at[:, block_index].set(vectors)
  coef = coef.reshape(num, rows, cols)
  return jnp.matmul(jnp.matmul(d_rows.T, coef, precision=_HIGHEST), d_cols, precision=_HIGHEST)

