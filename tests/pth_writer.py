"""Writes small `.pth` files in torch's zip format without torch (test helper).

The layout is that of `torch.save` (torch >= 1.6): `archive/data.pkl` (pickle protocol 2, each
tensor a `torch._utils._rebuild_tensor_v2` call on a persistent storage record), one
`archive/data/<key>` file of raw little-endian bytes per storage, `archive/byteorder` and
`archive/version`. Pickling names torch globals, so stand-in `torch` modules sit in
`sys.modules` while the pickle is written (and the previous entries are put back).
"""
import collections
import contextlib
import io
import pickle
import sys
import types
import zipfile

import numpy as np

_STORAGES = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.float64): 'DoubleStorage',
             np.dtype(np.float16): 'HalfStorage', np.dtype(np.int64): 'LongStorage',
             np.dtype(np.int32): 'IntStorage', np.dtype(np.uint8): 'ByteStorage',
             np.dtype(np.bool_): 'BoolStorage'}


def _rebuild_tensor_v2(*args):
  raise AssertionError('only pickled, never called')


@contextlib.contextmanager
def _torch_names():
  """Stand-in `torch` and `torch._utils` modules that pickle can name globals from."""
  saved = {name: sys.modules.get(name) for name in ('torch', 'torch._utils')}
  torch = types.ModuleType('torch')
  utils = types.ModuleType('torch._utils')
  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = 'torch._utils', '_rebuild_tensor_v2'
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  for name in _STORAGES.values():
    setattr(torch, name, type(name, (), {'__module__': 'torch'}))
  torch._utils = utils
  sys.modules.update({'torch': torch, 'torch._utils': utils})
  try:
    yield torch
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module


class _Tensor:
  def __init__(self, key, array):
    self.key, self.array = key, array


def write_pth(path, obj) -> None:
  """`obj`: nested dicts of numpy arrays (e.g. `{'model': state_dict}`), written as tensors."""
  storages = []

  def wrap(x):
    if isinstance(x, dict):
      return {k: wrap(v) for k, v in x.items()}
    array = np.array(x, order="C")      # (ascontiguousarray would make a 0-d array 1-d)
    storages.append(_Tensor(str(len(storages)), array))
    return storages[-1]

  tree = wrap(obj)
  with _torch_names() as torch:

    class Pickler(pickle.Pickler):

      def persistent_id(self, x):
        if isinstance(x, _Tensor) and getattr(x, 'as_storage', False):
          storage = getattr(torch, _STORAGES[x.array.dtype])
          return ('storage', storage, x.key, 'cpu', x.array.size)
        return None

      def reducer_override(self, x):
        if isinstance(x, _Tensor) and not getattr(x, 'as_storage', False):
          storage = _Tensor(x.key, x.array)
          storage.as_storage = True
          a = x.array
          strides = tuple(s // a.itemsize for s in a.strides) if a.size else (1,) * a.ndim
          return (_rebuild_tensor_v2,
                  (storage, 0, a.shape, strides, False, collections.OrderedDict()))
        return NotImplemented

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(tree)
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', buffer.getvalue())
    archive.writestr('archive/byteorder', 'little')
    archive.writestr('archive/version', '3\n')
    for t in storages:
      archive.writestr(f'archive/data/{t.key}', t.array.astype(t.array.dtype.newbyteorder('<'))
                       .tobytes())
