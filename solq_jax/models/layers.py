"""Small building blocks shared by the network: PyTorch-equivalent initialisers and the MLP head.

The official model mixes three kinds of initialisation, and parity of the initial model (not
only of converted checkpoints) needs all three:
  * xavier_uniform (gain 1) where the official code resets parameters explicitly;
  * the PyTorch `nn.Linear` default, `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` for the weight and
    the bias, where it leaves the defaults;
  * constants (zeros, the class prior, the box/vector bias quirk).
"""
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

xavier_uniform = nn.initializers.xavier_uniform()
# kaiming_uniform(a=sqrt(5)) of torch's nn.Linear: bound = sqrt(6 / (6 * fan_in)).
torch_linear_kernel = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_linear_bias(fan_in: int) -> Callable:
  """The default bias init of torch's `nn.Linear(fan_in, ...)`: U(-1/sqrt(fan_in), +)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def constant_vector(values) -> Callable:
  """An initialiser returning the given fixed vector (checked against the requested shape)."""
  values = np.asarray(values, np.float32)

  def init(key, shape, dtype=jnp.float32):
    del key
    if tuple(shape) != values.shape:
      raise ValueError(f'constant initialiser has shape {values.shape}, asked for {shape}')
    return jnp.asarray(values, dtype)
  return init


def box_bias_quirk(size: int) -> np.ndarray:
  """`[0, 0, -2, ..., -2]`: the official last-layer bias of bbox_embed[0] and vector_embed."""
  bias = np.full((size,), -2.0, np.float32)
  bias[:2] = 0.0
  return bias


def torch_dense(features: int, fan_in: int, name: Optional[str] = None, **kwargs) -> nn.Dense:
  """`nn.Dense` with torch's default `nn.Linear` initialisation (kernel and bias)."""
  kwargs.setdefault('kernel_init', torch_linear_kernel)
  kwargs.setdefault('bias_init', torch_linear_bias(fan_in))
  return nn.Dense(features, name=name, **kwargs)


class Conv2d(nn.Module):
  """torch's `nn.Conv2d` (NHWC, zero padding `kernel_size // 2`) with the parameters of
  `flax.linen.Conv` (`kernel [k, k, Cin, Cout]`, optional `bias`, created in that order).

  A 1x1 kernel runs as a matrix product of the strided input: the same values, but XLA:CPU
  computes the weight gradient of a 1x1 convolution as a slow convolution plus transposes
  (~2.3x slower forward+backward on a ResNet-50 bottleneck conv).
  """
  features: int
  kernel_size: int = 1
  stride: int = 1
  use_bias: bool = False
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = jnp.float32      # computation dtype; the parameters stay float32

  @nn.compact
  def __call__(self, x):
    k, s = self.kernel_size, self.stride
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if k == 1:
      y = jnp.dot(x[:, ::s, ::s], kernel[0, 0])
    else:
      pad = k // 2
      y = jax.lax.conv_general_dilated(x, kernel, (s, s), ((pad, pad), (pad, pad)),
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,)).astype(self.dtype)
    return y


class MLP(nn.Module):
  """Linear-ReLU-...-Linear head (`layers_{j}`), the official `MLP(in, hidden, out, n)`.

  Hidden layers use torch's default Linear init; the last layer's kernel is zero and its bias
  is `last_bias` (zeros when None), as the official heads set them.
  """
  hidden_dim: int
  output_dim: int
  num_layers: int
  last_bias: Optional[np.ndarray] = None
  dtype: Any = jnp.float32      # computation dtype of every layer (and of the output)

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    for j in range(self.num_layers):
      if j < self.num_layers - 1:
        x = nn.relu(torch_dense(self.hidden_dim, fan_in, name=f'layers_{j}', dtype=self.dtype)(x))
        fan_in = self.hidden_dim
      else:
        bias = (np.zeros((self.output_dim,), np.float32) if self.last_bias is None
                else self.last_bias)
        x = nn.Dense(self.output_dim, kernel_init=nn.initializers.zeros,
                     bias_init=constant_vector(bias), dtype=self.dtype, name=f'layers_{j}')(x)
    return x
