"""The optimiser recipe: param groups by path, frozen leaves, torch-style clip, AdamW, step decay.

Checked against an independent numpy re-implementation of torch's AdamW + clip_grad_norm_ +
StepLR over the official three parameter groups.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import base
from solq_jax.training import optimizer as opt


def contract_params(rng):
  """A small parameter tree with every path pattern of the model contract."""
  def a(*shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)
  enc_attn = {n: {'kernel': a(4, 6), 'bias': a(6)}
              for n in ('sampling_offsets', 'attention_weights', 'value_proj', 'output_proj')}
  return {
      'backbone': {
          'conv1': {'kernel': a(3, 3, 3, 4)},
          'layer1_0': {'conv1': {'kernel': a(3, 3, 4, 4)}, 'conv2': {'kernel': a(3, 3, 4, 4)}},
          'layer2_0': {'conv1': {'kernel': a(3, 3, 4, 8)},
                       'downsample': {'kernel': a(1, 1, 4, 8)}},
          'layer4_1': {'conv2': {'kernel': a(3, 3, 8, 8)}},
      },
      'input_proj_0': {'conv': {'kernel': a(1, 1, 8, 4), 'bias': a(4)},
                       'norm': {'scale': a(4), 'bias': a(4)}},
      'transformer': {
          'level_embed': a(2, 4),
          'reference_points': {'kernel': a(4, 2), 'bias': a(2)},
          'encoder': {'layers_0': {'self_attn': enc_attn, 'norm1': {'scale': a(4), 'bias': a(4)}}},
      },
      'class_embed_0': {'kernel': a(4, 3), 'bias': a(3)},
      'query_embed': {'embedding': a(5, 8)},
  }


def train_config(**overrides):
  t = base.train_config()
  t.update(overrides)
  return t


def test_groups_by_path():
  params = contract_params(np.random.default_rng(0))
  labels = opt.param_labels(params)
  assert labels['backbone']['conv1']['kernel'] == opt.FROZEN
  assert labels['backbone']['layer1_0']['conv2']['kernel'] == opt.FROZEN
  assert labels['backbone']['layer2_0']['downsample']['kernel'] == opt.BACKBONE
  assert labels['backbone']['layer4_1']['conv2']['kernel'] == opt.BACKBONE
  assert labels['transformer']['reference_points']['kernel'] == opt.LINEAR_PROJ
  enc = labels['transformer']['encoder']['layers_0']['self_attn']
  assert enc['sampling_offsets']['bias'] == opt.LINEAR_PROJ
  assert enc['attention_weights']['kernel'] == opt.DEFAULT  # only offsets + reference points
  assert labels['transformer']['level_embed'] == opt.DEFAULT
  assert labels['query_embed']['embedding'] == opt.DEFAULT
  with pytest.raises(ValueError, match='backbone'):
    opt.param_labels({'encoder': {'w': jnp.zeros(2)}})


@pytest.mark.parametrize('frozen_stages', [0, 1, 2, 4])
def test_frozen_stages_set_the_frozen_group(frozen_stages):
  """`model.backbone_frozen_stages`: stem + layer1..k frozen; a GroupNorm stem (bn1) with it."""
  params = contract_params(np.random.default_rng(0))
  params['backbone']['bn1'] = {'scale': jnp.ones(4), 'bias': jnp.zeros(4)}
  labels = opt.param_labels(params, frozen_stages)
  b = labels['backbone']
  want = lambda stage: opt.FROZEN if stage <= frozen_stages else opt.BACKBONE
  assert b['conv1']['kernel'] == b['bn1']['scale'] == want(1)  # the stem goes with layer1
  assert b['layer1_0']['conv2']['kernel'] == want(1)
  assert b['layer2_0']['downsample']['kernel'] == want(2)
  assert b['layer4_1']['conv2']['kernel'] == want(4)
  trained = jax.tree.map(lambda g: g != opt.FROZEN, labels)
  assert trained['backbone']['layer2_0']['conv1']['kernel'] == (frozen_stages < 2)
  assert trained['class_embed_0']['kernel']


def reference_adamw(params, grads_per_step, labels, t, spe):
  """numpy: torch clip_grad_norm_ (trained params only), AdamW per group, StepLR per epoch."""
  flat_p = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
  flat_l = jax.tree.leaves(labels)
  lrs = {opt.DEFAULT: t.lr, opt.BACKBONE: t.lr_backbone,
         opt.LINEAR_PROJ: t.lr * t.lr_linear_proj_mult}
  m = [np.zeros_like(p) for p in flat_p]
  v = [np.zeros_like(p) for p in flat_p]
  for k, grads in enumerate(grads_per_step):
    flat_g = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    trained = [i for i, l in enumerate(flat_l) if l != opt.FROZEN]
    norm = np.sqrt(sum(np.sum(flat_g[i] ** 2) for i in trained))
    coef = min(1.0, t.clip_max_norm / (norm + 1e-6)) if t.clip_max_norm > 0 else 1.0
    decay = t.lr_drop_factor if k // spe >= t.lr_drop_epoch else 1.0
    for i in trained:
      g = flat_g[i] * coef
      lr = lrs[flat_l[i]] * decay
      flat_p[i] = flat_p[i] * (1 - lr * t.weight_decay)
      m[i] = t.adam_b1 * m[i] + (1 - t.adam_b1) * g
      v[i] = t.adam_b2 * v[i] + (1 - t.adam_b2) * g * g
      m_hat = m[i] / (1 - t.adam_b1 ** (k + 1))
      v_hat = v[i] / (1 - t.adam_b2 ** (k + 1))
      flat_p[i] = flat_p[i] - lr * m_hat / (np.sqrt(v_hat) + t.adam_eps)
  return jax.tree.unflatten(jax.tree.structure(params), flat_p)


def run_optax(tx, params, grads_per_step):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for grads in grads_per_step:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize('clip', [0.1, 0.0])
def test_matches_torch_recipe_with_step_decay(clip):
  rng = np.random.default_rng(1)
  params = contract_params(rng)
  # lr drop after 2 epochs of 2 steps: steps 0-3 at the base rates, 4-5 at x0.1
  t = train_config(lr=1e-2, lr_backbone=1e-3, weight_decay=0.05, clip_max_norm=clip,
                   lr_drop_epoch=2)
  spe = 2
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
           for _ in range(6)]
  got = run_optax(opt.build_optimizer(t, params, spe), params, grads)
  want = reference_adamw(params, grads, opt.param_labels(params), t, spe)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=2e-6)


def test_frozen_never_change_and_do_not_count_in_the_clip():
  rng = np.random.default_rng(2)
  params = contract_params(rng)
  labels = opt.param_labels(params)
  t = train_config(lr=1e-2)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
  # a huge gradient on the frozen leaves must change neither them nor the others' clipped step
  loud = jax.tree.map(lambda g, l: g * 1e6 if l == opt.FROZEN else g, grads, labels)
  tx = opt.build_optimizer(t, params, 10)
  quiet_out = run_optax(tx, params, [grads] * 3)
  loud_out = run_optax(tx, params, [loud] * 3)
  for a, b, p, l in zip(jax.tree.leaves(quiet_out), jax.tree.leaves(loud_out),
                        jax.tree.leaves(params), jax.tree.leaves(labels)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if l == opt.FROZEN:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(p))
    else:
      assert not np.array_equal(np.asarray(a), np.asarray(p))


def test_groups_move_at_their_relative_rates():
  """First AdamW step without decay on a fixed gradient: |update| = lr_group * |g|/(|g|+eps)
  (float32 bias corrections: ~1e-5 relative)."""
  rng = np.random.default_rng(3)
  params = contract_params(rng)
  labels = opt.param_labels(params)
  t = train_config(weight_decay=0.0, clip_max_norm=0.0)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, jnp.float32), params)
  tx = opt.build_optimizer(t, params, 10)
  updates, _ = tx.update(grads, tx.init(params), params)
  rate = {opt.DEFAULT: 2e-4, opt.BACKBONE: 2e-5, opt.LINEAR_PROJ: 2e-5, opt.FROZEN: 0.0}
  seen = set()
  for u, l in zip(jax.tree.leaves(updates), jax.tree.leaves(labels)):
    np.testing.assert_allclose(np.asarray(u), -rate[l], rtol=2e-5, atol=0)
    seen.add(l)
  assert seen == set(opt.GROUPS)


def test_step_decay_boundary():
  sched = opt.step_decay_schedule(2e-4, drop_step=40 * 7, factor=0.1)
  assert float(sched(40 * 7 - 1)) == pytest.approx(2e-4)
  assert float(sched(40 * 7)) == pytest.approx(2e-5)
  groups = opt.group_schedules(ml_collections.ConfigDict(train_config()), steps_per_epoch=7)
  assert float(groups[opt.LINEAR_PROJ](0)) == pytest.approx(2e-5)
  assert float(groups[opt.BACKBONE](400)) == pytest.approx(2e-6)


def test_warmup_ramps_every_group_then_steps():
  t = ml_collections.ConfigDict(train_config(warmup_steps=4, lr_drop_epoch=1.0))
  groups = opt.group_schedules(t, steps_per_epoch=10)
  base_rates = {opt.DEFAULT: 2e-4, opt.BACKBONE: 2e-5, opt.LINEAR_PROJ: 2e-5}
  for name, base_rate in base_rates.items():
    got = [float(groups[name](c)) for c in range(12)]
    want = [base_rate * min(1.0, (c + 1) / 4) * (0.1 if c >= 10 else 1.0) for c in range(12)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
  # 0 = the official schedule, unchanged
  plain = opt.group_schedules(ml_collections.ConfigDict(train_config(lr_drop_epoch=1.0)), 10)
  assert float(plain[opt.DEFAULT](0)) == pytest.approx(2e-4)
  with pytest.raises(ValueError, match='warmup_steps'):
    opt.group_schedules(ml_collections.ConfigDict(train_config(warmup_steps=-1)), 10)


def test_cosine_schedule_every_group():
  """`lr_schedule='cosine'`: after the warm-up, base * (f + (1 - f) (1 + cos(pi t)) / 2) with t
  running 0..1 over the remaining updates of the run (`total_steps`, else epochs x steps)."""
  t = ml_collections.ConfigDict(train_config(lr_schedule='cosine', warmup_steps=3,
                                             total_steps=24, lr_drop_factor=0.1))
  groups = opt.group_schedules(t, steps_per_epoch=10)
  for name, base_rate in {opt.DEFAULT: 2e-4, opt.BACKBONE: 2e-5, opt.LINEAR_PROJ: 2e-5}.items():
    got = np.array([float(groups[name](c)) for c in range(25)])
    np.testing.assert_allclose(got[:3], base_rate * np.array([1, 2, 3]) / 3, rtol=1e-6)
    np.testing.assert_allclose(got[3], base_rate, rtol=1e-6)           # the cosine's start
    np.testing.assert_allclose(got[13], base_rate * 0.55, rtol=1e-5)   # half-way: (1 + 0.1) / 2
    np.testing.assert_allclose(got[23:], base_rate * 0.1, rtol=1e-5)   # the last update on
    assert np.all(np.diff(got[3:]) <= 1e-12)
  by_epochs = opt.group_schedules(ml_collections.ConfigDict(
      train_config(lr_schedule='cosine', epochs=2, lr_drop_factor=0.0)), steps_per_epoch=5)
  np.testing.assert_allclose(float(by_epochs[opt.DEFAULT](9)), 0.0, atol=1e-12)
  np.testing.assert_allclose(float(by_epochs[opt.DEFAULT](0)), 2e-4, rtol=1e-6)
  with pytest.raises(ValueError, match='lr_schedule'):
    opt.group_schedules(ml_collections.ConfigDict(train_config(lr_schedule='linear')), 10)


def test_warmup_scales_the_applied_update():
  """SGD-like check through AdamW: with weight decay 0 and a constant gradient, Adam's update
  is -lr(step) * sign, so the first two updates are 1/3 and 2/3 of the base rate."""
  params = contract_params(np.random.default_rng(0))
  t = train_config(weight_decay=0.0, clip_max_norm=0.0, warmup_steps=3)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, jnp.float32), params)
  tx = opt.build_optimizer(t, params, 10)
  state = tx.init(params)
  for fraction in (1 / 3, 2 / 3, 1.0, 1.0):
    updates, state = tx.update(grads, state, params)
    u = np.asarray(jax.tree.leaves(updates['backbone']['layer2_0'])[0])
    np.testing.assert_allclose(u, -2e-5 * fraction, rtol=2e-5)
