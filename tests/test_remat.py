"""train.remat: rematerialised transformer layers give the same parameters, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solq_jax import models

OUTPUT_KEYS = ('pred_logits', 'pred_boxes', 'pred_vectors')


def inputs(batch=2, h=64, w=64):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((batch, h, w, 3)), jnp.float32)
  pad = jnp.zeros((batch, h, w), bool).at[1, 40:].set(True)
  return images, pad


def value_and_grad(model, variables, images, pad):
  """Loss of every output of every layer (train mode, dropout on) and its parameter gradient."""

  def loss(params):
    out = model.apply(dict(variables, params=params), images, pad, train=True,
                      rngs={'dropout': jax.random.key(2)})
    layers = [out] + list(out['aux_outputs'])
    return sum(jnp.sum(jnp.sin(o[k])) for o in layers for k in OUTPUT_KEYS), out

  return jax.value_and_grad(loss, has_aux=True)


def checkpoint_count(model, variables, images, pad):
  """Number of `checkpoint` (remat) regions in the traced train-mode forward, at any depth."""
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, images, pad, train=True,
                                               rngs={'dropout': jax.random.key(2)}))(variables)

  def count(jp):
    n = 0
    for eqn in jp.eqns:
      n += eqn.primitive.name in ('checkpoint', 'remat2')   # the name differs by jax version
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          sub = getattr(sub, 'jaxpr', sub)   # a ClosedJaxpr's Jaxpr
          if hasattr(sub, 'eqns'):
            n += count(sub)
    return n
  return count(jaxpr.jaxpr)


def test_remat_equals_no_remat(tiny_config):
  """Values and gradients of remat 'all' equal no remat to 1e-6 (dropout on, same keys)."""
  plain = models.build_model(tiny_config.model)
  remat = models.build_model(tiny_config.model, remat='all')
  variables = models.init_variables(plain, jax.random.key(0))
  # The remat model has the very same parameter tree (names and shapes).
  remat_vars = models.init_variables(remat, jax.random.key(0))
  assert jax.tree.structure(remat_vars) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(remat_vars), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  leaves, tree = jax.tree.flatten(variables['params'])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  variables = dict(variables, params=jax.tree.unflatten(
      tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
  images, pad = inputs()
  (loss_a, out_a), grad_a = jax.jit(value_and_grad(plain, variables, images, pad))(
      variables['params'])
  (loss_b, out_b), grad_b = jax.jit(value_and_grad(remat, variables, images, pad))(
      variables['params'])
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  for key in OUTPUT_KEYS:
    np.testing.assert_allclose(out_b[key], out_a[key], rtol=1e-6, atol=1e-6, err_msg=key)
  paths = jax.tree_util.tree_flatten_with_path(grad_a)[0]
  # Recomputing a layer's forward inside the backward fuses it differently, so entries differ
  # in the last bits, and the rounding grows through the layers below; it is largest relative
  # to small gradients (a bias followed by a GroupNorm: zero up to rounding; the GroupNorm of a
  # 1x1 map, 2 values a group, which amplifies rounding). So every parameter array's gradient
  # is tested to 1e-6 of the norm of the whole gradient (measured: below 1e-7); a wrong
  # recomputation (another dropout mask, a stale input) is off by O(1) of it.
  grads = [(jax.tree_util.keystr(p), np.asarray(a, np.float64), np.asarray(b, np.float64))
           for (p, a), b in zip(paths, jax.tree.leaves(grad_b))]
  norm = np.sqrt(sum(np.sum(a ** 2) for _, a, _ in grads))
  worst = max((np.linalg.norm(b - a) / norm, name) for name, a, b in grads)
  assert worst[0] < 1e-6, worst
  total = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grad_a))
  assert total > 1.0   # a non-trivial gradient


@pytest.mark.parametrize('remat,expected', [('none', 0), ('encoder', 2), ('decoder', 2),
                                            ('all', 4)])
def test_remat_wraps_the_chosen_layers(tiny_config, remat, expected):
  """Each rematerialised layer is one checkpoint region (tiny: 2 encoder, 2 decoder layers)."""
  model = models.build_model(tiny_config.model, remat=remat)
  variables = models.init_variables(models.build_model(tiny_config.model), jax.random.key(0))
  assert checkpoint_count(model, variables, *inputs(1, 32, 32)) == expected


def test_remat_is_a_train_field_not_a_model_field(tiny_config):
  assert tiny_config.train.remat == 'none'
  assert 'remat' not in models.MODEL_FIELDS and 'remat' not in tiny_config.model
  model = models.build_model(tiny_config.model, remat='everything')
  with pytest.raises(ValueError, match='config.train.remat'):
    models.init_variables(model, jax.random.key(0))
