"""The smallest training config (tests of solq_jax.training, and their subprocesses).

Smaller than configs/tiny.py so the training tests compile and run quickly: 96x96 generated
images, a ResNet-10 body of width 16 (0.4 M parameters: checkpoints of a few MB), 1 encoder and
2 decoder layers (so auxiliary losses are exercised), 8 images per step.
"""
from configs import tiny


def get_config():
  config = tiny.get_config()
  m = config.model
  m.backbone = 'resnet10'
  m.backbone_width = 16
  m.hidden_dim = 32
  m.nheads = 2
  m.enc_layers = 1
  m.dec_layers = 2
  m.dim_feedforward = 64
  m.num_queries = 10
  m.vector_hidden_dim = 64
  m.num_coeffs = 32
  m.mask_size = 32
  d = config.data
  d.max_gt = 8
  d.synthetic_train_images = 32
  d.synthetic_val_images = 8
  d.synthetic_min_size = 64
  d.synthetic_max_size = 96
  d.train_scales = (64, 80)
  d.train_max_size = 96
  d.crop_resize_scales = (64,)
  d.crop_min_size = 48
  d.crop_max_size = 64
  d.eval_size = 64
  d.eval_max_size = 96
  d.num_workers = 0
  t = config.train
  t.batch_size = 8
  t.total_steps = 6
  t.lr = 1e-3
  t.lr_backbone = 1e-4
  # Adam's first update is g / (|g| + eps): on entries whose gradient is pure float rounding
  # (~1e-9) eps=1e-8 turns device-count-dependent rounding into lr-sized moves; 1e-6 keeps the
  # sharded-vs-single comparisons about the step itself.
  t.adam_eps = 1e-6
  t.log_every_steps = 1
  t.checkpoint_every_steps = 2
  t.progress_bar = False
  t.final_eval = False
  config.eval.batch_size = 8
  config.eval.top_k = 10
  return config
