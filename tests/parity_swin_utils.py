"""Deterministic numpy weights, inputs and outputs for the Swin-T SOLQ parity check.

Pure numpy, shared by the fixture generator (scripts/make_swin_parity_fixture.py, run with
torch against the official code) and `tests/test_parity_swin.py`. The model is the tiny config
(configs/tiny.py: 64-d, 2 encoder + 2 decoder layers, 30 queries) with a Swin-T backbone.
Non-backbone tensors come from `parity_utils.make_tensor`; the Swin tensors get scales that make
every part matter: LayerNorm scales 1 +- 0.2 and biases 0.1, biases 0.1, relative position
tables N(0, 0.5) (as large as the attention logits), and the exact relative position index.
The two images are not multiples of 7 x 32, so the patch embedding, every block and the patch
merging pad.
"""
import re
import zlib

import numpy as np

import parity_utils

SEED = 20260312
IMAGE_SIZES = ((150, 210), (120, 180))
FEATURE_CHANNEL_STEP = 8          # the fixture keeps channels 0, 8, 16, ... of each backbone map
SWIN_PREFIX = 'backbone.0.body.'


def relative_position_index(window: int = 7) -> np.ndarray:
  """The official index, written out independently of solq_jax: for tokens a, b of a window
  (row-major), (dy + w - 1) * (2w - 1) + (dx + w - 1) with (dy, dx) = pos(a) - pos(b)."""
  n = window * window
  out = np.zeros((n, n), np.int64)
  for a in range(n):
    for b in range(n):
      dy, dx = a // window - b // window, a % window - b % window
      out[a, b] = (dy + window - 1) * (2 * window - 1) + (dx + window - 1)
  return out


def make_swin_tensor(key: str, shape, seed: int = SEED) -> np.ndarray:
  """The value of one Swin backbone entry (`key` without the `backbone.0.body.` prefix)."""
  shape = tuple(shape)
  if key.endswith('relative_position_index'):
    return relative_position_index(int(round((shape[0]) ** 0.5)))
  rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
  normal = lambda std: rng.normal(0.0, std, shape)
  is_norm = re.search(r'(^|\.)norm\d?\.(weight|bias)$', key)
  if key.endswith('relative_position_bias_table'):
    value = normal(0.5)
  elif is_norm and key.endswith('weight'):
    value = 1.0 + normal(0.2)
  elif key.endswith('weight'):                           # Linear [out, in] and the 4x4 conv
    value = normal(1.0 / np.sqrt(np.prod(shape[1:])))
  else:
    value = normal(0.1)
  return value.astype(np.float32)


def make_state_dict(shapes: dict, seed: int = SEED) -> dict:
  """`{official key: shape}` -> `{key: array}`: Swin keys by `make_swin_tensor`, the rest by
  `parity_utils.make_tensor` (aliases equal)."""
  out = {}
  for key, shape in shapes.items():
    if key.startswith(SWIN_PREFIX):
      out[key] = make_swin_tensor(key[len(SWIN_PREFIX):], shape, seed)
    else:
      out[key] = parity_utils.make_tensor(key, shape, seed)
  return out


def make_inputs(seed: int = SEED):
  return parity_utils.make_inputs(seed, IMAGE_SIZES)


def select_outputs(outputs: dict, features) -> dict:
  """Every decoder layer's outputs (all queries; `layer{i}/...`) and every
  `FEATURE_CHANNEL_STEP`-th channel of the backbone maps (`feature{l}`, NHWC)."""
  layers = list(outputs['aux_outputs']) + [outputs]
  out = {}
  for i, layer in enumerate(layers):
    for name in ('pred_logits', 'pred_boxes', 'pred_vectors'):
      out[f'layer{i}/{name}'] = np.asarray(layer[name], np.float32)
  for l, feature in enumerate(features):
    out[f'feature{l}'] = np.asarray(feature, np.float32)[..., ::FEATURE_CHANNEL_STEP]
  return out
