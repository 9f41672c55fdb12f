"""Swin Transformer backbones (Swin-T/S/B/L, patch 4, window 7) for SOLQ, NHWC.

The detection variant of Swin that the official SOLQ builds (`build_swin_backbone`): any image
size (the image is padded to a multiple of the patch size, every block pads its map to a
multiple of the window, patch merging pads odd sizes), the shifted-window attention mask built
for each stage's padded size, and returns stages 2-4 (strides 8/16/32, channels 2C/4C/8C), each
through its own output LayerNorm (`norm1`..`norm3`).

Parameter names follow the torch module names: `patch_embed/{proj,norm}`,
`layers_{i}/blocks_{j}/{norm1,attn/{qkv,proj,relative_position_bias_table},norm2,mlp/{fc1,fc2}}`,
`layers_{i}/downsample/{norm,reduction}`, `norm{i}`. The relative position index and the shift
masks are constants of the window size (and of the map size), not variables.

`frozen_stages` is the official Swin `frozen_stages`: -1 trains everything (SOLQ's setting),
0 and 1 freeze the patch embedding, k >= 2 also freezes stages 1..k-1 (`layers_0..layers_{k-2}`,
patch merging included); frozen stages get no gradient and no stochastic depth (the official
model keeps them in eval mode). The output norms are always trained.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from solq_jax.models.layers import torch_linear_bias, torch_linear_kernel
from solq_jax.models.transformer import layer_norm, maybe_remat

# name -> (embed_dim C, blocks per stage, heads per stage, official drop-path rate)
SWIN_VARIANTS = {
    'swin_t': (96, (2, 2, 6, 2), (3, 6, 12, 24), 0.2),
    'swin_s': (96, (2, 2, 18, 2), (3, 6, 12, 24), 0.2),
    'swin_b': (128, (2, 2, 18, 2), (4, 8, 16, 32), 0.3),
    'swin_l': (192, (2, 2, 18, 2), (6, 12, 24, 48), 0.3),
}
PATCH_SIZE = 4
WINDOW_SIZE = 7
MLP_RATIO = 4
OUT_INDICES = (1, 2, 3)
# Logit added between tokens of different regions of a shifted window (the official value).
SHIFT_MASK_VALUE = -100.0
PATCH_EMBED = 'patch_embed'
STAGE_PREFIX = 'layers_'

# The official `init_weights`: Linear kernels N(0, 0.02) (timm's trunc_normal_ cuts at +-2,
# i.e. 100 std), biases 0; the relative position tables N(0, 0.02).
_linear_init = nn.initializers.normal(0.02)


def is_swin(name: str) -> bool:
  return name in SWIN_VARIANTS


def swin_layout(name: str):
  if name not in SWIN_VARIANTS:
    raise ValueError(f'config.model.backbone must be one of {sorted(SWIN_VARIANTS)} for a Swin '
                     f'backbone, got {name!r}')
  return SWIN_VARIANTS[name]


def swin_channels(name: str):
  """Channels of the returned stage 2..4 maps (2C, 4C, 8C)."""
  embed_dim = swin_layout(name)[0]
  return tuple(embed_dim * 2 ** i for i in OUT_INDICES)


def check_frozen_stages(frozen_stages: int, num_stages: int = 4) -> None:
  if not -1 <= frozen_stages <= num_stages + 1:
    raise ValueError(f'config.model.backbone_frozen_stages must be in -1..{num_stages + 1} for '
                     'a Swin backbone (the official frozen_stages: -1 none, 0/1 the patch '
                     f'embedding, k>=2 also stages 1..k-1), got {frozen_stages}')


def swin_frozen_module(module_name: str, frozen_stages: int) -> bool:
  """Whether the Swin module `module_name` (`patch_embed`, `layers_{i}`, `norm{i}`) is frozen."""
  if module_name == PATCH_EMBED:
    return frozen_stages >= 0
  if module_name.startswith(STAGE_PREFIX):
    return int(module_name[len(STAGE_PREFIX):]) <= frozen_stages - 2
  return False


def relative_position_index(window: int) -> np.ndarray:
  """`[N, N]` (N = window^2) index into the `(2w-1)^2` table of relative offsets (dy, dx)."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing='ij'))
  coords = coords.reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :] + (window - 1)          # [2, N, N], >= 0
  return rel[0] * (2 * window - 1) + rel[1]


def window_partition(x, window: int):
  """`[B, H, W, C]` (H, W multiples of `window`) -> `[B, nW, window^2, C]`, windows row-major."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // window) * (w // window), window ** 2, c)


def window_merge(windows, window: int, h: int, w: int):
  """The inverse of `window_partition`."""
  b, c = windows.shape[0], windows.shape[-1]
  x = windows.reshape(b, h // window, w // window, window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def shift_attention_mask(hp: int, wp: int, window: int, shift: int) -> np.ndarray:
  """`[nW, N, N]` additive mask of the shifted windows of an `hp x wp` map: tokens that the
  cyclic shift brought from different regions of the map do not attend to each other."""
  regions = np.zeros((1, hp, wp, 1), np.float32)
  bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  for i, hs in enumerate(bounds):
    for j, ws in enumerate(bounds):
      regions[:, hs, ws, :] = 3 * i + j
  ids = window_partition(regions, window)[0, :, :, 0]                 # [nW, N]
  return np.where(ids[:, None, :] != ids[:, :, None], SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def _dense(features, name, dtype, use_bias=True):
  return nn.Dense(features, use_bias=use_bias, kernel_init=_linear_init, dtype=dtype, name=name)


class WindowAttention(nn.Module):
  """Multi-head self-attention inside each window, plus the learned relative position bias."""
  num_heads: int
  window: int = WINDOW_SIZE
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask: Optional[np.ndarray]):
    b, nw, n, c = x.shape
    head_dim = c // self.num_heads
    table = self.param('relative_position_bias_table', _linear_init,
                       ((2 * self.window - 1) ** 2, self.num_heads))
    qkv = _dense(3 * c, 'qkv', self.dtype)(x).reshape(b, nw, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    logits = jnp.einsum('bwqhd,bwkhd->bwhqk', q, k).astype(jnp.float32)
    bias = table[relative_position_index(self.window).reshape(-1)].reshape(n, n, -1)
    logits = logits + bias.transpose(2, 0, 1)                          # [nH, N, N]
    if mask is not None:
      logits = logits + jnp.asarray(mask)[:, None]                     # [nW, 1, N, N]
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bwhqk,bwkhd->bwqhd', weights, v).reshape(b, nw, n, c)
    return _dense(c, 'proj', self.dtype)(out)


class DropPath(nn.Module):
  """Stochastic depth: the whole residual branch of a sample is dropped with probability
  `rate` (the survivors scaled by 1 / (1 - rate)), during training only."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    survive = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(survive, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class Mlp(nn.Module):
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = jax.nn.gelu(_dense(self.hidden, 'fc1', self.dtype)(x), approximate=False)
    return _dense(x.shape[-1], 'fc2', self.dtype)(h)


class SwinBlock(nn.Module):
  """Pre-norm (shifted-)window attention and MLP, each a residual branch with stochastic depth.

  The map is padded with zeros (after `norm1`) to a multiple of the window; padded tokens take
  part in the attention as in the official model, and are cropped afterwards."""
  num_heads: int
  shift: int = 0
  drop_path: float = 0.0
  window: int = WINDOW_SIZE
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    _, h, w, c = x.shape
    ws = self.window
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    y = layer_norm('norm1', self.dtype)(x)
    y = jnp.pad(y, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    mask = None
    if self.shift:
      y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
      mask = shift_attention_mask(hp, wp, ws, self.shift)
    y = WindowAttention(self.num_heads, ws, self.dtype, name='attn')(window_partition(y, ws), mask)
    y = window_merge(y, ws, hp, wp)
    if self.shift:
      y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
    x = x + DropPath(self.drop_path)(y[:, :h, :w], not train)
    y = Mlp(MLP_RATIO * c, self.dtype, name='mlp')(layer_norm('norm2', self.dtype)(x))
    return x + DropPath(self.drop_path)(y, not train)


class PatchMerging(nn.Module):
  """2x2 neighbours concatenated (odd sizes padded with zeros), LayerNorm(4C), Linear -> 2C."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    _, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                        axis=-1)
    x = layer_norm('norm', self.dtype)(x)
    return _dense(2 * c, 'reduction', self.dtype, use_bias=False)(x)


class PatchEmbed(nn.Module):
  """The image zero-padded bottom/right to a multiple of `patch`, patches embedded (`proj`),
  then LayerNorm (`norm`)."""
  embed_dim: int
  patch: int = PATCH_SIZE
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    _, h, w, _ = x.shape
    p = self.patch
    x = jnp.pad(x, ((0, 0), (0, -h % p), (0, -w % p), (0, 0))).astype(self.dtype)
    # torch's Conv2d(3, C, kernel p, stride p): kernel HWIO and bias, torch's default init.
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding='VALID',
                kernel_init=torch_linear_kernel, bias_init=torch_linear_bias(p * p * x.shape[-1]),
                dtype=self.dtype, name='proj')(x)
    return layer_norm('norm', self.dtype)(x)


class SwinStage(nn.Module):
  """`depth` blocks (odd ones shifted by half a window), then patch merging unless `last`.
  Returns the stage output (before merging) and the merged map for the next stage."""
  depth: int
  num_heads: int
  drop_paths: Sequence[float]
  last: bool = False
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    block_cls = maybe_remat(SwinBlock, self.remat, static_argnums=(2,))
    for j in range(self.depth):
      shift = 0 if j % 2 == 0 else WINDOW_SIZE // 2
      x = block_cls(self.num_heads, shift, float(self.drop_paths[j]), WINDOW_SIZE, self.dtype,
                    name=f'blocks_{j}')(x, train)
    merged = x if self.last else PatchMerging(self.dtype, name='downsample')(x)
    return x, merged


class SwinTransformer(nn.Module):
  """Swin body; `__call__(images [B,H,W,3], train)` returns the stage 2..4 maps, NHWC."""
  variant: str = 'swin_t'            # a key of SWIN_VARIANTS
  frozen_stages: int = -1            # the official frozen_stages (module docstring)
  drop_path_rate: float = 0.2        # stochastic depth of the last block (linear from 0)
  dtype: Any = jnp.float32           # computation dtype; params, softmax and norm stats f32
  remat: bool = False                # rematerialise every block in the backward pass

  @nn.compact
  def __call__(self, x, train: bool = False):
    embed_dim, depths, heads, _ = swin_layout(self.variant)
    check_frozen_stages(self.frozen_stages, len(depths))
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError('config.model.drop_path_rate must be in [0, 1), got '
                       f'{self.drop_path_rate}')
    rates = np.linspace(0.0, self.drop_path_rate, sum(depths))
    x = PatchEmbed(embed_dim, dtype=self.dtype, name=PATCH_EMBED)(x)
    if swin_frozen_module(PATCH_EMBED, self.frozen_stages):
      x = jax.lax.stop_gradient(x)
    outputs = []
    for i, depth in enumerate(depths):
      name = f'{STAGE_PREFIX}{i}'
      frozen = swin_frozen_module(name, self.frozen_stages)
      first = sum(depths[:i])
      out, x = SwinStage(depth, heads[i], tuple(float(r) for r in rates[first:first + depth]),
                         last=i == len(depths) - 1, dtype=self.dtype, remat=self.remat,
                         name=name)(x, train and not frozen)
      if frozen:
        out, x = jax.lax.stop_gradient(out), jax.lax.stop_gradient(x)
      if i in OUT_INDICES:
        outputs.append(layer_norm(f'norm{i}', self.dtype)(out))
    return outputs
