"""ResNet-18/34/50/101 bodies with frozen batch norm (torchvision layout, NHWC).

Matches `torchvision.models.resnet*` with `norm_layer=FrozenBatchNorm2d`: conv1 7x7/2 (pad 3),
max-pool 3x3/2 (pad 1, padding never wins the max), BasicBlock or Bottleneck (v1.5: stride on the
3x3 conv), and returns the outputs of layer2, layer3 and layer4 (strides 8/16/32). Every stride-2
stage maps a size n to ceil(n/2), as torch does with these paddings.

The batch-norm constants are not parameters: they live in the `buffers` collection and are never
trained. The stem and layer1 are frozen in the official model. `frozen_module` is the one rule
that says which backbone modules are frozen: the ResNet stops gradients after the last module it
freezes (so no backward pass ever runs through them), and the optimiser's frozen parameter group
(solq_jax.training.optimizer) is read from it.

Two knobs exist for training WITHOUT pretrained weights (the CPU demo): `norm='group_norm'`
replaces every frozen batch norm with a trained GroupNorm (same module names, its scale and bias
in `params`), because a random ResNet behind identity batch norms is unnormalised; and
`frozen_stages` (official 1: stem + layer1) sets how many stages get no gradient (0 = none).

The Swin bodies live in `swin.py`; `frozen_module` and `backbone_channels` answer for both.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from solq_jax.models import swin
from solq_jax.models.layers import Conv2d

# depth -> (block kind, blocks per stage)
RESNET_LAYOUTS = {
    'resnet18': ('basic', (2, 2, 2, 2)),
    'resnet34': ('basic', (3, 4, 6, 3)),
    'resnet50': ('bottleneck', (3, 4, 6, 3)),
    'resnet101': ('bottleneck', (3, 4, 23, 3)),
    # Not a torchvision depth (no pretrained weights): the cheapest body with every stage, for
    # training from scratch on a CPU (the demo, the test suite).
    'resnet10': ('basic', (1, 1, 1, 1)),
}
# Stage widths as multiples of the stem width (`ResNet.width`; torchvision's 64).
_STAGE_MULTIPLES = (1, 2, 4, 8)
TORCHVISION_WIDTH = 64
PRETRAINED_LAYOUTS = ('resnet18', 'resnet34', 'resnet50', 'resnet101')
BN_EPS = 1e-5
NORMS = ('frozen_bn', 'group_norm')
GN_GROUPS = 32


STEM = ('conv1', 'bn1')


def frozen_module(module_name: str, frozen_stages: int) -> bool:
  """Whether the backbone module `module_name` (a top-level name under the backbone's params:
  `conv1`, `bn1`, `layer{s}_{k}`) is frozen when stages 1..`frozen_stages` are: the stem goes
  with layer1, later stages by their index. Swin modules (`patch_embed`, `layers_{i}`,
  `norm{i}`) follow the official Swin rule (`swin.swin_frozen_module`)."""
  if module_name == swin.PATCH_EMBED or module_name.startswith(swin.STAGE_PREFIX):
    return swin.swin_frozen_module(module_name, frozen_stages)
  if module_name in STEM:
    return frozen_stages >= 1
  stage = module_name[len('layer'):].split('_')[0] if module_name.startswith('layer') else ''
  return stage.isdigit() and int(stage) <= frozen_stages


def resnet_layout(name: str):
  if name not in RESNET_LAYOUTS:
    raise ValueError(f'config.model.backbone must be one of {sorted(RESNET_LAYOUTS)}, '
                     f'got {name!r}')
  return RESNET_LAYOUTS[name]


def backbone_channels(name: str, width: int = TORCHVISION_WIDTH):
  """Channels of the returned (layer2, layer3, layer4) maps: 128/256/512 or 512/1024/2048 at
  the torchvision width (Swin: its stages 2..4, 2C/4C/8C)."""
  if swin.is_swin(name):
    return swin.swin_channels(name)
  kind, _ = resnet_layout(name)
  return tuple(width * k * _BLOCKS[kind].expansion for k in _STAGE_MULTIPLES[1:])


def check_width(width: int, name: str):
  if not isinstance(width, int) or width < 8 or width % 8:
    raise ValueError(f'config.model.backbone_width must be a multiple of 8 (>= 8; torchvision '
                     f'and the official weights: {TORCHVISION_WIDTH}), got {width!r}')
  if width != TORCHVISION_WIDTH and swin.is_swin(name):
    raise ValueError(f'config.model.backbone_width={width} is a ResNet knob; {name} sets its '
                     f'own widths (leave it at {TORCHVISION_WIDTH})')


# torchvision's ResNet init: kaiming_normal_(mode='fan_out', nonlinearity='relu').
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(features, kernel, stride=1, name=None, dtype=jnp.float32):
  """Bias-free conv with torch's symmetric padding `kernel // 2`, computed in `dtype`."""
  return Conv2d(features, kernel, stride, kernel_init=_conv_init, dtype=dtype, name=name)


class FrozenBatchNorm(nn.Module):
  """y = x * s + (bias - mean * s), s = scale * rsqrt(var + eps); constants in `buffers`."""
  eps: float = BN_EPS

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.variable('buffers', 'scale', jnp.ones, (c,), jnp.float32).value
    bias = self.variable('buffers', 'bias', jnp.zeros, (c,), jnp.float32).value
    mean = self.variable('buffers', 'mean', jnp.zeros, (c,), jnp.float32).value
    var = self.variable('buffers', 'var', jnp.ones, (c,), jnp.float32).value
    s = scale * jax.lax.rsqrt(var + self.eps)
    # The constants are folded in float32, then applied in the activations' dtype.
    return x * s.astype(x.dtype) + (bias - mean * s).astype(x.dtype)


def norm_layer(kind: str, name: str, dtype=jnp.float32, channels: int = 64) -> nn.Module:
  """The backbone's normalisation after a conv of `channels` outputs: `FrozenBatchNorm` or a
  trained `GroupNorm` (statistics in float32 whatever `dtype`, the output in `dtype`; 32
  groups, fewer below 64 channels so that a group keeps two channels)."""
  if kind == 'frozen_bn':
    return FrozenBatchNorm(name=name)
  if kind == 'group_norm':
    return nn.GroupNorm(num_groups=min(GN_GROUPS, channels // 2), epsilon=BN_EPS, dtype=dtype,
                        name=name)
  raise ValueError(f'config.model.backbone_norm must be one of {NORMS}, got {kind!r}')


class _Block(nn.Module):
  """A residual block: `relu(body(x) + shortcut(x))`, the shortcut a strided 1x1 conv + BN
  (`downsample`, `downsample_bn`) when the shape changes."""
  width: int
  stride: int = 1
  downsample: bool = False
  norm: str = 'frozen_bn'
  dtype: Any = jnp.float32
  expansion = 1

  def bn(self, name, channels):
    return norm_layer(self.norm, name, self.dtype, channels)

  def conv(self, features, kernel, stride, name):
    return conv(features, kernel, stride, name, self.dtype)

  def shortcut(self, x):
    if not self.downsample:
      return x
    out = self.conv(self.width * self.expansion, 1, self.stride, 'downsample')(x)
    return self.bn('downsample_bn', self.width * self.expansion)(out)


class BasicBlock(_Block):
  """3x3 (stride) -> 3x3."""

  @nn.compact
  def __call__(self, x):
    out = nn.relu(self.bn('bn1', self.width)(self.conv(self.width, 3, self.stride, 'conv1')(x)))
    out = self.bn('bn2', self.width)(self.conv(self.width, 3, 1, 'conv2')(out))
    return nn.relu(out + self.shortcut(x))


class Bottleneck(_Block):
  """1x1 -> 3x3 (stride, torchvision v1.5) -> 1x1 with 4x expansion."""
  expansion = 4

  @nn.compact
  def __call__(self, x):
    w = self.width
    out = nn.relu(self.bn('bn1', w)(self.conv(w, 1, 1, 'conv1')(x)))
    out = nn.relu(self.bn('bn2', w)(self.conv(w, 3, self.stride, 'conv2')(out)))
    out = self.bn('bn3', w * self.expansion)(self.conv(w * self.expansion, 1, 1, 'conv3')(out))
    return nn.relu(out + self.shortcut(x))


_BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}


class ResNet(nn.Module):
  """ResNet body; returns `[layer2, layer3, layer4]` feature maps, NHWC."""
  variant: str = 'resnet50'     # a key of RESNET_LAYOUTS
  norm: str = 'frozen_bn'
  frozen_stages: int = 1        # the modules `frozen_module` names get no gradient
  dtype: Any = jnp.float32      # computation dtype (the input is cast to it); params float32
  width: int = TORCHVISION_WIDTH  # the stem's channels; stage s has width * 2**(s-1) (x4)

  @nn.compact
  def __call__(self, x, train: bool = False):
    # `train` is the backbones' shared signature (Swin's stochastic depth); a ResNet with
    # frozen batch norms or GroupNorm computes the same in both modes.
    del train
    kind, blocks = resnet_layout(self.variant)
    check_width(self.width, self.variant)
    block_cls = _BLOCKS[kind]
    if not 0 <= self.frozen_stages <= 4:
      raise ValueError('config.model.backbone_frozen_stages must be in 0..4 (0: train the '
                       f'whole backbone; 1: stem + layer1 frozen), got {self.frozen_stages}')
    # Units in order: the stem, then the four stages (named by their first block); gradients
    # stop after the last one the rule freezes.
    units = [STEM[0]] + [f'layer{stage + 1}_0' for stage in range(len(blocks))]
    last_frozen = max((i for i, u in enumerate(units) if frozen_module(u, self.frozen_stages)),
                      default=-1)
    stem = conv(self.width, 7, 2, 'conv1', self.dtype)(x)
    x = nn.relu(norm_layer(self.norm, 'bn1', self.dtype, self.width)(stem))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    if last_frozen == 0:
      x = jax.lax.stop_gradient(x)
    in_channels = self.width
    outputs = []
    widths = [self.width * k for k in _STAGE_MULTIPLES]
    for stage, (width, n) in enumerate(zip(widths, blocks)):
      out_channels = width * block_cls.expansion
      for k in range(n):
        stride = 2 if (stage > 0 and k == 0) else 1
        needs_downsample = k == 0 and (stride != 1 or in_channels != out_channels)
        x = block_cls(width, stride, needs_downsample, self.norm, self.dtype,
                      name=f'layer{stage + 1}_{k}')(x)
        in_channels = out_channels
      if stage + 1 == last_frozen:
        x = jax.lax.stop_gradient(x)
      if stage > 0:
        outputs.append(x)
    return outputs
