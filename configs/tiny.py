"""A tiny CPU config for tests and the README demo (generated dataset, small images)."""
from configs import base


def get_config():
  config = base.base_config()
  m = config.model
  m.backbone = 'resnet18'
  m.hidden_dim = 64
  m.nheads = 4
  m.enc_layers = 2
  m.dec_layers = 2
  m.dim_feedforward = 128
  m.num_queries = 30
  m.num_classes = 8
  m.vector_hidden_dim = 128
  m.num_coeffs = 64
  m.mask_size = 64
  config.data.max_gt = 16
  config.data.train_scales = (192, 224, 256)
  config.data.train_max_size = 320
  config.data.crop_resize_scales = (160, 192)
  config.data.crop_min_size = 128
  config.data.crop_max_size = 192
  config.data.eval_size = 256
  config.data.eval_max_size = 320
  config.data.num_workers = 1                # one worker process: the 2-core CPU demo
  config.train.batch_size = 8
  config.train.epochs = 2
  config.eval.batch_size = 8
  config.eval.top_k = 30
  return config
