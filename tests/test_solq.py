"""The whole SOLQ network: parameter tree and count, output shapes, initial-output quirks."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solq_jax.models import build_model, count_params, init_variables

FROZEN_PREFIXES = ('conv1', 'layer1_')


def _paths(tree):
  return {'/'.join(k.key for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _contract_paths(layers=6, levels=4, blocks=(3, 4, 6, 3)):
  """The parameter tree (docs/design.md, "Parameters") for a bottleneck ResNet config."""
  kb = ('kernel', 'bias')
  paths = {'backbone/conv1/kernel', 'query_embed/embedding', 'transformer/level_embed'}
  for i, n in enumerate(blocks, 1):
    for k in range(n):
      paths |= {f'backbone/layer{i}_{k}/conv{c}/kernel' for c in (1, 2, 3)}
    paths.add(f'backbone/layer{i}_0/downsample/kernel')
  for l in range(levels):
    paths |= {f'input_proj_{l}/conv/{x}' for x in kb} | {
        f'input_proj_{l}/norm/{x}' for x in ('scale', 'bias')}
  paths |= {f'transformer/reference_points/{x}' for x in kb}
  msda = ('sampling_offsets', 'attention_weights', 'value_proj', 'output_proj')
  for i in range(layers):
    enc = f'transformer/encoder/layers_{i}'
    dec = f'transformer/decoder/layers_{i}'
    for x in kb:
      paths |= {f'{enc}/self_attn/{m}/{x}' for m in msda}
      paths |= {f'{dec}/cross_attn/{m}/{x}' for m in msda}
      paths |= {f'{dec}/self_attn/{m}/{x}' for m in ('query', 'key', 'value', 'out')}
      paths |= {f'{p}/linear{j}/{x}' for p in (enc, dec) for j in (1, 2)}
      paths |= {f'class_embed_{i}/{x}'} | {f'bbox_embed_{i}/layers_{j}/{x}' for j in range(3)}
      paths |= {f'vector_embed/layers_{j}/{x}' for j in range(3)}
    for x in ('scale', 'bias'):
      paths |= {f'{enc}/norm{j}/{x}' for j in (1, 2)} | {f'{dec}/norm{j}/{x}' for j in (1, 2, 3)}
  return paths


@pytest.fixture(scope='module')
def r50_shapes(r50_config):
  model = build_model(r50_config.model)
  images = jax.ShapeDtypeStruct((2, 333, 517, 3), jnp.float32)
  pad = jax.ShapeDtypeStruct((2, 333, 517), jnp.bool_)
  variables = jax.eval_shape(model.init, jax.random.key(0), images, pad)
  return model, variables, images, pad


def test_r50_parameter_count_and_tree(r50_shapes):
  _, variables, _, _ = r50_shapes
  assert set(variables) == {'params', 'buffers'}
  params = variables['params']
  assert count_params(params) == 54_193_660
  frozen = sum(count_params(v) for k, v in params['backbone'].items()
               if k.startswith(FROZEN_PREFIXES))
  assert count_params(params) - frozen == 53_971_260
  assert count_params(variables['buffers']) == 106_240
  assert _paths(params) == _contract_paths()
  buffers = _paths(variables['buffers'])
  assert 'backbone/layer4_0/downsample_bn/var' in buffers and 'backbone/bn1/mean' in buffers
  assert all(p.split('/')[-1] in ('scale', 'bias', 'mean', 'var') for p in buffers)
  shapes = jax.tree_util.tree_map(lambda a: a.shape, params)
  assert shapes['input_proj_3']['conv']['kernel'] == (3, 3, 2048, 384)
  assert shapes['query_embed']['embedding'] == (300, 768)
  assert shapes['vector_embed']['layers_1']['kernel'] == (1024, 1024)


def test_r50_output_shapes_on_odd_padded_batch(r50_shapes):
  model, variables, images, pad = r50_shapes
  out = jax.eval_shape(model.apply, variables, images, pad)
  assert out['pred_logits'].shape == (2, 300, 91)
  assert out['pred_boxes'].shape == (2, 300, 4)
  assert out['pred_vectors'].shape == (2, 300, 256)
  assert len(out['aux_outputs']) == 5
  for aux in out['aux_outputs']:
    assert {k: v.shape for k, v in aux.items()} == {
        'pred_logits': (2, 300, 91), 'pred_boxes': (2, 300, 4), 'pred_vectors': (2, 300, 256)}


def _odd_batch(h, w, sizes):
  """Random normalised images padded bottom/right to (h, w), one per entry of `sizes`."""
  rng = np.random.default_rng(0)
  images = rng.standard_normal((len(sizes), h, w, 3)).astype(np.float32)
  pad = np.ones((len(sizes), h, w), bool)
  for i, (hi, wi) in enumerate(sizes):
    pad[i, :hi, :wi] = False
  images[pad] = 0.0
  return images, pad


@pytest.fixture(scope='module')
def tiny(tiny_config):
  model = build_model(tiny_config.model)
  images, pad = _odd_batch(67, 91, [(67, 91), (50, 60)])
  variables = init_variables(model, jax.random.key(0))
  out = jax.jit(model.apply)(variables, images, pad)
  return model, variables, out, tiny_config.model


def test_tiny_outputs(tiny):
  _, _, out, c = tiny
  assert out['pred_logits'].shape == (2, c.num_queries, c.num_classes)
  assert len(out['aux_outputs']) == c.dec_layers - 1
  for o in [out] + out['aux_outputs']:
    assert o['pred_boxes'].shape == (2, c.num_queries, 4)
    assert o['pred_vectors'].shape == (2, c.num_queries, c.num_coeffs)
    for key in ('pred_logits', 'pred_boxes', 'pred_vectors'):
      assert np.all(np.isfinite(np.asarray(o[key])))
    boxes = np.asarray(o['pred_boxes'])
    assert np.all((boxes > 0) & (boxes < 1))


def test_initial_head_quirks(tiny):
  """Class prior bias, zero last box layer (bias[2:] = -2 only on clone 0), vector [0,0,-2..]."""
  _, variables, out, c = tiny
  p = variables['params']
  prior = -math.log((1 - 0.01) / 0.01)
  assert abs(prior + 4.5951) < 1e-4
  for i in range(c.dec_layers):
    np.testing.assert_allclose(np.asarray(p[f'class_embed_{i}']['bias']), prior, rtol=1e-6)
    last = p[f'bbox_embed_{i}']['layers_2']
    assert np.all(np.asarray(last['kernel']) == 0)
    np.testing.assert_array_equal(np.asarray(last['bias']),
                                  [0, 0, -2, -2] if i == 0 else [0, 0, 0, 0])
  want = np.full(c.num_coeffs, -2.0, np.float32)
  want[:2] = 0
  for o in [out] + out['aux_outputs']:
    np.testing.assert_array_equal(np.asarray(o['pred_vectors']),
                                  np.broadcast_to(want, o['pred_vectors'].shape))
  # layer 0: w, h = sigmoid(-2); later layers refine with a zero delta: boxes stay put
  np.testing.assert_allclose(np.asarray(out['aux_outputs'][0]['pred_boxes'])[..., 2:],
                             1 / (1 + math.exp(2)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out['pred_boxes']),
                             np.asarray(out['aux_outputs'][-1]['pred_boxes']), rtol=1e-4,
                             atol=1e-6)
  # the class weight keeps torch's default Linear init: U(-1/sqrt(D), 1/sqrt(D))
  k = np.abs(np.asarray(p['class_embed_0']['kernel']))
  assert k.max() <= 1 / math.sqrt(c.hidden_dim) and k.max() > 0.9 / math.sqrt(c.hidden_dim)


def test_initial_embeddings_and_projections(tiny):
  _, variables, _, c = tiny
  p = variables['params']
  q = np.asarray(p['query_embed']['embedding'])
  assert q.shape == (c.num_queries, 2 * c.hidden_dim) and 0.9 < q.std() < 1.1
  assert 0.7 < np.asarray(p['transformer']['level_embed']).std() < 1.3
  for l in range(c.num_feature_levels):
    conv = p[f'input_proj_{l}']['conv']
    assert np.all(np.asarray(conv['bias']) == 0)
    kh, kw, cin, cout = conv['kernel'].shape
    bound = math.sqrt(6 / ((cin + cout) * kh * kw))
    assert np.abs(np.asarray(conv['kernel'])).max() <= bound
  assert np.all(np.asarray(p['transformer']['reference_points']['bias']) == 0)


def test_tiny_shapes_on_odd_sizes(tiny_config):
  model = build_model(tiny_config.model)
  images = jax.ShapeDtypeStruct((2, 333, 517, 3), jnp.float32)
  pad = jax.ShapeDtypeStruct((2, 333, 517), jnp.bool_)
  variables = jax.eval_shape(model.init, jax.random.key(0), images, pad)
  out = jax.eval_shape(model.apply, variables, images, pad)
  m = tiny_config.model
  assert out['pred_vectors'].shape == (2, m.num_queries, m.num_coeffs)
  assert 'downsample' not in variables['params']['backbone']['layer1_0']   # BasicBlock


def test_bad_inputs_are_named(tiny_config):
  model = build_model(tiny_config.model)
  with pytest.raises(ValueError, match='pad_mask'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                   jnp.zeros((1, 32, 31), bool))
  bad = tiny_config.copy_and_resolve_references()
  bad.model.backbone = 'resnet9'
  with pytest.raises(ValueError, match='resnet9'):
    jax.eval_shape(build_model(bad.model).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                   jnp.zeros((1, 32, 32), bool))
  bad.model.backbone = 'resnet18'
  bad.model.num_feature_levels = 2
  with pytest.raises(ValueError, match='num_feature_levels'):
    jax.eval_shape(build_model(bad.model).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                   jnp.zeros((1, 32, 32), bool))


@pytest.mark.parametrize('refine,levels', [(False, 4), (True, 1), (True, 5)])
def test_config_variants(tiny_config, refine, levels):
  """No box refinement: one shared class/box head; 1 level: layer4 only; 5: two extra levels."""
  config = tiny_config.copy_and_resolve_references()
  config.model.with_box_refine = refine
  config.model.num_feature_levels = levels
  model = build_model(config.model)
  images = jax.ShapeDtypeStruct((1, 97, 131, 3), jnp.float32)
  pad = jax.ShapeDtypeStruct((1, 97, 131), jnp.bool_)
  variables = jax.eval_shape(model.init, jax.random.key(0), images, pad)
  p = variables['params']
  heads = config.model.dec_layers if refine else 1
  assert sorted(k for k in p if k.startswith('class_embed_')) == [
      f'class_embed_{i}' for i in range(heads)]
  assert sorted(k for k in p if k.startswith('bbox_embed_')) == [
      f'bbox_embed_{i}' for i in range(heads)]
  kernels = [p[f'input_proj_{l}']['conv']['kernel'].shape for l in range(levels)]
  d = config.model.hidden_dim
  if levels == 1:
    assert kernels == [(1, 1, 512, d)]
  else:
    assert kernels[:4] == [(1, 1, 128, d), (1, 1, 256, d), (1, 1, 512, d), (3, 3, 512, d)]
    assert kernels[4:] == [(3, 3, d, d)] * (levels - 4)
  out = jax.eval_shape(model.apply, variables, images, pad)
  assert out['pred_boxes'].shape == (1, config.model.num_queries, 4)
  assert len(out['aux_outputs']) == config.model.dec_layers - 1
