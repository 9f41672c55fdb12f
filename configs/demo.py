"""The README's main job (`make demo` = `python train.py`): train on the generated dataset on a
CPU, then evaluate box and mask AP on its validation split.

Chosen for a 2-core CPU and a ~15 minute budget (step time estimated, not measured end to end):
* images of 112-144 px padded to ONE 160x160 bucket, so the train step compiles once;
* a small network (ResNet-18, d=64, 2+3 layers, 20 queries): a step costs well under a second;
* no dropout and a 2.5x higher learning rate than the official recipe: a short run on a simple
  dataset needs fast fitting, not regularisation;
* the step decay at ~90% of the run (official: 40 of 50 epochs).
"""
from configs import tiny


def get_config():
  config = tiny.get_config()
  m = config.model
  m.hidden_dim = 64
  m.nheads = 4
  m.enc_layers = 2
  m.dec_layers = 3
  m.dim_feedforward = 128
  m.dropout = 0.0
  m.num_queries = 20
  m.num_classes = 6             # the generated dataset's category ids are 1..5
  m.vector_hidden_dim = 128
  m.num_coeffs = 64
  m.mask_size = 64
  d = config.data
  d.synthetic_min_size = 112
  d.synthetic_max_size = 144
  d.train_scales = (112, 128, 144)
  d.train_max_size = 160
  d.crop_resize_scales = (112,)
  d.crop_min_size = 80
  d.crop_max_size = 112
  d.eval_size = 144
  d.eval_max_size = 160
  d.bucket_sizes = (160,)
  t = config.train
  t.batch_size = 8
  t.total_steps = 1000
  t.lr = 5e-4
  t.lr_backbone = 5e-5
  t.lr_drop_epoch = 7           # 128 steps per epoch: the drop at step 896
  t.log_every_steps = 10
  t.checkpoint_every_steps = 250
  config.eval.batch_size = 8
  config.eval.top_k = 20
  return config
