"""Batches (docs/design.md, "Batch") from a source: deterministic order, size buckets, process sharding, grain.

Every element of the grain dataset is one process-local batch, built by a picklable callable
from the *global* step number alone:
* train: epoch `e = step // steps_per_epoch`; the epoch's order is a permutation drawn from
  `(seed, e)`; each record's augmentation is planned from `(seed, e, record)` (so it does not
  depend on batch size, process or worker count); the planned records are cut into global
  batches, grouped by orientation when `data.group_by_aspect` (`group_by_orientation`); the
  remainder of an epoch is dropped, as the official `BatchSampler(drop_last=True)`.
* eval: every record once (landscape first when grouping), the last global batch filled with
  invalid entries (image_id -1, valid all False, a zero image with no padding).
* process `p` of `P` takes rows `[p*B/P, (p+1)*B/P)` of every global batch.
* the padded shape is chosen from the *planned* sizes of the whole global batch (no pixels
  needed), so every process pads to the same shape: per dimension, the smallest bucket size
  that holds the batch's largest image (`bucket_sizes`, `bucket_shape`).
Resuming: the grain iterator's `get_state()` / `set_state()`, or `Pipeline.iterator(start_step)`.
Workers: `data.num_workers` grain processes (0 = in-process), each building whole batches.
"""
import logging
from typing import NamedTuple

import grain
import numpy as np

from solq_jax.data import coco
from solq_jax.data import synthetic
from solq_jax.data import targets as targets_lib
from solq_jax.data import transforms

log = logging.getLogger(__name__)

# What a batch holds (docs/design.md, "Batch"): the model's inputs, the criterion's targets, and
# the image id and original size that evaluation reads on the host.
BATCH_KEYS = ('images', 'pad_mask', 'labels', 'boxes', 'vectors', 'valid', 'image_id',
              'orig_size')
# The keys the train step reads on the devices; only these are copied there.
TRAIN_DEVICE_KEYS = ('images', 'pad_mask', 'labels', 'boxes', 'vectors', 'valid')


def train_device_batch(batch):
  """The part of a batch that the train step reads (`TRAIN_DEVICE_KEYS`)."""
  return {k: batch[k] for k in TRAIN_DEVICE_KEYS}


class PlannedRecord(NamedTuple):
  """One row of a global batch, planned from the step number alone."""
  index: int      # the source record, or -1 for the filler of a short final eval batch
  ops: list       # the transform ops (`solq_jax.data.transforms`)
  hw: tuple       # the (h, w) the ops produce


def _round_up(x, multiple):
  return -(-int(x) // multiple) * multiple


def bucket_sizes(data_config):
  """Per-dimension padded sizes (sorted). Explicit `data.bucket_sizes`, or derived.

  Derived: each image side is at most the largest short side (max of the train scales and
  eval_size) or at most the long-side cap (max of train_max_size and eval_max_size); those two
  values, plus `data.bucket_extra_sizes`, rounded up to `data.bucket_multiple`, are the sizes of
  each dimension. A batch therefore has one of at most len(sizes)^2 shapes (R50: (800, 1344) ->
  4; with `group_by_aspect` training uses 2 of them). The official rounding can put the long
  side a pixel or two above its cap; the multiple absorbs that.
  """
  d = data_config
  m = d.bucket_multiple
  if d.bucket_sizes:
    return tuple(sorted({_round_up(s, m) for s in d.bucket_sizes}))
  short = max(max(d.train_scales), d.eval_size)
  long = max(d.train_max_size, d.eval_max_size)
  return tuple(sorted({_round_up(s, m) for s in (short, long, *d.bucket_extra_sizes)}))


def bucket_shape(hws, sizes, multiple):
  """Padded (H, W) for images of sizes `hws`: the smallest bucket size >= the largest side.

  A side beyond the largest bucket (only with overridden sizes) is rounded up to `multiple`.
  """
  hws = np.asarray(hws).reshape(-1, 2)
  out = []
  for side in hws.max(0):
    fits = [s for s in sizes if s >= side]
    out.append(fits[0] if fits else _round_up(side, multiple))
  return tuple(out)


def _empty_batch(n, hw, max_gt, num_coeffs):
  h, w = hw
  return dict(
      images=np.zeros((n, h, w, 3), np.float32),
      pad_mask=np.ones((n, h, w), bool),
      labels=np.zeros((n, max_gt), np.int32),
      boxes=np.zeros((n, max_gt, 4), np.float32),
      vectors=np.zeros((n, max_gt, num_coeffs), np.float32),
      valid=np.zeros((n, max_gt), bool),
      image_id=np.full((n,), -1, np.int32),
      orig_size=np.zeros((n, 2), np.int32))


class _Batcher:
  """Step -> process-local batch. Picklable (grain worker processes get a copy)."""

  def __init__(self, source, coder, data_config, global_batch, process_index, process_count):
    if global_batch % process_count:
      raise ValueError(f'the global batch size {global_batch} is not divisible by the number of '
                       f'processes {process_count}')
    self.source = source
    self.coder = coder
    self.data_config = data_config
    self.global_batch = global_batch
    self.local_batch = global_batch // process_count
    self.process_index = process_index
    self.sizes = bucket_sizes(data_config)
    self.max_gt = data_config.max_gt
    self.skipped = 0   # bad images skipped (data.skip_bad_images), counted per process

  def records(self, step):
    """The `PlannedRecord`s of the global batch `step`."""
    raise NotImplementedError

  def __call__(self, step):
    plan = self.records(step)
    hw = bucket_shape([p.hw for p in plan], self.sizes, self.data_config.bucket_multiple)
    lo = self.process_index * self.local_batch
    local = plan[lo:lo + self.local_batch]
    batch = _empty_batch(len(local), hw, self.max_gt, self.coder.num_coeffs)
    for row, record in enumerate(local):
      if record.index < 0:  # filler of a short final eval batch: a harmless all-valid zero image
        batch['pad_mask'][row] = False
        batch['orig_size'][row] = hw
        continue
      try:
        sample = self.source.load(record.index)
      except coco.DataError as e:
        if not self.data_config.skip_bad_images:
          raise
        # data.skip_bad_images: the row becomes a filler (an image without targets, id -1 so
        # evaluation ignores it); the batch keeps its shape and a resumed run its batches.
        self.skipped += 1
        log.warning('data.skip_bad_images: skipped %s (%d bad image(s) skipped so far by this '
                    'process)', e, self.skipped)
        batch['pad_mask'][row] = False
        batch['orig_size'][row] = hw
        continue
      sample = transforms.apply_ops(sample, record.ops)
      h, w = sample['image'].height, sample['image'].width
      assert (h, w) == tuple(record.hw), (self.source.path(record.index), (h, w), record.hw)
      batch['images'][row, :h, :w] = transforms.normalize_image(sample['image'])
      batch['pad_mask'][row, :h, :w] = False
      for k, v in targets_lib.make_targets(sample, self.coder, self.max_gt).items():
        batch[k][row] = v
      batch['image_id'][row] = sample['image_id']
      batch['orig_size'][row] = sample['orig_size']
    return batch


def group_by_orientation(plan, batch_size):
  """Split a plan (records with planned (h, w)) into full batches of one orientation.

  Records go, in order, to a landscape (h <= w) or a portrait queue; a full queue becomes a
  batch. The two leftovers are then batched together (at most one mixed batch), so all but
  `len(plan) % batch_size` records are used, as with plain batching. Homogeneous batches pad
  to (short, long) or (long, short) instead of (long, long).
  """
  queues = {True: [], False: []}
  batches = []
  for record in plan:
    queue = queues[record.hw[0] <= record.hw[1]]
    queue.append(record)
    if len(queue) == batch_size:
      batches.append(list(queue))
      queue.clear()
  rest = queues[True] + queues[False]
  batches += [rest[i:i + batch_size] for i in range(0, len(rest) - batch_size + 1, batch_size)]
  return batches


class TrainBatcher(_Batcher):
  """Shuffled, augmented batches; `steps_per_epoch = len(source) // global_batch`.

  With `data.group_by_aspect`, each epoch's planned records are grouped by orientation
  (`group_by_orientation`); otherwise the epoch's permutation is cut into consecutive batches.
  """

  def __init__(self, *args, seed, **kwargs):
    super().__init__(*args, **kwargs)
    self.seed = int(seed)
    self._memo = {}
    self.steps_per_epoch = len(self.source) // self.global_batch
    if self.steps_per_epoch == 0:
      raise ValueError(f'{len(self.source)} training images are fewer than one global batch '
                       f'({self.global_batch})')

  def plan_record(self, epoch, index):
    rng = np.random.default_rng([self.seed, 1, epoch, int(index)])
    ops, hw = transforms.plan_train(rng, self.source.hw(index), self.data_config)
    return PlannedRecord(int(index), ops, hw)

  def _cached(self, kind, epoch, compute):
    """Per-instance memo of the last two epochs' orders / batches."""
    key = (kind, epoch)
    if key not in self._memo:
      if len(self._memo) >= 4:
        self._memo.pop(next(iter(self._memo)))
      self._memo[key] = compute()
    return self._memo[key]

  def order(self, epoch):
    return self._cached('order', epoch, lambda: np.random.default_rng(
        [self.seed, 0, epoch]).permutation(len(self.source)))

  def epoch_batches(self, epoch):
    """The planned global batches of `epoch` (grouped mode: planned for the whole epoch)."""
    return self._cached('batches', epoch, lambda: group_by_orientation(
        [self.plan_record(epoch, i) for i in self.order(epoch)], self.global_batch))

  def records(self, step):
    epoch, b = divmod(int(step), self.steps_per_epoch)
    if self.data_config.group_by_aspect:
      return self.epoch_batches(epoch)[b]
    chunk = self.order(epoch)[b * self.global_batch:(b + 1) * self.global_batch]
    return [self.plan_record(epoch, i) for i in chunk]


class EvalBatcher(_Batcher):
  """Every record once, with the eval resize; the last batch is filled with invalid entries.

  Order: image-id order, or with `data.group_by_aspect` the landscape images first, then the
  portrait ones (each in image-id order), so that at most one batch mixes orientations.
  """

  def __init__(self, *args, max_images=0, **kwargs):
    super().__init__(*args, **kwargs)
    n = len(self.source)
    n = min(n, max_images) if max_images else n
    self.plan = [PlannedRecord(i, *transforms.plan_eval(self.source.hw(i), self.data_config))
                 for i in range(n)]
    if self.data_config.group_by_aspect:
      self.plan.sort(key=lambda record: record.hw[0] > record.hw[1])  # stable: landscape first
    self.num_images = n
    self.num_steps = -(-n // self.global_batch)

  def records(self, step):
    plan = self.plan[step * self.global_batch:(step + 1) * self.global_batch]
    return plan + [PlannedRecord(-1, [], (1, 1))] * (self.global_batch - len(plan))


def _grain_workers_outside_absl():
  """grain 0.2.18's `mp_prefetch` reads the absl flag `grain_enable_multiprocess_worker_profiling`
  and fails when absl has not parsed flags (pytest, notebooks). Mark that one flag as given, so
  it reads its default (False); an entry point that parses flags is unaffected."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  name = 'grain_enable_multiprocess_worker_profiling'
  if name in flags.FLAGS and not flags.FLAGS.is_parsed():
    flags.FLAGS[name].present = True


def to_iter_dataset(batcher, steps, data_config):
  """A grain IterDataset over `steps` (a range of step numbers) with `data.num_workers` workers."""
  ds = grain.MapDataset.range(steps.start, steps.stop).map(batcher)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_config.read_threads,
                                            prefetch_buffer_size=data_config.prefetch))
  if data_config.num_workers > 0:
    _grain_workers_outside_absl()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.num_workers))
  return ds


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


def build_source(config, split):
  """The source of `split`: `data.source='coco'` reads `data.root` (the generated dataset when
  `data.root` is ''); `'tfds'` reads a TFDS ArrayRecord dataset (`solq_jax.data.tfds`)."""
  d = config.data
  if d.source == 'tfds':
    from solq_jax.data import tfds  # pylint: disable=g-import-not-at-top
    return tfds.build_source(config, split)
  if d.source != 'coco':
    raise ValueError(f"config.data.source={d.source!r}: expected 'coco' or 'tfds'")
  root = d.root or synthetic.ensure_dataset(d)
  return coco.CocoSource(root, split, num_classes=config.model.num_classes)


class Pipeline:
  """A batcher plus its step range; `iterator()` gives a checkpointable grain iterator."""

  def __init__(self, batcher, data_config, num_steps):
    self.batcher = batcher
    self.data_config = data_config
    self.num_steps = num_steps
    self.source = batcher.source

  def dataset(self, start_step=0):
    return to_iter_dataset(self.batcher, range(start_step, self.num_steps), self.data_config)

  def iterator(self, start_step=0):
    """Batches from global step `start_step` on; `get_state()` / `set_state()` resume exactly."""
    return iter(self.dataset(start_step))

  def __len__(self):
    return self.num_steps


def train_pipeline(config, coder, *, source=None, num_epochs=None, process_index=None,
                   process_count=None):
  """Augmented, shuffled train batches of `config.train.batch_size` (global) for `num_epochs`
  (default `config.train.epochs`); this process's rows only. `.steps_per_epoch` is set.
  `coder`: the run's mask coder (encodes the ground-truth masks)."""
  source = source or build_source(config, config.data.train_split)
  p, n = _process(process_index, process_count)
  batcher = TrainBatcher(source, coder, config.data,
                         config.train.batch_size, p, n, seed=config.seed)
  epochs = config.train.epochs if num_epochs is None else num_epochs
  pipe = Pipeline(batcher, config.data, epochs * batcher.steps_per_epoch)
  pipe.steps_per_epoch = batcher.steps_per_epoch
  return pipe


def eval_pipeline(config, coder, *, source=None, split=None, process_index=None,
                  process_count=None):
  """Eval batches of `config.eval.batch_size` (global) over `split` (default `data.val_split`),
  at most `config.eval.max_images` (0 = all); the last batch is filled with image_id -1."""
  source = source or build_source(config, split or config.data.val_split)
  p, n = _process(process_index, process_count)
  batcher = EvalBatcher(source, coder, config.data,
                        config.eval.batch_size, p, n, max_images=config.eval.max_images)
  return Pipeline(batcher, config.data, batcher.num_steps)
