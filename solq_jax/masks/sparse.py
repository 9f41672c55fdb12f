"""The sparse-coding coder (paper Table 3a): box crops as sparse codes over a learned dictionary.

A dictionary of `K` unit-norm atoms `D [K, N*N]` is learned offline on a dataset's binary box
crops (`fit_dictionary`, entry point `python -m solq_jax.masks.fit_sparse`) and stored in the
`.npz` that `config.model.sparse_path` names:

    dictionary  float32 [K,N*N]   unit-norm atoms (rows)
    alpha       float             the L1 weight of the codes
    iterations  int               FISTA iterations of an encoding
    mask_size   int               N

Encode: the Lasso code `c = argmin 0.5 |x - c D|^2 + alpha |c|_1` of the flattened crop `x`,
computed by a fixed number of FISTA iterations from zero (Beck & Teboulle 2009), so encoding is
a deterministic function that the numpy twin (input pipeline) and the jnp version share step for
step. Reconstruct: the dictionary product `c D`; decode keeps values `>= 0.5`.

Learning (Mairal et al. 2010, "Online learning for matrix factorization and sparse coding"):
alternate the Lasso codes of all crops with the block-coordinate dictionary update of that
paper (each atom in turn minimises the reconstruction error given the codes, then is projected
onto the unit ball), starting from the leading right singular vectors of the crops. Written
here in numpy rather than with scikit-learn (not a dependency) because encoding must also run
under `jax.jit` with the very iterations used at fitting time; the learning loop is ~20 lines.
"""
import jax
import jax.numpy as jnp
import numpy as np

from solq_jax.masks import base

_KEYS = ('dictionary', 'alpha', 'iterations', 'mask_size')
_HIGHEST = jax.lax.Precision.HIGHEST


def _lipschitz(dictionary):
  """The FISTA step's Lipschitz constant: the largest eigenvalue of `D D^T`."""
  d = np.asarray(dictionary, np.float64)
  return float(max(np.linalg.eigvalsh(d @ d.T)[-1], 1e-12))


def lasso_codes_np(data, dictionary, alpha, iterations):
  """FISTA Lasso codes `[M,K]` of `data [M,P]` over `dictionary [K,P]` (float32 numpy)."""
  d = np.asarray(dictionary, np.float32)
  gram = d @ d.T
  corr = np.asarray(data, np.float32) @ d.T
  step = np.float32(1.0 / _lipschitz(d))
  thresh = np.float32(alpha) * step
  code = np.zeros_like(corr)
  momentum = code
  t = 1.0
  for _ in range(int(iterations)):
    grad = momentum @ gram - corr
    z = momentum - step * grad
    new = np.sign(z) * np.maximum(np.abs(z) - thresh, 0).astype(np.float32)
    t_new = (1.0 + np.sqrt(1.0 + 4.0 * t * t)) / 2.0
    momentum = new + np.float32((t - 1.0) / t_new) * (new - code)
    code, t = new, t_new
  return code


def lasso_codes(data, dictionary, alpha, iterations):
  """jnp twin of `lasso_codes_np` (same iterations, same momentum sequence)."""
  d = jnp.asarray(dictionary, jnp.float32)
  gram = jnp.matmul(d, d.T, precision=_HIGHEST)
  corr = jnp.matmul(jnp.asarray(data, jnp.float32), d.T, precision=_HIGHEST)
  step = np.float32(1.0 / _lipschitz(dictionary))
  thresh = np.float32(alpha) * step
  # The momentum factors depend only on the iteration: computed on the host as numpy does.
  ts = [1.0]
  for _ in range(int(iterations)):
    ts.append((1.0 + np.sqrt(1.0 + 4.0 * ts[-1] ** 2)) / 2.0)
  factors = jnp.asarray([np.float32((ts[i] - 1.0) / ts[i + 1]) for i in range(int(iterations))])

  def body(carry, factor):
    code, momentum = carry
    z = momentum - step * (jnp.matmul(momentum, gram, precision=_HIGHEST) - corr)
    new = jnp.sign(z) * jnp.maximum(jnp.abs(z) - thresh, 0)
    return (new, new + factor * (new - code)), None

  zeros = jnp.zeros_like(corr)
  (code, _), _ = jax.lax.scan(body, (zeros, zeros), factors)
  return code


def fit_dictionary(crops, num_atoms, alpha=1.0, iterations=100, rounds=20):
  """Learn `num_atoms` atoms from binary crops `[M,N,N]` -> dict with the `.npz` keys.

  `rounds` alternations of codes (`iterations` FISTA steps, L1 weight `alpha`) and the
  block-coordinate atom update; the atoms start as the crops' leading right singular vectors.
  """
  crops = np.asarray(crops)
  num, size = crops.shape[0], crops.shape[-1]
  data = crops.reshape(num, -1).astype(np.float32)
  if num_atoms > min(data.shape):
    raise ValueError(f'cannot learn {num_atoms} atoms from {num} crops of {size}x{size} '
                     f'(at most {min(data.shape)})')
  _, _, vt = np.linalg.svd(data.astype(np.float64), full_matrices=False)
  dictionary = vt[:num_atoms].astype(np.float32)
  for _ in range(int(rounds)):
    codes = lasso_codes_np(data, dictionary, alpha, iterations).astype(np.float64)
    a, b = codes.T @ codes, codes.T @ data          # [K,K], [K,P]
    d = dictionary.astype(np.float64)
    for j in range(num_atoms):
      if a[j, j] < 1e-12:   # an unused atom: left as it is
        continue
      u = d[j] + (b[j] - a[j] @ d) / a[j, j]
      d[j] = u / max(np.linalg.norm(u), 1.0)
    dictionary = d.astype(np.float32)
  return dict(dictionary=dictionary, alpha=np.float64(alpha), iterations=np.int64(iterations),
              mask_size=np.int64(size))


def save_dictionary(path, fitted):
  """Write a `fit_dictionary` dict to `path` (.npz)."""
  np.savez(path, **{k: fitted[k] for k in _KEYS})


def load_dictionary(path):
  """Read and validate a dictionary `.npz`; raises ValueError naming the file on any problem."""
  fitted = base.read_fitted_npz(path, _KEYS, 'sparse', 'sparse_path', 'dictionary')
  d = fitted['dictionary']
  if d.ndim != 2 or d.shape[1] != int(fitted['mask_size']) ** 2:
    raise ValueError(f'dictionary file {path!r}: dictionary {d.shape} does not fit mask_size '
                     f'{int(fitted["mask_size"])}')
  return fitted


class SparseCoder(base.BoxCropCoder):
  """Box crop as its Lasso code over a learned dictionary (see the module docstring)."""

  def __init__(self, fitted):
    self.mask_size = int(fitted['mask_size'])
    self._dictionary = np.asarray(fitted['dictionary'], np.float32)
    self.num_coeffs = self._dictionary.shape[0]
    self.alpha = float(fitted['alpha'])
    self.iterations = int(fitted['iterations'])

  @classmethod
  def from_file(cls, path, mask_size=None, num_coeffs=None):
    """Load `path`; checks it against `mask_size` and `num_coeffs` (when given)."""
    fitted = load_dictionary(path)
    for name, want, have in (('mask_size', mask_size, int(fitted['mask_size'])),
                             ('num_coeffs', num_coeffs, fitted['dictionary'].shape[0])):
      if want is not None and int(want) != have:
        raise ValueError(f'dictionary file {path!r} has {name} {have}, but config.model.{name} '
                         f'is {want}')
    return cls(fitted)

  def __repr__(self):
    return (f'SparseCoder(mask_size={self.mask_size}, num_coeffs={self.num_coeffs}, '
            f'alpha={self.alpha}, iterations={self.iterations})')

  def transform(self, crops):
    crops = jnp.asarray(crops)
    flat = crops.reshape(crops.shape[0], -1).astype(jnp.float32)
    return lasso_codes(flat, self._dictionary, self.alpha, self.iterations)

  def transform_np(self, crops):
    crops = np.asarray(crops)
    flat = crops.reshape(crops.shape[0], -1).astype(np.float32)
    return lasso_codes_np(flat, self._dictionary, self.alpha, self.iterations)

  def reconstruct(self, vectors):
    vectors = jnp.asarray(vectors, jnp.float32)
    flat = jnp.matmul(vectors, self._dictionary, precision=_HIGHEST)
    return flat.reshape(vectors.shape[0], self.mask_size, self.mask_size)

  def decode(self, vectors):
    return self.reconstruct(vectors) >= 0.5
