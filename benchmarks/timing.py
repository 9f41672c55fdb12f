"""Shared timing helpers of the benchmark scripts: interleaved rounds over named variants.

A variant is a zero-argument callable. Its result is waited for with `jax.block_until_ready`
(JAX arrays anywhere in the returned pytree; other leaves are left alone), so an asynchronously
dispatched computation is timed to its end. Variants are called in turn, round after round, so
that noise from other processes on a shared machine spreads over all of them; report medians.

    import timing  # the scripts' own folder is on sys.path when run as benchmarks/X.py
    samples = timing.interleaved({'a': lambda: f(x), 'b': lambda: g(x)}, rounds=5)
    timing.print_table(samples)
"""
import dataclasses
import statistics
import time

import jax


def block(result):
  """Waits for the JAX arrays in `result` (any pytree); returns it."""
  for leaf in jax.tree_util.tree_leaves(result):
    if isinstance(leaf, jax.Array):
      leaf.block_until_ready()
  return result


def timed(fn):
  """Calls fn() once -> (result, wall seconds, CPU seconds of this process, all threads)."""
  start, cpu = time.perf_counter(), time.process_time()
  result = block(fn())
  return result, time.perf_counter() - start, time.process_time() - cpu


@dataclasses.dataclass
class Samples:
  """Wall and CPU seconds of the timed calls of one variant; `first`: the warm-up call's wall."""
  wall: list
  cpu: list
  first: float = float('nan')

  @property
  def median(self):
    return statistics.median(self.wall)

  @property
  def min(self):
    return min(self.wall)

  @property
  def max(self):
    return max(self.wall)

  @property
  def cpu_median(self):
    return statistics.median(self.cpu)


def warm_up(fns, verbose=False):
  """Calls each variant once (compilation) -> {name: wall seconds}; prints them if verbose."""
  first = {}
  for name, fn in fns.items():
    _, first[name], _ = timed(fn)
    if verbose:
      print(f'  first call (compile) {name}: {first[name]:.2f} s', flush=True)
  return first


def interleaved(fns, rounds, warmup=True, verbose=False):
  """{name: zero-arg callable} -> {name: Samples} of `rounds` interleaved rounds.

  With `warmup`, each variant is first called once untimed (its wall time kept in `first`,
  printed if `verbose`).
  """
  first = warm_up(fns, verbose) if warmup else {}
  samples = {name: Samples([], [], first.get(name, float('nan'))) for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      _, wall, cpu = timed(fn)
      samples[name].wall.append(wall)
      samples[name].cpu.append(cpu)
  return samples


def medians(fns, rounds, warmup=True, verbose=False):
  """{name: median wall seconds} of `interleaved(...)`."""
  return {name: s.median for name, s in interleaved(fns, rounds, warmup, verbose).items()}


def print_table(samples, unit='ms', cpu=False, width=28, indent='  ', extra=None):
  """One line per variant: median (min, max) wall time, optionally the median CPU time.

  `extra(name, samples) -> str` appends a variant-specific note (e.g. a ratio to a baseline).
  """
  scale = {'s': 1.0, 'ms': 1e3}[unit]
  for name, s in samples.items():
    line = (f'{indent}{name:{width}s} median {s.median * scale:9.2f} {unit} '
            f'(min {s.min * scale:.2f}, max {s.max * scale:.2f})')
    if cpu:
      line += f'  cpu {s.cpu_median * scale:9.2f} {unit}'
    if extra:
      line += extra(name, s)
    print(line, flush=True)
