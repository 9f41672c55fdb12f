"""Parameter counts of the official SOLQ with Swin-T and Swin-L backbones (torch, no weights).

  /work/torch_venv/bin/python scripts/count_official_swin_params.py --official /work/official

Sizes: the official argparse defaults of the R50 recipe (d=384, 6+6 layers, 300 queries, 91
classes, 256 vector coefficients, vector MLP 1024), i.e. configs/base.py. Compare with
`benchmarks/swin_params.py` (ours, jax).
"""
import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import make_swin_parity_fixture as fixture  # noqa: E402  pylint: disable=g-import-not-at-top

OFFICIAL_R50_RECIPE = dict(hidden_dim=384, nheads=8, enc_layers=6, dec_layers=6,
                           dim_feedforward=1024, num_queries=300, num_classes=91,
                           vector_hidden_dim=1024, n_keep=256, gt_mask_len=128,
                           num_feature_levels=4, enc_n_points=4, dec_n_points=4)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--official', required=True)
  a = parser.parse_args()
  for variant in ('swin_t_p4w7', 'swin_l_p4w7'):
    _, model = fixture.build_official(a.official, variant, OFFICIAL_R50_RECIPE)
    total = sum(p.numel() for p in model.parameters())
    body = sum(p.numel() for p in model.backbone.parameters())
    print(f'{variant}: {total:,} parameters ({body:,} in the backbone)')


if __name__ == '__main__':
  main()
