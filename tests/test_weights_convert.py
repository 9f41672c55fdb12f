"""The official-checkpoint converter, the torch-free `.pth` reader and the orbax round trip."""
import os
import pathlib
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solq_jax.weights import convert
from solq_jax.weights import pth as pth_reader
from solq_jax.weights import store
from solq_jax.models import build_model

DATA = pathlib.Path(__file__).parent / 'data'
SPEC_KEYS = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'spec' / (
    'solq_r50_state_dict_keys.txt')


def _read_spec():
  """{key: (shape, [aliases])} from the official key list."""
  if not SPEC_KEYS.exists():
    pytest.skip(f'official key list not found at {SPEC_KEYS}')
  entries = {}
  for line in SPEC_KEYS.read_text().splitlines():
    if line.startswith('#') or not line.strip():
      continue
    fields = line.split('\t')
    shape = tuple(int(n) for n in re.findall(r'\d+', fields[1]))
    aliases = fields[4].split(',') if len(fields) > 4 and fields[4] else []
    entries[fields[0]] = (shape, aliases)
  return entries


def _random_state_dict(spec, seed=0):
  """Random values of the spec's shapes; aliased keys share the value of their twin."""
  rng = np.random.default_rng(seed)
  sd = {}
  for key, (shape, aliases) in spec.items():
    if key not in sd:
      sd[key] = rng.standard_normal(shape).astype(np.float32)
    for alias in aliases:
      sd[alias] = sd[key]
  # The six vector_embed.i are one shared module (spec section 7).
  for key in list(sd):
    if re.match(r'vector_embed\.\d+\.', key):
      sd[key] = sd[re.sub(r'^vector_embed\.\d+\.', 'vector_embed.0.', key)]
  return sd


def _plan_state_dict(config, seed=0):
  """Random state dict with the plan's keys for any config (aliases equal)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for rule in convert.model_plan(config.model):
    value = rng.standard_normal(rule.shape).astype(np.float32)
    sd.update({k: value for k in rule.keys})
  return sd


_SHAPE_TREES = {}


def _shape_tree(config):
  """The model's variable shapes (traced once per config)."""
  key = config.model.to_json()
  if key not in _SHAPE_TREES:
    model = build_model(config.model)
    _SHAPE_TREES[key] = jax.eval_shape(model.init, jax.random.key(0),
                                       jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool))
  return _SHAPE_TREES[key]


def _paths(tree):
  return {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope='module')
def spec():
  return _read_spec()


@pytest.fixture(scope='module')
def r50_state_dict(spec):
  return _random_state_dict(spec)


@pytest.fixture(scope='module')
def r50_variables(r50_state_dict, r50_config):
  return convert.convert_state_dict(r50_state_dict, r50_config.model)


def test_spec_has_633_keys_matching_the_plan(spec, r50_config):
  assert len(spec) == 633
  plan = {k: rule.shape for rule in convert.model_plan(r50_config.model) for k in rule.keys}
  assert plan == {k: shape for k, (shape, _) in spec.items()}
  # Every alias pair listed in the spec is one rule of the plan.
  rule_of = {k: i for i, rule in enumerate(convert.model_plan(r50_config.model)) for k in rule.keys}
  for key, (_, aliases) in spec.items():
    assert all(rule_of[a] == rule_of[key] for a in aliases), key


def test_r50_fills_every_leaf_of_the_model(r50_variables, r50_state_dict, r50_config):
  assert _paths(r50_variables) == _paths(_shape_tree(r50_config))
  for path, leaf in jax.tree_util.tree_leaves_with_path(r50_variables):
    assert leaf.dtype == np.float32 and np.all(np.isfinite(leaf)), path
    assert np.all(leaf != 0), f'{jax.tree_util.keystr(path)} was not filled from the state dict'
  # Every value of every unique tensor lands exactly once (aliases share one array object).
  unique = {id(v): v for v in r50_state_dict.values()}.values()
  total = lambda arrays: sum(np.abs(a.astype(np.float64)).sum() for a in arrays)
  np.testing.assert_allclose(total(jax.tree.leaves(r50_variables)), total(unique), rtol=1e-12)
  n_params = sum(x.size for x in jax.tree.leaves(r50_variables['params']))
  n_buffers = sum(x.size for x in jax.tree.leaves(r50_variables['buffers']))
  assert (n_params, n_buffers) == (54_193_660, 106_240)


def test_values_land_where_expected(r50_state_dict, r50_variables):
  sd, p, b = r50_state_dict, r50_variables['params'], r50_variables['buffers']
  rng = np.random.default_rng(1)
  # Linear: W[i, j] -> kernel[j, i].
  w = sd['transformer.encoder.layers.2.linear1.weight']
  k = p['transformer']['encoder']['layers_2']['linear1']['kernel']
  for i, j in zip(rng.integers(0, w.shape[0], 20), rng.integers(0, w.shape[1], 20)):
    assert k[j, i] == w[i, j]
  np.testing.assert_array_equal(p['class_embed_4']['kernel'], sd['class_embed.4.weight'].T)
  np.testing.assert_array_equal(p['class_embed_4']['bias'], sd['class_embed.4.bias'])
  # Conv: W[o, i, h, w] -> kernel[h, w, i, o].
  w = sd['backbone.0.body.layer3.1.conv2.weight']
  k = p['backbone']['layer3_1']['conv2']['kernel']
  for o, i, y, x in zip(*(rng.integers(0, n, 20) for n in w.shape)):
    assert k[y, x, i, o] == w[o, i, y, x]
  w = sd['input_proj.3.0.weight']
  assert p['input_proj_3']['conv']['kernel'][2, 0, 7, 5] == w[5, 7, 2, 0]
  # MHA in_proj: rows [0, D) query, [D, 2D) key, [2D, 3D) value; each transposed.
  d = 384
  w = sd['transformer.decoder.layers.5.self_attn.in_proj_weight']
  bias = sd['transformer.decoder.layers.5.self_attn.in_proj_bias']
  attn = p['transformer']['decoder']['layers_5']['self_attn']
  for third, name in enumerate(('query', 'key', 'value')):
    for r, c in zip(rng.integers(0, d, 10), rng.integers(0, d, 10)):
      assert attn[name]['kernel'][c, r] == w[third * d + r, c]
    np.testing.assert_array_equal(attn[name]['bias'], bias[third * d:(third + 1) * d])
  np.testing.assert_array_equal(attn['out']['kernel'],
                                sd['transformer.decoder.layers.5.self_attn.out_proj.weight'].T)
  # Norms and FrozenBN.
  np.testing.assert_array_equal(p['transformer']['decoder']['layers_1']['norm3']['scale'],
                                sd['transformer.decoder.layers.1.norm3.weight'])
  np.testing.assert_array_equal(p['input_proj_2']['norm']['scale'], sd['input_proj.2.1.weight'])
  bn = b['backbone']['layer4_0']['downsample_bn']
  for flax_name, torch_name in (('scale', 'weight'), ('bias', 'bias'),
                                ('mean', 'running_mean'), ('var', 'running_var')):
    np.testing.assert_array_equal(
        bn[flax_name], sd[f'backbone.0.body.layer4.0.downsample.1.{torch_name}'])
  np.testing.assert_array_equal(p['query_embed']['embedding'], sd['query_embed.weight'])
  np.testing.assert_array_equal(p['transformer']['level_embed'], sd['transformer.level_embed'])
  np.testing.assert_array_equal(p['bbox_embed_2']['layers_1']['kernel'],
                                sd['transformer.decoder.bbox_embed.2.layers.1.weight'].T)
  np.testing.assert_array_equal(p['vector_embed']['layers_2']['kernel'],
                                sd['vector_embed.3.layers.2.weight'].T)


def test_ignored_keys_and_dtypes(r50_state_dict, r50_config):
  sd = {k: v.astype(np.float16) for k, v in r50_state_dict.items()}
  sd['total_params'] = np.zeros(1)
  sd['backbone.0.body.total_ops'] = np.zeros(1)
  sd['backbone.0.body.bn1.num_batches_tracked'] = np.zeros((), np.int64)
  variables = convert.convert_state_dict(sd, r50_config.model)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(variables))


@pytest.mark.parametrize('edit, names', [
    (lambda sd: sd.update({'class_embed.6.weight': np.zeros((91, 384), np.float32)}),
     ['unknown', 'class_embed.6.weight']),
    (lambda sd: sd.pop('transformer.encoder.layers.3.norm2.bias'),
     ['missing', 'transformer.encoder.layers.3.norm2.bias']),
    (lambda sd: sd.pop('transformer.decoder.bbox_embed.1.layers.0.bias'),
     ['missing', 'transformer.decoder.bbox_embed.1.layers.0.bias']),
    (lambda sd: sd.update({'input_proj.1.0.weight': np.zeros((384, 1024, 3, 3), np.float32)}),
     ['input_proj.1.0.weight', '(384, 1024, 3, 3)', '(384, 1024, 1, 1)']),
    (lambda sd: sd.update({'transformer.decoder.bbox_embed.2.layers.2.bias':
                           sd['bbox_embed.2.layers.2.bias'] + 1}),
     ['transformer.decoder.bbox_embed.2.layers.2.bias', 'bbox_embed.2.layers.2.bias']),
    (lambda sd: sd.update({'vector_embed.4.layers.1.weight':
                           sd['vector_embed.4.layers.1.weight'] * 2}),
     ['vector_embed.4.layers.1.weight', 'vector_embed.0.layers.1.weight']),
])
def test_bad_state_dicts_raise_naming_the_key(r50_state_dict, r50_config, edit, names):
  sd = dict(r50_state_dict)
  edit(sd)
  with pytest.raises(convert.StateDictError) as e:
    convert.convert_state_dict(sd, r50_config.model)
  for name in names:
    assert name in str(e.value)


@pytest.mark.parametrize('backbone, levels, refine', [
    ('resnet18', 4, True), ('resnet34', 1, False), ('resnet101', 5, True)])
def test_other_configs_convert_to_their_model_tree(backbone, levels, refine):
  """Other depths, level counts and heads (64-d, 2+2 layers): expectations follow the config."""
  config = _tiny_config()
  config.model.backbone = backbone
  config.model.num_feature_levels = levels
  config.model.with_box_refine = refine
  variables = convert.convert_state_dict(_plan_state_dict(config), config.model)
  assert _paths(variables) == _paths(_shape_tree(config))


def test_wrong_depth_key_is_unknown(tiny_config):
  with pytest.raises(convert.StateDictError, match='backbone.0.body.layer1.0.conv3.weight'):
    # An R50-style key is unknown to the R18 config.
    sd = _plan_state_dict(tiny_config)
    sd['backbone.0.body.layer1.0.conv3.weight'] = np.zeros((64, 64, 1, 1), np.float32)
    convert.convert_state_dict(sd, tiny_config.model)


def _torchvision_state_dict(config, seed=0):
  rng = np.random.default_rng(seed)
  sd = {}
  for rule in convert.backbone_plan(config.model):
    sd[rule.keys[0]] = rng.standard_normal(rule.shape).astype(np.float32)
    if rule.keys[0].endswith('running_var'):
      sd[rule.keys[0].replace('running_var', 'num_batches_tracked')] = np.array(0)
  sd['fc.weight'] = np.zeros((1000, 512 * 4), np.float32)
  sd['fc.bias'] = np.zeros(1000, np.float32)
  return sd


def test_torchvision_resnet50(r50_config, r50_variables):
  sd = _torchvision_state_dict(r50_config)
  # 53 convs + 53 FrozenBN x 4 (+ fc and num_batches_tracked, both ignored).
  assert len([k for k in sd if not k.startswith('fc.') and 'num_batches' not in k]) == 265
  assert 'layer1.0.downsample.0.weight' in sd and 'layer4.2.bn3.running_var' in sd
  backbone = convert.convert_torchvision_resnet(sd, r50_config.model)
  model_tree = _paths(_shape_tree(r50_config))
  got = _paths(backbone)
  assert got == {k: v for k, v in model_tree.items() if k.startswith(("['params']['backbone']",
                                                                      "['buffers']['backbone']"))}
  np.testing.assert_array_equal(backbone['params']['backbone']['layer2_3']['conv3']['kernel'],
                                sd['layer2.3.conv3.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(backbone['buffers']['backbone']['bn1']['var'],
                                sd['bn1.running_var'])
  merged = convert.merge_backbone(r50_variables, backbone)
  assert _paths(merged) == _paths(r50_variables)
  assert merged['params']['backbone'] is backbone['params']['backbone']
  assert merged['params']['transformer'] is r50_variables['params']['transformer']
  del sd['layer3.5.bn2.bias']
  with pytest.raises(convert.StateDictError, match=r'layer3\.5\.bn2\.bias'):
    convert.convert_torchvision_resnet(sd, r50_config.model)


# --- .pth reading (fixture written by torch 2.14.1; values below) ---------------------------

def _expected_tiny_state_dict():
  base = np.arange(20, dtype=np.float32).reshape(4, 5) / 8
  return {
      'f32': np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
      'transposed': (np.arange(12, dtype=np.float32).reshape(3, 4) - 5).T,
      'base': base,
      'offset_view': base[1:, 2:],
      'f16': np.arange(6, dtype=np.float16) / np.float16(4),
      'f64': np.arange(5, dtype=np.float64) / 3,
      'bf16': np.arange(8, dtype=np.float32) / 4 - 1,
      'i64': np.arange(7, dtype=np.int64) - 3,
      'scalar': np.array(3.5, np.float32),
      'empty': np.zeros((0, 3), np.float32),
      'param': np.full((2, 2), 0.25, np.float32),
  }


@pytest.mark.parametrize('name', ['tiny_torch_checkpoint.pth', 'tiny_torch_state_dict.pth'])
def test_zip_reader_without_torch(name):
  sd = pth_reader.read_state_dict(str(DATA / name), reader='zip')
  expected = _expected_tiny_state_dict()
  assert list(sd) == list(expected)
  for key, value in expected.items():
    assert sd[key].dtype == value.dtype, key
    assert sd[key].shape == value.shape, key
    np.testing.assert_array_equal(sd[key], value, err_msg=key)


def test_bad_pth_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.pth'):
    pth_reader.read_state_dict(str(tmp_path / 'nope.pth'), reader='zip')
  raw = (DATA / 'tiny_torch_checkpoint.pth').read_bytes()
  truncated = tmp_path / 'truncated.pth'
  truncated.write_bytes(raw[:len(raw) // 2])
  with pytest.raises(ValueError, match='truncated.pth'):
    pth_reader.read_state_dict(str(truncated), reader='zip')
  legacy = tmp_path / 'legacy.pth'
  legacy.write_bytes(b'\x80\x02not a zip archive')
  with pytest.raises(ValueError, match=r"legacy\.pth.*solq-jax\[torch\]"):
    pth_reader.read_state_dict(str(legacy), reader='zip')


def test_torch_reader_without_torch_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)   # makes `import torch` fail
  with pytest.raises(ImportError, match=r"pip install 'solq-jax\[torch\]'"):
    convert.load_official_checkpoint(str(DATA / 'tiny_torch_checkpoint.pth'), None,
                                     reader='torch')
  # 'auto' falls back to the built-in reader, which then reports the mismatch by key name.
  with pytest.raises(convert.StateDictError, match='unknown key.*f32'):
    convert.load_official_checkpoint(str(DATA / 'tiny_torch_checkpoint.pth'),
                                     _tiny_config().model, reader='auto')


def _tiny_config():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  return tiny.get_config()


# --- orbax checkpoints and the command line -------------------------------------------------

@pytest.fixture(scope='module')
def tiny_state_dict(tiny_config):
  return _plan_state_dict(tiny_config, seed=3)


def test_command_line_writes_a_restorable_checkpoint(tmp_path, monkeypatch, tiny_config,
                                                     tiny_state_dict):
  pth = tmp_path / 'solq_tiny.pth'
  pth.write_bytes(b'placeholder')
  monkeypatch.setattr(pth_reader, 'read_state_dict',
                      lambda path, reader: tiny_state_dict if path == str(pth) else None)
  config_file = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'tiny.py'
  out = tmp_path / 'converted'
  convert.main(['--checkpoint', str(pth), '--config', str(config_file), '--out', str(out),
                '--config.model.dropout=0.0'])
  restored = store.load_converted(str(out), tiny_config.model)
  expected = convert.convert_state_dict(tiny_state_dict, tiny_config.model)
  assert _paths(restored) == _paths(expected)
  jax.tree.map(np.testing.assert_array_equal, restored, expected)
  with pytest.raises(FileExistsError, match='converted'):
    store.save_converted(str(out), expected, tiny_config.model)


def test_restore_errors(tmp_path, tiny_config, tiny_state_dict):
  variables = convert.convert_state_dict(tiny_state_dict, tiny_config.model)
  with pytest.raises(FileNotFoundError, match='missing_dir'):
    store.load_converted(str(tmp_path / 'missing_dir'))
  foreign = tmp_path / 'foreign'
  foreign.mkdir()
  (foreign / 'weights.bin').write_bytes(b'xyz')
  with pytest.raises(ValueError, match='not a solq-jax variables checkpoint'):
    store.load_converted(str(foreign))
  good = tmp_path / 'good'
  store.save_converted(str(good), variables, tiny_config.model)
  other = _tiny_config()
  other.model.hidden_dim = 96
  with pytest.raises(ValueError, match='hidden_dim'):
    store.load_converted(str(good), other.model)
  truncated = tmp_path / 'truncated'
  shutil.copytree(good, truncated)
  data_files = [os.path.join(d, f) for d, _, fs in os.walk(truncated / 'variables') for f in fs
                if os.path.getsize(os.path.join(d, f)) > 1000]
  assert data_files
  for f in data_files:
    with open(f, 'r+b') as fh:
      fh.truncate(os.path.getsize(f) // 3)
  with pytest.raises(ValueError, match='truncated or corrupt'):
    store.load_converted(str(truncated))
