"""Deterministic numpy weights and inputs for the parity check against the official model.

Pure numpy (no torch, no jax), so the same functions build the official model's state dict
in the external reference script and ours in `test_parity.py`. Every tensor depends only on
(seed, canonical key, shape): key order does not matter and aliased keys get equal values.

Scales are chosen so activations stay O(1) through the 50-layer backbone and the transformer,
sampling locations land both inside and outside the feature maps, and the box refinement does
not saturate the sigmoid.
"""
import re
import zlib

import numpy as np

SEED = 20211028
IMAGE_SIZES = ((160, 224), (128, 192))   # (h, w) of the two images; padded bottom/right
SAVED_QUERIES = np.arange(0, 300, 5)      # queries stored in the fixture (60 of 300)
SAVED_AUX_LAYERS = (0, 3)                 # aux_outputs entries stored besides the last layer

_ALIASES = (
    (re.compile(r'^transformer\.decoder\.bbox_embed\.'), 'bbox_embed.'),
    (re.compile(r'^transformer\.decoder\.class_embed\.'), 'class_embed.'),   # two-stage
    (re.compile(r'^vector_embed\.\d+\.'), 'vector_embed.0.'),
)


def canonical_key(key: str) -> str:
  """The key whose tensor an alias shares (`transformer.decoder.bbox_embed.i` -> `bbox_embed.i`)."""
  for pattern, replacement in _ALIASES:
    key = pattern.sub(replacement, key)
  return key


def _rng(seed: int, key: str) -> np.random.Generator:
  return np.random.default_rng([seed, zlib.crc32(key.encode())])


def _fan_in(shape) -> int:
  return int(np.prod(shape[1:]))


def make_tensor(key: str, shape, seed: int = SEED) -> np.ndarray:
  """The float32 value of one official state-dict entry."""
  key = canonical_key(key)
  shape = tuple(shape)
  rng = _rng(seed, key)
  normal = lambda std: rng.normal(0.0, std, shape)
  name = key.rsplit('.', 1)[-1]
  if key.startswith('backbone.'):
    if name == 'weight' and len(shape) == 4:
      value = normal(np.sqrt(2.0 / _fan_in(shape)))           # He init for ReLU convs
    elif name == 'running_var':
      value = rng.uniform(0.5, 1.5, shape)
    elif name == 'running_mean':
      value = normal(0.1)
    elif name == 'weight':                                    # FrozenBN scale
      last_bn = re.search(r'(bn3|downsample\.1)\.weight$', key)
      value = rng.uniform(0.2, 0.5, shape) if last_bn else rng.uniform(0.5, 1.0, shape)
    else:                                                     # FrozenBN bias
      value = normal(0.1)
  elif key in ('transformer.level_embed', 'query_embed.weight'):
    value = normal(1.0)
  elif re.search(r'norm\d?\.weight$|input_proj\.\d+\.1\.weight$', key):
    value = 1.0 + normal(0.1)                                  # LayerNorm / GroupNorm scale
  elif key.endswith('sampling_offsets.bias'):
    value = rng.uniform(-2.0, 2.0, shape)                      # pixels (2-d refs)
  elif key.startswith('bbox_embed.') and key.endswith('layers.2.weight'):
    value = normal(0.1 / np.sqrt(_fan_in(shape)))              # gentle box refinement
  elif key == 'bbox_embed.0.layers.2.bias':                   # small first boxes, as the init
    value = np.array([0.0, 0.0, -2.0, -2.0]) + normal(0.1)
  elif name.endswith('weight'):                                # Linear / conv / in_proj_weight
    value = normal(1.0 / np.sqrt(_fan_in(shape)))
  else:                                                        # every other bias
    value = normal(0.1)
  return value.astype(np.float32)


def make_state_dict(shapes: dict, seed: int = SEED) -> dict:
  """`{key: shape}` -> `{key: float32 array}` (aliases equal by construction)."""
  return {k: make_tensor(k, s, seed) for k, s in shapes.items()}


def check_generators(ref: dict, weights, images) -> None:
  """Refuses a drifted generator: the abs-sum of the regenerated `weights` (arrays) and the sum
  of `images` must equal the fixture's `check/*` entries."""
  np.testing.assert_allclose(sum(np.abs(v.astype(np.float64)).sum() for v in weights),
                             ref['check/weights_abs_sum'], rtol=1e-12,
                             err_msg='the parity weights changed: regenerate the fixture')
  np.testing.assert_allclose(images.astype(np.float64).sum(), ref['check/images_sum'],
                             rtol=1e-12, err_msg='the parity inputs changed')


def make_inputs(seed: int = SEED, image_sizes=IMAGE_SIZES):
  """Normalised images of `image_sizes` (h, w) padded bottom/right into one batch.

  Returns `images [2, H, W, 3]` float32 (zeros on padding, as the official
  `nested_tensor_from_tensor_list`) and `pad_mask [2, H, W]` bool (True on padding).
  """
  rng = np.random.default_rng([seed, 1])
  h = max(s[0] for s in image_sizes)
  w = max(s[1] for s in image_sizes)
  images = np.zeros((len(image_sizes), h, w, 3), np.float32)
  pad_mask = np.ones((len(image_sizes), h, w), bool)
  for i, (hi, wi) in enumerate(image_sizes):
    images[i, :hi, :wi] = rng.normal(0.0, 1.0, (hi, wi, 3))
    pad_mask[i, :hi, :wi] = False
  return images, pad_mask


def select_outputs(outputs: dict) -> dict:
  """The flat `{name: array}` of the outputs the fixture stores (numpy in, numpy out)."""
  out = {}
  layers = [('last', outputs)] + [(f'aux{i}', outputs['aux_outputs'][i])
                                  for i in SAVED_AUX_LAYERS]
  for tag, layer in layers:
    for name in ('pred_logits', 'pred_boxes', 'pred_vectors'):
      out[f'{tag}/{name}'] = np.asarray(layer[name])[:, SAVED_QUERIES]
  return out
