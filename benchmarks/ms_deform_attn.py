"""Benchmark of the multi-scale deformable-attention core (forward, forward+backward).

  python benchmarks/ms_deform_attn.py                      # encoder scale, batch 1 (CPU default)
  python benchmarks/ms_deform_attn.py --batch 4 --scale both   # issue 8's GPU shapes

Variants, timed interleaved in one run (medians):
  simple  - per-level `take_along_axis` gather of the 4 corners, autodiff backward (baseline)
  fused   - the fused XLA forward (ops/ms_deform_attn.py) with autodiff backward
  xla     - the fused forward with its custom_vjp backward (what `impl='xla'` runs)
  pallas  - the Triton kernel (GPU only; on CPU a small interpret-mode run, correctness only)
It also prints the FLOP and byte floors of the shape on the device it runs on.
"""
import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels import ms_deform_attn as pallas_kernel
from solq_jax.ops import ms_deform_attn as msda
import timing  # benchmarks/timing.py

ENCODER_LEVELS = ((100, 134), (50, 67), (25, 34), (13, 17))  # 800x1066 input
HEADS, HEAD_DIM, POINTS = 8, 48, 4
# Peak fp32 FLOP/s (non-tensor-core) and DRAM bytes/s by device kind.
PEAKS = {'A100': (19.5e12, 1.555e12), 'H100': (66.9e12, 3.35e12)}
CPU_PEAK_FLOPS = 330e9  # 2 Zen-5 cores, AVX-512 (perf_notes.md)


def simple_core(value, shapes, sampling_locations, attention_weights):
  """Baseline: transpose each level to [B,M,HW,Dh] and gather each corner separately."""
  b, _, m, dh = value.shape
  lq, p = sampling_locations.shape[1], sampling_locations.shape[4]
  out = jnp.zeros((b, m, lq * p, dh), jnp.float32)
  for lvl, (h, w) in enumerate(shapes):
    start = sum(hh * ww for hh, ww in shapes[:lvl])
    value_l = jnp.transpose(value[:, start:start + h * w], (0, 2, 1, 3))
    loc = jnp.transpose(sampling_locations[:, :, :, lvl], (0, 2, 1, 3, 4)).reshape(b, m, -1, 2)
    attn = jnp.transpose(attention_weights[:, :, :, lvl], (0, 2, 1, 3)).reshape(b, m, -1)
    for tap in msda.bilinear_taps(loc, h, w):
      gathered = jnp.take_along_axis(value_l, tap.index[..., None], axis=2)
      out = out + gathered * (tap.weight * attn)[..., None]
  out = out.reshape(b, m, lq, p, dh).sum(axis=3)
  return jnp.transpose(out, (0, 2, 1, 3)).reshape(b, lq, m * dh)


def fused_autodiff_core(value, shapes, sampling_locations, attention_weights):
  out = msda.fused_forward(value, shapes, sampling_locations, attention_weights)
  return out.reshape(out.shape[:2] + (-1,))


def inputs(batch, queries, levels, seed=0):
  rng = np.random.default_rng(seed)
  s = sum(h * w for h, w in levels)
  value = jnp.asarray(rng.normal(size=(batch, s, HEADS, HEAD_DIM)), jnp.float32)
  loc = jnp.asarray(rng.uniform(-0.05, 1.05, (batch, queries, HEADS, len(levels), POINTS, 2)),
                    jnp.float32)
  attn = jnp.asarray(rng.uniform(size=(batch, queries, HEADS, len(levels), POINTS)), jnp.float32)
  return value, loc, attn


def floors(batch, queries, levels, peak_flops, bandwidth):
  """Arithmetic and memory floors (seconds) of forward and backward, fp32."""
  taps = batch * queries * HEADS * len(levels) * POINTS * 4
  s = sum(h * w for h, w in levels)
  value_bytes = batch * s * HEADS * HEAD_DIM * 4
  sample_bytes = batch * queries * HEADS * len(levels) * POINTS * 3 * 4  # x, y, weight
  out_bytes = batch * queries * HEADS * HEAD_DIM * 4
  fwd_flops = taps * 2 * HEAD_DIM
  bwd_flops = taps * 4 * HEAD_DIM  # dot with the output gradient + the scatter update
  fwd_bytes = value_bytes + sample_bytes + out_bytes
  bwd_bytes = 2 * value_bytes + 2 * sample_bytes + out_bytes  # + value-gradient writes
  tap_bytes = taps * HEAD_DIM * 4  # every corner row fetched once with no cache reuse
  return {
      'fwd_flop_floor_ms': 1e3 * fwd_flops / peak_flops,
      'fwd_byte_floor_ms': 1e3 * fwd_bytes / bandwidth,
      'fwd_uncached_gather_ms': 1e3 * tap_bytes / bandwidth,
      'bwd_flop_floor_ms': 1e3 * bwd_flops / peak_flops,
      'bwd_byte_floor_ms': 1e3 * bwd_bytes / bandwidth,
      'bwd_uncached_gather_and_atomics_ms': 1e3 * 2 * tap_bytes / bandwidth,
  }


def measured_bandwidth():
  """Rough DRAM bandwidth of this host: a 256 MB array copy-and-scale, bytes read + written."""
  x = jnp.ones((64 * 2 ** 20,), jnp.float32)
  fn = jax.jit(lambda x: x * 1.0001)
  return 2 * x.nbytes / timing.interleaved({'copy': lambda: fn(x)}, 5)['copy'].min


def device_peaks(device):
  for name, peaks in PEAKS.items():
    if name in device.device_kind:
      return peaks
  if device.platform == 'cpu':
    return CPU_PEAK_FLOPS, measured_bandwidth()
  return None


def make_fns(core, shapes, cotangent):
  fwd = jax.jit(lambda v, l, a: core(v, shapes, l, a))

  def loss(v, l, a):
    return jnp.sum(core(v, shapes, l, a) * cotangent)

  fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  return fwd, fwd_bwd


def run_scale(label, batch, queries, levels, variants, repeats, on_gpu):
  value, loc, attn = inputs(batch, queries, levels)
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(batch, queries, HEADS * HEAD_DIM)),
                          jnp.float32)
  cores = {'simple': simple_core, 'fused': fused_autodiff_core, 'xla': msda.ms_deform_attn_xla,
           'pallas': pallas_kernel.ms_deform_attn_pallas}
  fns = {}
  for name in variants:
    if name == 'pallas' and not on_gpu:
      continue
    fwd, fwd_bwd = make_fns(cores[name], levels, cotangent)
    fns[f'{name} fwd'] = functools.partial(fwd, value, loc, attn)
    fns[f'{name} fwd+bwd'] = functools.partial(fwd_bwd, value, loc, attn)
  medians = timing.medians(fns, repeats)  # one untimed warm-up (compile) call each first
  print(f'\n{label}: batch {batch}, {queries} queries, levels {levels}, '
        f'{HEADS}x{HEAD_DIM}, {POINTS} points (median of {repeats})')
  for name, t in medians.items():
    print(f'  {name:18s} {1e3 * t:9.1f} ms')
  return medians


def interpret_check():
  """On CPU: the Pallas kernel in interpret mode on a small shape (correctness mode, not speed)."""
  levels = ((5, 7), (3, 4))
  value, loc, attn = inputs(1, 8, levels)
  t = time.perf_counter()
  out = pallas_kernel.ms_deform_attn_pallas(value, levels, loc, attn, interpret=True)
  err = float(jnp.abs(out - msda.ms_deform_attn_xla(value, levels, loc, attn)).max())
  print(f'\npallas interpret mode (CORRECTNESS MODE, not a speed figure): 8 queries, levels '
        f'{levels}: max |pallas - xla| = {err:.2e}, {time.perf_counter() - t:.1f} s incl. '
        'compile')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--scale', choices=('encoder', 'decoder', 'both'), default='encoder')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--variants', default='simple,fused,xla,pallas')
  args = parser.parse_args()
  device = jax.devices()[0]
  on_gpu = pallas_kernel.device_supported(device)
  variants = args.variants.split(',')
  print(f'device: {device.platform} {device.device_kind!r}; pallas kernel '
        f'{"enabled" if on_gpu else "not timed (needs an sm80+ GPU)"}')
  scales = []
  encoder_queries = sum(h * w for h, w in ENCODER_LEVELS)
  if args.scale in ('encoder', 'both'):
    scales.append(('encoder', encoder_queries))
  if args.scale in ('decoder', 'both'):
    scales.append(('decoder', 300))
  peaks = device_peaks(device)
  for label, queries in scales:
    run_scale(label, args.batch, queries, ENCODER_LEVELS, variants, args.repeats, on_gpu)
    if peaks:
      print(f'  floors at {peaks[0] / 1e12:.2f} TFLOP/s, {peaks[1] / 1e9:.0f} GB/s:')
      for key, ms in floors(args.batch, queries, ENCODER_LEVELS, *peaks).items():
        print(f'    {key:36s} {ms:9.3f} ms')
  if not on_gpu and 'pallas' in variants:
    interpret_check()


if __name__ == '__main__':
  main()
