"""Official SOLQ R101: the R50 recipe with a ResNet-101 body."""
from configs import base


def get_config():
  config = base.base_config()
  config.model.backbone = 'resnet101'
  return config
