"""Deterministic numpy inputs for the two-stage parity check against the official model.

Pure numpy, shared by scripts/make_two_stage_parity_fixture.py (run with torch against the
official code) and tests/test_two_stage.py. The official model runs from given backbone maps
(the ResNet-18 channel counts, random values) rather than a backbone, so the check covers the
input projections, the transformer, the two-stage proposals and the heads. hidden_dim is 256
because the official proposal embedding (128 sine features per box coordinate) only fits its
`pos_trans` at that width. Weights: `parity_utils.make_state_dict` (not stored: ~2M values).
"""
import numpy as np

import parity_utils

SEED = 20261203
PAD_HW = (64, 96)                      # the padded input; the second image is 48 x 72
VALID_HW = ((64, 96), (48, 72))
CHANNELS = (128, 256, 512)             # layer2..4 of ResNet-18 (configs/tiny.py's backbone)
STRIDES = (8, 16, 32)
# The model config (overrides of configs/tiny.py); the script repeats them for torch.
MODEL = dict(hidden_dim=256, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
             num_queries=16, num_classes=5, vector_hidden_dim=32, num_coeffs=16,
             num_feature_levels=4, enc_n_points=2, dec_n_points=2, with_box_refine=True,
             two_stage=True)
# Ground truth for the criterion check: (label, cx, cy, w, h) per image.
TARGETS = (((1, 0.30, 0.40, 0.20, 0.30), (3, 0.70, 0.55, 0.35, 0.25), (0, 0.50, 0.20, 0.10, 0.15)),
           ((4, 0.45, 0.50, 0.50, 0.60), (2, 0.20, 0.75, 0.15, 0.20)))


def make_inputs(seed: int = SEED):
  """`(features, pad_mask)`: three backbone maps `[2, H/s, W/s, C]` float32 (N(0, 1), zero
  where the nearest-down-sampled padding mask is True) and `pad_mask [2, H, W]` bool."""
  pad_mask = np.ones((2,) + PAD_HW, bool)
  for i, (h, w) in enumerate(VALID_HW):
    pad_mask[i, :h, :w] = False
  rng = np.random.default_rng([seed, 2])
  features = []
  for c, s in zip(CHANNELS, STRIDES):
    h, w = PAD_HW[0] // s, PAD_HW[1] // s
    f = rng.normal(0.0, 1.0, (2, h, w, c)).astype(np.float32)
    f *= ~pad_mask[:, ::s, ::s][:, :h, :w, None]
    features.append(f)
  return features, pad_mask


def make_targets():
  """Padded targets `labels [2, G]`, `boxes [2, G, 4]`, `valid [2, G]` (G = 3)."""
  g = max(len(t) for t in TARGETS)
  labels = np.zeros((2, g), np.int32)
  boxes = np.full((2, g, 4), 0.5, np.float32)
  valid = np.zeros((2, g), bool)
  for i, image in enumerate(TARGETS):
    for j, (label, *box) in enumerate(image):
      labels[i, j], boxes[i, j], valid[i, j] = label, box, True
  return labels, boxes, valid


def make_state_dict(shapes: dict, seed: int = SEED) -> dict:
  return parity_utils.make_state_dict(shapes, seed)


def select_outputs(outputs: dict) -> dict:
  """Flat `{name: float32 array}`: every decoder layer (`layer{i}/...`) and `enc/...`."""
  layers = list(outputs['aux_outputs']) + [outputs]
  out = {}
  for i, layer in enumerate(layers):
    for name in ('pred_logits', 'pred_boxes', 'pred_vectors'):
      out[f'layer{i}/{name}'] = np.asarray(layer[name], np.float32)
  for name in ('pred_logits', 'pred_boxes'):
    out[f'enc/{name}'] = np.asarray(outputs['enc_outputs'][name], np.float32)
  return out
