"""Writes tests/data/solq_two_stage_parity.npz: the official two-stage SOLQ (`--two_stage
--with_box_refine`) run in float64 on CPU from the backbone maps, weights and targets of
tests/parity_two_stage_utils.py, with the official criterion's loss terms.

Needs torch and torchvision (not solq-jax's dependencies) and a checkout of the official code
(github.com/megvii-research/SOLQ); nothing of it is copied here:

  /work/torch_venv/bin/python scripts/make_two_stage_parity_fixture.py --official /work/official

The official modules are imported as scripts/make_swin_parity_fixture.py does. The backbone is
the official `Joiner` (its sine position encoding) around a module that returns the given maps
with the official down-sampled masks. The official matcher calls scipy's
`linear_sum_assignment`, which this venv lacks: it is replaced by an exhaustive search, exact for
these few targets.
"""
import argparse
import itertools
import os
import pathlib
import sys
import zlib

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tests'))
sys.path.insert(0, str(REPO / 'scripts'))
import make_swin_parity_fixture  # noqa: E402  pylint: disable=g-import-not-at-top
import parity_two_stage_utils as utils  # noqa: E402  pylint: disable=g-import-not-at-top
import parity_utils  # noqa: E402  pylint: disable=g-import-not-at-top

N_KEEP, GT_MASK_LEN = utils.MODEL['num_coeffs'], 8
COST = dict(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)       # official matcher defaults
WEIGHTS = {'loss_ce': 2.0, 'loss_bbox': 5.0, 'loss_giou': 2.0}


def exhaustive_assignment(cost):
  """`(rows, cols)` of the minimum-cost assignment of every column of `cost [Q, G]` (G <= Q)
  to a distinct row, by trying all of them (G is at most 3 here)."""
  cost = np.asarray(cost, np.float64)
  q, g = cost.shape
  total = np.zeros((q,) * g)
  index = np.indices((q,) * g)
  for j in range(g):
    total = total + cost[index[j], j]
  for a, b in itertools.combinations(range(g), 2):
    total = np.where(index[a] == index[b], np.inf, total)
  rows = np.asarray(np.unravel_index(np.argmin(total), total.shape))
  order = np.argsort(rows)
  return rows[order], np.arange(g)[order]


def build(official: str):
  torch = make_swin_parity_fixture.import_official(official)
  sys.modules['scipy.optimize'].linear_sum_assignment = exhaustive_assignment
  from torch import nn  # pylint: disable=g-import-not-at-top
  from models.backbone import BackboneBase, Joiner  # pylint: disable=g-import-not-at-top
  from models.position_encoding import PositionEmbeddingSine  # pylint: disable=g-import-not-at-top
  from models.deformable_transformer import DeformableTransformer  # pylint: disable=g-import-not-at-top
  from models.solq import SOLQ, SetCriterion  # pylint: disable=g-import-not-at-top
  from models.matcher import HungarianMatcher  # pylint: disable=g-import-not-at-top
  from models.dct import ProcessorDCT  # pylint: disable=g-import-not-at-top

  class GivenMaps(nn.Module):
    """The backbone body: returns the fixture's maps whatever the image."""

    def __init__(self):
      super().__init__()
      self.maps = None

    def forward(self, x):
      del x
      return {str(i): m for i, m in enumerate(self.maps)}

  class GivenBackbone(BackboneBase):
    def __init__(self):  # pylint: disable=super-init-not-called
      nn.Module.__init__(self)
      self.body = GivenMaps()
      self.strides = list(utils.STRIDES)
      self.num_channels = list(utils.CHANNELS)

  m = utils.MODEL
  d = m['hidden_dim']
  backbone = Joiner(GivenBackbone(), PositionEmbeddingSine(d // 2, normalize=True))
  transformer = DeformableTransformer(
      d_model=d, nhead=m['nheads'], num_encoder_layers=m['enc_layers'],
      num_decoder_layers=m['dec_layers'], dim_feedforward=m['dim_feedforward'], dropout=0.1,
      activation='relu', return_intermediate_dec=True,
      num_feature_levels=m['num_feature_levels'], dec_n_points=m['dec_n_points'],
      enc_n_points=m['enc_n_points'], two_stage=True,
      two_stage_num_proposals=m['num_queries'])
  model = SOLQ(backbone, transformer, num_classes=m['num_classes'],
               num_queries=m['num_queries'], num_feature_levels=m['num_feature_levels'],
               aux_loss=True, with_box_refine=True, two_stage=True, with_vector=True,
               processor_dct=ProcessorDCT(N_KEEP, GT_MASK_LEN),
               vector_hidden_dim=m['vector_hidden_dim'])
  matcher = HungarianMatcher(**COST)
  weight_dict = dict(WEIGHTS)
  for suffix in [f'_{i}' for i in range(m['dec_layers'] - 1)] + ['_enc']:
    weight_dict.update({k + suffix: v for k, v in WEIGHTS.items()})
  criterion = SetCriterion(m['num_classes'], matcher, weight_dict, ['labels', 'boxes'],
                           focal_alpha=0.25)
  return torch, model, criterion


def run(torch, model, criterion, state_dict, dtype):
  from util.misc import NestedTensor  # pylint: disable=g-import-not-at-top
  model = model.to(dtype).eval()
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()},
                        strict=True)
  features, pad_mask = utils.make_inputs()
  model.backbone[0].body.maps = [torch.from_numpy(f.transpose(0, 3, 1, 2)).to(dtype)
                                 for f in features]
  images = torch.zeros((2, 3) + utils.PAD_HW, dtype=dtype)
  with torch.no_grad():
    out = model(NestedTensor(images, torch.from_numpy(pad_mask)))
  labels, boxes, valid = utils.make_targets()
  targets = [{'labels': torch.from_numpy(labels[i][valid[i]]).long(),
              'boxes': torch.from_numpy(boxes[i][valid[i]]).to(dtype)} for i in range(2)]
  with torch.no_grad():
    terms = criterion(out, targets)
  to_np = lambda d: {k: v.numpy() for k, v in d.items() if hasattr(v, 'numpy')}
  outputs = to_np(out)
  outputs['enc_outputs'] = to_np(out['enc_outputs'])
  outputs['aux_outputs'] = [to_np(a) for a in out['aux_outputs']]
  result = utils.select_outputs(outputs)
  result.update({f'loss/{k}': np.float64(v) for k, v in terms.items()
                 if k.startswith('loss_')})
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--official', required=True, help='checkout of the official SOLQ code')
  parser.add_argument('--out',
                      default=str(REPO / 'tests' / 'data' / 'solq_two_stage_parity.npz'))
  a = parser.parse_args()
  torch, model, criterion = build(os.path.abspath(a.official))
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  state_dict = utils.make_state_dict(shapes)
  ref = run(torch, model, criterion, state_dict, torch.float64)
  fp32 = run(torch, model, criterion, state_dict, torch.float32)
  out = dict(ref)
  for k in ref:
    out[f'torch_fp32_max_abs_err/{k}'] = np.abs(fp32[k].astype(np.float64) - ref[k]).max()
  canonical = [v for k, v in state_dict.items()
               if k == parity_utils.canonical_key(k)]
  out['check/weights_abs_sum'] = sum(np.abs(v.astype(np.float64)).sum() for v in canonical)
  out['check/images_sum'] = sum(f.astype(np.float64).sum() for f in utils.make_inputs()[0])
  out['check/keys_crc'] = np.int64(zlib.crc32('\n'.join(sorted(shapes)).encode()))
  np.savez_compressed(a.out, **out)
  print(f'wrote {a.out}: {os.path.getsize(a.out)} bytes, {len(state_dict)} tensors')
  for k in sorted(ref):
    print(f'{k}: shape {np.shape(ref[k])}, std {np.std(ref[k]):.3g}, torch fp32 err '
          f'{out["torch_fp32_max_abs_err/" + k]:.2e}')
  scores = np.sort(ref['enc/pred_logits'][..., 0], axis=1)[:, ::-1]
  k = utils.MODEL['num_queries']
  print('top-k margin (k-th minus (k+1)-th class-0 logit):', scores[:, k - 1] - scores[:, k])


if __name__ == '__main__':
  main()
