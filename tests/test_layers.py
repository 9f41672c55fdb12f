"""`layers.Conv2d`: the parameters of `flax.linen.Conv` (same names, shapes and initial values),
torch's padding and output sizes, and the 1x1 matrix-product path equal to a convolution."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solq_jax.models.layers import Conv2d


@pytest.mark.parametrize('kernel,stride,bias', [(1, 1, False), (1, 2, True), (3, 2, True),
                                                (3, 1, False), (7, 2, False)])
def test_conv2d_matches_flax_conv(kernel, stride, bias):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 13, 10, 6)), jnp.float32)
  pad = kernel // 2
  init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
  ours = Conv2d(5, kernel, stride, use_bias=bias, kernel_init=init,
                bias_init=nn.initializers.normal(1.0))
  flax = nn.Conv(5, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=bias, kernel_init=init,
                 bias_init=nn.initializers.normal(1.0))
  v_ours = ours.init(jax.random.key(7), x)
  v_flax = flax.init(jax.random.key(7), x)
  jax.tree.map(np.testing.assert_array_equal, v_ours, v_flax)  # same tree, same values
  y_ours, y_flax = ours.apply(v_ours, x), flax.apply(v_flax, x)
  # torch: out = floor((n + 2 pad - k) / stride) + 1
  assert y_ours.shape == (2, (13 + 2 * pad - kernel) // stride + 1,
                          (10 + 2 * pad - kernel) // stride + 1, 5)
  np.testing.assert_allclose(np.asarray(y_ours), np.asarray(y_flax), rtol=1e-5, atol=1e-5)
  g_ours = jax.grad(lambda v: jnp.sum(ours.apply(v, x) ** 2))(v_ours)
  g_flax = jax.grad(lambda v: jnp.sum(flax.apply(v, x) ** 2))(v_flax)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               g_ours, g_flax)
