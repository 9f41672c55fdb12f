"""Denoising queries (DN-DETR, DINO's negatives): off by default with no parameters and the
criterion unchanged; the noise; the attention masks (one-to-one outputs and the other DN groups
do not move when DN queries do); the DN terms against numpy with slot-to-target pairs by
construction; micro-batches and 8 devices. (Today's values of the default model and criterion:
tests/test_hybrid_matching.py.)"""
import functools

import jax
import numpy as np
import pytest

from query_set_helpers import (build, micro_batch, micro_config, query_arrays,
                               sharded_terms_equal_single_device)
from solq_jax import denoising, losses, models
from solq_jax.box_ops import inverse_sigmoid
from solq_jax.training import step as step_lib
from test_losses import linear_model_outputs, make_batch, make_config, np_focal, np_vector_term
from test_matching import _np_giou, _np_xyxy

DN = 'dn_outputs'


def test_default_is_off(tiny_config):
  """Off by default: no DN parameter and no denoiser (so the train step calls the model as
  before). The criterion without `dn_outputs` is the one-to-one criterion bit for bit, and the
  default model and criterion give today's values: tests/test_hybrid_matching.py."""
  assert tiny_config.model.dn_groups == 0
  assert denoising.denoiser_from_config(tiny_config) is None
  model = models.build_model(tiny_config.model)
  shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), (32, 32)))
  assert not any('dn' in name for name in shapes['params'])
  with_dn = models.build_model(micro_config(dn_groups=1).model)
  shapes = jax.eval_shape(lambda: models.init_variables(with_dn, jax.random.key(0), (32, 32)))
  assert [name for name in shapes['params'] if 'dn' in name] == ['dn_query_embed']


def test_noise():
  rng = np.random.default_rng(0)
  b, g, groups, c, scale = 16, 30, 3, 50, 0.4
  valid = rng.random((b, g)) < 0.7
  boxes = np.concatenate([rng.uniform(0.1, 0.9, (b, g, 2)), rng.uniform(0.05, 0.5, (b, g, 2))],
                         -1).astype(np.float32)
  targets = dict(labels=rng.integers(0, c, (b, g)).astype(np.int32), boxes=boxes, valid=valid)
  kw = dict(groups=groups, box_noise=scale, label_noise=0.2, num_classes=c)
  dn = jax.tree.map(np.asarray, denoising.noised_queries(jax.random.key(3), targets, **kw,
                                                         contrastive=True))
  index, positive = denoising.slot_layout(g, groups, True)
  np.testing.assert_array_equal(index, np.tile(np.r_[np.arange(g), np.arange(g)], groups))
  np.testing.assert_array_equal(positive, np.tile(np.r_[[True] * g, [False] * g], groups))
  assert dn['labels'].shape == (b, 2 * g * groups) and dn['boxes'].shape == (b, 2 * g * groups, 4)
  np.testing.assert_array_equal(dn['valid'], valid[:, index])
  real = dn['valid']
  assert not dn['labels'][~real].any() and not dn['boxes'][~real].any()   # padded: zeros
  # Labels: each replaced by a different class with probability 0.2.
  orig = targets['labels'][:, index]
  flipped = (dn['labels'] != orig)[real]
  assert abs(flipped.mean() - 0.2) < 0.03
  assert dn['labels'].min() >= 0 and dn['labels'].max() < c
  # Boxes: positives within the scale (centre <= scale x half size, size within 1 +- scale);
  # negatives between one and two times it, where not clipped to the image.
  src = boxes[:, index]
  rel = np.abs(dn['boxes'] - src) / np.concatenate([src[..., 2:] / 2, src[..., 2:]], -1)
  pos, neg = real & positive, real & ~positive
  assert rel[pos].max() <= scale * (1 + 1e-4) and rel[pos].max() > 0.9 * scale
  unclipped = ((dn['boxes'] > 0) & (dn['boxes'] < 1)).all(-1) & neg
  assert unclipped.sum() > 100
  assert rel[unclipped].min() >= scale * (1 - 1e-4) and rel[neg].max() <= 2 * scale * (1 + 1e-4)
  assert (dn['boxes'] >= 0).all() and (dn['boxes'] <= 1).all()
  # A pure function of the key; without noise every query is its ground truth.
  again = denoising.noised_queries(jax.random.key(3), targets, **kw, contrastive=True)
  np.testing.assert_array_equal(again['boxes'], dn['boxes'])
  clean = denoising.noised_queries(jax.random.key(3), targets, groups=2, box_noise=0.0,
                                   label_noise=0.0, num_classes=c)
  np.testing.assert_array_equal(clean['labels'], np.where(valid, targets['labels'], 0)[:, np.r_[
      np.arange(g), np.arange(g)]])
  np.testing.assert_array_equal(clean['boxes'], np.tile(np.where(valid[..., None], boxes, 0),
                                                        (1, 2, 1)))


@pytest.mark.timeout(600)
def test_dn_queries_are_hidden_from_the_matching_queries_and_each_other():
  """One compiled train-mode forward (`step.loss_fn`, the DN queries given; the DN terms:
  below): moving DN queries leaves the learned query sets and the other DN groups bit for
  bit."""
  config = micro_config(dn_groups=2, query_groups=2)
  config.loss.dn_contrastive = True
  model, variables = build(config)
  assert set(variables['params']['dn_query_embed']) == {'label_embed', 'pos_proj_0',
                                                        'pos_proj_1'}
  batch = micro_batch(config)
  g = 2 * config.data.max_gt                     # slots per group: positives and negatives
  dn = denoising.denoiser_from_config(config)(jax.random.key(2), batch)
  outputs_only = lambda out, targets: {'total': 0.0, 'outputs': out}
  run_dn = jax.jit(lambda d: step_lib.loss_fn(
      variables['params'], variables['buffers'], batch, jax.random.key(1), model=model,
      criterion=outputs_only, denoiser=lambda key, b: d)[1])
  out = run_dn(dn)['outputs']
  assert out[DN]['pred_logits'].shape == (2, 2 * g, config.model.num_classes)
  assert len(out[DN]['aux_outputs']) == 1
  assert all(np.isfinite(x).all() for x in query_arrays(out[DN]))
  learned = lambda o: [o] + list(o['group_outputs'])
  group_rows = lambda o, i: [x[:, i * g:(i + 1) * g] for x in query_arrays(o[DN])]

  def moved(d, rows, shift):
    labels = (d['labels'][:, rows] + 1) % config.model.num_classes
    return dict(d, labels=d['labels'].at[:, rows].set(labels),
                boxes=d['boxes'].at[:, rows].add(shift))

  # Group 1 moved: the learned sets and DN group 0 stay bit for bit (every layer).
  second = run_dn(moved(dn, slice(g, 2 * g), 0.05))['outputs']
  for got, want in zip(learned(second), learned(out)):
    for a, b in zip(query_arrays(got), query_arrays(want)):
      np.testing.assert_array_equal(a, b)
  for a, b in zip(group_rows(second, 0), group_rows(out, 0)):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(group_rows(second, 1)[0], group_rows(out, 1)[0])
  # A padded slot (the images have 3 and 5 targets) is seen by no query: moving it moves only
  # itself.
  padded = run_dn(moved(dn, slice(5, 6), 0.3))['outputs']
  keep = np.ones(2 * g, bool)
  keep[5] = False
  for a, b in zip(query_arrays(padded[DN]), query_arrays(out[DN])):
    np.testing.assert_array_equal(a[:, keep], b[:, keep])
  for a, b in zip(query_arrays(padded), query_arrays(out)):
    np.testing.assert_array_equal(a, b)
  # The noised boxes are the DN queries' initial references (4-d, not points): layer 0's box
  # head, whose last kernel is zero at init, refines them by its bias alone.
  head = variables['params']['bbox_embed_0']['layers_2']
  assert not np.asarray(head['kernel']).any()
  want = jax.nn.sigmoid(head['bias'] + inverse_sigmoid(dn['boxes']))
  np.testing.assert_allclose(out[DN]['aux_outputs'][0]['pred_boxes'], want, rtol=1e-5, atol=1e-6)


class _RecordingModel:
  """Stands in for the model in `step.loss_fn`: records the keyword arguments of `apply`."""

  def __init__(self):
    self.calls = []

  def apply(self, variables, images, pad_mask, **kwargs):
    self.calls.append(kwargs)
    return {}


def test_train_step_gives_the_model_dn_queries_from_the_step_key():
  batch = dict(images=np.zeros((1, 4, 4, 3)), pad_mask=np.zeros((1, 4, 4), bool),
               labels=np.ones((1, 2), np.int32), boxes=np.full((1, 2, 4), 0.5, np.float32),
               valid=np.array([[True, False]]))
  criterion = lambda outputs, targets: {'total': 0.0}
  key = jax.random.key(7)
  model = _RecordingModel()
  step_lib.loss_fn({}, {}, batch, key, model=model, criterion=criterion)
  assert set(model.calls[0]) == {'train', 'rngs'}             # the default call path
  denoiser = lambda k, b: {'key': k, 'labels': b['labels']}
  step_lib.loss_fn({}, {}, batch, key, model=model, criterion=criterion, denoiser=denoiser)
  dn = model.calls[1]['dn_queries']
  assert model.calls[1]['rngs']['dropout'] is key
  np.testing.assert_array_equal(jax.random.key_data(dn['key']), jax.random.key_data(
      jax.random.fold_in(key, step_lib.DENOISE_STREAM)))
  assert not np.array_equal(jax.random.key_data(dn['key']), jax.random.key_data(key))


def np_dn_terms(dn_outputs, targets, loss_cfg, groups, contrastive):
  """DN terms by direct loops: slot s of group j <-> target s mod G (positive when s < G)."""
  g = targets['valid'].shape[1]
  per = 2 * g if contrastive else g
  num_boxes = max(1.0, float(targets['valid'].sum())) * groups
  out = {}
  layers = [(f'_{i}', a) for i, a in enumerate(dn_outputs['aux_outputs'])] + [('', dn_outputs)]
  for suffix, layer in layers:
    logits = layer['pred_logits'].astype(np.float64)
    ce = l1 = giou = 0.0
    pv, tv = [], []
    for b in range(logits.shape[0]):
      for j in range(groups):
        for s in range(per):
          t = s % g
          if not targets['valid'][b, t]:
            continue
          row = j * per + s
          onehot = np.zeros(logits.shape[-1])
          if s < g:
            onehot[targets['labels'][b, t]] = 1.0
          ce += np_focal(logits[b, row], onehot, loss_cfg).sum()
          if s < g:
            pb = layer['pred_boxes'][b, row].astype(np.float64)
            tb = targets['boxes'][b, t].astype(np.float64)
            l1 += np.abs(pb - tb).sum()
            giou += 1 - _np_giou(_np_xyxy(pb), _np_xyxy(tb))
            pv.append(layer['pred_vectors'][b, row])
            tv.append(targets['vectors'][b, t])
    pv = np.array(pv, np.float64).reshape(-1, layer['pred_vectors'].shape[-1])
    out.update({'loss_ce' + suffix: ce / num_boxes, 'loss_bbox' + suffix: l1 / num_boxes,
                'loss_giou' + suffix: giou / num_boxes,
                'loss_vector' + suffix: loss_cfg.vector_loss_scale * np_vector_term(
                    pv, np.array(tv, np.float64).reshape(pv.shape), loss_cfg.vector_loss)})
  return out


def _with_dn(outputs, per_group, groups, seed):
  """The outputs plus random DN outputs of `groups` x `per_group` queries."""
  rng = np.random.default_rng(seed)
  b, _, c = outputs['pred_logits'].shape
  k = outputs['pred_vectors'].shape[-1]
  n = per_group * groups

  def layer():
    return dict(pred_logits=rng.normal(0, 2, (b, n, c)).astype(np.float32),
                pred_boxes=np.concatenate([rng.uniform(0.2, 0.8, (b, n, 2)),
                                           rng.uniform(0.05, 0.4, (b, n, 2))],
                                          -1).astype(np.float32),
                pred_vectors=rng.normal(0, 1, (b, n, k)).astype(np.float32))

  dn = layer()
  dn['aux_outputs'] = [layer() for _ in outputs['aux_outputs']]
  return dict(outputs, **{DN: dn})


@pytest.mark.parametrize('contrastive', [False, True])
def test_dn_terms_equal_numpy(tiny_config, contrastive):
  outputs, targets = make_batch(7)
  g = targets['valid'].shape[1]
  full = _with_dn(outputs, 2 * g if contrastive else g, 3, 1)
  config = make_config(tiny_config, dn_contrastive=contrastive, dn_weight=0.5)
  got = {k: float(v) for k, v in losses.criterion_from_config(config.loss)(full, targets).items()}
  plain = {k: float(v) for k, v in losses.criterion_from_config(config.loss)(outputs,
                                                                            targets).items()}
  want = np_dn_terms(full[DN], targets, config.loss, 3, contrastive)
  assert set(got) == set(plain) | {k + '_dn' for k in want}
  for key, value in want.items():
    np.testing.assert_allclose(got[key + '_dn'], value, rtol=1e-5, err_msg=key)
  for key in plain:
    if key != 'total':
      assert got[key] == plain[key]
  weights = dict(loss_ce=2.0, loss_bbox=5.0, loss_giou=2.0, loss_vector=1.0)
  dn_total = sum(weights[k.rstrip('_0123456789')] * v for k, v in want.items())
  np.testing.assert_allclose(got['total'], plain['total'] + 0.5 * dn_total, rtol=1e-5)


def test_dn_queries_reconstruct_their_own_ground_truth(tiny_config):
  """Pairs by construction: outputs that copy each slot's own target have no box or vector
  loss; the same outputs with the groups' slots rotated have."""
  outputs, targets = make_batch(3)
  g = targets['valid'].shape[1]
  exact = dict(pred_logits=np.full(targets['labels'].shape + (5,), -9.0, np.float32),
               pred_boxes=np.where(targets['valid'][..., None], targets['boxes'], 0.5),
               pred_vectors=targets['vectors'])
  exact = {k: np.concatenate([v, v], 1) for k, v in exact.items()}   # two groups
  exact['pred_logits'] = exact['pred_logits'].copy()
  b_idx, s_idx = np.nonzero(np.concatenate([targets['valid']] * 2, 1))
  exact['pred_logits'][b_idx, s_idx, np.concatenate([targets['labels']] * 2, 1)[b_idx, s_idx]] = 9
  exact['aux_outputs'] = []
  criterion = losses.criterion_from_config(tiny_config.loss)
  terms = criterion(dict(outputs, **{DN: exact}), targets)
  for name in ('loss_bbox_dn', 'loss_giou_dn', 'loss_vector_dn'):
    assert abs(float(terms[name])) < 1e-5, name
  assert float(terms['loss_ce_dn']) < 1e-3
  rotated = {k: np.roll(v, 1, axis=1) if k != 'aux_outputs' else v for k, v in exact.items()}
  moved = criterion(dict(outputs, **{DN: rotated}), targets)
  assert float(moved['loss_bbox_dn']) > 0.1 and float(moved['loss_ce_dn']) > 1.0


def dn_criterion(loss_cfg):
  """The DN terms alone, with the settings `criterion_from_config` gives them."""
  return functools.partial(
      denoising.dn_losses, focal_loss=functools.partial(
          losses.sigmoid_focal_loss, alpha=loss_cfg.focal_alpha, gamma=loss_cfg.focal_gamma),
      vector_loss=losses.vector_loss_fn(loss_cfg.vector_loss),
      contrastive=loss_cfg.dn_contrastive, vector_loss_scale=loss_cfg.vector_loss_scale)


def test_micro_batches_with_dn_add_up_to_the_batch(tiny_config):
  outputs, targets = make_batch(4, b=4)
  dn = _with_dn(outputs, 2 * targets['valid'].shape[1], 2, 2)[DN]
  criterion = jax.jit(dn_criterion(make_config(tiny_config, dn_contrastive=True).loss))
  whole = criterion(dn, targets)
  parts = [criterion(jax.tree.map(lambda x: x[i::2], dn),
                     jax.tree.map(lambda x: x[i::2], targets), step_valid=targets['valid'])
           for i in range(2)]
  assert len(whole) == 4 * 3            # four terms, three decoder layers
  for key in whole:
    np.testing.assert_allclose(float(parts[0][key] + parts[1][key]), float(whole[key]),
                               rtol=1e-5, err_msg=key)


def test_bad_settings_are_named(tiny_config):
  with pytest.raises(ValueError, match='dn_groups'):
    build(micro_config(dn_groups=-1))
  with pytest.raises(ValueError, match='with_box_refine'):
    build(micro_config(dn_groups=2, with_box_refine=False))
  bad = {'dn_box_noise': -0.1, 'dn_label_noise': 1.5, 'dn_weight': -1.0}
  for field, value in bad.items():
    with pytest.raises(ValueError, match=field):
      losses.criterion_from_config(make_config(tiny_config, **{field: value}).loss)
  with pytest.raises(ValueError, match='dn_contrastive'):   # the config itself is type-safe
    denoising.check_settings(1, 0.4, 0.2, 'yes', 1.0)
  config = make_config(tiny_config)
  config.model.dn_groups = True
  with pytest.raises(ValueError, match='dn_groups'):
    denoising.denoiser_from_config(config)
  outputs, targets = make_batch(3)
  with pytest.raises(ValueError, match='dn_contrastive'):
    losses.criterion_from_config(make_config(tiny_config, dn_contrastive=True).loss)(
        _with_dn(outputs, 3, 1, 0), targets)


@pytest.mark.timeout(240)
def test_sharded_dn_losses_equal_single_device(tiny_config):
  """The DN terms (no matching: pure array arithmetic) under a mesh of 8 simulated devices, as
  the train step traces them, give the single-device values and gradients."""
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices (tests/conftest.py sets them)')
  g = 4
  outputs, targets = make_batch(12, b=16, q=2 * g * 2, c=5, g=g, k=6, layers=2)
  targets['valid'][3:9] = False          # some devices hold no target at all
  base = {k: v for k, v in outputs.items() if k != 'aux_outputs'}
  rng = np.random.default_rng(13)
  feats = rng.normal(size=(2, 16, 2 * g * 2, 3)).astype(np.float32)
  w = rng.normal(0, 0.1, (3, 5 + 4 + 6)).astype(np.float32)
  loss_cfg = make_config(tiny_config, dn_contrastive=True).loss
  criterion = dn_criterion(loss_cfg)
  total = functools.partial(losses.weighted_total, weights=losses.loss_weights(loss_cfg))

  def loss_fn(w, feats, base, targets):
    terms = criterion(linear_model_outputs(w, feats, base), targets)
    return total(terms), terms

  terms = sharded_terms_equal_single_device(loss_fn, w, feats, base, targets)
  assert 'loss_vector_0' in terms
