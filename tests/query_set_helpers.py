"""Shared by the tests of the extra query sets (hybrid matching, Group DETR, denoising): the
micro model (tests/train_micro_config.py, no dropout so train-mode outputs are deterministic)
with a small fixed batch."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import train_micro_config
from solq_jax import models, sharding

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


def sharded_terms_equal_single_device(loss_fn, w, feats, base, targets, devices=8):
  """Runs `jax.value_and_grad(loss_fn, has_aux=True)` (`loss_fn(w, feats, base, targets) ->
  (total, terms)`) on one device and under a mesh of `devices` (as the train step traces it:
  `w` replicated, `feats [L, B, ...]`, `base` and `targets` split along the batch), asserts
  equal totals, terms and gradients, and returns the terms."""
  mesh = sharding.make_mesh(devices)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (ref_total, ref_terms), ref_grad = jax.jit(grad_fn)(w, feats, base, targets)
  batch_spec = NamedSharding(mesh, P(sharding.AXIS))
  args = (jax.device_put(w, NamedSharding(mesh, P())),
          jax.device_put(feats, NamedSharding(mesh, P(None, sharding.AXIS))),
          jax.device_put(base, batch_spec), jax.device_put(targets, batch_spec))
  sharded = sharding.under_mesh(mesh, jax.jit(grad_fn, out_shardings=NamedSharding(mesh, P())))
  (total, terms), grad = sharded(*args)
  np.testing.assert_allclose(float(total), float(ref_total), rtol=1e-6)
  for key in ref_terms:
    np.testing.assert_allclose(float(terms[key]), float(ref_terms[key]), rtol=1e-6, err_msg=key)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-5, atol=1e-7)
  assert float(np.abs(ref_grad).max()) > 0
  return terms
