"""Shared config sections. Each experiment file composes these in its `get_config()`.

Every experiment knob is a field here, so it can be set from the command line as
`--config.section.field=value`. Defaults are the official SOLQ-R50 recipe.
Paper Table 3c ("k stages with vector loss" = the last k decoder layers) is `loss.vector_stages=k`;
`loss.vector_start_stage` is the official flag (the first such layer, 0-based: 6 - k).
Each section has one owner module; add new fields to the section of the code that reads them.
"""
import ml_collections


def model_config() -> ml_collections.ConfigDict:
  """The network (solq_jax.models) and its mask coder (solq_jax.masks)."""
  return ml_collections.ConfigDict(dict(
      backbone='resnet50',          # resnet18 | resnet34 | resnet50 | resnet101 | swin_t|s|b|l
                                    # (| resnet10: one block per stage, no pretrained weights)
      # A ResNet's stem width (stages: x1, x2, x4, x8); torchvision and official weights: 64.
      # Narrower bodies are for training from scratch on a CPU (the test suite).
      backbone_width=64,
      # Training from scratch (no pretrained weights): 'group_norm' trains a GroupNorm where the
      # official model has frozen batch norm, and 0 frozen stages trains the stem and layer1 too.
      backbone_norm='frozen_bn',    # frozen_bn (official; torchvision/official weights) | group_norm
      backbone_frozen_stages=1,     # official: stem + layer1 frozen; 0..4
      # Swin: the official frozen_stages instead (-1..5; -1 none, SOLQ's setting) and stochastic
      # depth (official 0.2 for swin_t/s, 0.3 for swin_b/l); ResNets ignore drop_path_rate.
      drop_path_rate=0.2,
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
      mask_coder='dct',             # dct | pca | flatten | sparse
      pca_path='',                  # .npz with PCA components (mask_coder='pca')
      sparse_path='',               # .npz with the learned dictionary (mask_coder='sparse')
      # False: detection only (paper Table 2/3a "det", Deformable DETR): no vector head, no mask
      # targets, losses, decoding or segm evaluation.
      with_masks=True,
      attention_impl='xla',         # xla | pallas | auto (deformable-attention core)
      # Computation dtype (float32 | bfloat16) of the backbone, input projections, transformer
      # and heads. Parameters and optimiser state stay float32, as do softmaxes, normalisation
      # statistics, sampling locations, reference points and boxes; the deformable-attention
      # core accumulates in float32; outputs, matching, losses and post-processing are float32.
      dtype='float32',
      # Hybrid matching (H-DETR): this many extra queries, trained one-to-many (loss.one_to_many_*)
      # and hidden from the one-to-one queries in self-attention; inference uses the
      # one-to-one set alone. 0 = off (official SOLQ).
      one_to_many_queries=0,
      # Group DETR: this many groups of num_queries queries, each matched one-to-one, hidden
      # from each other in self-attention; inference uses the first group. 1 = off (official).
      query_groups=1,
      # Two-stage Deformable DETR: queries from the encoder's top-scoring proposals, which get
      # their own class-agnostic loss (`_enc` terms). False = off (official SOLQ).
      two_stage=False,
      # Denoising (DN-DETR): this many groups of noised ground-truth queries in training
      # (noise and loss: loss.dn_*), hidden from the matching queries. 0 = off (official).
      dn_groups=0,
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
      # l1 | smooth_l1 | l2 | cosine | dice, or several joined by '+' ('l2+dice': the paper's
      # flatten coder), summed with vector_loss_weights (one per term; () = 1 each).
      vector_loss='l1',
      vector_loss_weights=(),
      vector_loss_scale=3.0,
      vector_start_stage=0,         # decoder layers (0-based) >= this get the vector loss
      # Paper Table 3c's count: k > 0 = the last k decoder layers get the vector loss (official
      # `6 - vector_start_stage`); 0 = vector_start_stage decides.
      vector_stages=0,
      dice_sharpness=10.0,          # vector_loss='dice': soft mask = sigmoid(s * (recon - 0.5))
      focal_alpha=0.25,
      focal_gamma=2.0,
      aux_loss=True,
      matcher='hungarian',          # hungarian (scipy via host callback) | jax (pure-JAX exact)
      cost_class=2.0,
      cost_bbox=5.0,
      cost_giou=2.0,
      # Hybrid matching (model.one_to_many_queries > 0): the one-to-many queries are matched to
      # every ground truth repeated k times; their loss enters the total times the weight.
      one_to_many_k=6,
      one_to_many_weight=1.0,
      # Denoising (model.dn_groups > 0): box noise scale (centre shift <= scale x half size,
      # size factor in 1 +- scale), probability of replacing a label by another class, DINO's
      # contrastive negatives (noised between 1 and 2 x scale, learn no-object), loss weight.
      dn_box_noise=0.4,
      dn_label_noise=0.2,
      dn_contrastive=False,
      dn_weight=1.0,
  ))


def data_config() -> ml_collections.ConfigDict:
  """The input pipeline (solq_jax.data)."""
  return ml_collections.ConfigDict(dict(
      source='coco',                # coco | tfds
      root='',                      # COCO layout; '' = the generated dataset in cache_dir
      train_split='train2017',
      val_split='val2017',
      # source='tfds' (solq_jax/data/tfds.py): an ArrayRecord TFDS dataset, read without
      # TensorFlow (pip install 'solq-jax[tfds]'). Prepare it once where TF is installed.
      tfds_name='lvis',             # builder name, optionally 'name/config:version'
      tfds_data_dir='',             # folder holding <name>/<version>/ (required, no download)
      tfds_train_split='train',     # TFDS split read where data.train_split is asked for
      tfds_val_split='validation',  # TFDS split read where data.val_split is asked for
      tfds_image_key='image',       # Image feature (RGB)
      tfds_id_key='image/id',       # int image id ('' = record index + 1)
      tfds_bbox_key='objects/bbox',  # BBoxFeature: normalised ymin, xmin, ymax, xmax
      tfds_label_key='objects/label',  # ClassLabel, 0-based
      tfds_mask_key='objects/segmentation',  # per-object Image [H,W,1], nonzero = inside
      tfds_crowd_key='',            # optional per-object bool/int; nonzero objects dropped
      tfds_label_offset=1,          # model class index = label + offset (LVIS: category id)
      # Pixel boxes (normalised float32 x image size) rounded to this many decimals (-1 = off):
      # COCO/LVIS json boxes have 2, so this restores them exactly; unrounded, an edge at 37 px
      # can come back as 36.999996 and move the mask coder's box crop by a pixel.
      tfds_box_decimals=2,
      cache_dir='.cache/solq_data',
      max_gt=100,
      train_scales=tuple(range(480, 801, 32)),
      train_max_size=1333,
      crop_resize_scales=(400, 500, 600),
      crop_min_size=384,
      crop_max_size=600,
      eval_size=800,
      eval_max_size=1333,
      flip_prob=0.5,                # RandomHorizontalFlip
      select_prob=0.5,              # RandomSelect: P(plain multi-scale resize) vs resize+crop+resize
      # Padding buckets: each batch is padded bottom/right to (H, W), each side the smallest of
      # these sizes that holds the batch's largest image. () = derived: the largest short side and
      # the long-side cap (R50: 800, 1344 -> at most 4 shapes), plus bucket_extra_sizes.
      bucket_sizes=(),
      bucket_extra_sizes=(),
      bucket_multiple=32,           # sizes are rounded up to a multiple of this
      # Batch images of one orientation together (train: per epoch, after planning the
      # augmentations; eval: landscape first): batches pad to (800, 1344) or (1344, 800) instead
      # of (1344, 1344). Per-image augmentations are unchanged; only batch composition differs.
      group_by_aspect=True,
      num_workers=2,                # grain worker processes; 0 = in-process
      # False: an image that cannot be decoded stops the run (naming the file); True: it is
      # skipped and counted in the log (python -m solq_jax.data.check lists them up front).
      skip_bad_images=False,
      read_threads=1,               # threads per process building batches (0 = synchronous)
      prefetch=2,                   # batches buffered per process
      # The generated dataset, used when root == '' (written once to cache_dir, then reused).
      synthetic_seed=0,
      synthetic_train_images=1024,
      synthetic_val_images=128,
      synthetic_min_size=192,       # image sides are drawn uniformly from [min, max]
      synthetic_max_size=320,
      synthetic_max_objects=8,      # shapes per image: uniform in 1..max (fewer if occluded away)
      synthetic_min_object=6.0,     # shape sizes: log-uniform in [min px, max_frac * short side]
      synthetic_max_object_frac=0.9,
      synthetic_texture=1.0,        # scales background/shape texture and pixel noise (0 = flat)
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
      lr_drop_epoch=40.0,           # may be fractional: the drop is at int(epoch * steps/epoch)
      lr_drop_factor=0.1,
      # 'step' (official): x lr_drop_factor at lr_drop_epoch; 'cosine': a half cosine from each
      # group's rate (after the warm-up) down to lr_drop_factor of it at the run's last step.
      lr_schedule='step',
      # Linear warm-up of every group's rate over this many optimizer steps (0 = none, as the
      # official recipe): lets a short from-scratch run take a higher lr without diverging early.
      warmup_steps=0,
      # Rematerialise transformer layers in the backward pass (none | encoder | decoder | all;
      # backbone: each Swin block, also in all): their activations are recomputed instead of
      # stored, for ~one more forward of those layers.
      # Same parameters, values and gradients; here, not in `model`, because it is how a run
      # trains, not what a checkpoint holds (build_model(config.model, remat=config.train.remat)).
      remat='none',
      adam_b1=0.9,
      adam_b2=0.999,
      adam_eps=1e-8,
      total_steps=0,                # 0 = epochs * (train images // batch_size): the run's length
      stop_at_step=0,               # 0 = run to total_steps; else stop (and save) after this step
      num_devices=0,                # 0 = every device of every process
      log_every_steps=10,
      checkpoint_every_steps=500,
      max_to_keep=3,
      async_checkpointing=True,
      # 0 = resume from the newest step; else from this step (the newer ones are moved aside to
      # checkpoints/_discarded_step_<n>): the way forward when the newest step is corrupt.
      resume_from_step=0,
      eval_every_steps=0,           # 0 = evaluate once, at the end
      # Gradient accumulation: each optimizer step sums the gradients of this many micro-batches
      # of the global batch (batch_size must be a multiple of it x the device count).
      grad_accum_steps=1,
      ema_decay=0.0,                # weight EMA (bias-corrected) kept in the state; 0 = none
      final_eval=True,
      progress_bar=True,
      # Multi-host: jax.distributed.initialize() (entry points call it before anything else).
      distributed=False,
      coordinator_address='',       # '' = auto-detect (SLURM, TPU, ...)
      num_processes=0,              # 0 = auto-detect
      process_id=-1,                # -1 = auto-detect
  ))


def eval_config() -> ml_collections.ConfigDict:
  """Evaluation and post-processing (solq_jax.evaluation, solq_jax.postprocess)."""
  return ml_collections.ConfigDict(dict(
      batch_size=8,                 # global; a multiple of the device count
      top_k=100,                    # detections per image (official: 100, no threshold, no NMS)
      max_images=0,                 # 0 = all
      with_masks=True,              # False: bbox-only evaluation (no decode/paste/segm)
      paste_exact_sizes=8,          # first image sizes pasted at exact size (a compile each);
      paste_size_multiple=128,      # later sizes: canvas sides rounded up to this, then cropped
      # 'coder': each coder's own threshold (DCT: the official mid-range, a constant
      # reconstruction is empty); 'soft': the soft reconstruction pasted, then >= 0.5 (the
      # official fast_solq.py).
      mask_decode='coder',
      score_threshold=0.3,          # predict: detections drawn in overlays
      names_file='',                # predict: names, dataset json or text ('' = COCO or shapes)
      use_ema=True,                 # evaluate/predict with the weight EMA when the weights have one
      # solq_jax.inference.export: platforms lowered for, and the padded input size (H, W);
      # () = the largest bucket side, square (holds every eval-resized image).
      export_platforms='cpu,cuda',
      export_hw=(),
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
