"""Shared config sections. Each experiment file composes these in its `get_config()`.

Every experiment knob is a field here, so it can be set from the command line as
`--config.section.field=value`. Defaults are the official SOLQ-R50 recipe (spec section 0).
Each section has one owner module; add new fields to the section of the code that reads them.
"""
import ml_collections


def model_config() -> ml_collections.ConfigDict:
  """The network (solq_jax.models) and its mask coder (solq_jax.masks)."""
  return ml_collections.ConfigDict(dict(
      backbone='resnet50',          # resnet18 | resnet34 | resnet50 | resnet101
      hidden_dim=384,               # d_model (official SOLQ uses 384, not 256)
      nheads=8,
      enc_layers=6,
      dec_layers=6,
      dim_feedforward=1024,
      dropout=0.1,
      num_queries=300,
      num_classes=91,               # logits; raw COCO category ids 0..90 index them directly
      num_feature_levels=4,
      enc_n_points=4,
      dec_n_points=4,
      with_box_refine=True,
      vector_hidden_dim=1024,
      num_coeffs=256,               # n_k: mask-vector length
      mask_size=128,                # N: box-relative mask resolution
      mask_coder='dct',             # dct | pca | flatten
      pca_path='',                  # .npz with PCA components (mask_coder='pca')
      attention_impl='xla',         # xla | pallas | auto (deformable-attention core)
      pretrained_backbone='',       # torchvision ResNet .pth on disk
      init_checkpoint='',           # official SOLQ .pth or converted orbax dir
  ))


def loss_config() -> ml_collections.ConfigDict:
  """The criterion (solq_jax.losses) and the matcher (solq_jax.matching)."""
  return ml_collections.ConfigDict(dict(
      cls_weight=2.0,
      bbox_weight=5.0,
      giou_weight=2.0,
      vector_weight=1.0,            # weight_dict entry; the x3 below is inside the term
      vector_loss='l1',             # l1 | smooth_l1 | l2 | cosine | dice
      vector_loss_scale=3.0,
      vector_start_stage=0,         # decoder layers >= this get the vector loss (paper Table 3c)
      focal_alpha=0.25,
      focal_gamma=2.0,
      aux_loss=True,
      matcher='hungarian',          # hungarian (scipy via host callback) | jax (pure-JAX exact)
      cost_class=2.0,
      cost_bbox=5.0,
      cost_giou=2.0,
  ))


def data_config() -> ml_collections.ConfigDict:
  """The input pipeline (solq_jax.data)."""
  return ml_collections.ConfigDict(dict(
      source='coco',                # coco | tfds
      root='',                      # COCO layout; '' = the generated dataset in cache_dir
      train_split='train2017',
      val_split='val2017',
      cache_dir='.cache/solq_data',
      max_gt=100,
      train_scales=tuple(range(480, 801, 32)),
      train_max_size=1333,
      crop_resize_scales=(400, 500, 600),
      crop_min_size=384,
      crop_max_size=600,
      eval_size=800,
      eval_max_size=1333,
      num_workers=2,
  ))


def train_config() -> ml_collections.ConfigDict:
  """The optimiser recipe and the loop (solq_jax.training)."""
  return ml_collections.ConfigDict(dict(
      batch_size=32,                # global batch, split over the `data` mesh axis
      epochs=50,
      lr=2e-4,
      lr_backbone=2e-5,
      lr_linear_proj_mult=0.1,      # sampling_offsets and reference_points
      weight_decay=1e-4,
      clip_max_norm=0.1,
      lr_drop_epoch=40,
      lr_drop_factor=0.1,
  ))


def eval_config() -> ml_collections.ConfigDict:
  """Evaluation and post-processing (solq_jax.evaluation, solq_jax.postprocess)."""
  return ml_collections.ConfigDict(dict(
      batch_size=8,
      top_k=100,
      max_images=0,                 # 0 = all
  ))


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 42
  config.model = model_config()
  config.loss = loss_config()
  config.data = data_config()
  config.train = train_config()
  config.eval = eval_config()
  return config
