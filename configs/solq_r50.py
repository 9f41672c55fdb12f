"""Official SOLQ R50 (configs/r50_solq_train.sh of the official code): 8 GPUs x 4 images."""
from configs import base


def get_config():
  return base.base_config()
