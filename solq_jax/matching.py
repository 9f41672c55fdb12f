"""Bipartite matching of object queries to ground-truth targets (the official `HungarianMatcher`).

The matching cost is computed in `jnp` on the device; the assignment is solved either by
`scipy.optimize.linear_sum_assignment` on the host through `jax.pure_callback` (`'scipy'`, the
official behaviour), or by an exact pure-JAX shortest-augmenting-path solver (`'jax'`, no host
callback, e.g. for TPU). Nothing here carries a gradient: the inputs are `stop_gradient`-ed.

Shapes are static: targets are padded to `G = max_gt` with a `valid` mask, and every image's
result is returned as `src_idx [B,G]` (query index), `tgt_idx [B,G]` (target slot in `0..G-1`)
and `valid [B,G]` marking the real pairs (the first `min(Q, #targets)` entries, sorted by query
index like scipy's output). Padded entries hold index 0, so they are safe to gather with.

Sharding: under `jit` with batch-sharded inputs, a plain `pure_callback` makes XLA gather the
whole batch onto one device before calling the host (one scipy call for the global batch), and
with explicit `out_shardings` the program can dead-lock. The solver (either one) therefore runs
through `solq_jax.sharding.per_batch_shard`: traced under a context mesh (the train step's
`sharding.under_mesh`), every device solves its own images.
"""
import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from solq_jax import box_ops
from solq_jax import sharding

# A valid (cx, cy, w, h) box that stands in for padded targets so that no NaN/inf is created.
DUMMY_BOX = (0.5, 0.5, 1.0, 1.0)
SOLVERS = ('scipy', 'jax')
_FOCAL_ALPHA = 0.25   # hard-coded in the official matcher, not config.loss.focal_alpha
_FOCAL_GAMMA = 2.0
_LOG_EPS = 1e-8
# Non-finite costs (a diverged model's NaN/inf outputs) are replaced by +-this before solving,
# and finite costs are clipped to it: both solvers then terminate on any input (the duals of
# the JAX solver stay far from float32 overflow), the step's non-finite loss is reported by
# the training loop, and real costs (order 10) are never touched.
COST_LIMIT = 1e6


def safe_boxes(boxes, valid):
  """`boxes [...,4]` (cxcywh) with the entries where `valid` is False replaced by `DUMMY_BOX`."""
  return jnp.where(valid[..., None], boxes, jnp.asarray(DUMMY_BOX, boxes.dtype))


def match_cost(pred_logits, pred_boxes, tgt_labels, tgt_boxes, tgt_valid,
               cost_class=2.0, cost_bbox=5.0, cost_giou=2.0):
  """The official matching cost `C [..., B, Q, G]`.

  Args:
    pred_logits: `[..., B, Q, C]` class logits (leading dims, e.g. decoder layers, allowed).
    pred_boxes: `[..., B, Q, 4]` predicted cxcywh boxes in [0, 1].
    tgt_labels: `[B, G]` int class ids (indices into the C logits).
    tgt_boxes: `[B, G, 4]` target cxcywh boxes.
    tgt_valid: `[B, G]` bool; padded columns get a finite but meaningless cost.
    cost_class, cost_bbox, cost_giou: the weights of the three terms.

  Returns:
    `cost_bbox * L1 + cost_class * focal_class + cost_giou * (-GIoU)`, no gradient.
  """
  pred_logits, pred_boxes, tgt_boxes = (
      lax.stop_gradient(x) for x in (pred_logits, pred_boxes, tgt_boxes))
  num_classes = pred_logits.shape[-1]
  labels = jnp.where(tgt_valid, jnp.clip(tgt_labels, 0, num_classes - 1), 0)
  tgt_boxes = safe_boxes(tgt_boxes.astype(pred_boxes.dtype), tgt_valid)

  # The class cost is element-wise in the logit, so gather the target classes' logits first
  # ([..., B, Q, G]) and evaluate the focal terms only there. The barrier keeps XLA:CPU from
  # fusing (and re-running) the gather inside the element-wise loop; it and the unrolled L1 sum
  # (a reduce over a minor axis of 4 is slow) made this cost 8x faster (benchmarks/matching.py).
  idx = jnp.broadcast_to(labels[:, None, :], pred_logits.shape[:-1] + labels.shape[-1:])
  p = jax.nn.sigmoid(lax.optimization_barrier(jnp.take_along_axis(pred_logits, idx, axis=-1)))
  pos = _FOCAL_ALPHA * (1 - p) ** _FOCAL_GAMMA * -jnp.log(p + _LOG_EPS)
  neg = (1 - _FOCAL_ALPHA) * p ** _FOCAL_GAMMA * -jnp.log(1 - p + _LOG_EPS)
  class_cost = pos - neg

  l1_cost = sum(jnp.abs(pred_boxes[..., :, None, k] - tgt_boxes[:, None, :, k]) for k in range(4))
  giou = box_ops.elementwise_giou(box_ops.cxcywh_to_xyxy(pred_boxes)[..., :, None, :],
                                  box_ops.cxcywh_to_xyxy(tgt_boxes)[:, None, :, :])
  return cost_bbox * l1_cost + cost_class * class_cost - cost_giou * giou


# ----------------------------------------------------------------------------------------------
# scipy on the host


def assign_np(costs, valid):
  """Host solver: `costs [..., B, Q, G]`, `valid [B, G]` -> `(src, tgt, matched)` each
  `[..., B, G]`.

  Each `[Q, G]` problem is solved by scipy after its padded columns are removed.
  """
  costs = np.asarray(costs)
  q, g = costs.shape[-2:]
  lead = costs.shape[:-2]
  flat_c = costs.reshape(-1, q, g)
  flat_v = np.broadcast_to(np.asarray(valid, bool), lead + (g,)).reshape(-1, g)
  src = np.zeros(flat_v.shape, np.int32)
  tgt = np.zeros(flat_v.shape, np.int32)
  matched = np.zeros(flat_v.shape, bool)
  for k in range(flat_c.shape[0]):
    cols = np.flatnonzero(flat_v[k])
    if cols.size == 0:
      continue
    block = flat_c[k][:, cols]
    if not np.isfinite(block).all():
      raise ValueError('hungarian_match: the matching cost has NaN/inf entries; check '
                       'pred_logits / pred_boxes (boxes must be finite cxcywh) and tgt_boxes.')
    rows, picked = scipy.optimize.linear_sum_assignment(block)
    n = rows.size
    src[k, :n] = rows
    tgt[k, :n] = cols[picked]
    matched[k, :n] = True
  shape = lead + (g,)
  return src.reshape(shape), tgt.reshape(shape), matched.reshape(shape)


def _assign_callback(costs, valid):
  shape = costs.shape[:-2] + costs.shape[-1:]
  out = (jax.ShapeDtypeStruct(shape, jnp.int32), jax.ShapeDtypeStruct(shape, jnp.int32),
         jax.ShapeDtypeStruct(shape, jnp.bool_))
  # `assign_np` is looked up at call time, so tests can observe the host calls.
  return jax.pure_callback(lambda c, v: assign_np(c, v), out, costs, valid,
                           vmap_method='sequential')


# ----------------------------------------------------------------------------------------------
# Exact pure-JAX solver


def lsap_jax(cost, row_valid):
  """Exact min-cost assignment of the valid rows of each `cost [N, n, m]` (n <= m) to columns.

  The shortest-augmenting-path method of Jonker & Volgenant in the form of Crouse (2016), the
  algorithm behind scipy's `linear_sum_assignment`: rows are added one at a time; each addition
  runs a Dijkstra search over reduced costs (dual variables `u`, `v`) for the cheapest path to
  a free column, then flips the path. Optimal for finite costs (ties may pick a different but
  equally cheap assignment than scipy). Rows with `row_valid [N, n]` False are never assigned.
  The N problems advance together; index updates are one-hot selects rather than scatters
  (much faster on XLA:CPU).

  Returns `col4row [N, n]` int32, -1 for rows left unassigned.
  """
  num, n, m = cost.shape
  if n > m:
    raise ValueError(f'lsap_jax needs rows <= columns, got {cost.shape}')
  cost = cost.astype(jnp.float32)
  rows = jnp.arange(n)[None, :]
  cols = jnp.arange(m)[None, :]
  inf = jnp.float32(jnp.inf)

  def pick(x, idx):
    """x[b, idx[b]] for x [N, k], idx [N]."""
    return jnp.take_along_axis(x, idx[:, None], axis=1)[:, 0]

  def add_row(cur, state):
    u, v, col4row, row4col = state
    active = row_valid[:, cur]

    def running(s):
      sink, _, _, _, _, _, _, it = s
      return active & (sink < 0) & (it < m)

    def search_body(s):
      sink, i, min_val, spc, path, seen_rows, seen_cols, it = s
      run = running(s)
      seen_rows = seen_rows | ((rows == i[:, None]) & run[:, None])
      cost_i = jnp.take_along_axis(cost, i[:, None, None], axis=1)[:, 0]
      reduced = min_val[:, None] + cost_i - pick(u, i)[:, None] - v
      better = (~seen_cols) & (reduced < spc) & run[:, None]
      path = jnp.where(better, i[:, None], path)
      spc = jnp.where(better, reduced, spc)
      open_spc = jnp.where(seen_cols, inf, spc)
      lowest = open_spc.min(axis=1)
      candidate = (open_spc == lowest[:, None]) & ~seen_cols
      free = candidate & (row4col < 0)      # among ties, prefer a column that ends the path
      j = jnp.where(free.any(axis=1), jnp.argmax(free, axis=1), jnp.argmax(candidate, axis=1))
      seen_cols = seen_cols | ((cols == j[:, None]) & run[:, None])
      owner = pick(row4col, j)
      sink = jnp.where(run & (owner < 0), j, sink)
      i = jnp.where(run & (owner >= 0), owner, i)
      min_val = jnp.where(run, lowest, min_val)
      return sink, i, min_val, spc, path, seen_rows, seen_cols, it + run

    init = (jnp.full((num,), -1, jnp.int32), jnp.full((num,), cur, jnp.int32),
            jnp.zeros((num,), jnp.float32), jnp.full((num, m), inf),
            jnp.full((num, m), -1, jnp.int32), jnp.zeros((num, n), bool),
            jnp.zeros((num, m), bool), jnp.zeros((num,), jnp.int32))
    sink, _, min_val, spc, path, seen_rows, seen_cols, _ = lax.while_loop(
        lambda s: running(s).any(), search_body, init)
    found = sink >= 0

    # Dual update (only where a path was found; elsewhere the state is left untouched).
    other_rows = seen_rows & (rows != cur) & found[:, None]
    spc_of_row = jnp.take_along_axis(spc, jnp.maximum(col4row, 0), axis=1)
    u = u + jnp.where(other_rows, min_val[:, None] - spc_of_row, 0)
    u = u + jnp.where((rows == cur) & found[:, None], min_val[:, None], 0)
    v = v - jnp.where(seen_cols & found[:, None], min_val[:, None] - spc, 0)

    def flip_body(s):
      j, done, col4row, row4col, it = s
      i = pick(path, j)
      row4col = jnp.where((cols == j[:, None]) & ~done[:, None], i[:, None], row4col)
      j_next = pick(col4row, jnp.maximum(i, 0))
      col4row = jnp.where((rows == i[:, None]) & ~done[:, None], j[:, None], col4row)
      # A path visits each row at most once; a path through a never-set entry (-1, possible
      # only on non-finite costs) ends here instead of cycling.
      done = done | (i == cur) | (i < 0)
      return jnp.where(done, j, j_next), done, col4row, row4col, it + 1

    # At most n + 1 flips per path: the bound keeps non-finite input from looping forever.
    _, _, col4row, row4col, _ = lax.while_loop(
        lambda s: (~s[1]).any() & (s[4] <= n), flip_body,
        (jnp.maximum(sink, 0), ~found, col4row, row4col, jnp.int32(0)))
    return u, v, col4row, row4col

  state = (jnp.zeros((num, n), jnp.float32), jnp.zeros((num, m), jnp.float32),
           jnp.full((num, n), -1, jnp.int32), jnp.full((num, m), -1, jnp.int32))
  _, _, col4row, _ = lax.fori_loop(0, n, add_row, state)
  return col4row


def _assign_jax(costs, valid):
  """Pure-JAX twin of `assign_np` (same outputs up to ties) for `costs [..., B, Q, G]`."""
  q, g = costs.shape[-2:]
  if g > q:
    raise ValueError(f"matcher 'jax' needs max_gt ({g}) <= num_queries ({q})")
  lead = costs.shape[:-2]
  flat_c = jnp.swapaxes(costs, -1, -2).reshape(-1, g, q)        # rows = targets
  flat_v = jnp.broadcast_to(valid, lead + (g,)).reshape(-1, g)
  # One problem at a time: a batched search must run until its slowest problem finishes, which
  # measured 4x slower on CPU than this sequential map (benchmarks/matching.py).
  col4row = lax.map(lambda cv: lsap_jax(cv[0][None], cv[1][None])[0], (flat_c, flat_v))
  matched = col4row >= 0
  # Sort the pairs by query index (scipy's order), invalid ones last.
  key = jnp.where(matched, col4row, q + jnp.arange(g))
  order = jnp.argsort(key, axis=-1)
  src = jnp.take_along_axis(jnp.maximum(col4row, 0), order, axis=-1)
  matched = jnp.take_along_axis(matched, order, axis=-1)
  tgt = jnp.where(matched, order, 0).astype(jnp.int32)
  src = jnp.where(matched, src, 0).astype(jnp.int32)
  shape = lead + (g,)
  return src.reshape(shape), tgt.reshape(shape), matched.reshape(shape)


def finite_costs(costs):
  """`costs` with NaN -> COST_LIMIT, +-inf -> +-COST_LIMIT, and clipped to +-COST_LIMIT."""
  costs = jnp.nan_to_num(costs, nan=COST_LIMIT, posinf=COST_LIMIT, neginf=-COST_LIMIT)
  return jnp.clip(costs, -COST_LIMIT, COST_LIMIT)


def assign(costs, valid, solver='scipy'):
  """Solve every `[Q, G]` problem of `costs [..., B, Q, G]` with targets `valid [B, G]`.

  Runs per batch shard under a context mesh (`solq_jax.sharding.per_batch_shard`); the batch
  axis of the costs and of the results follows the leading (e.g. decoder-layer) axes.
  """
  solve = {'scipy': _assign_callback, 'jax': _assign_jax}.get(solver)
  if solve is None:
    raise ValueError(f'unknown matching solver {solver!r}; expected one of {SOLVERS}')
  batch_axis = costs.ndim - 3
  costs = finite_costs(lax.stop_gradient(costs))
  return sharding.per_batch_shard(solve, costs, valid,
                                  in_axes=(batch_axis, 0), out_axes=batch_axis)


def hungarian_match(pred_logits, pred_boxes, tgt_labels, tgt_boxes, tgt_valid, *,
                    cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, solver='scipy'):
  """Match the queries of every image to its targets (the official `HungarianMatcher`).

  Args:
    pred_logits: `[B, Q, C]` (or `[L, B, Q, C]`: every layer matched independently in one call).
    pred_boxes: `[B, Q, 4]` (or `[L, B, Q, 4]`) cxcywh.
    tgt_labels, tgt_boxes, tgt_valid: `[B, G]`, `[B, G, 4]`, `[B, G]` padded targets.
    cost_class, cost_bbox, cost_giou: cost weights (official 2, 5, 2).
    solver: `'scipy'` (host callback) or `'jax'` (exact, on device).

  Returns:
    `(src_idx, tgt_idx, valid)`, each `[B, G]` (or `[L, B, G]`), see the module docstring.
  """
  costs = match_cost(pred_logits, pred_boxes, tgt_labels, tgt_boxes, tgt_valid,
                     cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou)
  return assign(costs, tgt_valid, solver=solver)


def matcher_from_config(loss_config):
  """`hungarian_match` with the weights and solver of `config.loss` (`matcher`, `cost_*`)."""
  solver = {'hungarian': 'scipy', 'jax': 'jax'}.get(loss_config.matcher)
  if solver is None:
    raise ValueError(f'unknown config.loss.matcher {loss_config.matcher!r}; '
                     "expected 'hungarian' or 'jax'")
  return functools.partial(hungarian_match, cost_class=loss_config.cost_class,
                           cost_bbox=loss_config.cost_bbox, cost_giou=loss_config.cost_giou,
                           solver=solver)
