"""Official SOLQ, torchvision ResNet and Microsoft Swin PyTorch weights -> solq-jax variables.

The expected torch keys, their shapes and where each lands in the Flax tree are derived from
the config alone (`model_plan`), so every backbone depth, hidden size and layer count works.
Layouts: Linear `[out, in]` -> kernel `[in, out]`; conv OIHW -> HWIO; the packed MHA
`in_proj_*` -> query/key/value thirds; LayerNorm/GroupNorm weight -> scale; FrozenBN
weight/bias/running_mean/running_var -> buffers scale/bias/mean/var. Keys that alias one
module (`transformer.decoder.bbox_embed.*` = `bbox_embed.*`, the shared `vector_embed.i.*`)
must all be present and equal. Swin backbones: `swin_keys`.

Every function takes the `model` config section (`config.model`).

Command line (writes a converted directory that training, eval.py and predict.py restore):
  python -m solq_jax.weights --checkpoint X.pth --config configs/solq_r50.py --out DIR
  python -m solq_jax.weights --torchvision --checkpoint resnet50.pth --config ... --out DIR
  (--torchvision with a Swin config reads Microsoft's ImageNet `swin_*_patch4_window7_*.pth`)
"""
import dataclasses
from typing import Any, Callable

import numpy as np

from solq_jax.models import backbone as backbone_lib
from solq_jax.weights import pth
from solq_jax.weights import store
from solq_jax.weights import swin_keys

IGNORED_SUFFIXES = ('total_params', 'total_ops', 'num_batches_tracked')
OFFICIAL_BACKBONE_PREFIX = 'backbone.0.body.'


class StateDictError(ValueError):
  """A state dict does not match the config: unknown, missing, mis-shaped or unequal keys."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """One torch tensor (under one or more alias keys) and the Flax leaves it fills."""
  keys: tuple            # canonical key first, then aliases that must hold equal values
  shape: tuple           # torch shape
  targets: tuple         # ((collection, *path), layout function) pairs
  # A constant the tensor must equal (a buffer that is no variable here, e.g. an index).
  expect: Any = dataclasses.field(default=None, compare=False)


def _linear_to_kernel(x):
  """torch Linear `[out, in]` -> Flax Dense kernel `[in, out]`."""
  return x.T


def _oihw_to_hwio(x):
  return x.transpose(2, 3, 1, 0)


def _identity(x):
  return x


def _third(i: int, layout: Callable) -> Callable:
  def take(x):
    n = x.shape[0] // 3
    return layout(x[i * n:(i + 1) * n])
  return take


class _Plan:
  """Collects rules; helpers name the Flax path as a '/'-joined string."""

  def __init__(self):
    self.rules = []

  def add(self, keys, shape, *targets):
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    targets = tuple((tuple(p.split('/')), fn) for p, fn in targets)
    self.rules.append(Rule(keys, tuple(shape), targets))

  def constant(self, key, value):
    """A key that must hold exactly `value` and fills nothing."""
    value = np.asarray(value)
    self.rules.append(Rule((key,), value.shape, (), value))

  def linear(self, keys, flax, n_out, n_in, bias=True):
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    self.add([k + '.weight' for k in keys], (n_out, n_in),
             (f'params/{flax}/kernel', _linear_to_kernel))
    if bias:
      self.add([k + '.bias' for k in keys], (n_out,), (f'params/{flax}/bias', _identity))

  def norm(self, key, flax, n):
    self.add(key + '.weight', (n,), (f'params/{flax}/scale', _identity))
    self.add(key + '.bias', (n,), (f'params/{flax}/bias', _identity))

  def conv(self, key, flax, shape_oihw):
    self.add(key, shape_oihw, (f'params/{flax}/kernel', _oihw_to_hwio))

  def frozen_bn(self, key, flax, n):
    for torch_name, flax_name in (('weight', 'scale'), ('bias', 'bias'),
                                  ('running_mean', 'mean'), ('running_var', 'var')):
      self.add(f'{key}.{torch_name}', (n,), (f'buffers/{flax}/{flax_name}', _identity))

  def mlp(self, keys, flax, dims):
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    for j, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
      self.linear([f'{k}.layers.{j}' for k in keys], f'{flax}/layers_{j}', n_out, n_in)


def _check_convertible(model_config):
  """Published weights exist only for torchvision's ResNet layouts at their width (and Swin)."""
  m = model_config
  if backbone_lib.swin.is_swin(m.backbone):
    return
  if m.backbone not in backbone_lib.PRETRAINED_LAYOUTS:
    raise ValueError(f'config.model.backbone={m.backbone!r} has no published weights to '
                     f'convert (one of {backbone_lib.PRETRAINED_LAYOUTS} or a Swin)')
  if m.get('backbone_width', backbone_lib.TORCHVISION_WIDTH) != backbone_lib.TORCHVISION_WIDTH:
    raise ValueError(f'config.model.backbone_width={m.backbone_width}: published ResNet weights '
                     f'have width {backbone_lib.TORCHVISION_WIDTH}')


def _add_backbone(plan: _Plan, backbone: str, prefix: str):
  if backbone_lib.swin.is_swin(backbone):
    swin_keys.add_swin(plan, backbone, prefix)
    return
  kind, blocks = backbone_lib.resnet_layout(backbone)
  expansion = 4 if kind == 'bottleneck' else 1
  plan.conv(f'{prefix}conv1.weight', 'backbone/conv1', (64, 3, 7, 7))
  plan.frozen_bn(f'{prefix}bn1', 'backbone/bn1', 64)
  in_ch = 64
  for stage, n_blocks in enumerate(blocks, start=1):
    width = 64 * 2 ** (stage - 1)
    out_ch = width * expansion
    for k in range(n_blocks):
      t, f = f'{prefix}layer{stage}.{k}', f'backbone/layer{stage}_{k}'
      if kind == 'bottleneck':
        shapes = [(width, in_ch, 1, 1), (width, width, 3, 3), (out_ch, width, 1, 1)]
      else:
        shapes = [(width, in_ch, 3, 3), (width, width, 3, 3)]
      for c, shape in enumerate(shapes, start=1):
        plan.conv(f'{t}.conv{c}.weight', f'{f}/conv{c}', shape)
        plan.frozen_bn(f'{t}.bn{c}', f'{f}/bn{c}', shape[0])
      if k == 0 and (stage > 1 or in_ch != out_ch):
        plan.conv(f'{t}.downsample.0.weight', f'{f}/downsample', (out_ch, in_ch, 1, 1))
        plan.frozen_bn(f'{t}.downsample.1', f'{f}/downsample_bn', out_ch)
      in_ch = out_ch


def _add_msda(plan: _Plan, t: str, f: str, m, n_points: int):
  d, heads, levels = m.hidden_dim, m.nheads, m.num_feature_levels
  plan.linear(f'{t}.sampling_offsets', f'{f}/sampling_offsets', heads * levels * n_points * 2, d)
  plan.linear(f'{t}.attention_weights', f'{f}/attention_weights', heads * levels * n_points, d)
  plan.linear(f'{t}.value_proj', f'{f}/value_proj', d, d)
  plan.linear(f'{t}.output_proj', f'{f}/output_proj', d, d)


def _add_ffn(plan: _Plan, t: str, f: str, m):
  plan.linear(f'{t}.linear1', f'{f}/linear1', m.dim_feedforward, m.hidden_dim)
  plan.linear(f'{t}.linear2', f'{f}/linear2', m.hidden_dim, m.dim_feedforward)


def model_plan(model_config) -> list:
  """The rules for a whole official SOLQ state dict (meta_arch solq, with_vector)."""
  m = model_config
  d, n_dec = m.hidden_dim, m.dec_layers
  _check_convertible(m)
  plan = _Plan()
  _add_backbone(plan, m.backbone, OFFICIAL_BACKBONE_PREFIX)
  channels = backbone_lib.backbone_channels(m.backbone)
  # One level: a 1x1 projection of layer4. Otherwise 1x1 projections of layer2..4, then 3x3
  # stride-2 extra levels (the first from the raw layer4 output, later ones from hidden_dim).
  if m.num_feature_levels == 1:
    in_chs = [channels[-1]]
  else:
    in_chs = list(channels) + [channels[-1]] + [d] * max(0, m.num_feature_levels - 4)
  for level in range(m.num_feature_levels):
    k = 1 if level < min(3, len(in_chs)) else 3
    plan.conv(f'input_proj.{level}.0.weight', f'input_proj_{level}/conv',
              (d, in_chs[level], k, k))
    plan.add(f'input_proj.{level}.0.bias', (d,),
             (f'params/input_proj_{level}/conv/bias', _identity))
    plan.norm(f'input_proj.{level}.1', f'input_proj_{level}/norm', d)
  plan.add('transformer.level_embed', (m.num_feature_levels, d),
           ('params/transformer/level_embed', _identity))
  if not m.two_stage:
    plan.linear('transformer.reference_points', 'transformer/reference_points', 2, d)
  for i in range(m.enc_layers):
    t, f = f'transformer.encoder.layers.{i}', f'transformer/encoder/layers_{i}'
    _add_msda(plan, f'{t}.self_attn', f'{f}/self_attn', m, m.enc_n_points)
    for n in (1, 2):
      plan.norm(f'{t}.norm{n}', f'{f}/norm{n}', d)
    _add_ffn(plan, t, f, m)
  for i in range(n_dec):
    t, f = f'transformer.decoder.layers.{i}', f'transformer/decoder/layers_{i}'
    _add_msda(plan, f'{t}.cross_attn', f'{f}/cross_attn', m, m.dec_n_points)
    qkv = ('query', 'key', 'value')
    plan.add(f'{t}.self_attn.in_proj_weight', (3 * d, d),
             *[(f'params/{f}/self_attn/{n}/kernel', _third(j, _linear_to_kernel))
               for j, n in enumerate(qkv)])
    plan.add(f'{t}.self_attn.in_proj_bias', (3 * d,),
             *[(f'params/{f}/self_attn/{n}/bias', _third(j, _identity))
               for j, n in enumerate(qkv)])
    plan.linear(f'{t}.self_attn.out_proj', f'{f}/self_attn/out', d, d)
    for n in (1, 2, 3):
      plan.norm(f'{t}.norm{n}', f'{f}/norm{n}', d)
    _add_ffn(plan, t, f, m)
  # Two-stage: one more head (the encoder proposals'), and the decoder holds the class heads too.
  n_pred = n_dec + 1 if m.two_stage else n_dec
  class_keys = lambda i: ([f'class_embed.{i}', f'transformer.decoder.class_embed.{i}']
                          if m.two_stage else [f'class_embed.{i}'])
  if m.with_box_refine:
    for i in range(n_pred):
      plan.linear(class_keys(i), f'class_embed_{i}', m.num_classes, d)
      plan.mlp([f'bbox_embed.{i}', f'transformer.decoder.bbox_embed.{i}'], f'bbox_embed_{i}',
               (d, d, d, 4))
  else:  # one class head and one box MLP repeated over the layers (aliases).
    plan.linear([k for i in range(n_pred) for k in class_keys(i)], 'class_embed_0',
                m.num_classes, d)
    plan.mlp([f'bbox_embed.{i}' for i in range(n_pred)], 'bbox_embed_0', (d, d, d, 4))
  if m.with_masks:  # detection only: the official model without --with_vector has none
    plan.mlp([f'vector_embed.{i}' for i in range(n_pred)], 'vector_embed',
             (d, m.vector_hidden_dim, m.vector_hidden_dim, m.num_coeffs))
  if m.two_stage:
    f = 'proposal_queries'
    plan.linear('transformer.enc_output', f'{f}/enc_output', d, d)
    plan.norm('transformer.enc_output_norm', f'{f}/enc_output_norm', d)
    plan.linear('transformer.pos_trans', f'{f}/pos_trans', 2 * d, 2 * d)
    plan.norm('transformer.pos_trans_norm', f'{f}/pos_trans_norm', 2 * d)
  else:
    plan.add('query_embed.weight', (m.num_queries, 2 * d),
             ('params/query_embed/embedding', _identity))
  return plan.rules


def backbone_plan(model_config, prefix: str = '') -> list:
  """The rules for the ResNet body with torch keys under `prefix`."""
  _check_convertible(model_config)
  plan = _Plan()
  _add_backbone(plan, model_config.backbone, prefix)
  return plan.rules


def _set(tree: dict, path: tuple, value):
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _listing(keys) -> str:
  keys = sorted(keys)
  more = f' ... and {len(keys) - 12} more' if len(keys) > 12 else ''
  return ', '.join(keys[:12]) + more


def apply_rules(state_dict: dict, rules: list, ignore=lambda key: False) -> dict:
  """Checks `state_dict` against `rules` and builds the `{'params', 'buffers'}` tree.

  Raises StateDictError naming unknown, missing and mis-shaped keys and unequal aliases.
  """
  state = {k: v for k, v in state_dict.items()
           if not k.endswith(IGNORED_SUFFIXES) and not ignore(k)}
  expected = {k for rule in rules for k in rule.keys}
  unknown, missing = set(state) - expected, expected - set(state)
  problems = []
  if unknown:
    problems.append(f'{len(unknown)} unknown key(s): {_listing(unknown)}')
  if missing:
    problems.append(f'{len(missing)} missing key(s): {_listing(missing)}')
  arrays = {}
  for rule in rules:
    for k in rule.keys:
      if k in state:
        arrays[k] = np.asarray(state[k])
        if arrays[k].shape != rule.shape:
          problems.append(f'{k} has shape {arrays[k].shape}, expected {rule.shape}')
  if problems:
    raise StateDictError('state dict does not match the config: ' + '; '.join(problems))
  variables = {'params': {}, 'buffers': {}}
  for rule in rules:
    value = arrays[rule.keys[0]]
    if rule.expect is not None and not np.array_equal(value, rule.expect):
      raise StateDictError(f'{rule.keys[0]} differs from the constant this model computes '
                           f'(another window size or layout?)')
    for alias in rule.keys[1:]:
      if not np.array_equal(arrays[alias], value):
        raise StateDictError(f'aliased keys {alias} and {rule.keys[0]} should hold the same '
                             'tensor but differ')
    value = value.astype(np.float32)
    for path, layout in rule.targets:
      _set(variables, path, np.ascontiguousarray(layout(value)))
  return variables


def convert_state_dict(state_dict: dict, model_config) -> dict:
  """Official SOLQ state dict (`{key: numpy array}`) -> `{'params', 'buffers'}`."""
  return apply_rules(state_dict, model_plan(model_config))


def convert_torchvision_resnet(state_dict: dict, model_config) -> dict:
  """torchvision ResNet state dict -> the backbone part (`params/backbone`, `buffers/backbone`).

  `fc.*` (the ImageNet classifier) is ignored; `num_batches_tracked` is dropped.
  """
  return apply_rules(state_dict, backbone_plan(model_config),
                     ignore=lambda k: k.startswith('fc.'))


def convert_imagenet_swin(state_dict: dict, model_config) -> dict:
  """Microsoft ImageNet Swin state dict (the `model` dict of `swin_*_patch4_window7_*.pth`) ->
  the backbone part without the output norms (`swin_keys` says what is ignored)."""
  plan = _Plan()
  swin_keys.add_swin(plan, model_config.backbone, '', output_norms=False)
  return apply_rules(state_dict, plan.rules, ignore=swin_keys.imagenet_ignored)


def load_pretrained_backbone(path: str, model_config, reader: str = 'auto') -> dict:
  """ImageNet backbone weights for `config.model.pretrained_backbone`: torchvision ResNet or,
  for a Swin config, Microsoft's Swin checkpoint."""
  state_dict = pth.read_state_dict(path, reader)
  if backbone_lib.swin.is_swin(model_config.backbone):
    return convert_imagenet_swin(state_dict, model_config)
  return convert_torchvision_resnet(state_dict, model_config)


def load_official_checkpoint(path: str, model_config, reader: str = 'auto') -> dict:
  """Reads an official SOLQ `.pth` and converts it (see `pth.read_state_dict`)."""
  return convert_state_dict(pth.read_state_dict(path, reader), model_config)


def load_torchvision_resnet(path: str, model_config, reader: str = 'auto') -> dict:
  """Reads torchvision ImageNet ResNet weights (`.pth`) into the backbone variables."""
  return convert_torchvision_resnet(pth.read_state_dict(path, reader), model_config)


def merge_backbone(variables: dict, backbone_variables: dict) -> dict:
  """`variables` with the backbone modules that `backbone_variables` holds replaced by its
  (the others, e.g. Swin's output norms absent from ImageNet files, kept)."""
  out = {}
  for collection in ('params', 'buffers'):
    out[collection] = dict(variables.get(collection, {}))
    loaded = backbone_variables.get(collection, {}).get('backbone')
    if loaded is None:
      continue
    kept = {k: v for k, v in variables[collection].get('backbone', {}).items()
            if k not in loaded}
    out[collection]['backbone'] = {**kept, **loaded} if kept else loaded
  return out


def main(argv=None):
  """`python -m solq_jax.weights`: convert a `.pth` into a converted directory.

  Flags live in a private FlagValues, so importing this module registers no global flags.
  """
  import sys  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ['solq_jax.weights'] + list(sys.argv[1:] if argv is None else argv)
  fv = flags.FlagValues()
  config_flag = config_flags.DEFINE_config_file(
      'config', None, 'config file with get_config(); --config.model.X=... overrides',
      flag_values=fv, sys_argv=argv)
  checkpoint = flags.DEFINE_string('checkpoint', None, 'official SOLQ or torchvision .pth',
                                   flag_values=fv)
  out = flags.DEFINE_string('out', None, 'new output directory', flag_values=fv)
  torchvision = flags.DEFINE_bool('torchvision', False,
                                  'the file holds ImageNet backbone weights only (torchvision '
                                  'ResNet, or Microsoft Swin for a Swin config)',
                                  flag_values=fv)
  reader = flags.DEFINE_enum('reader', 'auto', ['auto', 'zip', 'torch'],
                             '.pth reader (zip = built-in, torch-free)', flag_values=fv)
  for name in ('config', 'checkpoint', 'out'):
    flags.mark_flag_as_required(name, flag_values=fv)
  from solq_jax import cli  # pylint: disable=g-import-not-at-top
  cli.parse_flags(argv, fv)
  config = config_flag.value
  load = load_pretrained_backbone if torchvision.value else load_official_checkpoint
  variables = load(checkpoint.value, config.model, reader.value)
  directory = store.save_converted(out.value, variables, config.model)
  n = sum(np.size(v) for v in __import__('jax').tree.leaves(variables['params']))
  print(f'wrote {directory}: {n:,} parameters')


if __name__ == '__main__':
  main()
