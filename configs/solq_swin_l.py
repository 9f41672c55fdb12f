"""SOLQ with a Swin-L backbone (the paper's strongest model: 55.4 box AP / 45.9 mask AP).

The official code builds Swin backbones (`build_swin_backbone`) but publishes no Swin training
script, so this recipe is our choice, kept as close to the code's own settings as possible:
* backbone: Swin-L, patch 4, window 7, stages 2-4 out (its `swin_l_p4w7` entry); initialise it
  from Microsoft's ImageNet-22k checkpoint with
  `--config.model.pretrained_backbone=swin_large_patch4_window7_224_22k.pth`;
* stochastic depth 0.3: the rate of the official `swin_l_p4w7` entry (0.2 for Swin-T/S);
* frozen stages -1 (nothing frozen): `build_swin_backbone` never sets `frozen_stages`, so the
  official Swin trains every stage, with the backbone learning rate;
* learning rates: the official defaults for every backbone (lr 2e-4, backbone 2e-5, x0.1 for the
  sampling offsets and reference points), AdamW with weight decay 1e-4 on every parameter;
  50 epochs, decay at 40; batch 32 as the R50 recipe;
* scales: the Swin-L scales left commented in the official datasets/coco.py: short side
  416..1088 (step 32) and at most 1333 for training, 1088 / 1333 at evaluation; the
  crop-and-resize branch keeps 400/500/600 and 384..600 crops.
Training memory: `--config.train.remat=backbone` (or `all`) recomputes each Swin block in the
backward pass (figures in benchmarks/README.md).
"""
from configs import base

SWIN_L_TRAIN_SCALES = tuple(range(416, 1089, 32))
SWIN_L_EVAL_SIZE = 1088


def get_config():
  config = base.base_config()
  m = config.model
  m.backbone = 'swin_l'
  m.backbone_frozen_stages = -1
  m.drop_path_rate = 0.3
  d = config.data
  d.train_scales = SWIN_L_TRAIN_SCALES
  d.train_max_size = 1333
  d.eval_size = SWIN_L_EVAL_SIZE
  d.eval_max_size = 1333
  return config
