"""The input pipeline: COCO-format source, the official transforms, targets, batches.

    coder = solq_jax.masks.build_coder(config.model)   # one per run
    train = train_pipeline(config, coder)   # config.data.root = COCO folder, or '' = generated
    it = train.iterator()               # grain iterator of batches (process-local; docs/design.md)
    batch = next(it); state = it.get_state()   # ... later: it.set_state(state) resumes exactly
    val = eval_pipeline(config, coder)  # eval resize; the last batch is padded (image_id -1)
"""
from solq_jax.data.coco import CocoSource
from solq_jax.data.coco import DataError
from solq_jax.data.pipeline import BATCH_KEYS
from solq_jax.data.pipeline import TRAIN_DEVICE_KEYS
from solq_jax.data.pipeline import build_source
from solq_jax.data.pipeline import bucket_shape
from solq_jax.data.pipeline import bucket_sizes
from solq_jax.data.pipeline import eval_pipeline
from solq_jax.data.pipeline import train_device_batch
from solq_jax.data.pipeline import train_pipeline
from solq_jax.data.synthetic import ensure_dataset
from solq_jax.data.synthetic import write_split
from solq_jax.data.targets import make_targets
from solq_jax.data.transforms import plan_eval
from solq_jax.data.transforms import plan_train
from solq_jax.data.transforms import resized_hw

__all__ = ['CocoSource', 'DataError', 'BATCH_KEYS', 'TRAIN_DEVICE_KEYS', 'build_source',
           'bucket_shape', 'bucket_sizes', 'eval_pipeline', 'train_device_batch',
           'train_pipeline', 'ensure_dataset', 'write_split', 'make_targets', 'plan_eval',
           'plan_train', 'resized_hw']
