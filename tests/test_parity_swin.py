"""Number-for-number parity of a Swin-T SOLQ with the official PyTorch model.

`tests/data/solq_swin_t_parity.npz` holds the official model's outputs (megvii-research/SOLQ
`build_swin_backbone('swin_t_p4w7')` + its deformable transformer and heads, eval mode, float64
on CPU; tests/data/README.md) for the tiny transformer config, with the numpy weights and the
two padded images (150x210, 120x180: not multiples of 7 x 32) of `parity_swin_utils`: the three
backbone maps (every 8th channel) and every decoder layer's logits, boxes and vectors.
"""
import pathlib
import zlib

import jax
import numpy as np
import pytest

import parity_swin_utils
import parity_utils
from solq_jax.models import build_model
from solq_jax.weights import convert

FIXTURE = pathlib.Path(__file__).parent / 'data' / 'solq_swin_t_parity.npz'
# The brief's bound: 1e-4 of each output's largest magnitude (float32 XLA vs float64 torch).
RELATIVE_TOLERANCE = 1e-4


def _config():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.backbone = 'swin_t'
  config.model.backbone_frozen_stages = -1
  return config


@pytest.fixture(scope='module')
def parity_run():
  ref = dict(np.load(FIXTURE))
  config = _config()
  rules = convert.model_plan(config.model)
  shapes = {k: rule.shape for rule in rules for k in rule.keys}
  assert zlib.crc32('\n'.join(sorted(shapes)).encode()) == ref['check/keys_crc'], (
      'the converter expects other keys than the official model has')
  state_dict = parity_swin_utils.make_state_dict(shapes)
  images, pad_mask = parity_swin_utils.make_inputs()
  parity_utils.check_generators(ref, state_dict.values(), images)
  variables = convert.convert_state_dict(state_dict, config.model)
  model = build_model(config.model)

  def forward(module, x, m):
    return module(x, m, train=False), module.body(x)

  outputs, features = jax.jit(lambda v, x, m: model.apply(v, x, m, method=forward))(
      variables, images, pad_mask)
  return ref, parity_swin_utils.select_outputs(jax.device_get(outputs),
                                               jax.device_get(features))


def _names():
  return [f'feature{l}' for l in range(3)] + [
      f'layer{i}/{n}' for i in range(2) for n in ('pred_logits', 'pred_boxes', 'pred_vectors')]


@pytest.mark.parametrize('name', _names())
def test_matches_official_swin_model(parity_run, name):
  ref, ours = parity_run
  assert ours[name].shape == ref[name].shape
  err = np.abs(ours[name].astype(np.float64) - ref[name]).max()
  scale = np.abs(ref[name]).max()
  assert err <= RELATIVE_TOLERANCE * scale, f'{name}: max abs error {err:.3e} (scale {scale:.3g})'


def test_reference_is_not_degenerate(parity_run):
  """Padding matters (the two images' features differ in layout), outputs vary, boxes inside."""
  ref, _ = parity_run
  for l in range(3):
    assert ref[f'feature{l}'].std() > 0.5
  for i in range(2):
    assert ref[f'layer{i}/pred_logits'].std() > 0.5
    assert ref[f'layer{i}/pred_vectors'].std() > 0.2
    boxes = ref[f'layer{i}/pred_boxes']
    assert 0.01 < boxes.min() and boxes.max() < 0.999 and boxes.std() > 0.1
