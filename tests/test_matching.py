"""Matching: the cost matrix against a numpy re-derivation of the official matcher, the scipy and
pure-JAX assignments against direct scipy calls (rectangular, padded, empty images, ties)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from solq_jax import matching


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _np_giou(a, b):
  """GIoU of two xyxy boxes, written out for one pair."""
  inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = inter_w * inter_h
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
  return inter / union - (hull - union) / hull


def _np_xyxy(b):
  cx, cy, w, h = b
  return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def np_cost(logits, boxes, labels, tgt_boxes, w_class=2.0, w_bbox=5.0, w_giou=2.0):
  """The official matching cost for one image, pair by pair in float64: `[Q, G]`."""
  q, g = logits.shape[0], labels.shape[0]
  out = np.zeros((q, g))
  for i in range(q):
    for j in range(g):
      p = _np_sigmoid(float(logits[i, labels[j]]))
      pos = 0.25 * (1 - p) ** 2 * -np.log(p + 1e-8)
      neg = 0.75 * p ** 2 * -np.log(1 - p + 1e-8)
      l1 = np.abs(boxes[i].astype(np.float64) - tgt_boxes[j]).sum()
      giou = _np_giou(_np_xyxy(boxes[i].astype(np.float64)), _np_xyxy(tgt_boxes[j]))
      out[i, j] = w_bbox * l1 + w_class * (pos - neg) - w_giou * giou
  return out


def random_problem(rng, b, q, c, g, fill=0.6):
  logits = rng.normal(0, 2, (b, q, c)).astype(np.float32)
  boxes = np.concatenate([rng.uniform(0.2, 0.8, (b, q, 2)), rng.uniform(0.05, 0.4, (b, q, 2))],
                         -1).astype(np.float32)
  labels = rng.integers(0, c, (b, g)).astype(np.int32)
  tgt = np.concatenate([rng.uniform(0.2, 0.8, (b, g, 2)), rng.uniform(0.05, 0.4, (b, g, 2))],
                       -1).astype(np.float32)
  valid = rng.random((b, g)) < fill
  valid[0] = False                   # an image without targets
  valid[-1] = True                   # a full image
  tgt[~valid] = 0.0                  # padded boxes as the data pipeline pads them (degenerate)
  return logits, boxes, labels, tgt, valid


def scipy_reference(cost, valid):
  """Direct scipy on the valid columns: sorted (src, tgt) pairs of one problem."""
  cols = np.flatnonzero(valid)
  if cols.size == 0:
    return np.zeros(0, int), np.zeros(0, int)
  r, c = scipy.optimize.linear_sum_assignment(cost[:, cols])
  return r, cols[c]


def test_cost_equals_numpy_rederivation():
  rng = np.random.default_rng(0)
  logits, boxes, labels, tgt, valid = random_problem(rng, 3, 7, 5, 4)
  cost = np.asarray(matching.match_cost(logits, boxes, labels, tgt, valid,
                                        cost_class=2.0, cost_bbox=5.0, cost_giou=2.0))
  assert np.isfinite(cost).all()
  for b in range(3):
    ref = np_cost(logits[b], boxes[b], labels[b], tgt[b].astype(np.float64))
    np.testing.assert_allclose(cost[b][:, valid[b]], ref[:, valid[b]], rtol=1e-5, atol=1e-5)
  # Leading (decoder-layer) dims, other weights.
  stacked = np.asarray(matching.match_cost(logits[None].repeat(2, 0), boxes[None].repeat(2, 0),
                                           labels, tgt, valid, 1.0, 3.0, 0.5))
  ref = np_cost(logits[2], boxes[2], labels[2], tgt[2].astype(np.float64), 1.0, 3.0, 0.5)
  np.testing.assert_allclose(stacked[1, 2][:, valid[2]], ref[:, valid[2]], rtol=1e-5, atol=1e-5)


def test_cost_has_no_gradient():
  rng = np.random.default_rng(1)
  logits, boxes, labels, tgt, valid = random_problem(rng, 2, 5, 3, 4)
  grads = jax.jit(jax.grad(lambda l, b: matching.match_cost(l, b, labels, tgt, valid).sum(),
                           argnums=(0, 1)))(jnp.asarray(logits), jnp.asarray(boxes))
  assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


@pytest.mark.parametrize('q,g', [(12, 5), (4, 9)])   # more queries than targets, and fewer
def test_scipy_assignment_equals_scipy(q, g):
  rng = np.random.default_rng(q)
  costs = rng.normal(size=(2, 5, q, g)).astype(np.float32)   # [L, B, Q, G]
  valid = rng.random((5, g)) < 0.6
  valid[0] = False
  valid[1] = True
  src, tgt, matched = jax.jit(matching.assign)(costs, valid)
  src, tgt, matched = map(np.asarray, (src, tgt, matched))
  assert src.shape == tgt.shape == matched.shape == (2, 5, g)
  for l in range(2):
    for b in range(5):
      r, c = scipy_reference(costs[l, b], valid[b])
      n = r.size
      assert n == min(q, valid[b].sum())
      np.testing.assert_array_equal(matched[l, b], np.arange(g) < n)
      np.testing.assert_array_equal(src[l, b, :n], r)
      np.testing.assert_array_equal(tgt[l, b, :n], c)
      assert (src[l, b, n:] == 0).all() and (tgt[l, b, n:] == 0).all()


def test_hungarian_match_end_to_end():
  rng = np.random.default_rng(3)
  logits, boxes, labels, tgt, valid = random_problem(rng, 4, 10, 6, 5)
  src, tgt_idx, matched = map(np.asarray, jax.jit(matching.hungarian_match)(
      logits, boxes, labels, tgt, valid))
  for b in range(4):
    r, c = scipy_reference(np_cost(logits[b], boxes[b], labels[b], tgt[b].astype(np.float64)),
                           valid[b])
    np.testing.assert_array_equal(src[b][matched[b]], r)
    np.testing.assert_array_equal(tgt_idx[b][matched[b]], c)


def _total(cost, src, tgt, matched):
  return cost[src[matched], tgt[matched]].sum()


@pytest.mark.parametrize('integer_costs', [False, True])
def test_jax_solver_is_optimal(integer_costs):
  """Same total cost as scipy (ties may give a different but equally cheap assignment)."""
  rng = np.random.default_rng(int(integer_costs))
  q, g = 11, 7
  costs = rng.normal(size=(3, 6, q, g))
  if integer_costs:                  # many ties
    costs = rng.integers(-3, 4, size=costs.shape)
  costs = costs.astype(np.float32)
  valid = rng.random((6, g)) < 0.6
  valid[0] = False
  valid[1] = True
  src, tgt, matched = map(np.asarray, jax.jit(matching.assign, static_argnames='solver')(
      costs, valid, solver='jax'))
  for l in range(3):
    for b in range(6):
      r, c = scipy_reference(costs[l, b].astype(np.float64), valid[b])
      assert matched[l, b].sum() == r.size
      np.testing.assert_array_equal(matched[l, b], np.arange(g) < r.size)
      s, t = src[l, b][matched[l, b]], tgt[l, b][matched[l, b]]
      assert len(set(s)) == s.size and set(t) == set(c)       # a valid matching of all targets
      assert (np.diff(s) > 0).all()                           # sorted by query like scipy
      np.testing.assert_allclose(_total(costs[l, b], s, t, np.ones_like(s, bool)),
                                 costs[l, b][r, c].sum(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('n,m', [(6, 6), (5, 9)])
def test_lsap_jax_square_and_skipped_rows(n, m):
  rng = np.random.default_rng(n * m)
  cost = rng.uniform(-5, 5, (20, n, m)).astype(np.float32)
  rows = rng.random((20, n)) < 0.7
  cols = np.asarray(jax.jit(matching.lsap_jax)(cost, rows))
  for k in range(20):
    col, row_valid = cols[k], rows[k]
    assert (col[~row_valid] == -1).all()
    picked = col[row_valid]
    assert len(set(picked)) == picked.size and (picked >= 0).all()
    r, c = scipy.optimize.linear_sum_assignment(cost[k][row_valid].astype(np.float64))
    np.testing.assert_allclose(cost[k][row_valid][np.arange(picked.size), picked].sum(),
                               cost[k][row_valid][r, c].sum(), rtol=1e-5, atol=1e-4, err_msg=str(k))


def test_bad_inputs_are_named():
  costs = jnp.zeros((2, 4, 3))
  valid = jnp.ones((2, 3), bool)
  with pytest.raises(ValueError, match='solver'):
    matching.assign(costs, valid, solver='munkres')
  with pytest.raises(ValueError, match='max_gt'):
    matching.assign(jnp.zeros((2, 3, 4)), jnp.ones((2, 4), bool), solver='jax')
  import ml_collections
  with pytest.raises(ValueError, match='matcher'):
    matching.matcher_from_config(ml_collections.ConfigDict(dict(
        matcher='greedy', cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)))


def _diverged_costs():
  """Costs of a diverged model: NaN everywhere in one image, mixed NaN/inf/huge in the other."""
  costs = np.full((2, 6, 4), np.nan, np.float32)
  costs[1] = np.random.default_rng(0).uniform(-5, 5, (6, 4))
  costs[1, 0, 0], costs[1, 2, 1], costs[1, 3, 3] = np.inf, -np.inf, 1e30
  costs[1, 4, 2] = np.nan
  return costs


@pytest.mark.timeout(120)
@pytest.mark.parametrize('solver', ['scipy', 'jax'])
def test_nonfinite_costs_terminate_with_a_valid_matching(solver):
  """A diverged step must reach the loop's non-finite-loss stop: the scipy solver used to raise
  inside the host callback, the JAX one to loop forever."""
  valid = np.array([[True, True, True, False], [True, True, True, True]])
  src, tgt, ok = jax.device_get(jax.jit(
      lambda c, v: matching.assign(c, v, solver=solver))(_diverged_costs(), valid))
  for b in range(2):
    n = int(valid[b].sum())
    assert ok[b].sum() == n and len(set(src[b][ok[b]])) == n
    assert sorted(tgt[b][ok[b]]) == list(np.flatnonzero(valid[b]))


@pytest.mark.timeout(120)
def test_lsap_jax_terminates_on_raw_nan_costs():
  """The solver itself is bounded, even when called without the cost clean-up of `assign`."""
  cost = np.full((1, 4, 6), np.nan, np.float32)
  cost[0, 1, 2] = 1.0
  cols = np.asarray(jax.jit(matching.lsap_jax)(cost, np.ones((1, 4), bool)))
  assert cols.shape == (1, 4) and (cols < 6).all()
