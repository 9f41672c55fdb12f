"""Reading PyTorch `.pth` files without torch.

`read_state_dict` returns a flat `{torch key: numpy array}` dict from a `.pth` file. It reads
the zip format of `torch.save` (torch >= 1.6) with plain `zipfile` and a restricted unpickler,
so torch is not needed; with `reader='torch'` (or `'auto'` when torch is importable) torch
itself reads the file, which also covers the legacy (pre-zip) format.
"""
import collections
import os
import pickle
import zipfile

import numpy as np

TORCH_EXTRA_HINT = ("install torch with `pip install 'solq-jax[torch]'` "
                    "(or `pip install torch`)")

# torch storage class names and dtype names -> numpy dtypes ('bfloat16' handled apart).
_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': 'bfloat16', 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_, 'UntypedStorage': np.uint8,
}
_TORCH_DTYPES = {
    'float32': np.float32, 'float': np.float32, 'float64': np.float64, 'double': np.float64,
    'float16': np.float16, 'half': np.float16, 'bfloat16': 'bfloat16', 'int64': np.int64,
    'long': np.int64, 'int32': np.int32, 'int': np.int32, 'int16': np.int16,
    'int8': np.int8, 'uint8': np.uint8, 'bool': np.bool_,
}


class _DType:
  """A torch storage type or dtype named in the pickle, as the numpy dtype it denotes."""

  def __init__(self, dtype):
    self.dtype = dtype


class _Opaque:
  """Stand-in for any other pickled object (e.g. `argparse.Namespace`): nothing is executed."""

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs = args, kwargs

  def __setstate__(self, state):
    self.state = state


def _numpy_from_bytes(raw: bytes, dtype, byteorder: str) -> np.ndarray:
  if isinstance(dtype, str) and dtype == 'bfloat16':
    bits = np.frombuffer(raw, dtype=np.dtype('uint16').newbyteorder(byteorder[0]))
    return (bits.astype(np.uint32) << 16).view(np.float32)
  return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder(byteorder[0])).astype(
      np.dtype(dtype).newbyteorder('='))


class _LazyStorage:
  """One storage record of the zip archive, read when a tensor first refers to it."""

  def __init__(self, archive, name, dtype, byteorder):
    self._archive, self._name, self.dtype, self._byteorder = archive, name, dtype, byteorder
    self._array = None

  def array(self, dtype=None) -> np.ndarray:
    if self._array is None:
      try:
        raw = self._archive.read(self._name)
      except KeyError:
        raise ValueError(f'storage record {self._name!r} is missing from the archive') from None
      self._array = _numpy_from_bytes(raw, dtype if dtype is not None else self.dtype,
                                      self._byteorder)
    return self._array


def _rebuild_tensor(storage, offset, size, stride, *unused, dtype=None):
  flat = storage.array(dtype)
  size, stride = tuple(size), tuple(stride)
  numel = int(np.prod(size)) if size else 1
  if numel == 0:
    return np.zeros(size, flat.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if offset < 0 or last >= flat.size:
    raise ValueError(f'tensor of size {size} at offset {offset} exceeds its storage '
                     f'of {flat.size} elements (truncated file?)')
  view = np.lib.stride_tricks.as_strided(
      flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride], writeable=False)
  return np.array(view)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *unused):
  return _rebuild_tensor(storage, offset, size, stride, dtype=dtype.dtype)


def _rebuild_parameter(data, *unused):
  return data


_ALLOWED_GLOBALS = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles `data.pkl` of a torch zip archive without importing torch.

  Only tensor-rebuilding functions and OrderedDict are honoured; every other global becomes an
  inert `_Opaque` record, so unpickling never runs code named by the file.
  """

  def __init__(self, file, archive, prefix, byteorder):
    super().__init__(file)
    self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
    self._storages = {}

  def find_class(self, module, name):
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _DType(_STORAGE_DTYPES[name])
    if module == 'torch' and name in _TORCH_DTYPES:
      return _DType(_TORCH_DTYPES[name])
    return type(name, (_Opaque,), {'pickled_global': f'{module}.{name}'})

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    storage_type, key = pid[1], str(pid[2])
    dtype = storage_type.dtype if isinstance(storage_type, _DType) else np.uint8
    if key not in self._storages:
      self._storages[key] = _LazyStorage(self._archive, f'{self._prefix}data/{key}', dtype,
                                         self._byteorder)
    return self._storages[key]


def _read_zip_pth(path: str):
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile:
    raise ValueError(
        f'{path} is not a zip-format torch checkpoint (a legacy torch<1.6 file or a corrupt/'
        f'truncated download); to read legacy files, {TORCH_EXTRA_HINT}') from None
  with archive:
    pkl_names = [n for n in archive.namelist() if n.endswith('data.pkl') and n.count('/') == 1]
    if len(pkl_names) != 1:
      raise ValueError(f'{path}: expected one <name>/data.pkl record in the torch zip archive, '
                       f'found {pkl_names}')
    prefix = pkl_names[0][:-len('data.pkl')]
    byteorder = 'little'
    if f'{prefix}byteorder' in archive.namelist():
      byteorder = archive.read(f'{prefix}byteorder').decode().strip()
    with archive.open(pkl_names[0]) as f:
      try:
        obj = _RestrictedUnpickler(f, archive, prefix, byteorder).load()
      except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f'{path}: cannot unpickle the checkpoint ({e})') from e
  return obj


def _read_torch_pth(path: str):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f'reading {path} with reader="torch" needs torch: '
                      f'{TORCH_EXTRA_HINT}') from None
  import argparse  # pylint: disable=g-import-not-at-top
  import contextlib  # pylint: disable=g-import-not-at-top
  # Official checkpoints pickle their `args` (an argparse.Namespace): allow just that type.
  safe = getattr(torch.serialization, 'safe_globals', None)
  with safe([argparse.Namespace]) if safe else contextlib.nullcontext():
    try:
      obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for bad files.
      raise ValueError(f'torch cannot read {path} with weights_only=True ({e}); the built-in '
                       "reader (reader='zip') ignores non-tensor objects") from e

  def to_numpy(x):
    if isinstance(x, torch.Tensor):
      x = x.detach().cpu()
      return (x.float() if x.dtype == torch.bfloat16 else x).numpy()   # numpy has no bf16
    return x

  if isinstance(obj, dict):
    return {k: (type(v)((kk, to_numpy(vv)) for kk, vv in v.items()) if isinstance(v, dict)
                else to_numpy(v)) for k, v in obj.items()}
  return obj


def _torch_importable() -> bool:
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def read_state_dict(path: str, reader: str = 'auto') -> dict:
  """Reads a `.pth` file into `{key: numpy array}`.

  Args:
    path: a `torch.save` file holding `{'model': state_dict, ...}` (official SOLQ checkpoints)
      or a bare state dict (torchvision weights).
    reader: 'zip' (built-in, torch-free, zip format only), 'torch' (needs torch) or 'auto'
      (torch when importable, else 'zip').

  Returns:
    The state dict as an ordinary dict of numpy arrays.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint file not found: {path}')
  if reader == 'auto':
    reader = 'torch' if _torch_importable() else 'zip'
  if reader == 'zip':
    obj = _read_zip_pth(path)
  elif reader == 'torch':
    obj = _read_torch_pth(path)
  else:
    raise ValueError(f"reader must be 'auto', 'zip' or 'torch', got {reader!r}")
  if isinstance(obj, dict) and isinstance(obj.get('model'), dict):
    obj = obj['model']
  elif isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
    obj = obj['state_dict']
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    found = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f'{path} holds neither a state dict nor {{"model": state_dict}} '
                     f'(top level: {found})')
  return dict(obj)
