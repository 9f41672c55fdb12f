"""Two-stage Deformable DETR (`model.two_stage`): parity with the official two-stage SOLQ and its
criterion, the converter's key plan, the default untouched, refused combinations, 8 devices
equal 1 for the encoder-proposal loss.

`tests/data/solq_two_stage_parity.npz` (scripts/make_two_stage_parity_fixture.py; numpy recipe
in `parity_two_stage_utils`) holds the official model's outputs (`--two_stage
--with_box_refine`, float64, from given backbone maps) and its criterion's terms for fixed
targets, `_enc` terms included.
"""
import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parity_two_stage_utils as utils
import parity_utils
from query_set_helpers import sharded_terms_equal_single_device
from solq_jax import losses, two_stage
from solq_jax.models import build_model
from solq_jax.models import two_stage as two_stage_model
from solq_jax.weights import convert
from test_losses import linear_model_outputs, make_batch, make_config
from test_weights_convert import _paths, _plan_state_dict, _shape_tree, _tiny_config

FIXTURE = pathlib.Path(__file__).parent / 'data' / 'solq_two_stage_parity.npz'
# Max |ours (float32 XLA) - official float64|, relative to each output's largest magnitude.
RELATIVE_TOLERANCE = 1e-5


def _config(**overrides):
  config = _tiny_config()
  for key, value in dict(utils.MODEL, **overrides).items():
    config.model[key] = value
  return config


def _converted(config):
  """`(state_dict, variables)`: `parity_two_stage_utils` weights of the official keys of
  `config` but the backbone's, and their conversion."""
  rules = [r for r in convert.model_plan(config.model)
           if not r.keys[0].startswith(convert.OFFICIAL_BACKBONE_PREFIX)]
  state_dict = utils.make_state_dict({k: rule.shape for rule in rules for k in rule.keys})
  return state_dict, convert.apply_rules(state_dict, rules)


def _forward(module, features, pad_mask):
  """The model from the backbone maps on (the fixture has no backbone)."""
  srcs, masks, pos = module.project(features, pad_mask)
  return module.decode(module.transformer.encode(srcs, masks, pos, False), masks, False)


@pytest.fixture(scope='module')
def parity_run():
  ref = dict(np.load(FIXTURE))
  state_dict, variables = _converted(_config())
  assert zlib.crc32('\n'.join(sorted(state_dict)).encode()) == ref['check/keys_crc'], (
      'the converter expects other keys than the official two-stage model has')
  features, pad_mask = utils.make_inputs()
  parity_utils.check_generators(
      ref, [v for k, v in state_dict.items() if k == parity_utils.canonical_key(k)],
      np.concatenate([f.reshape(-1) for f in features]))
  model = build_model(_config().model)
  outputs = jax.jit(lambda v, f, m: model.apply(v, f, m, method=_forward))(
      variables, features, pad_mask)
  return ref, utils.select_outputs(jax.device_get(outputs))


def _output_names():
  return [f'layer{i}/{n}' for i in range(2) for n in ('pred_logits', 'pred_boxes',
                                                       'pred_vectors')] + [
      'enc/pred_logits', 'enc/pred_boxes']


@pytest.mark.parametrize('name', _output_names())
def test_matches_official_two_stage_model(parity_run, name):
  ref, ours = parity_run
  assert ours[name].shape == ref[name].shape
  err = np.abs(ours[name].astype(np.float64) - ref[name]).max()
  scale = np.abs(ref[name]).max()
  assert err <= RELATIVE_TOLERANCE * scale, f'{name}: max abs error {err:.3e} (scale {scale:.3g})'


def test_reference_exercises_the_proposals(parity_run):
  """The padded image's padding tokens have unusable proposals (boxes at 1), the others
  vary; the decoder outputs vary."""
  ref, _ = parity_run
  enc = ref['enc/pred_boxes']
  assert not (enc[0] == 1).any() and (enc[1] == 1).all(-1).sum() > 20
  assert (enc < 1).all(-1).sum() > 200
  assert enc[(enc < 1).all(-1)].std() > 0.1
  for i in range(2):
    assert ref[f'layer{i}/pred_logits'].std() > 0.5
    boxes = ref[f'layer{i}/pred_boxes']
    assert 0.001 < boxes.min() and boxes.max() < 0.999 and boxes.std() > 0.1


def _targets():
  labels, boxes, valid = utils.make_targets()
  return dict(labels=labels, boxes=boxes, valid=valid,
              vectors=np.zeros(labels.shape + (0,), np.float32))


def test_criterion_matches_official_terms(parity_run):
  """Our criterion on the official outputs gives the official criterion's terms (decoder layers
  and `_enc`: binary targets, no vector term), and `total` weighs `_enc` as the others."""
  ref, _ = parity_run
  layer = lambda i: {n: ref[f'layer{i}/{n}'] for n in ('pred_logits', 'pred_boxes')}
  outputs = dict(layer(1), aux_outputs=[layer(0)],
                 enc_outputs={n: ref[f'enc/{n}'] for n in ('pred_logits', 'pred_boxes')})
  config = _config()
  criterion = losses.criterion_from_config(config.loss, with_masks=False)
  terms = jax.device_get(jax.jit(criterion)(outputs, _targets()))
  official = {k[len('loss/'):]: v for k, v in ref.items() if k.startswith('loss/')}
  assert {'loss_ce_enc', 'loss_bbox_enc', 'loss_giou_enc'} <= set(official)
  assert set(terms) == set(official) | {'total'}
  for key, value in official.items():
    np.testing.assert_allclose(terms[key], value, rtol=2e-6, err_msg=key)
  weights = losses.loss_weights(config.loss)
  expected = sum(weights[k.replace('_enc', '').rstrip('_01')] * v for k, v in official.items())
  np.testing.assert_allclose(terms['total'], expected, rtol=2e-6)
  without = dict(outputs)
  del without['enc_outputs']
  np.testing.assert_allclose(
      jax.jit(criterion)(without, _targets())['total'],
      expected - sum(weights[k[:-4]] * official[k] for k in official if k.endswith('_enc')),
      rtol=2e-6)


def test_selected_proposals_carry_no_gradient():
  """The decoder's references and query embeddings are not differentiated through the
  proposals' boxes or scores (the official detach)."""
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(2, 12)).astype(np.float32)
  boxes = rng.normal(size=(2, 12, 4)).astype(np.float32)
  boxes[0, 3] = np.inf                     # an unusable proposal among the selected
  scores[0, 3] = 5.0
  f = lambda s, b: jnp.sum(jnp.tanh(two_stage_model.select_top_k(s, b, 5) + s[:, :5, None]))
  selected = two_stage_model.select_top_k(scores, boxes, 5)
  np.testing.assert_array_equal(selected[1], boxes[1][np.argsort(-scores[1])[:5]])
  g_scores, g_boxes = jax.grad(f, argnums=(0, 1))(scores, boxes)
  assert not np.asarray(g_boxes).any() and np.asarray(g_scores)[1, :5].all()


def test_proposals_against_a_loop():
  """Proposals of a padded 2-level map written out token by token."""
  shapes = ((4, 6), (2, 3))
  pad = np.zeros((1, 4, 6), bool)
  pad[0, 3:, :] = True
  pad[0, :, 4:] = True           # valid 3 x 4 on level 0, as a down-sampled mask gives
  pad1 = pad[:, ::2, ::2]
  flat = np.concatenate([pad.reshape(1, -1), pad1.reshape(1, -1)], 1)
  proposals, usable = jax.device_get(two_stage_model.encoder_proposals(shapes, jnp.asarray(flat)))
  i = 0
  for level, (mask, (h, w)) in enumerate(zip((pad, pad1), shapes)):
    vh, vw = (~mask[0, :, 0]).sum(), (~mask[0, 0, :]).sum()
    for y in range(h):
      for x in range(w):
        box = np.array([(x + 0.5) / vw, (y + 0.5) / vh, 0.05 * 2 ** level, 0.05 * 2 ** level])
        ok = not mask[0, y, x] and ((box > 0.01) & (box < 0.99)).all()
        assert usable[0, i] == ok, (level, y, x)
        if ok:
          np.testing.assert_allclose(proposals[0, i], np.log(box / (1 - box)), rtol=1e-5)
        else:
          assert np.isinf(proposals[0, i]).all()
        i += 1
  assert usable.sum() == 16 and not usable.all()


@pytest.mark.parametrize('refine', [True, False])
def test_official_two_stage_keys_convert_to_the_model_tree(refine):
  """The official two-stage keys (one more class/box head, `transformer.decoder.class_embed`
  aliases, enc_output/pos_trans, no query_embed or reference_points) fill exactly the model's
  variables, with and without box refinement."""
  config = _tiny_config()
  config.model.two_stage = True
  config.model.with_box_refine = refine
  plan_keys = {k for r in convert.model_plan(config.model) for k in r.keys}
  assert 'query_embed.weight' not in plan_keys
  assert 'transformer.reference_points.weight' not in plan_keys
  assert {'transformer.pos_trans.weight', 'transformer.enc_output_norm.bias',
          'transformer.decoder.class_embed.2.bias', 'class_embed.2.bias'} <= plan_keys
  variables = convert.convert_state_dict(_plan_state_dict(config), config.model)
  assert _paths(variables) == _paths(_shape_tree(config))
  if refine:
    assert 'class_embed_2' in variables['params'] and 'bbox_embed_2' in variables['params']


def test_default_has_no_two_stage_parameters():
  """two_stage=False (the default) is today's model: learned queries, reference_points, one
  head per decoder layer, no proposal layers (its values: tests/test_parity*.py)."""
  config = _tiny_config()
  assert config.model.two_stage is False
  params = _shape_tree(config)['params']
  assert {'query_embed', 'class_embed_1'} <= set(params)
  assert 'reference_points' in params['transformer']
  assert not {'proposal_queries', 'class_embed_2', 'bbox_embed_2'} & set(params)


@pytest.mark.parametrize('overrides, names', [
    (dict(one_to_many_queries=10), ['config.model.two_stage', 'one_to_many_queries']),
    (dict(query_groups=2), ['config.model.two_stage', 'query_groups']),
    (dict(dn_groups=1), ['config.model.two_stage', 'dn_groups']),
    (dict(two_stage='yes'), ['config.model.two_stage']),
    (dict(num_queries=500), ['config.model.num_queries']),
])
def test_bad_combinations_are_refused_naming_the_field(overrides, names):
  fields = {**_tiny_config().model.to_dict(), 'two_stage': True, **overrides}
  model = build_model(fields)
  with pytest.raises(ValueError) as e:
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                   jnp.zeros((1, 64, 64), bool))
  for name in names:
    assert name in str(e.value)


def test_binary_targets_keep_everything_but_labels():
  _, targets = make_batch(3)
  binary = two_stage.binary_targets(targets)
  assert not np.asarray(binary['labels']).any()
  for key in ('boxes', 'vectors', 'valid'):
    assert binary[key] is targets[key]


def test_sharded_encoder_loss_equals_single_device(tiny_config):
  """The encoder proposals are matched per batch shard like the decoder layers: under a mesh of
  8 simulated devices the terms and gradients equal the single-device ones."""
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices (tests/conftest.py sets them)')
  outputs, targets = make_batch(21, b=8, q=10, c=5, g=4, k=6, layers=2)
  targets['valid'][3:6] = False          # some devices hold no target at all
  base = {k: v for k, v in outputs.items() if k != 'aux_outputs'}
  rng = np.random.default_rng(5)
  feats = rng.normal(size=(2, 8, 10, 3)).astype(np.float32)
  w = rng.normal(0, 0.1, (3, 5 + 4 + 6)).astype(np.float32)
  criterion = losses.criterion_from_config(make_config(tiny_config).loss)

  def loss_fn(w, feats, base, targets):
    out = linear_model_outputs(w, feats, base)
    enc = linear_model_outputs(-w, feats[:, :, ::-1], base)
    out['enc_outputs'] = {k: enc[k] for k in ('pred_logits', 'pred_boxes')}
    terms = criterion(out, targets)
    return terms['total'], terms

  terms = sharded_terms_equal_single_device(loss_fn, w, feats, base, targets)
  assert 'loss_giou_enc' in terms and 'loss_vector_enc' not in terms
