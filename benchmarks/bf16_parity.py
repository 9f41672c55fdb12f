"""bfloat16 accuracy on the R50 parity fixture: our model in float32 and in bfloat16 (the same
converted weights) against the official model's float64 outputs in `tests/data/
solq_r50_parity.npz` (see tests/test_parity.py), per output and decoder layer.

    python benchmarks/bf16_parity.py

Prints the largest absolute error and that error relative to the largest magnitude of the
official output, for the last layer and the stored auxiliary layers.
"""
import os
import sys

import jax
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, 'tests'))
from configs import solq_r50  # pylint: disable=g-import-not-at-top,wrong-import-position
import parity_utils  # pylint: disable=g-import-not-at-top,wrong-import-position
from solq_jax.models import build_model  # pylint: disable=g-import-not-at-top,wrong-import-position
from solq_jax.weights import convert  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  ref = dict(np.load(os.path.join(_ROOT, 'tests', 'data', 'solq_r50_parity.npz')))
  config = solq_r50.get_config()
  rules = convert.model_plan(config.model)
  state_dict = parity_utils.make_state_dict({k: r.shape for r in rules for k in r.keys})
  variables = convert.convert_state_dict(state_dict, config.model)
  images, pad_mask = parity_utils.make_inputs()
  results = {}
  for dtype in ('float32', 'bfloat16'):
    config.model.dtype = dtype
    model = build_model(config.model)
    out = jax.jit(lambda v, x, m, model=model: model.apply(v, x, m, train=False))(
        variables, images, pad_mask)
    results[dtype] = parity_utils.select_outputs(jax.device_get(out))
  print('| output | max abs err fp32 | max abs err bf16 | bf16 err / max abs value | '
        'max abs value |\n|---|---|---|---|---|')
  for layer in ['last'] + [f'aux{i}' for i in parity_utils.SAVED_AUX_LAYERS]:
    for name in ('pred_logits', 'pred_boxes', 'pred_vectors'):
      key = f'{layer}/{name}'
      want = ref[key]
      errs = {d: float(np.abs(results[d][key].astype(np.float64) - want).max())
              for d in results}
      scale = float(np.abs(want).max())
      print(f'| {key} | {errs["float32"]:.2e} | {errs["bfloat16"]:.2e} | '
            f'{errs["bfloat16"] / scale:.2e} | {scale:.2f} |', flush=True)


if __name__ == '__main__':
  main()
