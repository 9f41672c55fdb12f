"""Post-processing speed: 100 masks at 800x1066 (the official PostProcess: 0.33 s on this CPU).

    .venv/bin/python benchmarks/postprocess.py [--repeats 7]

Random outputs of the R50 head shapes (Q=300, C=91, n_k=256, N=128), one image of 800x1066.
Timed, interleaved per repeat (medians reported):
  full       `Postprocessor(...)(outputs, sizes)` end to end, numpy masks on the host, for the exact-size canvas
             (size_multiple=1) and the default bucketed canvas (128 -> 896x1152, then cropped);
  select     top-k + boxes (jitted);
  decode     gather + DCT decode of the 100 vectors (jitted);
  paste      `solq_jax.masks.paste_masks` alone at 800x1066 (device, blocked until ready);
  host       device -> numpy bool [100,H,W] copy (+ crop for the bucketed canvas).
"""
import argparse
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from solq_jax import masks  # noqa: E402
from solq_jax.inference import postprocess as pp  # noqa: E402
import timing  # noqa: E402  (benchmarks/timing.py)

OFFICIAL_SECONDS = 0.33
HW = (800, 1066)


def _outputs(seed=0, batch=1, queries=300, classes=91, coeffs=256):
  rng = np.random.default_rng(seed)
  centres = rng.uniform(0.2, 0.8, (batch, queries, 2))
  sizes = rng.uniform(0.05, 0.6, (batch, queries, 2))
  coder = masks.DCTCoder(128, coeffs)
  # Vectors of real shapes (ellipses) so the decoded masks are object-like, not noise.
  yy, xx = np.mgrid[:128, :128]
  shapes = np.stack([((yy - 64) / (20 + i % 40)) ** 2 + ((xx - 64) / (60 - i % 40)) ** 2 < 1
                     for i in range(queries)])
  vectors = coder.transform_np(shapes.astype(np.float32))
  logits = rng.normal(size=(batch, queries, classes))
  return coder, dict(pred_logits=jnp.asarray(logits, jnp.float32),
                     pred_boxes=jnp.asarray(np.concatenate([centres, sizes], -1), jnp.float32),
                     pred_vectors=jnp.asarray(np.tile(vectors[None], (batch, 1, 1)), jnp.float32))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=7)
  args = parser.parse_args()
  coder, outputs = _outputs()
  sizes = np.array([HW])
  scores, labels, boxes, query = pp.select_detections(
      outputs['pred_logits'], outputs['pred_boxes'], jnp.asarray(sizes), 100)
  exact = pp.Postprocessor(coder, 100, size_multiple=1)
  bucketed = pp.Postprocessor(coder, 100, size_multiple=128, max_exact_sizes=0)
  box_masks = exact.decode_selected(outputs['pred_vectors'], query)[0]
  pasted = pp.paste_on_canvas(box_masks, boxes[0], HW)
  cases = {
      'full (exact canvas)': lambda: exact(outputs, sizes),
      'full (canvas x128)': lambda: bucketed(outputs, sizes),
      'select': lambda: pp.select_detections(outputs['pred_logits'], outputs['pred_boxes'],
                                             jnp.asarray(sizes), 100),
      'decode': lambda: exact.decode_selected(outputs['pred_vectors'], query),
      'paste (masks.paste_masks)': lambda: masks.paste_masks(box_masks, boxes[0], HW),
      'host copy': lambda: np.asarray(pasted),
  }
  samples = timing.interleaved(cases, args.repeats)  # after one untimed (compile) call each
  det = cases['full (exact canvas)']()[0]
  print(f'100 masks at {HW[0]}x{HW[1]} ({det["masks"].mean() * 100:.1f}% of pixels set), '
        f'median of {args.repeats}, jax {jax.__version__}, {jax.devices()[0].platform}; '
        f'load average {os.getloadavg()[0]:.1f} (CPU time is less sensitive to other processes)')
  timing.print_table(samples, cpu=True, extra=lambda name, t: (
      f'  {OFFICIAL_SECONDS / t.median:5.2f}x vs official {OFFICIAL_SECONDS}s'
      if 'full' in name else ''))


if __name__ == '__main__':
  main()
