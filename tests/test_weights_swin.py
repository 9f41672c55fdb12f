"""Swin weights: official SOLQ Swin checkpoints (`backbone.0.body.*`) and Microsoft's ImageNet
Swin checkpoints (`pretrained_backbone`), read from `.pth` files written here without torch,
with the same strict key checks as the ResNet path."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pth_writer import write_pth
from solq_jax import weights
from solq_jax.models import build_model, swin
from solq_jax.weights import convert
from solq_jax.weights import store

SMALL = 'swin_test_small'
SMALL_LAYOUT = (16, (2, 1, 1, 1), (1, 2, 2, 4), 0.2)
P = 'backbone.0.body.'


@pytest.fixture(autouse=True)
def small_variant(monkeypatch):
  monkeypatch.setitem(swin.SWIN_VARIANTS, SMALL, SMALL_LAYOUT)


def _config(backbone):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.backbone = backbone
  config.model.backbone_frozen_stages = -1
  return config


def _official_state_dict(config, seed=0):
  rng = np.random.default_rng(seed)
  sd = {}
  for rule in convert.model_plan(config.model):
    value = rule.expect if rule.expect is not None else (
        rng.standard_normal(rule.shape).astype(np.float32))
    sd.update({k: value for k in rule.keys})
  return sd


def _imagenet_state_dict(config, seed=1):
  """Microsoft's layout: the body without prefix, plus classifier, final norm, shift masks."""
  sd = {k[len(P):]: v for k, v in _official_state_dict(config, seed).items()
        if k.startswith(P) and not k.startswith(P + 'norm')}
  c = swin.swin_layout(config.model.backbone)[0] * 8
  sd.update({'norm.weight': np.ones(c, np.float32), 'norm.bias': np.zeros(c, np.float32),
             'head.weight': np.zeros((10, c), np.float32), 'head.bias': np.zeros(10, np.float32),
             'layers.0.blocks.1.attn_mask': np.zeros((4, 49, 49), np.float32)})
  return sd


def _paths(tree):
  return {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _model_tree(config):
  model = build_model(config.model)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                        jnp.zeros((1, 64, 64), bool))


def test_official_swin_t_fills_every_leaf_where_expected():
  config = _config('swin_t')
  sd = _official_state_dict(config)
  # 12 blocks x 14 tensors (index included) + 3 merges x 3 + patch embed 4 + output norms 6.
  assert len([k for k in sd if k.startswith(P)]) == 12 * 14 + 3 * 3 + 4 + 6
  variables = convert.convert_state_dict(sd, config.model)
  assert _paths(variables) == _paths(_model_tree(config))
  b = variables['params']['backbone']
  np.testing.assert_array_equal(b['patch_embed']['proj']['kernel'],
                                sd[P + 'patch_embed.proj.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(b['layers_2']['blocks_5']['attn']['qkv']['kernel'],
                                sd[P + 'layers.2.blocks.5.attn.qkv.weight'].T)
  np.testing.assert_array_equal(
      b['layers_1']['blocks_1']['attn']['relative_position_bias_table'],
      sd[P + 'layers.1.blocks.1.attn.relative_position_bias_table'])
  np.testing.assert_array_equal(b['layers_0']['downsample']['reduction']['kernel'],
                                sd[P + 'layers.0.downsample.reduction.weight'].T)
  np.testing.assert_array_equal(b['norm3']['scale'], sd[P + 'norm3.weight'])
  assert 'bias' not in b['layers_0']['downsample']['reduction']


def _bad_index(sd):
  index = sd[P + 'layers.0.blocks.0.attn.relative_position_index'].copy()
  index[0, 1] += 1
  sd[P + 'layers.0.blocks.0.attn.relative_position_index'] = index


@pytest.mark.parametrize('edit, names', [
    (lambda sd: sd.update({P + 'layers.3.downsample.norm.weight': np.zeros(6144, np.float32)}),
     ['unknown', P + 'layers.3.downsample.norm.weight']),
    (lambda sd: sd.pop(P + 'norm2.bias'), ['missing', P + 'norm2.bias']),
    (lambda sd: sd.pop(P + 'layers.2.blocks.4.attn.relative_position_index'),
     ['missing', 'layers.2.blocks.4.attn.relative_position_index']),
    (lambda sd: sd.update({P + 'layers.1.blocks.0.attn.relative_position_bias_table':
                           np.zeros((169, 3), np.float32)}),
     ['layers.1.blocks.0.attn.relative_position_bias_table', '(169, 3)', '(169, 6)']),
    (_bad_index, [P + 'layers.0.blocks.0.attn.relative_position_index']),
])
def test_bad_swin_state_dicts_raise_naming_the_key(edit, names):
  config = _config('swin_t')
  sd = _official_state_dict(config)
  edit(sd)
  with pytest.raises(convert.StateDictError) as e:
    convert.convert_state_dict(sd, config.model)
  for name in names:
    assert name in str(e.value)


def test_swin_l_expects_its_own_shapes():
  """A Swin-T checkpoint given to a Swin-L config fails on shapes and on the extra blocks."""
  sd = _official_state_dict(_config('swin_t'))
  with pytest.raises(convert.StateDictError) as e:
    convert.convert_state_dict(sd, _config('swin_l').model)
  assert '168 missing key(s): backbone.0.body.layers.2.blocks.10.' in str(e.value)  # 6 x 14 x 2
  assert 'patch_embed.proj.weight has shape (96, 3, 4, 4), expected (192, 3, 4, 4)' in str(e.value)


def test_imagenet_swin_keeps_the_output_norms_of_the_init():
  config = _config(SMALL)
  sd = _imagenet_state_dict(config)
  backbone = convert.convert_imagenet_swin(sd, config.model)['params']['backbone']
  assert set(backbone) == {'patch_embed', 'layers_0', 'layers_1', 'layers_2', 'layers_3'}
  init = jax.tree.map(lambda s: np.full(s.shape, 7.0, np.float32), _model_tree(config))
  merged = convert.merge_backbone(init, {'params': {'backbone': backbone}, 'buffers': {}})
  assert _paths(merged) == _paths(init)
  np.testing.assert_array_equal(merged['params']['backbone']['norm1']['scale'], 7.0)
  np.testing.assert_array_equal(merged['params']['backbone']['layers_3']['blocks_0']['mlp'][
      'fc2']['kernel'], sd['layers.3.blocks.0.mlp.fc2.weight'].T)
  del sd['layers.0.blocks.1.norm2.weight']
  sd['layers.9.blocks.0.norm1.bias'] = np.zeros(3, np.float32)
  with pytest.raises(convert.StateDictError,
                     match=r'layers\.9\.blocks\.0\.norm1\.bias.*layers\.0\.blocks\.1\.norm2'):
    convert.convert_imagenet_swin(sd, config.model)


def test_pth_files_reach_the_training_init_and_the_command_line(tmp_path, monkeypatch):
  """pretrained_backbone (ImageNet .pth) and init_checkpoint (official SOLQ .pth) through
  `weights.initial_variables`, and `python -m solq_jax.weights` on the official file. (The
  random init is replaced by ones of the model's shapes: its values are not under test here.)"""
  config = _config(SMALL)
  model = build_model(config.model)
  ones = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), _model_tree(config))
  monkeypatch.setattr(weights.models, 'init_variables', lambda m, key: {'buffers': {}, **ones})
  official = _official_state_dict(config, seed=2)
  imagenet = _imagenet_state_dict(config, seed=3)
  write_pth(tmp_path / 'solq_swin.pth', {'model': official, 'epoch': np.zeros(())})
  write_pth(tmp_path / 'swin_imagenet.pth', {'model': imagenet})

  config.model.pretrained_backbone = str(tmp_path / 'swin_imagenet.pth')
  v = weights.initial_variables(config.model, model, jax.random.key(0))
  b = v['params']['backbone']
  np.testing.assert_array_equal(b['layers_0']['blocks_1']['attn']['qkv']['kernel'],
                                imagenet['layers.0.blocks.1.attn.qkv.weight'].T)
  np.testing.assert_array_equal(b['norm2']['bias'], 1.0)       # kept from the init
  np.testing.assert_array_equal(v['params']['transformer']['level_embed'], 1.0)

  config.model.init_checkpoint = str(tmp_path / 'solq_swin.pth')
  v = weights.initial_variables(config.model, model, jax.random.key(0))
  expected = convert.convert_state_dict(official, config.model)
  assert _paths(v) == _paths(expected)
  jax.tree.map(np.testing.assert_array_equal, v, expected)

  out = tmp_path / 'converted'
  config_file = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'tiny.py'
  convert.main(['--checkpoint', str(tmp_path / 'solq_swin.pth'), '--config', str(config_file),
                '--out', str(out), f'--config.model.backbone={SMALL}'])
  jax.tree.map(np.testing.assert_array_equal, store.load_converted(str(out), config.model),
               expected)
