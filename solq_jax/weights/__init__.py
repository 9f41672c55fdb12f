"""Weights: a path (or nothing) and the model config section -> `{'params', 'buffers'}`.

    variables = weights.load(path, config.model, model=model)        # eval.py, predict.py
    variables = weights.initial_variables(config.model, model, key)  # a training's step 0

`path` may be an official SOLQ `.pth` (converted on the fly, `convert`), a converted directory
(`store.save_converted`), a training run's `checkpoints/` directory or one `<step>/` of it, or
nothing (random initialisation). Every stored model config goes through one check,
`store.check_model_config`.

Modules: `pth` reads `.pth` files without torch; `convert` maps official SOLQ and torchvision
keys to the Flax tree (and is the `python -m solq_jax.weights` command); `store` reads
and writes the two solq-jax formats.
"""
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from solq_jax import models
from solq_jax.weights import convert
from solq_jax.weights import store
from solq_jax.weights.store import ModelConfigMismatch, check_model_config

log = logging.getLogger(__name__)

PTH_SUFFIXES = ('.pth', '.pt', '.bin')


def load(checkpoint, model_config, *, model=None, seed=0, use_ema: bool = False) -> dict:
  """Variables for inference from `checkpoint` (see the module docstring).

  No checkpoint: random weights from `seed`, with a loud warning (only for benchmarking).
  `use_ema` (`config.eval.use_ema`): from a training checkpoint that keeps a weight EMA, its
  EMA instead of its parameters (the other formats hold one set of weights).
  """
  if not isinstance(use_ema, bool):
    raise ValueError(f'config.eval.use_ema must be True or False, got {use_ema!r}')
  if not checkpoint:
    banner = '*' * 78
    log.warning('%s\nNO CHECKPOINT GIVEN: using RANDOMLY INITIALISED weights (seed %d). The '
                'detections are meaningless; this is only for benchmarking.\n%s',
                banner, seed, banner)
    model = model or models.build_model(model_config)
    return models.init_variables(model, jax.random.key(seed))
  path = os.path.abspath(os.fspath(checkpoint))
  if os.path.isfile(path):
    if not path.endswith(PTH_SUFFIXES):
      raise ValueError(f'checkpoint file {path} is not an official SOLQ .pth')
    return convert.load_official_checkpoint(path, model_config)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'checkpoint not found: {path}')
  if store.is_converted(path):
    return store.load_converted(path, model_config)
  if store.is_train_step(path) or store.train_steps(path):
    return store.load_train_variables(path, model_config, use_ema=use_ema)
  return store.load_converted(path, model_config)   # raises: names what the folder lacks


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


def initial_variables(model_config, model, key) -> dict:
  """Step-0 `{'params', 'buffers'}` of a training: random from `key`, then replaced by
  `model_config.init_checkpoint` (a whole official `.pth` or converted directory) or, for the
  backbone only, by `model_config.pretrained_backbone` (torchvision ResNet `.pth`, or
  Microsoft's ImageNet Swin `.pth` for a Swin backbone)."""
  m = model_config
  variables = models.init_variables(model, key)
  if m.init_checkpoint:
    path = m.init_checkpoint
    if os.path.isfile(path):
      loaded = convert.load_official_checkpoint(path, m)
    elif os.path.isdir(path):
      loaded = store.load_converted(path, m)
    else:
      raise FileNotFoundError(f'config.model.init_checkpoint not found: {path}')
    loaded = {'params': loaded['params'], 'buffers': loaded.get('buffers', {})}
    check_same_structure(loaded, variables, path)
    variables = loaded
  elif m.pretrained_backbone:
    path = m.pretrained_backbone
    if not os.path.isfile(path):
      raise FileNotFoundError(f'config.model.pretrained_backbone not found: {path}')
    merged = convert.merge_backbone(variables, convert.load_pretrained_backbone(path, m))
    check_same_structure(merged, variables, path)
    variables = merged
  return jax.tree.map(jnp.asarray, variables)


__all__ = ['ModelConfigMismatch', 'check_model_config', 'check_same_structure', 'convert',
           'initial_variables', 'load', 'store']
