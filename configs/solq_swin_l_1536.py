"""SOLQ Swin-L at a longer side of up to 1536 px (configs/solq_swin_l.py otherwise).

The paper's large-resolution Swin-L variant; the official code has no script for it either. Our
choice: the same short-side scales (416..1088 for training, 1088 at evaluation) with the long
side capped at 1536 instead of 1333, for training and evaluation, so wide images keep more of
their resolution. The padding buckets follow from the cap (data.bucket_sizes=() derives them).
"""
from configs import solq_swin_l

MAX_SIZE = 1536


def get_config():
  config = solq_swin_l.get_config()
  config.data.train_max_size = MAX_SIZE
  config.data.eval_max_size = MAX_SIZE
  return config
