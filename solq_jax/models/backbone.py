"""ResNet-18/34/50/101 bodies with frozen batch norm (torchvision layout, NHWC).

Matches `torchvision.models.resnet*` with `norm_layer=FrozenBatchNorm2d`: conv1 7x7/2 (pad 3),
max-pool 3x3/2 (pad 1, padding never wins the max), BasicBlock or Bottleneck (v1.5: stride on the
3x3 conv), and returns the outputs of layer2, layer3 and layer4 (strides 8/16/32). Every stride-2
stage maps a size n to ceil(n/2), as torch does with these paddings.

The batch-norm constants are not parameters: they live in the `buffers` collection and are never
trained. The stem and layer1 are frozen in the official model; gradients are stopped at the
output of layer1, so no backward pass ever runs through them.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

# depth -> (block kind, blocks per stage)
RESNET_LAYOUTS = {
    'resnet18': ('basic', (2, 2, 2, 2)),
    'resnet34': ('basic', (3, 4, 6, 3)),
    'resnet50': ('bottleneck', (3, 4, 6, 3)),
    'resnet101': ('bottleneck', (3, 4, 23, 3)),
}
_WIDTHS = (64, 128, 256, 512)
BN_EPS = 1e-5


def resnet_layout(name: str):
  if name not in RESNET_LAYOUTS:
    raise ValueError(f'config.model.backbone must be one of {sorted(RESNET_LAYOUTS)}, '
                     f'got {name!r}')
  return RESNET_LAYOUTS[name]


def backbone_channels(name: str):
  """Channels of the returned (layer2, layer3, layer4) maps: 128/256/512 or 512/1024/2048."""
  kind, _ = resnet_layout(name)
  return tuple(w * _BLOCKS[kind].expansion for w in _WIDTHS[1:])


# torchvision's ResNet init: kaiming_normal_(mode='fan_out', nonlinearity='relu').
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(features, kernel, stride=1, name=None):
  """Bias-free conv with torch's symmetric padding `kernel // 2`."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=_conv_init,
                 name=name)


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
    return x * s + (bias - mean * s)


class _Block(nn.Module):
  """A residual block: `relu(body(x) + shortcut(x))`, the shortcut a strided 1x1 conv + BN
  (`downsample`, `downsample_bn`) when the shape changes."""
  width: int
  stride: int = 1
  downsample: bool = False
  expansion = 1

  def shortcut(self, x):
    if not self.downsample:
      return x
    out = conv(self.width * self.expansion, 1, self.stride, 'downsample')(x)
    return FrozenBatchNorm(name='downsample_bn')(out)


class BasicBlock(_Block):
  """3x3 (stride) -> 3x3."""

  @nn.compact
  def __call__(self, x):
    out = nn.relu(FrozenBatchNorm(name='bn1')(conv(self.width, 3, self.stride, 'conv1')(x)))
    out = FrozenBatchNorm(name='bn2')(conv(self.width, 3, 1, 'conv2')(out))
    return nn.relu(out + self.shortcut(x))


class Bottleneck(_Block):
  """1x1 -> 3x3 (stride, torchvision v1.5) -> 1x1 with 4x expansion."""
  expansion = 4

  @nn.compact
  def __call__(self, x):
    out = nn.relu(FrozenBatchNorm(name='bn1')(conv(self.width, 1, 1, 'conv1')(x)))
    out = nn.relu(FrozenBatchNorm(name='bn2')(conv(self.width, 3, self.stride, 'conv2')(out)))
    out = FrozenBatchNorm(name='bn3')(conv(self.width * self.expansion, 1, 1, 'conv3')(out))
    return nn.relu(out + self.shortcut(x))


_BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}


class ResNet(nn.Module):
  """ResNet body; returns `[layer2, layer3, layer4]` feature maps, NHWC."""
  name_: str = 'resnet50'

  @nn.compact
  def __call__(self, x):
    kind, blocks = resnet_layout(self.name_)
    block_cls = _BLOCKS[kind]
    x = nn.relu(FrozenBatchNorm(name='bn1')(conv(64, 7, 2, 'conv1')(x)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    in_channels = 64
    outputs = []
    for stage, (width, n) in enumerate(zip(_WIDTHS, blocks)):
      out_channels = width * block_cls.expansion
      for k in range(n):
        stride = 2 if (stage > 0 and k == 0) else 1
        needs_downsample = k == 0 and (stride != 1 or in_channels != out_channels)
        x = block_cls(width, stride, needs_downsample, name=f'layer{stage + 1}_{k}')(x)
        in_channels = out_channels
      if stage == 0:
        x = jax.lax.stop_gradient(x)  # stem and layer1 are frozen
      else:
        outputs.append(x)
    return outputs
