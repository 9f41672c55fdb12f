"""Dropout with `flax.linen.Dropout`'s exact masks, built in one fused computation.

On XLA:CPU, `jax.random.bernoulli` lowers the Threefry-2x32 hash to a rolled 5-iteration loop
that writes every intermediate array out; for the dropout masks of a SOLQ-R50 train step that
was ~1.2 s of a one-core forward. Here the hash is unrolled into one element-wise fusion that
produces the same bits, so a model with this `Dropout` trains exactly as with `nn.Dropout`
(tests/test_dropout.py checks the masks bit for bit against `jax.random.bernoulli`).
"""
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# Threefry-2x32 rotation constants of the two alternating groups of 4 rounds.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1, k2, x0, x1):
  """The Threefry-2x32 block cipher (20 rounds) on uint32 arrays, fully unrolled.

  The same function as `jax.random`'s default hash, whose XLA:CPU lowering is a rolled
  5-iteration while loop that materialises every intermediate (about 3x slower for dropout
  masks here); unrolled, the whole mask is one element-wise fusion.
  """
  rotl = lambda v, d: lax.shift_left(v, np.uint32(d)) | lax.shift_right_logical(
      v, np.uint32(32 - d))
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x0 = x0 + ks[0]
  x1 = x1 + ks[1]
  for i in range(5):
    for r in _THREEFRY_ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = x0 ^ rotl(x1, r)
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def _fast_bernoulli_supported(rng, size):
  return (jax.config.jax_default_prng_impl == 'threefry2x32' and
          jax.config.jax_threefry_partitionable and
          not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) and
          rng.shape == (2,) and rng.dtype == jnp.uint32 and size < 2 ** 32)


def bernoulli_mask(rng, keep_prob: float, shape):
  """`jax.random.bernoulli(rng, keep_prob, shape)`, bit for bit, as one fused computation.

  Follows jax's partitionable threefry bits (counter = flat index split into high/low words,
  bits = x0 ^ x1) and `uniform`'s mantissa trick; falls back to `jax.random.bernoulli` when the
  key or the PRNG configuration is not that one.
  """
  size = int(np.prod(shape))
  if not _fast_bernoulli_supported(rng, size):
    return jax.random.bernoulli(rng, keep_prob, shape)
  counts = lax.iota(jnp.uint32, size).reshape(shape)  # low word; the high word is 0
  x0, x1 = _threefry2x32(rng[0], rng[1], jnp.zeros(shape, jnp.uint32), counts)
  bits = x0 ^ x1
  one = np.array(1.0, np.float32).view(np.uint32)
  floats = lax.bitcast_convert_type(lax.shift_right_logical(bits, np.uint32(9)) | one,
                                    jnp.float32) - np.float32(1.0)
  return floats < np.float32(keep_prob)


class Dropout(nn.Module):
  """`flax.linen.Dropout` with identical masks and outputs, built by `bernoulli_mask`.

  The class name is `Dropout` on purpose: auto-named instances are `Dropout_0`, ... as with
  `nn.Dropout`, so `make_rng('dropout')` hands them the same keys.
  """
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if self.rate == 0.0 or deterministic:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep_prob = 1.0 - self.rate
    mask = bernoulli_mask(self.make_rng('dropout'), keep_prob, x.shape)
    return lax.select(mask, x / keep_prob, jnp.zeros_like(x))
