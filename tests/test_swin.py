"""The Swin backbone's pieces and knobs: windows, shift masks, odd sizes, frozen stages,
stochastic depth, bfloat16 and remat (a 4-stage Swin of width 16 keeps compiles short; the
Swin-T numbers are checked against the official model by test_parity_swin.py)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parity_swin_utils
from solq_jax.models import backbone as backbone_lib
from solq_jax.models import swin
from solq_jax.training import optimizer
from solq_jax.weights import convert
from solq_jax.weights import swin_keys

SMALL = 'swin_test_small'
SMALL_LAYOUT = (16, (2, 1, 1, 1), (1, 2, 2, 4), 0.2)
# Two images of 37 x 45: every stage pads (10x12 -> windows of 14x14, 5x6, 3x3, 2x2).
IMAGES = np.random.default_rng(0).standard_normal((2, 37, 45, 3)).astype(np.float32)


@pytest.fixture(autouse=True)
def small_variant(monkeypatch):
  monkeypatch.setitem(swin.SWIN_VARIANTS, SMALL, SMALL_LAYOUT)


def test_window_partition_round_trip_and_layout():
  x = jnp.arange(2 * 14 * 21 * 3, dtype=jnp.float32).reshape(2, 14, 21, 3)
  windows = swin.window_partition(x, 7)
  assert windows.shape == (2, 6, 49, 3)
  # window 4 = second row of windows, second column: rows 7..13, cols 7..13, row-major inside.
  np.testing.assert_array_equal(windows[1, 4], x[1, 7:14, 7:14].reshape(49, 3))
  np.testing.assert_array_equal(swin.window_merge(windows, 7, 14, 21), x)


def test_relative_position_index_is_the_official_one():
  np.testing.assert_array_equal(swin.relative_position_index(7),
                                parity_swin_utils.relative_position_index(7))


@pytest.mark.parametrize('hp, wp', [(14, 21), (7, 7)])
def test_shift_mask_separates_wrapped_tokens(hp, wp):
  """After rolling by -s, the last s rows/cols of the map hold wrapped tokens; two tokens of a
  window may attend to each other iff they are wrapped alike in both axes."""
  ws, s = 7, 3
  mask = swin.shift_attention_mask(hp, wp, ws, s)
  rows, cols = np.meshgrid(np.arange(hp), np.arange(wp), indexing='ij')
  kind = ((rows >= hp - s) * 2 + (cols >= wp - s)).astype(np.float32)
  ids = np.asarray(swin.window_partition(kind[None, :, :, None], ws))[0, :, :, 0]
  same = ids[:, :, None] == ids[:, None, :]
  np.testing.assert_array_equal(mask, np.where(same, 0.0, -100.0))
  assert (mask[0] == 0).all() == (hp > ws)       # an interior window is not masked


@pytest.mark.parametrize('h, w', [(45, 61), (64, 96)])
def test_output_sizes_of_any_image(h, w):
  model = swin.SwinTransformer(SMALL)
  shapes = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0],
                          jnp.zeros((1, h, w, 3)))
  size = (-(-h // 4), -(-w // 4))
  expected = []
  for i in range(4):
    if i in swin.OUT_INDICES:
      expected.append((1,) + size + (16 * 2 ** i,))
    size = ((size[0] + 1) // 2, (size[1] + 1) // 2)
  assert [s.shape for s in shapes] == expected
  assert backbone_lib.backbone_channels('swin_l') == (384, 768, 1536)


@pytest.fixture(scope='module')
def params():
  """The small Swin's parameters from numpy through the converter's rules (no init compile)."""
  with pytest.MonkeyPatch.context() as m:
    m.setitem(swin.SWIN_VARIANTS, SMALL, SMALL_LAYOUT)
    plan = convert._Plan()   # pylint: disable=protected-access
    swin_keys.add_swin(plan, SMALL, '')
    state_dict = {r.keys[0]: parity_swin_utils.make_swin_tensor(r.keys[0], r.shape)
                  for r in plan.rules}
    return convert.apply_rules(state_dict, plan.rules)['params']['backbone']


@pytest.fixture(scope='module')
def eval_outputs(params):
  with pytest.MonkeyPatch.context() as m:
    m.setitem(swin.SWIN_VARIANTS, SMALL, SMALL_LAYOUT)
    return _apply(swin.SwinTransformer(SMALL), False)(params, jax.random.key(0))


def _apply(model, train):
  x = IMAGES
  return jax.jit(lambda p, key: model.apply({'params': p}, x, train, rngs={'dropout': key}))


@pytest.mark.parametrize('frozen_stages, frozen', [
    (-1, set()), (1, {'patch_embed'}), (3, {'patch_embed', 'layers_0', 'layers_1'})])
def test_frozen_stages_are_the_official_ones(params, frozen_stages, frozen):
  """Official frozen_stages: 0/1 the patch embedding, k>=2 also stages 1..k-1; the output norms
  always train. The backbone rule and the optimiser's frozen group agree, and (k = 3) exactly
  the frozen modules get no gradient."""
  assert set(params) == {'patch_embed', 'layers_0', 'layers_1', 'layers_2', 'layers_3', 'norm1',
                         'norm2', 'norm3'}
  assert {k for k in params if backbone_lib.frozen_module(k, frozen_stages)} == frozen
  labels = optimizer.param_labels({'backbone': params}, frozen_stages)['backbone']
  assert {k for k, sub in labels.items()
          if set(jax.tree.leaves(sub)) == {optimizer.FROZEN}} == frozen
  if frozen_stages == 3:
    model = swin.SwinTransformer(SMALL, frozen_stages=frozen_stages, drop_path_rate=0.0)
    loss = lambda p: sum(jnp.sum(f ** 2) for f in model.apply({'params': p}, IMAGES))
    grads = jax.jit(jax.grad(loss))(params)
    totals = {k: float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(sub)))
              for k, sub in grads.items()}
    assert {k for k, total in totals.items() if total == 0} == frozen
  with pytest.raises(ValueError, match='backbone_frozen_stages'):
    jax.eval_shape(swin.SwinTransformer(SMALL, frozen_stages=6).init, jax.random.key(0), IMAGES)


def test_stochastic_depth(params, eval_outputs):
  """Rate > 0: training outputs depend on the key; frozen stages (here all four) never drop.
  DropPath keeps or zeroes whole samples, the kept ones scaled by 1 / keep."""
  k1, k2 = jax.random.key(2), jax.random.key(3)
  dropping = _apply(swin.SwinTransformer(SMALL, drop_path_rate=0.5), True)
  t1, t2 = dropping(params, k1), dropping(params, k2)
  assert all(not np.allclose(a, b) for a, b in zip(t1, t2))
  assert all(not np.allclose(a, b) for a, b in zip(t1, eval_outputs))
  frozen = _apply(swin.SwinTransformer(SMALL, drop_path_rate=0.5, frozen_stages=5), True)
  for a, b in zip(eval_outputs, frozen(params, k1)):
    np.testing.assert_array_equal(a, b)
  y = jnp.ones((4000, 3, 2))
  out = np.asarray(jax.jit(lambda y: swin.DropPath(0.25).apply({}, y, False,
                                                                rngs={'dropout': k1}))(y))
  per_sample = out.reshape(4000, -1)
  assert set(np.unique(per_sample)) <= {0.0, np.float32(1 / 0.75)}
  assert (per_sample == per_sample[:, :1]).all()
  assert abs((per_sample[:, 0] > 0).mean() - 0.75) < 0.03


def test_bfloat16_computes_in_bfloat16_with_float32_parameters(params, eval_outputs):
  bf16 = swin.SwinTransformer(SMALL, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(bf16.init, jax.random.key(1), IMAGES)['params']
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert {a.dtype for a in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  for a, b in zip(eval_outputs, _apply(bf16, False)(params, jax.random.key(0))):
    assert b.dtype == jnp.bfloat16
    err = np.abs(np.asarray(b, np.float32) - np.asarray(a)).max()
    assert err < 0.05 * np.abs(np.asarray(a)).max(), err


def test_remat_per_block_keeps_values_and_gradients(params):
  """A stage of two blocks (the first stage's parameters), stochastic depth on."""
  x = np.random.default_rng(1).standard_normal((2, 10, 12, 16)).astype(np.float32)
  stage_params = params['layers_0']
  stages = [swin.SwinStage(2, 1, (0.2, 0.4), remat=remat) for remat in (False, True)]

  def value_and_grad(stage):
    loss = lambda p: sum(jnp.sum(f ** 2) for f in stage.apply(
        {'params': p}, x, True, rngs={'dropout': jax.random.key(4)}))
    return jax.value_and_grad(loss)(stage_params)

  (la, ga), (lb, gb) = jax.jit(lambda: [value_and_grad(s) for s in stages])()
  np.testing.assert_allclose(lb, la, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * np.abs(a).max())
  remat = swin.SwinTransformer(SMALL, remat=True)
  jaxpr = str(jax.make_jaxpr(lambda p: remat.apply({'params': p}, IMAGES))(params))
  assert len(re.findall(r'\b(?:checkpoint|remat2?)\[', jaxpr)) == sum(SMALL_LAYOUT[1])


@pytest.mark.parametrize('field, value', [('backbone_norm', 'group_norm'),
                                          ('drop_path_rate', 1.0)])
def test_bad_swin_config_values_are_named(field, value):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from solq_jax.models import build_model  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.backbone = SMALL
  config.model.backbone_frozen_stages = -1
  config.model[field] = value
  model = build_model(config.model)
  with pytest.raises(ValueError, match=f'config.model.{field}'):
    jax.eval_shape(model.init, jax.random.key(0), IMAGES, np.zeros(IMAGES.shape[:3], bool))
