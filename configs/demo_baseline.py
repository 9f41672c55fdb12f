"""The CPU demo with every convergence accelerator off, as the official SOLQ trains: the base that
configs/demo.py (the README's main job) builds on, the baseline row of the convergence table and
the base of the demo-scale ablations (benchmarks/README.md). Generated dataset, random weights.

Chosen for a 2-core CPU and a ~15 minute budget, with nothing downloaded (so no pretrained
backbone, which is what makes the official recipe converge):
* an easy generated dataset: 1-3 shapes per image, each at least 20 px, faint textures, images
  of 72-96 px padded to ONE 96x96 bucket (the train step compiles once). At 128 px the model
  reached about the same AP per step but each step cost more, so the smaller images buy about
  twice the steps in the budget;
* the backbone trained from scratch: ResNet-18 with a trained GroupNorm in place of the frozen
  batch norm (a random ResNet behind identity batch norms is unnormalised), nothing frozen;
* a small transformer (d=128, 3+3 layers, 20 queries, no dropout), whose cost is small next to
  the backbone's at these image sizes;
* batch 4 and lr 5e-4 for every group (official: batch 32, lr 2e-4, backbone 2e-5): many small
  updates fit a short run better than a few large ones (a higher lr diverged early); the step
  decay at ~90% of the run.
Measured figures (AP per step and image size, the lr trials, wall time) are in
benchmarks/README.md.
"""
from configs import tiny


def get_config():
  config = tiny.get_config()
  m = config.model
  m.backbone_norm = 'group_norm'
  m.backbone_frozen_stages = 0
  m.hidden_dim = 128
  m.nheads = 8
  m.enc_layers = 3
  m.dec_layers = 3
  m.dim_feedforward = 512
  m.dropout = 0.0
  m.num_queries = 20
  m.num_classes = 6             # the generated dataset's category ids are 1..5
  m.vector_hidden_dim = 256
  m.num_coeffs = 64
  m.mask_size = 64
  d = config.data
  d.synthetic_min_size = 72
  d.synthetic_max_size = 96
  d.synthetic_max_objects = 3
  d.synthetic_min_object = 20.0
  d.synthetic_max_object_frac = 0.8
  d.synthetic_texture = 0.25
  d.train_scales = (72, 84, 96)
  d.train_max_size = 96
  d.crop_resize_scales = (72,)
  d.crop_min_size = 48
  d.crop_max_size = 72
  d.eval_size = 96
  d.eval_max_size = 96
  d.bucket_sizes = (96,)
  t = config.train
  t.batch_size = 4
  t.total_steps = 2400
  t.lr = 5e-4
  t.lr_backbone = 5e-4
  t.lr_drop_epoch = 8.5         # 256 steps per epoch: the drop at step 2176
  t.log_every_steps = 10
  t.checkpoint_every_steps = 200
  config.eval.batch_size = 8
  config.eval.top_k = 20
  return config
