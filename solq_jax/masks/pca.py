"""The PCA coder (paper Table 3a): box crops projected on principal components fitted offline.

The components are fitted once on a dataset's binary box crops (`fit_pca`, entry point
`python -m solq_jax.masks.fit_pca`) and stored in an `.npz` that `config.model.pca_path` names:

    mean        float32 [N*N]        mean crop
    components  float32 [K,N*N]      orthonormal rows, by decreasing explained variance
    explained_variance float32 [K]   variance along each component
    mask_size   int                  N
    whiten      bool                 vectors divided by sqrt(explained_variance)

Encode: `(crop - mean) @ components[:n_k].T` (whitened if `whiten`). Reconstruct: the inverse
map; decode keeps reconstruction values `>= 0.5`. Unlike the official `solq_pca.py` (from
MEInst), no randomised inverse-sigmoid is applied before the projection: encoding is
deterministic, so the numpy twin and the jnp version agree.
"""
import jax
import jax.numpy as jnp
import numpy as np

from solq_jax.masks import base

_KEYS = ('mean', 'components', 'explained_variance', 'mask_size', 'whiten')


def fit_pca(crops, num_components, whiten=False):
  """Principal components of binary crops `[M,N,N]` -> dict with the keys of the `.npz` format."""
  crops = np.asarray(crops)
  num, size = crops.shape[0], crops.shape[-1]
  if num < 2:
    raise ValueError(f'fit_pca needs at least 2 crops, got {num}')
  data = crops.reshape(num, -1).astype(np.float64)
  mean = data.mean(axis=0)
  _, sing, vt = np.linalg.svd(data - mean, full_matrices=False)
  if num_components > vt.shape[0]:
    raise ValueError(f'cannot fit {num_components} components from {num} crops of {size}x{size} '
                     f'(rank <= {vt.shape[0]})')
  return dict(mean=mean.astype(np.float32),
              components=vt[:num_components].astype(np.float32),
              explained_variance=(sing[:num_components] ** 2 / (num - 1)).astype(np.float32),
              mask_size=np.int64(size), whiten=np.bool_(whiten))


def save_pca(path, pca):
  """Write a `fit_pca` dict to `path` (.npz)."""
  np.savez(path, **{k: pca[k] for k in _KEYS})


def load_pca(path):
  """Read and validate a PCA `.npz`; raises ValueError naming the file on any problem."""
  pca = base.read_fitted_npz(path, _KEYS, 'pca', 'pca_path', 'PCA')
  dim = int(pca['mask_size']) ** 2
  comps = pca['components']
  if (comps.ndim != 2 or comps.shape[1] != dim or pca['mean'].shape != (dim,)
      or pca['explained_variance'].shape != (comps.shape[0],)):
    raise ValueError(f'PCA file {path!r} has inconsistent shapes: mean {pca["mean"].shape}, '
                     f'components {comps.shape}, explained_variance '
                     f'{pca["explained_variance"].shape}, mask_size {int(pca["mask_size"])}')
  return pca


class PCACoder(base.BoxCropCoder):
  """Box crop projected on the first `num_coeffs` principal components."""

  def __init__(self, pca, num_coeffs=None):
    self.mask_size = int(pca['mask_size'])
    available = pca['components'].shape[0]
    self.num_coeffs = int(available if num_coeffs is None else num_coeffs)
    if not 1 <= self.num_coeffs <= available:
      raise ValueError(f'PCA has {available} components, num_coeffs={self.num_coeffs} requested')
    self.whiten = bool(pca['whiten'])
    comps = np.asarray(pca['components'][:self.num_coeffs], np.float32)
    scale = np.sqrt(np.maximum(pca['explained_variance'][:self.num_coeffs], 1e-12))
    scale = scale.astype(np.float32) if self.whiten else np.ones_like(scale, np.float32)
    self._mean = np.asarray(pca['mean'], np.float32)
    self._project = (comps / scale[:, None]).T          # [D,K]: encode
    self._basis = comps * scale[:, None]                # [K,D]: reconstruct

  @classmethod
  def from_file(cls, path, mask_size=None, num_coeffs=None):
    """Load `path`; checks that it matches `mask_size` (when given)."""
    pca = load_pca(path)
    if mask_size is not None and int(pca['mask_size']) != int(mask_size):
      raise ValueError(f'PCA file {path!r} was fitted at mask_size {int(pca["mask_size"])}, but '
                       f'config.model.mask_size is {mask_size}')
    try:
      return cls(pca, num_coeffs)
    except ValueError as err:
      raise ValueError(f'PCA file {path!r}: {err} (config.model.num_coeffs)') from err

  def __repr__(self):
    return f'PCACoder(mask_size={self.mask_size}, num_coeffs={self.num_coeffs}, whiten={self.whiten})'

  def transform(self, crops):
    crops = jnp.asarray(crops)
    flat = crops.reshape(crops.shape[0], -1).astype(jnp.float32)
    return jnp.matmul(flat - self._mean, self._project, precision=jax.lax.Precision.HIGHEST)

  def transform_np(self, crops):
    crops = np.asarray(crops)
    flat = crops.reshape(crops.shape[0], -1).astype(np.float32)
    return (flat - self._mean) @ self._project

  def reconstruct(self, vectors):
    vectors = jnp.asarray(vectors, jnp.float32)
    flat = jnp.matmul(vectors, self._basis, precision=jax.lax.Precision.HIGHEST) + self._mean
    return flat.reshape(vectors.shape[0], self.mask_size, self.mask_size)

  def decode(self, vectors):
    return self.reconstruct(vectors) >= 0.5
