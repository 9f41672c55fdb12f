"""Initial model variables: random, torchvision ResNet weights for the backbone, or a whole
official SOLQ checkpoint (`.pth`) / converted variables directory, through `solq_jax.convert`."""
import os

import jax
import jax.numpy as jnp
import numpy as np

_INIT_HW = (64, 64)  # parameters do not depend on the image size; small keeps init cheap


def random_variables(model, key):
  images = jnp.zeros((1, *_INIT_HW, 3), jnp.float32)
  pad_mask = jnp.zeros((1, *_INIT_HW), bool)
  return jax.jit(lambda k: model.init(k, images, pad_mask))(key)


def check_same_structure(loaded, reference, source: str) -> None:
  """Raises naming the first missing / extra / mis-shaped leaf of `loaded` vs `reference`."""
  want = {jax.tree_util.keystr(p): np.shape(x)
          for p, x in jax.tree_util.tree_flatten_with_path(reference)[0]}
  got = {jax.tree_util.keystr(p): np.shape(x)
         for p, x in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])
  if missing or extra or shapes:
    detail = '; '.join(f'{name}: {items[:3]}{"..." if len(items) > 3 else ""}'
                       for name, items in (('missing', missing), ('unexpected', extra),
                                           ('shape differs', [(k, got[k], want[k]) for k in shapes]))
                       if items)
    raise ValueError(f'weights from {source} do not fit the model of this config ({detail})')


def initial_variables(config, model, key):
  """`{'params', 'buffers'}` for step 0 as `config.model` asks (see the module docstring)."""
  from solq_jax import convert  # pylint: disable=g-import-not-at-top
  m = config.model
  variables = random_variables(model, key)
  if m.init_checkpoint:
    path = m.init_checkpoint
    if os.path.isfile(path):
      loaded = convert.load_official_checkpoint(path, config)
    elif os.path.isdir(path):
      loaded = convert.load_variables(path, config)
    else:
      raise FileNotFoundError(f'config.model.init_checkpoint not found: {path}')
    loaded = {'params': loaded['params'], 'buffers': loaded.get('buffers', {})}
    check_same_structure(loaded, variables, path)
    variables = loaded
  elif m.pretrained_backbone:
    path = m.pretrained_backbone
    if not os.path.isfile(path):
      raise FileNotFoundError(f'config.model.pretrained_backbone not found: {path}')
    merged = convert.merge_backbone(variables, convert.load_torchvision_resnet(path, config))
    check_same_structure(merged, variables, path)
    variables = merged
  return jax.tree.map(jnp.asarray, variables)
