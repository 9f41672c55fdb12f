"""The whole inference as one self-contained StableHLO artifact (`jax.export`).

    python -m solq_jax.inference.export --config configs/solq_r50.py --checkpoint CKPT --out DIR

writes `DIR/model.jax_export` (the bytes of `jax.export.Exported.serialize()`) and
`DIR/contract.json`. The artifact maps a normalised, padded image batch and its padding mask to
the top-k detections with their decoded box-relative masks; the weights are constants inside
it, the batch size is symbolic, and it is lowered for every platform of `eval.export_platforms`.
Running it needs jax alone (no solq_jax, no flax): the README's loader imports only jax, numpy
and PIL. The deformable attention needs no custom op on the 'xla' path, which is what makes
the export possible; the model is exported with `attention_impl='xla'`.

The padded size is fixed (the attention's level shapes are static): `eval.export_hw`, by default
the largest bucket side squared, which holds every eval-resized image. `contract.json` says how
to resize, normalise and pad an image, and what each output means.
"""
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from solq_jax.data import pipeline
from solq_jax.data import transforms
from solq_jax.inference import postprocess as postprocess_lib
from solq_jax.inference import visualize

log = logging.getLogger(__name__)

EXPORT_FILE = 'model.jax_export'
CONTRACT_FILE = 'contract.json'
FORMAT = 'solq-jax-export-v1'
INPUTS = ('images', 'pad_mask')
OUTPUTS = ('scores', 'labels', 'boxes', 'masks', 'query_index')


def inference_function(model, variables, coder, top_k):
  """`(images [B,H,W,3], pad_mask [B,H,W]) -> {scores, labels, boxes, masks}` with the
  variables closed over: the top-k of the last decoder layer (as `Postprocessor`), boxes as xyxy
  fractions of the unpadded image, masks the coder's decoded `[B,K,S,S]` bool box masks."""

  def infer(images, pad_mask):
    out = model.apply(variables, images, pad_mask, train=False)
    unit = jnp.ones((images.shape[0], 2), jnp.int32)   # boxes stay fractions of the image
    scores, labels, boxes, query = postprocess_lib.select_detections(
        out['pred_logits'], out['pred_boxes'], unit, top_k)
    box_masks = postprocess_lib.decode_vectors(out['pred_vectors'], query, coder)
    return dict(scores=scores, labels=labels, boxes=boxes, masks=box_masks, query_index=query)
  return infer


def export_hw(config):
  """The padded (H, W) the artifact takes: `eval.export_hw`, else the largest bucket, square."""
  if tuple(config.eval.export_hw):
    hw = tuple(int(v) for v in config.eval.export_hw)
    if len(hw) != 2 or min(hw) <= 0:
      raise ValueError(f'config.eval.export_hw must be (H, W) > 0, got {config.eval.export_hw}')
    return hw
  side = max(pipeline.bucket_sizes(config.data))
  return side, side


def contract(config, coder, hw, platforms, class_names):
  """The input contract and output meanings, written beside the artifact."""
  d, e = config.data, config.eval
  return {
      'format': FORMAT,
      'platforms': list(platforms),
      'inputs': [
          {'name': 'images', 'shape': ['batch', hw[0], hw[1], 3], 'dtype': 'float32'},
          {'name': 'pad_mask', 'shape': ['batch', hw[0], hw[1]], 'dtype': 'bool'}],
      'outputs': [
          {'name': 'scores', 'shape': ['batch', 'k'], 'dtype': 'float32',
           'meaning': 'sigmoid class score, descending'},
          {'name': 'labels', 'shape': ['batch', 'k'], 'dtype': 'int32',
           'meaning': 'category id (class_names)'},
          {'name': 'boxes', 'shape': ['batch', 'k', 4], 'dtype': 'float32',
           'meaning': 'x0, y0, x1, y1 as fractions of the unpadded image: times the original '
                      '(width, height, width, height) gives pixels of the original image'},
          {'name': 'masks', 'shape': ['batch', 'k', coder.mask_size, coder.mask_size],
           'dtype': 'bool', 'meaning': 'the object mask inside its box (rows top to bottom); '
                                       'resize it to the box to paste it'},
          {'name': 'query_index', 'shape': ['batch', 'k'], 'dtype': 'int32',
           'meaning': 'the object query of each detection'}],
      'preprocess': {
          'color': 'RGB', 'scale': 1 / 255,
          'mean': [float(v) for v in transforms.IMAGENET_MEAN],
          'std': [float(v) for v in transforms.IMAGENET_STD],
          'resize': {'short_side': int(d.eval_size), 'max_long_side': int(d.eval_max_size),
                     'interpolation': 'bilinear',
                     'rule': 'if long / short * short_side > max_long_side: short_side = '
                             'round(max_long_side * short / long); the short side becomes '
                             'short_side and the long side int(short_side * long / short)'},
          'padding': 'the resized image at the top-left of a zero [H, W] canvas; pad_mask is '
                     'True on the padding'},
      'top_k': int(min(e.top_k, config.model.num_queries * config.model.num_classes)),
      'mask_size': int(coder.mask_size),
      'class_names': {str(k): v for k, v in sorted(class_names.items())},
  }


def export(config, model, variables, coder, class_names):
  """(`jax.export.Exported`, contract dict) of the whole inference of `config`."""
  if not coder.has_masks:
    raise ValueError('config.model.with_masks=False (detection only) cannot be exported: the '
                     'exported contract returns masks; evaluate or predict instead')
  if config.eval.mask_decode != 'coder':
    raise ValueError(f"config.eval.mask_decode='{config.eval.mask_decode}' cannot be exported: "
                     "the exported contract returns the coder's bool box masks; export with "
                     "mask_decode='coder', or evaluate and predict from the checkpoint")
  hw = export_hw(config)
  platforms = tuple(p.strip() for p in str(config.eval.export_platforms).split(',') if p.strip())
  if not platforms:
    raise ValueError('config.eval.export_platforms names no platform (e.g. "cpu,cuda")')
  if model.attention_impl != 'xla':
    model = model.clone(attention_impl='xla')   # the Pallas kernel is CUDA-only
  infer = inference_function(model, variables, coder, config.eval.top_k)
  batch, = jax.export.symbolic_shape('batch')
  args = (jax.ShapeDtypeStruct((batch, *hw, 3), jnp.float32),
          jax.ShapeDtypeStruct((batch, *hw), jnp.bool_))
  exported = jax.export.export(jax.jit(infer), platforms=platforms)(*args)
  return exported, contract(config, coder, hw, platforms, class_names)


def save(out_dir, exported, contract_dict):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, EXPORT_FILE), 'wb') as f:
    f.write(exported.serialize())
  with open(os.path.join(out_dir, CONTRACT_FILE), 'w') as f:
    json.dump(contract_dict, f, indent=1)


def is_export_dir(path) -> bool:
  return bool(path) and os.path.isfile(os.path.join(os.fspath(path), EXPORT_FILE))


class ExportedModel:
  """An exported directory, callable as `(images, pad_mask) -> dict of numpy outputs`."""

  def __init__(self, directory):
    self.directory = os.fspath(directory)
    try:
      with open(os.path.join(self.directory, CONTRACT_FILE)) as f:
        self.contract = json.load(f)
      with open(os.path.join(self.directory, EXPORT_FILE), 'rb') as f:
        self.exported = jax.export.deserialize(bytearray(f.read()))
    except (OSError, ValueError) as e:
      raise ValueError(f'{self.directory} is not a readable solq-jax export ({e})') from e
    if self.contract.get('format') != FORMAT:
      raise ValueError(f'{self.directory}: contract format {self.contract.get("format")!r}, '
                       f'expected {FORMAT!r}')
    spec = self.contract['inputs'][0]['shape']
    self.hw = (int(spec[1]), int(spec[2]))
    self.class_names = {int(k): v for k, v in self.contract['class_names'].items()}

  def check_inputs(self, images, pad_mask):
    """Raises naming the input whose shape or dtype breaks the contract."""
    for name, x, dtype, tail in (('images', images, np.float32, (*self.hw, 3)),
                                 ('pad_mask', pad_mask, np.bool_, self.hw)):
      if np.asarray(x).dtype != dtype or tuple(np.shape(x)[1:]) != tail:
        want = ', '.join(str(n) for n in tail)
        raise ValueError(f'{name} must be {np.dtype(dtype).name} [batch, {want}] '
                         f'({self.directory}/{CONTRACT_FILE}), got {np.asarray(x).dtype.name} '
                         f'{tuple(np.shape(x))}')
    if np.shape(images)[0] != np.shape(pad_mask)[0]:
      raise ValueError(f'images and pad_mask have different batch sizes: {np.shape(images)[0]} '
                       f'and {np.shape(pad_mask)[0]}')

  def __call__(self, images, pad_mask):
    self.check_inputs(images, pad_mask)
    return jax.tree.map(np.asarray, self.exported.call(images, pad_mask))


def main(argv=None):
  """`python -m solq_jax.inference.export --config C --checkpoint CKPT --out DIR`."""
  import sys  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from solq_jax import masks as masks_lib  # pylint: disable=g-import-not-at-top
  from solq_jax import models  # pylint: disable=g-import-not-at-top
  from solq_jax import weights  # pylint: disable=g-import-not-at-top
  argv = ['solq_jax.inference.export'] + list(sys.argv[1:] if argv is None else argv)
  fv = flags.FlagValues()
  config_flag = config_flags.DEFINE_config_file('config', None, 'experiment config file',
                                                flag_values=fv, sys_argv=argv)
  checkpoint = flags.DEFINE_string('checkpoint', '', 'checkpoint dir or official .pth',
                                   flag_values=fv)
  out = flags.DEFINE_string('out', None, 'output directory', flag_values=fv)
  for name in ('config', 'out'):
    flags.mark_flag_as_required(name, flag_values=fv)
  fv(argv)
  config = config_flag.value
  model = models.build_model(config.model)
  variables = weights.load(checkpoint.value, config.model, model=model, seed=config.seed,
                           use_ema=config.eval.use_ema)
  coder = masks_lib.build_coder(config.model)
  exported, contract_dict = export(config, model, variables, coder,
                                   visualize.category_names(config))
  save(out.value, exported, contract_dict)
  print(f'wrote {out.value}/{EXPORT_FILE} ({", ".join(exported.platforms)}; input '
        f'[batch, {contract_dict["inputs"][0]["shape"][1]}, '
        f'{contract_dict["inputs"][0]["shape"][2]}, 3]) and {CONTRACT_FILE}')


if __name__ == '__main__':
  main()
