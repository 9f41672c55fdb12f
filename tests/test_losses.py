"""The SOLQ criterion: every term against a numpy re-derivation of the official `SetCriterion`
(with its own scipy matching), the variants, empty and padded batches, and gradients vs finite
differences."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solq_jax import losses
from test_matching import _np_giou, _np_sigmoid, _np_xyxy, np_cost, scipy_reference

B, Q, C, G, K = 3, 10, 5, 4, 6
LAYERS = 3                           # final + 2 aux


def make_config(base, **loss_overrides):
  config = copy.deepcopy(base)
  for key, value in loss_overrides.items():
    config.loss[key] = value
  return config


def criterion(config, coder=None):
  """The criterion of `config.loss` (`coder`: the mask coder the dice variant decodes with)."""
  return losses.criterion_from_config(config.loss, coder)


def make_batch(seed, b=B, q=Q, c=C, g=G, k=K, layers=LAYERS):
  rng = np.random.default_rng(seed)

  def layer():
    return dict(
        pred_logits=rng.normal(0, 2, (b, q, c)).astype(np.float32),
        pred_boxes=np.concatenate([rng.uniform(0.2, 0.8, (b, q, 2)),
                                   rng.uniform(0.05, 0.4, (b, q, 2))], -1).astype(np.float32),
        pred_vectors=rng.normal(0, 1, (b, q, k)).astype(np.float32))

  outputs = layer()
  outputs['aux_outputs'] = [layer() for _ in range(layers - 1)]
  valid = rng.random((b, g)) < 0.6
  valid[0] = False
  valid[-1] = True
  targets = dict(
      labels=rng.integers(0, c, (b, g)).astype(np.int32),
      boxes=np.concatenate([rng.uniform(0.2, 0.8, (b, g, 2)), rng.uniform(0.05, 0.4, (b, g, 2))],
                           -1).astype(np.float32),
      vectors=rng.normal(0, 1, (b, g, k)).astype(np.float32),
      valid=valid)
  targets['boxes'][~valid] = 0.0
  targets['vectors'][~valid] = 0.0
  return outputs, targets


def np_vector_term(pred, tgt, kind):
  """pred, tgt: `[N, K]` matched pairs (float64)."""
  if pred.shape[0] == 0:
    return 0.0
  d = pred - tgt
  if kind == 'l1':
    return np.abs(d).mean()
  if kind == 'smooth_l1':
    a = np.abs(d)
    return np.where(a < 1, 0.5 * a * a, a - 0.5).mean()
  if kind == 'l2':
    return (d * d).mean()
  if kind == 'cosine':
    cos = (pred * tgt).sum(1) / np.linalg.norm(pred, axis=1) / np.linalg.norm(tgt, axis=1)
    return (1 - cos).mean()
  raise AssertionError(kind)


def np_focal(logits, t, loss_cfg):
  """The elementwise sigmoid focal loss of float64 `logits` against 0/1 targets `t`."""
  p = _np_sigmoid(logits)
  ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
  p_t = p * t + (1 - p) * (1 - t)
  alpha_t = loss_cfg.focal_alpha * t + (1 - loss_cfg.focal_alpha) * (1 - t)
  return alpha_t * ce * (1 - p_t) ** loss_cfg.focal_gamma


def np_layer(layer, targets, num_boxes, loss_cfg):
  """The official criterion for one decoder layer, image by image, with its own scipy
  matching."""
  logits = layer['pred_logits'].astype(np.float64)
  target_classes = np.zeros_like(logits)
  l1 = giou = 0.0
  pred_v, tgt_v = [], []
  for b in range(logits.shape[0]):
    cost = np_cost(layer['pred_logits'][b], layer['pred_boxes'][b], targets['labels'][b],
                   targets['boxes'][b].astype(np.float64))
    rows, cols = scipy_reference(cost, targets['valid'][b])
    for i, j in zip(rows, cols):
      target_classes[b, i, targets['labels'][b, j]] = 1.0
      pb = layer['pred_boxes'][b, i].astype(np.float64)
      tb = targets['boxes'][b, j].astype(np.float64)
      l1 += np.abs(pb - tb).sum()
      giou += 1 - _np_giou(_np_xyxy(pb), _np_xyxy(tb))
      pred_v.append(layer['pred_vectors'][b, i])
      tgt_v.append(targets['vectors'][b, j])
  focal = np_focal(logits, target_classes, loss_cfg).sum()
  pred_v = np.array(pred_v, np.float64).reshape(-1, layer['pred_vectors'].shape[-1])
  tgt_v = np.array(tgt_v, np.float64).reshape(pred_v.shape)
  return dict(loss_ce=focal / num_boxes, loss_bbox=l1 / num_boxes, loss_giou=giou / num_boxes,
              loss_vector=loss_cfg.vector_loss_scale * np_vector_term(
                  pred_v, tgt_v, loss_cfg.vector_loss))


def np_criterion(outputs, targets, loss_cfg):
  num_boxes = max(1.0, float(targets['valid'].sum()))
  out = {}
  for i, aux in enumerate(outputs['aux_outputs']):
    out.update({k + f'_{i}': v for k, v in np_layer(aux, targets, num_boxes, loss_cfg).items()})
  out.update(np_layer(outputs, targets, num_boxes, loss_cfg))
  weights = dict(loss_ce=loss_cfg.cls_weight, loss_bbox=loss_cfg.bbox_weight,
                 loss_giou=loss_cfg.giou_weight, loss_vector=loss_cfg.vector_weight)
  out['total'] = sum(weights[k.rstrip('_0123456789')] * v for k, v in out.items())
  return out


def linear_model_outputs(w, feats, base):
  """A small 'model': decoder layers l = 0, 1, ... of outputs, each a function of `w [D, C+4+K]`
  applied to `feats [layer, B, Q, D]` around the fixed outputs `base` (the last layer is final)."""
  c = base['pred_logits'].shape[-1]
  layers = []
  for f in feats:
    h = f @ w
    layers.append(dict(
        pred_logits=base['pred_logits'] + h[..., :c],
        pred_boxes=jax.nn.sigmoid(jnp.log(base['pred_boxes'] / (1 - base['pred_boxes']))
                                  + 0.3 * h[..., c:c + 4]),
        pred_vectors=base['pred_vectors'] + h[..., c + 4:]))
  out = dict(layers[-1])
  out['aux_outputs'] = layers[:-1]
  return out


@pytest.fixture(scope='module')
def batch():
  return make_batch(0)


def test_every_term_equals_numpy(tiny_config, batch):
  config = make_config(tiny_config, vector_loss_scale=2.5, cls_weight=1.5, vector_weight=0.7)
  outputs, targets = batch
  got = jax.jit(criterion(config))(outputs, targets)
  ref = np_criterion(outputs, targets, config.loss)
  assert set(got) == set(ref)
  assert len(got) == 4 * LAYERS + 1
  for key in ref:
    np.testing.assert_allclose(float(got[key]), ref[key], rtol=2e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize('vector_loss', ['l1', 'smooth_l1', 'l2', 'cosine'])
def test_vector_variants_equal_numpy(vector_loss):
  """Each variant on masked pairs (padded pairs hold the dummy 1.0 as in `layer_losses`)."""
  rng = np.random.default_rng(2)
  pred = rng.normal(0, 1.5, (2, 5, K)).astype(np.float32)
  tgt = rng.normal(0, 1.5, (2, 5, K)).astype(np.float32)
  pair_valid = rng.random((2, 5)) < 0.6
  pred[~pair_valid] = tgt[~pair_valid] = 1.0
  got = losses.vector_loss_fn(vector_loss)(jnp.asarray(pred), jnp.asarray(tgt),
                                           jnp.asarray(pair_valid))
  ref = np_vector_term(pred[pair_valid].astype(np.float64), tgt[pair_valid].astype(np.float64),
                       vector_loss)
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_matcher_jax_gives_the_same_losses(tiny_config, batch):
  outputs, targets = batch
  ref = np_criterion(outputs, targets, tiny_config.loss)
  config = make_config(tiny_config, matcher='jax')
  got = jax.jit(criterion(config))(outputs, targets)
  for key in ref:
    np.testing.assert_allclose(float(got[key]), ref[key], rtol=2e-5, atol=1e-6, err_msg=key)


def test_stage_selection_and_aux_switch(tiny_config, batch):
  outputs, targets = batch
  keys = lambda cfg: set(jax.eval_shape(criterion(cfg), outputs, targets))
  late = keys(make_config(tiny_config, vector_start_stage=2))
  assert 'loss_vector' in late and 'loss_vector_0' not in late and 'loss_vector_1' not in late
  assert {'loss_ce_0', 'loss_giou_1', 'loss_bbox_1'} <= late
  assert keys(make_config(tiny_config, aux_loss=False)) == {
      'loss_ce', 'loss_bbox', 'loss_giou', 'loss_vector', 'total'}
  with pytest.raises(ValueError, match='vector_loss'):
    keys(make_config(tiny_config, vector_loss='l3'))


def test_no_targets_and_garbage_padding_stay_finite(tiny_config, batch):
  outputs, targets = batch
  config = tiny_config

  def total(o, t):
    terms = criterion(config)(o, t)
    return terms['total'], terms

  loss_and_grad = jax.jit(jax.value_and_grad(total, has_aux=True))

  empty = dict(targets, valid=np.zeros_like(targets['valid']))
  (_, terms), grads = loss_and_grad(outputs, empty)
  ref = np_criterion(outputs, empty, config.loss)
  for key in ref:
    assert np.isfinite(float(terms[key]))
    np.testing.assert_allclose(float(terms[key]), ref[key], rtol=2e-5, atol=1e-6, err_msg=key)
  assert float(terms['loss_bbox']) == float(terms['loss_vector']) == 0.0
  for layer in [grads] + grads['aux_outputs']:
    assert np.isfinite(layer['pred_logits']).all()
    assert float(jnp.abs(layer['pred_boxes']).max()) == 0.0
    assert float(jnp.abs(layer['pred_vectors']).max()) == 0.0

  # Padded slots holding NaN or degenerate boxes change nothing, in values or gradients.
  dirty = {k: np.array(v) for k, v in targets.items()}
  dirty['boxes'][~dirty['valid']] = np.nan
  dirty['boxes'][0, 0] = [0.3, 0.3, 0.0, 0.0]
  dirty['vectors'][~dirty['valid']] = np.nan
  dirty['labels'][~dirty['valid']] = -1
  (clean_value, _), clean_grads = loss_and_grad(outputs, targets)
  (dirty_value, _), dirty_grads = loss_and_grad(outputs, dirty)
  assert np.isfinite(float(dirty_value))
  np.testing.assert_allclose(float(dirty_value), float(clean_value), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(clean_grads), jax.tree.leaves(dirty_grads)):
    assert np.isfinite(b).all()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_gradient_matches_finite_differences(tiny_config):
  """A small linear 'model' feeding every output; float64; matching fixed by stop_gradient."""
  outputs, targets = make_batch(5, b=2, q=6, c=3, g=3, k=4, layers=2)
  rng = np.random.default_rng(6)
  feats = rng.normal(size=(2, 2, 6, 3))                     # [layer, B, Q, D]
  base = {k: np.asarray(v, np.float64) for k, v in outputs.items() if k != 'aux_outputs'}

  forward = lambda w: linear_model_outputs(w, feats, base)

  config = make_config(tiny_config, vector_loss='smooth_l1')
  with jax.enable_x64(True):
    tgts = {k: (np.asarray(v, np.float64) if v.dtype == np.float32 else v)
            for k, v in targets.items()}
    value_and_grad = jax.jit(jax.value_and_grad(
        lambda w: criterion(config)(forward(w), tgts)['total']))
    f = lambda w: float(value_and_grad(w)[0])
    w0 = rng.normal(0, 0.1, (3, 11))
    grad = np.asarray(value_and_grad(w0)[1])
    assert grad.dtype == np.float64
    eps = 1e-6
    for _ in range(4):
      direction = rng.normal(size=w0.shape)
      fd = (f(w0 + eps * direction) - f(w0 - eps * direction)) / (2 * eps)
      np.testing.assert_allclose((grad * direction).sum(), fd, rtol=1e-5, atol=1e-7)


def test_dice_variant(tiny_config):
  """Dice between coder-decoded masks: equals a numpy composition; low for the exact vector."""
  from solq_jax import masks
  config = make_config(tiny_config, vector_loss='dice', vector_loss_scale=1.0)
  coder = masks.build_coder(config.model)
  s = config.model.mask_size
  yy, xx = np.mgrid[:s, :s]
  crops = np.stack([((yy - s / 2) ** 2 + (xx - s / 2) ** 2 < (s / r) ** 2)
                    for r in (2.5, 3, 4, 5)]).astype(np.float32)
  gt = np.asarray(coder.transform(jnp.asarray(crops)))      # [4, K] DCT of the crops
  outputs, targets = make_batch(9, b=2, q=6, c=3, g=2, k=gt.shape[1], layers=1)
  targets['vectors'] = gt.reshape(2, 2, -1)
  targets['valid'][:] = True
  terms = jax.jit(criterion(config, coder))(outputs, targets)

  # Numpy composition with the matching from the numpy cost.
  pairs = []
  for b in range(2):
    cost = np_cost(outputs['pred_logits'][b], outputs['pred_boxes'][b], targets['labels'][b],
                   targets['boxes'][b].astype(np.float64))
    pairs += [(b, i, j) for i, j in zip(*scipy_reference(cost, targets['valid'][b]))]
  pred = np.stack([outputs['pred_vectors'][b, i] for b, i, _ in pairs])
  tgt = np.stack([targets['vectors'][b, j] for b, _, j in pairs])
  rec = np.asarray(coder.reconstruct(jnp.asarray(pred)), np.float64)
  soft = _np_sigmoid(config.loss.dice_sharpness * (rec - 0.5))
  hard = np.asarray(coder.decode(jnp.asarray(tgt)), np.float64)
  dice = 1 - (2 * (soft * hard).sum((1, 2)) + 1) / (soft.sum((1, 2)) + hard.sum((1, 2)) + 1)
  np.testing.assert_allclose(float(terms['loss_vector']), dice.mean(), rtol=1e-4)

  # Predicting the target vectors themselves gives a small loss (K-coefficient truncation and
  # the soft sigmoid keep it above 0), far below that of random vectors.
  perfect = losses.layer_losses(
      dict(pred_logits=jnp.zeros((1, 4, 3)), pred_boxes=jnp.full((1, 4, 4), 0.5),
           pred_vectors=jnp.asarray(gt)[None]),
      dict(labels=jnp.zeros((1, 4), jnp.int32), boxes=jnp.full((1, 4, 4), 0.5),
           vectors=jnp.asarray(gt)[None], valid=jnp.ones((1, 4), bool)),
      (jnp.arange(4)[None], jnp.arange(4)[None], jnp.ones((1, 4), bool)), 4.0,
      vector_loss=losses.vector_loss_fn('dice', coder, config.loss.dice_sharpness))
  assert float(perfect['loss_vector']) < 0.1 < 0.5 < float(terms['loss_vector'])


@pytest.mark.parametrize('vector_loss', ['l1', 'cosine'])
def test_micro_batches_normalised_by_the_step_add_up_to_the_batch(tiny_config, vector_loss):
  """Gradient accumulation's contract: the terms of the micro-batches of a step, each given the
  step's `valid`, sum to the terms of the whole step as one batch (every layer, every term).
  Q = 3 < 4 valid targets of image 1 checks the pair count where not every target is matched;
  image 0 has none."""
  config = make_config(tiny_config, vector_loss=vector_loss)
  outputs, targets = make_batch(4, b=4, q=3)
  targets['valid'][1] = True
  whole = jax.jit(criterion(config))(outputs, targets)

  def rows(tree, index):
    return jax.tree.map(lambda x: x[index], tree)

  step_criterion = jax.jit(criterion(config))
  summed = None
  for index in ([0, 2], [1, 3]):   # any split: the per-image terms do not depend on it
    part = step_criterion(rows(outputs, index), rows(targets, index),
                          step_valid=targets['valid'])
    summed = part if summed is None else jax.tree.map(lambda a, b: a + b, summed, part)
  assert set(summed) == set(whole) and 'loss_vector_1' in whole
  for key in whole:
    np.testing.assert_allclose(float(summed[key]), float(whole[key]), rtol=1e-6, atol=1e-7,
                               err_msg=key)
  # Without the step's counts each half is normalised by its own: the sum differs.
  own = [jax.jit(criterion(config))(rows(outputs, i), rows(targets, i)) for i in ([0, 2], [1, 3])]
  assert abs(float(own[0]['total'] + own[1]['total']) - float(whole['total'])) > 1e-3
