"""ResNet bodies: frozen BN, torch padding/stride semantics, block layout, shapes, frozen stages."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solq_jax import models
from solq_jax.models.backbone import (Bottleneck, FrozenBatchNorm, ResNet, backbone_channels,
                                      frozen_module)

RNG = np.random.default_rng(0)


def _conv(x, k, stride, pad):
  """numpy NHWC x HWIO convolution with symmetric zero padding (torch Conv2d, no bias)."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw = k.shape[:2]
  oh = (x.shape[1] - kh) // stride + 1
  ow = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, k.shape[3]))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
      out += patch @ k[i, j]
  return out


def _bn(x, b):
  s = b['scale'] / np.sqrt(b['var'] + 1e-5)
  return x * s + (b['bias'] - b['mean'] * s)


def _random_buffers(tree):
  """Realistic FrozenBN constants for every BN in a buffers tree (numpy)."""
  def fill(path, leaf):
    name = path[-1].key
    if name == 'var':
      return RNG.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    base = 1.0 if name == 'scale' else 0.0
    return (base + 0.3 * RNG.standard_normal(leaf.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, tree)


def test_frozen_batch_norm_formula():
  x = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
  bn = FrozenBatchNorm()
  variables = bn.init(jax.random.key(0), x)
  assert set(variables) == {'buffers'} and set(variables['buffers']) == {'scale', 'bias', 'mean',
                                                                        'var'}
  np.testing.assert_allclose(np.asarray(bn.apply(variables, x)), x / np.sqrt(1 + 1e-5),
                             rtol=1e-6)
  buffers = _random_buffers(variables['buffers'])
  got = np.asarray(bn.apply({'buffers': buffers}, x))
  np.testing.assert_allclose(got, _bn(x.astype(np.float64), buffers), rtol=1e-5, atol=1e-6)


def test_bottleneck_stride_on_3x3_against_numpy():
  """v1.5 bottleneck on an odd map: 1x1 -> 3x3/2 (pad 1) -> 1x1, 1x1/2 downsample."""
  x = RNG.standard_normal((1, 7, 9, 6)).astype(np.float32)
  block = Bottleneck(width=3, stride=2, downsample=True)
  v = jax.eval_shape(block.init, jax.random.key(0), x)
  params = jax.tree_util.tree_map(
      lambda s: (0.4 * RNG.standard_normal(s.shape)).astype(np.float32), v['params'])
  buffers = _random_buffers(v['buffers'])
  got = np.asarray(block.apply({'params': params, 'buffers': buffers}, x))
  p, b = params, buffers
  relu = lambda t: np.maximum(t, 0)
  out = relu(_bn(_conv(x, p['conv1']['kernel'], 1, 0), b['bn1']))
  out = relu(_bn(_conv(out, p['conv2']['kernel'], 2, 1), b['bn2']))
  out = _bn(_conv(out, p['conv3']['kernel'], 1, 0), b['bn3'])
  short = _bn(_conv(x, p['downsample']['kernel'], 2, 0), b['downsample_bn'])
  want = relu(out + short)
  assert got.shape == (1, 4, 5, 12)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope='module')
def resnet18_small():
  model = ResNet('resnet18')
  x = RNG.standard_normal((1, 19, 23, 3)).astype(np.float32)
  v = jax.eval_shape(model.init, jax.random.key(0), x)
  params = jax.tree_util.tree_map(
      lambda s: (RNG.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(
          np.float32), v['params'])
  return model, {'params': params, 'buffers': _random_buffers(v['buffers'])}, x


def test_stem_and_maxpool_against_numpy(resnet18_small):
  """conv1 7x7/2 pad 3, bn1, relu, maxpool 3x3/2 pad 1: layer2 input of an odd image."""
  model, variables, x = resnet18_small
  _, state = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
  p, b = variables['params'], variables['buffers']
  stem = np.maximum(_bn(_conv(x, p['conv1']['kernel'], 2, 3), b['bn1']), 0)   # [1,10,12,C]
  padded = np.pad(stem, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  pooled = np.full((1, 5, 6, 64), -np.inf)
  for i in range(3):
    for j in range(3):
      pooled = np.maximum(pooled, padded[:, i:i + 9:2, j:j + 11:2])
  got = state['intermediates']['layer1_0']['__call__'][0]
  # layer1_0 has no downsample: its output is relu(block(x) + x); check the input via shapes
  assert got.shape == pooled.shape
  conv1_out = state['intermediates']['conv1']['__call__'][0]
  np.testing.assert_allclose(np.asarray(conv1_out), _conv(x, p['conv1']['kernel'], 2, 3),
                             rtol=1e-4, atol=1e-4)
  block = jax.tree_util.tree_map(np.asarray, {'params': p['layer1_0'], 'buffers': b['layer1_0']})
  relu = lambda t: np.maximum(t, 0)
  out = relu(_bn(_conv(pooled, block['params']['conv1']['kernel'], 1, 1), block['buffers']['bn1']))
  out = _bn(_conv(out, block['params']['conv2']['kernel'], 1, 1), block['buffers']['bn2'])
  np.testing.assert_allclose(np.asarray(got), relu(out + pooled), rtol=1e-3, atol=1e-3)


def test_frozen_stem_and_layer1_get_no_gradient(resnet18_small):
  model, variables, x = resnet18_small
  loss = lambda p: sum(jnp.sum(f) for f in model.apply({'params': p,
                                                        'buffers': variables['buffers']}, x))
  grads = jax.grad(loss)(variables['params'])
  assert float(jnp.abs(grads['conv1']['kernel']).max()) == 0.0
  assert float(jnp.abs(grads['layer1_1']['conv2']['kernel']).max()) == 0.0
  assert float(jnp.abs(grads['layer2_0']['conv1']['kernel']).max()) > 0.0


@pytest.mark.parametrize('name,blocks,channels', [
    ('resnet10', (1, 1, 1, 1), (128, 256, 512)),
    ('resnet18', (2, 2, 2, 2), (128, 256, 512)),
    ('resnet50', (3, 4, 6, 3), (512, 1024, 2048)),
    ('resnet101', (3, 4, 23, 3), (512, 1024, 2048)),
])
def test_shapes_and_layout(name, blocks, channels):
  x = jax.ShapeDtypeStruct((2, 333, 517, 3), jnp.float32)
  model = ResNet(name)
  v = jax.eval_shape(model.init, jax.random.key(0), x)
  outs = jax.eval_shape(model.apply, v, x)
  # ceil(n/2) per stride-2 stage: 333 -> 167 -> 84 -> 42 -> 21 -> 11;
  # 517 -> 259 -> 130 -> 65 -> 33 -> 17
  assert [o.shape for o in outs] == [(2, 42, 65, channels[0]), (2, 21, 33, channels[1]),
                                     (2, 11, 17, channels[2])]
  assert backbone_channels(name) == channels
  for stage, n in enumerate(blocks):
    names = sorted(k for k in v['params'] if k.startswith(f'layer{stage + 1}_'))
    assert len(names) == n
    assert ('downsample' in v['params'][f'layer{stage + 1}_0']) == (
        stage > 0 or name in ('resnet50', 'resnet101'))
  assert 'conv3' in v['params']['layer1_0'] and 'bn3' in v['buffers']['layer1_0'] or (
      name in ('resnet10', 'resnet18'))
  assert not any('bias' in leaf for leaf in jax.tree_util.tree_leaves(
      jax.tree_util.tree_map_with_path(lambda path, _: str(path), v['params'])))


def test_unknown_backbone_is_named():
  with pytest.raises(ValueError, match='resnet152'):
    jax.eval_shape(ResNet('resnet152').init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def _stage_grads(norm, frozen_stages):
  model = ResNet('resnet18', norm=norm, frozen_stages=frozen_stages)
  x = RNG.standard_normal((2, 33, 41, 3)).astype(np.float32)
  v = model.init(jax.random.key(1), x)
  loss = lambda p: sum(jnp.sum(f ** 2) for f in model.apply({**v, 'params': p}, x))
  grads = jax.grad(loss)(v['params'])
  return v, {k: float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(sub)))
             for k, sub in grads.items()}


@pytest.mark.parametrize('frozen_stages', [0, 2])
def test_frozen_stages_knob(frozen_stages):
  """Gradient reaches exactly the modules after the frozen stages (0: the stem too)."""
  _, g = _stage_grads('frozen_bn', frozen_stages)
  for name, total in g.items():
    stage = 1 if name == 'conv1' else int(name[len('layer')])  # the stem goes with layer1
    assert (total > 0) == (stage > frozen_stages), (name, total)
    assert (total > 0) == (not frozen_module(name, frozen_stages)), (name, total)


def test_group_norm_backbone_trains_its_norms():
  """norm='group_norm': GroupNorm scale/bias are params (no buffers), normalise per group of
  32 channels, and get gradients; the FrozenBN model has the same conv kernels."""
  v, g = _stage_grads('group_norm', 0)
  assert 'buffers' not in v
  assert set(v['params']['bn1']) == {'scale', 'bias'} and g['bn1'] > 0
  frozen = ResNet('resnet18').init(jax.random.key(1), jnp.zeros((1, 33, 41, 3)))
  kernels = lambda t: {jax.tree_util.keystr(p): x.shape for p, x in
                       jax.tree_util.tree_flatten_with_path(t)[0] if 'kernel' in str(p)}
  assert kernels(v['params']) == kernels(frozen['params'])
  # The stem's GroupNorm against numpy: per image and group of 2 channels, zero mean, unit var.
  model = ResNet('resnet18', norm='group_norm', frozen_stages=0)
  x = RNG.standard_normal((2, 33, 41, 3)).astype(np.float32)
  _, state = model.apply(v, x, capture_intermediates=True, mutable=['intermediates'])
  pre = np.asarray(state['intermediates']['conv1']['__call__'][0], np.float64)
  post = np.asarray(state['intermediates']['bn1']['__call__'][0], np.float64)
  grouped = pre.reshape(2, -1, 32, 2)
  want = (grouped - grouped.mean((1, 3), keepdims=True)) / np.sqrt(
      grouped.var((1, 3), keepdims=True) + 1e-5)
  np.testing.assert_allclose(post, want.reshape(pre.shape), rtol=1e-4, atol=1e-4)


def test_bad_backbone_knobs_are_named():
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match='backbone_norm'):
    jax.eval_shape(ResNet('resnet18', norm='batch_norm').init, jax.random.key(0), x)
  with pytest.raises(ValueError, match='backbone_frozen_stages'):
    jax.eval_shape(ResNet('resnet18', frozen_stages=5).init, jax.random.key(0), x)


def test_narrow_width_scales_every_conv_and_group_norm():
  """backbone_width=16: every conv has a quarter of torchvision's channels (stem 16, stages
  16/32/64/128), the returned maps 32/64/128 channels; GroupNorm keeps 2 channels per group
  below 64 channels, 32 groups from 64 up (torchvision widths unchanged)."""
  x = jnp.zeros((1, 64, 96, 3))
  wide = jax.eval_shape(ResNet('resnet10').init, jax.random.key(0), x)['params']
  model = ResNet('resnet10', norm='group_norm', frozen_stages=0, width=16)
  narrow = jax.eval_shape(model.init, jax.random.key(0), x)['params']
  shapes = lambda t: {jax.tree_util.keystr(p): x.shape for p, x in
                      jax.tree_util.tree_flatten_with_path(t)[0] if 'kernel' in str(p)}
  wide, narrow_k = shapes(wide), shapes(narrow)
  assert set(wide) == set(narrow_k)
  for key, (kh, kw, cin, cout) in wide.items():
    assert narrow_k[key] == (kh, kw, 3 if cin == 3 else cin // 4, cout // 4), key
  outs = jax.eval_shape(model.apply, {'params': narrow}, x)
  assert [o.shape[-1] for o in outs] == list(backbone_channels('resnet10', 16)) == [32, 64, 128]
  v = model.init(jax.random.key(1), RNG.standard_normal((1, 33, 41, 3)).astype(np.float32))
  _, state = model.apply(v, RNG.standard_normal((1, 33, 41, 3)).astype(np.float32),
                         capture_intermediates=True, mutable=['intermediates'])
  pre = np.asarray(state['intermediates']['conv1']['__call__'][0], np.float64)
  post = np.asarray(state['intermediates']['bn1']['__call__'][0], np.float64)
  grouped = pre.reshape(1, -1, 8, 2)        # 16 channels: 8 groups of 2
  want = (grouped - grouped.mean((1, 3), keepdims=True)) / np.sqrt(
      grouped.var((1, 3), keepdims=True) + 1e-5)
  np.testing.assert_allclose(post, want.reshape(pre.shape), rtol=1e-4, atol=1e-4)


def test_bad_width_and_unconvertible_backbones_are_named():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from solq_jax.weights import convert  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((1, 32, 32, 3))
  for width in (12, 0):
    with pytest.raises(ValueError, match='backbone_width'):
      jax.eval_shape(ResNet('resnet18', width=width).init, jax.random.key(0), x)
  config = tiny.get_config()
  config.model.backbone_width = 32
  with pytest.raises(ValueError, match='backbone_width=32'):
    convert.model_plan(config.model)
  config.model.update(backbone='resnet10', backbone_width=64)
  with pytest.raises(ValueError, match="backbone='resnet10' has no published weights"):
    convert.backbone_plan(config.model)
  config.model.update(backbone='swin_t', backbone_width=32)
  with pytest.raises(ValueError, match='backbone_width=32 is a ResNet knob'):
    jax.eval_shape(lambda: models.init_variables(models.build_model(config.model),
                                                 jax.random.key(0)))
