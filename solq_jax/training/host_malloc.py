"""glibc's malloc thresholds for a training process on the CPU backend.

XLA:CPU takes each step's temporary buffers from malloc and frees them when the step ends. By
default glibc serves a large block with its own mmap and moves that threshold up or down as the
process frees blocks, so the outcome depends on the process's history: a run that compiled its
train step itself (rather than loading it from the persistent compilation cache) was left
serving the step's buffers with mmap and munmap, paying page faults on every step (a sixth of
its CPU time in the kernel). Fixed thresholds keep blocks up to `mmap_threshold` on the heap and
the freed heap mapped, whatever came before. They did not cure a fresh clone's first
`make demo`, whose page faults have another cause not yet found (benchmarks/README.md, session
11, has the figures of both).
"""
import ctypes

M_TRIM_THRESHOLD = -1   # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20   # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1 << 30    # free heap kept mapped before glibc returns it (mallopt takes an int)


def fix_malloc_thresholds(mmap_threshold: int = MMAP_THRESHOLD,
                          trim_threshold: int = TRIM_THRESHOLD) -> bool:
  """Sets both thresholds with `mallopt`; False where the C library has no `mallopt` (not
  glibc) or refuses a value, and then nothing else changes."""
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  return (mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1 and
          mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1)
