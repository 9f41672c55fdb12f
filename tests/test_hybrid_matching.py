"""Hybrid matching (H-DETR): the default is today's model and criterion; the one-to-many matching
is scipy on the repeated targets; the one-to-many terms against the numpy criterion; 8 devices
equal 1. (The attention masks: tests/test_query_sets.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import train_micro_config
from query_set_helpers import IMAGE_HW, micro_batch, query_arrays, sharded_terms_equal_single_device
from solq_jax import hybrid_matching, losses, matching, models
from test_losses import linear_model_outputs, make_batch, make_config, np_criterion
from test_matching import np_cost, random_problem

O2M = 'one_to_many_outputs'


@pytest.mark.timeout(900)
def test_default_reproduces_the_model_and_loss_before_hybrid_matching():
  """Values of the micro config (train mode, with its dropout) recorded with every query-set
  variant off, a path checked bit for bit against the code before the variants existed
  (c0db512, on the micro config's earlier ResNet-18 body); the tolerance is only for other
  CPUs' and compile options' rounding."""
  config = train_micro_config.get_config()
  assert config.model.one_to_many_queries == 0 and config.model.query_groups == 1
  model = models.build_model(config.model)
  variables = models.init_variables(model, jax.random.key(0), IMAGE_HW)
  assert not {'query_embed_one_to_many', 'query_embed_groups'} & set(variables['params'])
  batch = micro_batch(config)
  criterion = losses.criterion_from_config(config.loss)

  def loss(params):
    out = model.apply({'params': params, 'buffers': variables['buffers']}, batch['images'],
                      batch['pad_mask'], train=True, rngs={'dropout': jax.random.key(1)})
    terms = criterion(out, batch)
    return terms['total'], (terms, out)

  (total, (terms, out)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      variables['params'])
  assert set(out) == {'pred_logits', 'pred_boxes', 'pred_vectors', 'aux_outputs'}
  assert not any(k.endswith(hybrid_matching.SUFFIX) for k in terms)
  sums = [np.abs(np.asarray(x, np.float64)).sum() for x in query_arrays(out)]
  np.testing.assert_allclose(
      sums, [738.2475316524506, 28.07180154323578, 1200.0,
             753.6619369983673, 28.07180154323578, 1200.0], rtol=2e-6)
  grad_norm = np.sqrt(sum((np.asarray(g, np.float64) ** 2).sum() for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose([float(total), float(terms['loss_vector_0']), grad_norm],
                             [25.641803741455078, 5.876512050628662, 8.058912625108656],
                             rtol=2e-5)


def test_one_to_many_matching_is_scipy_on_the_repeated_targets():
  k, q, g = 3, 14, 4
  rng = np.random.default_rng(5)
  logits, boxes, labels, tgt, valid = random_problem(rng, 4, q, 5, g)
  valid[1, :] = True                                  # 3 x 4 = 12 copies for 14 queries
  valid[2, :] = [True, False, True, True]
  targets = dict(labels=labels, boxes=tgt, vectors=np.zeros((4, g, 2), np.float32), valid=valid)
  rep = hybrid_matching.repeat_targets(targets, k)
  src, tgt_idx, matched = (np.asarray(x) for x in matching.hungarian_match(
      logits, boxes, rep['labels'], rep['boxes'], rep['valid']))
  for b in range(4):
    cols = np.tile(np.flatnonzero(valid[b]), k)       # the repeated valid targets, compacted
    pairs = set()
    if cols.size:
      cost = np_cost(logits[b], boxes[b], labels[b][cols], tgt[b][cols].astype(np.float64))
      rows, picked = scipy.optimize.linear_sum_assignment(cost)
      pairs = {(int(r), int(cols[c])) for r, c in zip(rows, picked)}
    got = {(int(s), int(t) % g) for s, t in zip(src[b][matched[b]], tgt_idx[b][matched[b]])}
    assert got == pairs                               # copies of a target are interchangeable
    assert matched[b].sum() == min(q, k * valid[b].sum())


def _with_o2m(outputs, shift):
  """The outputs plus a one-to-many set: the same arrays with every query repeated twice (so
  there are enough queries for the repeated targets), logits shifted."""
  def more(layer):
    return {key: np.concatenate([v + shift if key == 'pred_logits' else v] * 2, axis=1)
            for key, v in layer.items() if key != 'aux_outputs'}
  extra = more(outputs)
  extra['aux_outputs'] = [more(a) for a in outputs['aux_outputs']]
  return dict(outputs, **{O2M: extra})


def test_one_to_many_terms_equal_the_numpy_criterion(tiny_config):
  outputs, targets = make_batch(3)
  full = _with_o2m(outputs, 0.7)
  config = make_config(tiny_config, one_to_many_k=2, one_to_many_weight=0.5)
  got = {k: float(v) for k, v in losses.criterion_from_config(config.loss)(full, targets).items()}
  want = np_criterion(outputs, targets, config.loss)
  rep = {k: np.asarray(v) for k, v in hybrid_matching.repeat_targets(targets, 2).items()}
  want_o2m = np_criterion(full[O2M], rep, config.loss)
  for key, value in want.items():
    if key != 'total':
      np.testing.assert_allclose(got[key], value, rtol=1e-5, err_msg=key)
  for key, value in want_o2m.items():
    if key != 'total':
      np.testing.assert_allclose(got[key + '_one_to_many'], value, rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(got['total'], want['total'] + 0.5 * want_o2m['total'], rtol=1e-5)
  # Without one-to-many outputs the criterion is the one-to-one criterion, bit for bit.
  plain = losses.criterion_from_config(tiny_config.loss)(outputs, targets)
  one_to_one = losses.solq_losses(
      outputs, targets, matcher=matching.matcher_from_config(tiny_config.loss),
      vector_loss=losses.vector_loss_fn('l1'), weights=losses.loss_weights(tiny_config.loss),
      vector_loss_scale=tiny_config.loss.vector_loss_scale)
  assert set(plain) == set(one_to_one)
  for key in plain:
    np.testing.assert_array_equal(plain[key], one_to_one[key])


def test_micro_batches_with_one_to_many_add_up_to_the_batch(tiny_config):
  outputs, targets = make_batch(4, b=4)
  full = _with_o2m(outputs, -0.3)
  criterion = losses.criterion_from_config(
      make_config(tiny_config, one_to_many_k=2).loss)
  whole = criterion(full, targets)
  parts = [criterion(jax.tree.map(lambda x: x[i::2], full), jax.tree.map(lambda x: x[i::2],
                                                                          targets),
                     step_valid=targets['valid']) for i in range(2)]
  for key in whole:
    np.testing.assert_allclose(float(parts[0][key] + parts[1][key]), float(whole[key]),
                               rtol=1e-5, err_msg=key)


def test_bad_settings_are_named(tiny_config):
  with pytest.raises(ValueError, match='one_to_many_k'):
    losses.criterion_from_config(make_config(tiny_config, one_to_many_k=0).loss)
  with pytest.raises(ValueError, match='one_to_many_weight'):
    losses.criterion_from_config(make_config(tiny_config, one_to_many_weight=-1.0).loss)


@pytest.mark.timeout(240)
def test_sharded_extra_query_set_losses_equal_single_device(tiny_config):
  """The one-to-many matching and the extra groups' matching run per shard like the one-to-one
  one (criterion under a mesh of 8 simulated devices, as the train step traces it) and give the
  single-device result."""
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices (tests/conftest.py sets them)')
  outputs, targets = make_batch(12, b=16, q=10, c=5, g=4, k=6, layers=2)
  targets['valid'][3:9] = False          # some devices hold no target at all
  base = {k: v for k, v in outputs.items() if k != 'aux_outputs'}
  rng = np.random.default_rng(13)
  feats = rng.normal(size=(2, 16, 10, 3)).astype(np.float32)
  w = rng.normal(0, 0.1, (3, 5 + 4 + 6)).astype(np.float32)
  criterion = losses.criterion_from_config(make_config(tiny_config, one_to_many_k=3).loss)

  def loss_fn(w, feats, base, targets):
    one_to_one = linear_model_outputs(w, feats, base)
    # 20 one-to-many queries (>= 3 x 4 repeated targets): the queries again, shifted.
    shifted = {k: jnp.concatenate([v, v[:, ::-1]], axis=1) for k, v in base.items()}
    out = dict(one_to_one, **{O2M: linear_model_outputs(
        0.5 * w, jnp.concatenate([feats, -feats], axis=2), shifted)})
    out['group_outputs'] = [linear_model_outputs(-w, feats[:, :, ::-1], base)]
    terms = criterion(out, targets)
    return terms['total'], terms

  terms = sharded_terms_equal_single_device(loss_fn, w, feats, base, targets)
  assert 'loss_giou_0_one_to_many' in terms and 'loss_vector_group1' in terms
