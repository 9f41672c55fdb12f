"""train.py's fixed glibc malloc thresholds: a step-sized block stays on the heap afterwards."""
import ctypes
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

_PROBE = '''
import ctypes
from solq_jax.training import host_malloc
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd',
                                              'usmblks', 'fsmblks', 'uordblks', 'fordblks',
                                              'keepcost')]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def mmapped_bytes_of(size):
  before = libc.mallinfo2().hblkhd
  block = libc.malloc(size)
  during = libc.mallinfo2().hblkhd
  libc.free(block)
  return during - before
size = 16 << 20
print(mmapped_bytes_of(size), host_malloc.fix_malloc_thresholds(), mmapped_bytes_of(size))
'''


def test_a_16_mb_block_moves_from_its_own_mmap_to_the_heap():
  try:
    ctypes.CDLL(None).mallinfo2
  except AttributeError:
    pytest.skip('not glibc >= 2.33 (no mallinfo2 to observe the allocator with)')
  out = subprocess.run([sys.executable, '-c', _PROBE], capture_output=True, text=True,
                       check=True, cwd=REPO, env={'PYTHONPATH': str(REPO)}).stdout.split()
  before, fixed, after = int(out[0]), out[1], int(out[2])
  assert before >= 16 << 20       # glibc's default: a block this large gets its own mapping
  assert fixed == 'True'
  assert after == 0               # with the fixed threshold it comes from the heap
