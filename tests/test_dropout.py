"""The fused dropout: masks bit for bit equal to `jax.random.bernoulli` (so a model trains
exactly as with `flax.linen.Dropout`), the inverted scaling, and the fallback paths."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solq_jax.models import dropout


@pytest.mark.parametrize('shape', [(7,), (3, 5, 11), (2, 300, 384), (1, 17, 8, 32)])
@pytest.mark.parametrize('keep', [0.9, 0.5, 0.1])
def test_mask_equals_jax_bernoulli(shape, keep):
  for seed in (0, 12345):
    key = jax.random.PRNGKey(seed)
    got = jax.jit(dropout.bernoulli_mask, static_argnums=(1, 2))(key, keep, shape)
    want = jax.random.bernoulli(key, keep, shape)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_module_equals_flax_dropout_and_scales():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 50, 64)), jnp.float32)
  rngs = {'dropout': jax.random.PRNGKey(3)}
  ours = dropout.Dropout(0.1).apply({}, x, False, rngs=rngs)
  flax = nn.Dropout(0.1).apply({}, x, deterministic=False, rngs=rngs)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(flax))
  kept = np.asarray(ours) != 0
  np.testing.assert_allclose(np.asarray(ours)[kept], np.asarray(x)[kept] / 0.9, rtol=1e-6)
  assert 0.85 < kept.mean() < 0.95
  np.testing.assert_array_equal(dropout.Dropout(0.1).apply({}, x, True), x)
  assert not np.asarray(dropout.Dropout(1.0).apply({}, x, False, rngs=rngs)).any()


def test_new_style_keys_fall_back_to_jax():
  key = jax.random.key(5)  # a typed key: not the raw uint32[2] the fused path reads
  got = dropout.bernoulli_mask(key, 0.7, (6, 9))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.random.bernoulli(key, 0.7, (6, 9))))
