"""Shared by the tests of the extra query sets (hybrid matching, Group DETR, denoising): the
micro model (tests/train_micro_config.py, no dropout so train-mode outputs are deterministic)
with a small fixed batch."""
import copy

import jax
import jax.numpy as jnp
import numpy as np

import train_micro_config
from solq_jax import models

IMAGE_HW = (64, 96)


def micro_config(**model_overrides):
  config = copy.deepcopy(train_micro_config.get_config())
  config.model.dropout = 0.0
  for key, value in model_overrides.items():
    config.model[key] = value
  return config


def micro_batch(config, seed=0, batch=2, counts=(3, 5)):
  """Images, padding and padded targets (`counts` valid per image) for `config`."""
  rng = np.random.default_rng(seed)
  g, k, h, w = config.data.max_gt, config.model.num_coeffs, *IMAGE_HW
  pad = np.zeros((batch, h, w), bool)
  pad[-1, 40:] = True
  valid = np.arange(g)[None] < np.asarray(counts)[:, None]
  boxes = np.concatenate([rng.uniform(0.2, 0.8, (batch, g, 2)),
                          rng.uniform(0.05, 0.4, (batch, g, 2))], -1).astype(np.float32)
  boxes[~valid] = 0.0
  vectors = rng.normal(size=(batch, g, k)).astype(np.float32)
  vectors[~valid] = 0.0
  return dict(images=jnp.asarray(rng.normal(size=(batch, h, w, 3)), jnp.float32),
              pad_mask=jnp.asarray(pad),
              labels=jnp.asarray(rng.integers(0, config.model.num_classes, (batch, g)),
                                 jnp.int32),
              boxes=jnp.asarray(boxes), vectors=jnp.asarray(vectors), valid=jnp.asarray(valid))


def build(config, seed=0):
  model = models.build_model(config.model)
  return model, models.init_variables(model, jax.random.key(seed), IMAGE_HW)


def apply_fn(model, **kwargs):
  """jit of `(variables, batch) -> outputs` in training mode (dropout key fixed)."""
  return jax.jit(lambda v, b: model.apply(v, b['images'], b['pad_mask'], train=True,
                                          rngs={'dropout': jax.random.key(1)}, **kwargs))


def with_param(variables, name, fn):
  """`variables` with `params[name]`'s leaves replaced by `fn(leaf)`."""
  params = dict(variables['params'])
  params[name] = jax.tree.map(fn, params[name])
  return {'params': params, 'buffers': variables['buffers']}


def query_arrays(outputs):
  """The per-query arrays of every decoder layer of one output dict."""
  layers = list(outputs['aux_outputs']) + [outputs]
  return [layer[k] for layer in layers for k in ('pred_logits', 'pred_boxes', 'pred_vectors')]
