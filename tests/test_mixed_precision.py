"""model.dtype='bfloat16': the computation dtype of the network, float32 parameters and outputs.

The tiny model runs with perturbed parameters (the official init zeroes the heads' last
kernels, which would make the box and vector outputs input-independent) in float32 and in
bfloat16 from the same variables.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solq_jax import models

OUTPUT_KEYS = ('pred_logits', 'pred_boxes', 'pred_vectors')
# Max |bf16 - fp32| over all queries and layers, relative to the largest |fp32| value of the
# output. bf16 has an 8-bit mantissa (relative rounding 2^-9 ~ 2e-3) and two encoder plus two
# decoder layers of rounding compound it; measured on this input: logits 5.0e-3, boxes 7e-4,
# vectors 4.7e-3 (of max |value| 6.7, 0.99, 2.6). The bounds are 3-7x the measured errors.
TOLERANCE = {'pred_logits': 2e-2, 'pred_boxes': 5e-3, 'pred_vectors': 1.5e-2}


def perturbed_variables(model, seed=1, scale=0.05):
  variables = models.init_variables(model, jax.random.key(0))
  leaves, tree = jax.tree.flatten(variables['params'])
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  params = jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  return dict(variables, params=params)


def inputs(batch=2, h=64, w=96):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((batch, h, w, 3)), jnp.float32)
  pad = jnp.zeros((batch, h, w), bool).at[1, 48:].set(True).at[1, :, 80:].set(True)
  return images, pad


def with_dtype(config, dtype):
  config = config.copy_and_resolve_references()
  config.model.dtype = dtype
  return config


@pytest.fixture(scope='module')
def runs(tiny_config):
  model32 = models.build_model(with_dtype(tiny_config, 'float32').model)
  model16 = models.build_model(with_dtype(tiny_config, 'bfloat16').model)
  variables = perturbed_variables(model32)
  images, pad = inputs()
  out32 = jax.jit(model32.apply)(variables, images, pad)
  out16 = jax.jit(model16.apply)(variables, images, pad)
  return model16, variables, (images, pad), out32, out16


def _layers(outputs):
  return [outputs] + list(outputs['aux_outputs'])


def test_bfloat16_outputs_are_float32_and_close_to_float32(runs):
  _, _, _, out32, out16 = runs
  assert len(out16['aux_outputs']) == len(out32['aux_outputs']) == 1
  for key in OUTPUT_KEYS:
    a = np.concatenate([np.asarray(o[key]) for o in _layers(out32)])
    b = np.concatenate([np.asarray(o[key]) for o in _layers(out16)])
    for o in _layers(out16):
      assert o[key].dtype == jnp.float32, key
    assert np.isfinite(b).all(), key
    err = np.abs(a - b).max() / np.abs(a).max()
    assert err < TOLERANCE[key], (key, err)
    assert np.abs(a - b).max() > 0, key   # bf16 really computed something else


def test_bfloat16_model_computes_in_bfloat16_with_float32_parameters(runs, tiny_config):
  model16, variables, (images, pad), _, _ = runs
  init16 = models.init_variables(model16, jax.random.key(0))
  init32 = models.init_variables(models.build_model(tiny_config.model), jax.random.key(0))
  for a, b in zip(jax.tree.leaves(init16), jax.tree.leaves(init32)):
    assert a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)   # the dtype does not change the initial variables
  jaxpr = jax.make_jaxpr(model16.apply)(variables, images, pad)

  def operand_dtypes(name):
    found = []

    def visit(jp):
      for eqn in jp.eqns:
        if eqn.primitive.name == name:
          found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for param in eqn.params.values():
          for sub in param if isinstance(param, (tuple, list)) else (param,):
            sub = getattr(sub, 'jaxpr', sub)   # a ClosedJaxpr's Jaxpr
            if hasattr(sub, 'eqns'):
              visit(sub)
    visit(jaxpr.jaxpr)
    return found

  dots = operand_dtypes('dot_general')
  convs = operand_dtypes('conv_general_dilated')
  # Every convolution and every matrix product but the reference-point projection of the query
  # positions (float32 on purpose: reference points are box arithmetic) runs in bfloat16.
  assert convs and all(d == ('bfloat16', 'bfloat16') for d in convs), convs
  f32_dots = [d for d in dots if d != ('bfloat16', 'bfloat16')]
  assert len(dots) > 40 and f32_dots == [('float32', 'float32')], f32_dots


def test_bfloat16_gradients_are_float32_and_finite(runs, tiny_config):
  model16, variables, (images, pad), _, _ = runs

  def loss(params):
    out = model16.apply(dict(variables, params=params), images, pad, train=True,
                        rngs={'dropout': jax.random.key(2)})
    return sum(jnp.sum(jnp.sin(out[k])) for k in OUTPUT_KEYS)

  grads = jax.jit(jax.grad(loss))(variables['params'])
  leaves = jax.tree.leaves(grads)
  assert all(g.dtype == jnp.float32 for g in leaves)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def test_unknown_dtype_is_refused(tiny_config):
  model = models.build_model(with_dtype(tiny_config, 'float16').model)
  with pytest.raises(ValueError, match='config.model.dtype'):
    models.init_variables(model, jax.random.key(0))
