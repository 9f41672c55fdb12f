"""Writes tests/data/solq_swin_t_parity.npz: the official SOLQ with a Swin-T backbone, run in
float64 on CPU with the weights and inputs of tests/parity_swin_utils.py.

Needs torch, torchvision and timm (not solq-jax's dependencies) and a checkout of the official
code (github.com/megvii-research/SOLQ); nothing of it is copied here:

  /work/torch_venv/bin/python scripts/make_swin_parity_fixture.py --official /work/official

The official modules are imported as they are, with the imports this CPU run does not use
stubbed (the CUDA deformable-attention extension, detectron2, cv2, pywt, matplotlib, scipy) and the
deformable-attention function replaced by the official pure-PyTorch core
(`ms_deform_attn_core_pytorch`). The model shapes are those of configs/tiny.py with
`backbone='swin_t'`; they are repeated below because this script runs without jax.
"""
import argparse
import os
import pathlib
import sys
import types
import zlib

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tests'))
import parity_swin_utils  # noqa: E402  pylint: disable=g-import-not-at-top

# configs/tiny.py
TINY = dict(hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=128,
            num_queries=30, num_classes=8, vector_hidden_dim=128, n_keep=64, gt_mask_len=64,
            num_feature_levels=4, enc_n_points=4, dec_n_points=4)


def _stub_modules():
  """Empty stand-ins for modules that the official files import but this forward never uses."""
  def module(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m
  unused = lambda *a, **k: None
  module('MultiScaleDeformableAttention')
  module('scipy')
  module('scipy.optimize', linear_sum_assignment=unused)
  module('scipy.fftpack', dct=unused, idct=unused)
  module('cv2')
  module('pywt')
  module('matplotlib')
  module('matplotlib.pyplot')
  module('detectron2')
  module('detectron2.structures', BitMasks=object)
  module('detectron2.layers', paste_masks_in_image=unused)
  module('detectron2.utils')
  module('detectron2.utils.memory', retry_if_cuda_oom=lambda f: f)


def import_official(official: str):
  """Makes the official `models` and `util` packages importable on CPU (the stubs above, the
  pure-PyTorch deformable-attention core); returns torch."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  torchvision.__version__ = '0.99.0'    # util/misc.py parses the first three characters
  _stub_modules()
  sys.path.insert(0, official)
  # The `models` package without its __init__ (which imports every meta-architecture).
  package = types.ModuleType('models')
  package.__path__ = [os.path.join(official, 'models')]
  sys.modules['models'] = package
  from models.ops.functions import ms_deform_attn_func  # pylint: disable=g-import-not-at-top
  from models.ops.modules import ms_deform_attn  # pylint: disable=g-import-not-at-top

  class PyTorchCore:
    @staticmethod
    def apply(value, shapes, level_start, locations, weights, im2col_step):
      del level_start, im2col_step
      return ms_deform_attn_func.ms_deform_attn_core_pytorch(value, shapes, locations, weights)

  ms_deform_attn.MSDeformAttnFunction = PyTorchCore
  return torch


def build_official(official: str, variant: str = 'swin_t_p4w7', shapes=None):
  """The official SOLQ (box refinement, vectors) with the Swin `variant` and the transformer
  and head sizes of `shapes` (default: TINY)."""
  torch = import_official(official)
  from models.swin_transformer import build_swin_backbone  # pylint: disable=g-import-not-at-top
  from models.deformable_transformer import DeformableTransformer  # pylint: disable=g-import-not-at-top
  from models.solq import SOLQ  # pylint: disable=g-import-not-at-top
  from models.dct import ProcessorDCT  # pylint: disable=g-import-not-at-top
  t = shapes or TINY
  args = argparse.Namespace(hidden_dim=t['hidden_dim'], position_embedding='sine',
                            backbone=variant, checkpoint=False, pretrained=None)
  backbone = build_swin_backbone(args)
  transformer = DeformableTransformer(
      d_model=t['hidden_dim'], nhead=t['nheads'], num_encoder_layers=t['enc_layers'],
      num_decoder_layers=t['dec_layers'], dim_feedforward=t['dim_feedforward'], dropout=0.1,
      activation='relu', return_intermediate_dec=True,
      num_feature_levels=t['num_feature_levels'], dec_n_points=t['dec_n_points'],
      enc_n_points=t['enc_n_points'], two_stage=False, two_stage_num_proposals=t['num_queries'])
  model = SOLQ(backbone, transformer, num_classes=t['num_classes'],
               num_queries=t['num_queries'], num_feature_levels=t['num_feature_levels'],
               aux_loss=True, with_box_refine=True, two_stage=False, with_vector=True,
               processor_dct=ProcessorDCT(t['n_keep'], t['gt_mask_len']),
               vector_hidden_dim=t['vector_hidden_dim'])
  return torch, model


def run(torch, model, state_dict, images, pad_mask, dtype):
  from util.misc import NestedTensor  # pylint: disable=g-import-not-at-top
  model = model.to(dtype).eval()
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()},
                        strict=True)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2)).to(dtype)
  mask = torch.from_numpy(pad_mask)
  with torch.no_grad():
    feats = model.backbone[0].body(x)
    features = [feats[k].permute(0, 2, 3, 1).numpy() for k in sorted(feats)]
    out = model(NestedTensor(x, mask))
  to_np = lambda d: {k: d[k].numpy() for k in ('pred_logits', 'pred_boxes', 'pred_vectors')}
  outputs = to_np(out)
  outputs['aux_outputs'] = [to_np(a) for a in out['aux_outputs']]
  return parity_swin_utils.select_outputs(outputs, features)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--official', required=True, help='checkout of the official SOLQ code')
  parser.add_argument('--out', default=str(REPO / 'tests' / 'data' / 'solq_swin_t_parity.npz'))
  a = parser.parse_args()
  torch, model = build_official(os.path.abspath(a.official))
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  state_dict = parity_swin_utils.make_state_dict(shapes)
  images, pad_mask = parity_swin_utils.make_inputs()
  ref = run(torch, model, state_dict, images, pad_mask, torch.float64)
  fp32 = run(torch, model, state_dict, images, pad_mask, torch.float32)
  out = dict(ref)
  for k in ref:
    out[f'torch_fp32_max_abs_err/{k}'] = np.abs(fp32[k].astype(np.float64) - ref[k]).max()
  out['check/weights_abs_sum'] = sum(np.abs(v.astype(np.float64)).sum()
                                     for v in state_dict.values())
  out['check/images_sum'] = images.astype(np.float64).sum()
  out['check/keys_crc'] = np.int64(zlib.crc32('\n'.join(sorted(shapes)).encode()))
  np.savez_compressed(a.out, **out)
  print(f'wrote {a.out}: {os.path.getsize(a.out)} bytes, {len(state_dict)} tensors')
  for k in sorted(ref):
    print(f'{k}: shape {ref[k].shape}, std {ref[k].std():.3g}, torch fp32 err '
          f'{out["torch_fp32_max_abs_err/" + k]:.2e}')


if __name__ == '__main__':
  main()
