"""The ablation settings of the paper's Table 3: joint vector losses (flatten's L2 + dice), the
Table 3c stage count, detection only (`model.with_masks=False`) and the single C5 level with
an official checkpoint of that setting."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solq_jax import losses
from solq_jax import masks
from solq_jax.data import targets as targets_lib
from solq_jax.inference import export as export_lib
from solq_jax.inference import postprocess
from solq_jax.models import build_model
from solq_jax.weights import convert
from test_losses import make_batch, make_config, np_criterion
from test_weights_convert import _paths, _plan_state_dict


@pytest.fixture(scope='module')
def batch():
  return make_batch(5)


def _criterion(config, coder=None, **kwargs):
  return jax.jit(losses.criterion_from_config(config.loss, coder, **kwargs))


def test_joint_vector_loss_is_the_weighted_sum_of_its_terms(tiny_config, batch):
  outputs, targets = batch
  ref = {kind: np_criterion(outputs, targets, make_config(tiny_config, vector_loss=kind).loss)
         for kind in ('l1', 'l2')}
  config = make_config(tiny_config, vector_loss='l1+l2', vector_loss_weights=(2.0, 0.5))
  got = _criterion(config)(outputs, targets)
  for key in ('loss_vector', 'loss_vector_0', 'loss_vector_1'):
    np.testing.assert_allclose(float(got[key]), 2.0 * ref['l1'][key] + 0.5 * ref['l2'][key],
                               rtol=2e-5, err_msg=key)
  # with dice (the paper's flatten training): the weighted sum of the two single terms
  coder = masks.FlattenCoder(2)     # K = 4 = 2 x 2
  rng = np.random.default_rng(1)
  pred, tgt = rng.normal(0.5, 0.5, (2, 2, 3, 4)).astype(np.float32)
  valid = np.array([[True, False, True], [True, True, False]])
  single = {k: float(losses.vector_loss_fn(k, coder)(pred, tgt, valid)) for k in ('l2', 'dice')}
  joint = losses.vector_loss_fn('l2+dice', coder, 10.0, (1.0, 3.0))(pred, tgt, valid)
  np.testing.assert_allclose(float(joint), single['l2'] + 3.0 * single['dice'], rtol=1e-6)
  with pytest.raises(ValueError, match='vector_loss_weights'):
    _criterion(make_config(tiny_config, vector_loss='l1+l2', vector_loss_weights=(1.0,)))
  with pytest.raises(ValueError, match="'l3'"):
    _criterion(make_config(tiny_config, vector_loss='l1+l3'))


def test_the_default_vector_loss_is_the_single_term(tiny_config):
  assert losses.vector_loss_fn('l1', None, 10.0, ()) is losses.VECTOR_LOSSES['l1']
  assert tuple(tiny_config.loss.vector_loss_weights) == () and tiny_config.loss.vector_stages == 0


def test_vector_stages_counts_the_last_decoder_layers(tiny_config, batch):
  outputs, targets = batch          # 3 decoder layers
  last_two = _criterion(make_config(tiny_config, vector_stages=2), num_decoder_layers=3)(
      outputs, targets)
  assert 'loss_vector_0' not in last_two and {'loss_vector_1', 'loss_vector'} <= set(last_two)
  start_one = _criterion(make_config(tiny_config, vector_start_stage=1))(outputs, targets)
  assert float(last_two['total']) == float(start_one['total'])
  every = jax.eval_shape(losses.criterion_from_config(
      make_config(tiny_config, vector_stages=3).loss, num_decoder_layers=3), outputs, targets)
  assert {'loss_vector_0', 'loss_vector_1', 'loss_vector'} <= set(every)
  for bad, layers in ((4, 3), (2, None)):
    with pytest.raises(ValueError, match='vector_stages'):
      losses.criterion_from_config(make_config(tiny_config, vector_stages=bad).loss,
                                   num_decoder_layers=layers)


def test_detection_only_criterion_drops_the_vector_terms(tiny_config, batch):
  outputs, targets = batch
  full = _criterion(tiny_config)(outputs, targets)
  det_outputs = copy.deepcopy(outputs)
  for layer in [det_outputs] + det_outputs['aux_outputs']:
    del layer['pred_vectors']
  det_targets = dict(targets, vectors=np.zeros(targets['vectors'].shape[:2] + (0,), np.float32))
  det = _criterion(tiny_config, with_masks=False)(det_outputs, det_targets)
  assert not any(k.startswith('loss_vector') for k in det)
  for key in det:
    if key != 'total':
      assert float(det[key]) == float(full[key]), key
  vector_part = sum(float(v) for k, v in full.items() if k.startswith('loss_vector'))
  np.testing.assert_allclose(float(det['total']),
                             float(full['total']) - tiny_config.loss.vector_weight * vector_part,
                             rtol=1e-5)


def _det_c5_config(tiny_config):
  config = copy.deepcopy(tiny_config)
  config.model.with_masks = False
  config.model.num_feature_levels = 1
  return config


def test_detection_only_model_coder_targets_and_postprocessing(tiny_config):
  config = _det_c5_config(tiny_config)
  model = build_model(config.model)
  images, pad = jnp.zeros((2, 64, 64, 3)), jnp.zeros((2, 64, 64), bool)
  variables = jax.eval_shape(model.init, jax.random.key(0), images, pad)
  assert 'vector_embed' not in variables['params']
  assert set(variables['params']) >= {'input_proj_0'} and 'input_proj_1' not in variables['params']
  outputs = jax.eval_shape(lambda v: model.apply(v, images, pad), variables)
  assert set(outputs) == {'pred_logits', 'pred_boxes', 'aux_outputs'}
  assert all('pred_vectors' not in a for a in outputs['aux_outputs'])

  coder = masks.build_coder(config.model)
  assert isinstance(coder, masks.NoMaskCoder) and not coder.has_masks
  sample = dict(masks=np.ones((2, 20, 30), bool), labels=np.array([1, 2]),
                boxes=np.array([[0, 0, 10, 10], [5, 5, 25, 15]], np.float32))
  t = targets_lib.make_targets(sample, coder, 4)
  assert t['vectors'].shape == (4, 0) and t['valid'].tolist() == [True, True, False, False]
  with pytest.raises(ValueError, match='with_masks=False'):
    coder.decode(np.zeros((1, 0), np.float32))

  post = postprocess.Postprocessor.from_config(config.eval, coder)
  assert config.eval.with_masks and not post.with_masks
  rng = np.random.default_rng(0)
  fake = dict(pred_logits=rng.normal(size=(2, 30, 8)).astype(np.float32),
              pred_boxes=rng.uniform(0.2, 0.6, (2, 30, 4)).astype(np.float32))
  dets = post(fake, [[40, 50], [60, 30]])
  assert all('masks' not in d and d['boxes'].shape == (30, 4) for d in dets)
  with pytest.raises(ValueError, match='with_masks=False'):
    export_lib.export(config, model, variables, coder, [])


def _official_c5_detection_state_dict(tiny_config):
  """The official state dict of a detection-only, single-level model, derived from the
  4-level SOLQ one by the official code's rules: `input_proj` holds one 1x1 projection of C5
  (layer4: 512 channels for ResNet-18), `level_embed` one row, the deformable attentions'
  `sampling_offsets` / `attention_weights` Linear(d, heads * 1 level * points (* 2)), and there
  is no `vector_embed` (no --with_vector)."""
  sd = _plan_state_dict(tiny_config, seed=7)
  m = tiny_config.model
  d, heads = m.hidden_dim, m.nheads
  rng = np.random.default_rng(8)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  out = {k: v for k, v in sd.items()
         if not k.startswith(('vector_embed.', 'input_proj.1.', 'input_proj.2.', 'input_proj.3.'))}
  out['input_proj.0.0.weight'] = normal(d, 512, 1, 1)
  out['transformer.level_embed'] = normal(1, d)
  for key in list(out):
    points = m.enc_n_points if '.encoder.' in key else m.dec_n_points
    if '.sampling_offsets.' in key:
      out[key] = normal(heads * points * 2, *out[key].shape[1:])
    elif '.attention_weights.' in key:
      out[key] = normal(heads * points, *out[key].shape[1:])
  return sd, out


def test_official_single_level_detection_checkpoint_converts(tiny_config):
  config = _det_c5_config(tiny_config)
  solq_sd, det_sd = _official_c5_detection_state_dict(tiny_config)
  variables = convert.convert_state_dict(det_sd, config.model)
  model = build_model(config.model)
  images, pad = jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool)
  assert _paths(variables) == _paths(jax.eval_shape(model.init, jax.random.key(0), images, pad))
  assert 'vector_embed' not in variables['params']
  np.testing.assert_array_equal(variables['params']['input_proj_0']['conv']['kernel'],
                                det_sd['input_proj.0.0.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables['params']['transformer']['level_embed'],
                                det_sd['transformer.level_embed'])
  with pytest.raises(convert.StateDictError, match='vector_embed'):
    convert.convert_state_dict(dict(det_sd, **{k: v for k, v in solq_sd.items()
                                               if k.startswith('vector_embed.')}), config.model)
