"""The extra query sets of one model (hybrid matching's one-to-many queries and Group DETR's
groups): each set's outputs do not depend on any other set's queries (self-attention masks),
and inference runs the one-to-one set alone with the same values."""
import jax
import numpy as np
import pytest

from query_set_helpers import (apply_fn, build, micro_batch, micro_config, query_arrays,
                               with_param)
from solq_jax.models import query_sets

O2M, GROUPS = 'one_to_many_outputs', 'group_outputs'


def test_block_attention_mask():
  mask = query_sets.block_attention_mask([2, 1, 3], visible=[(2, 0)])
  want = np.zeros((6, 6), bool)
  want[:2, :2] = want[2, 2] = want[3:, 3:] = want[3:, :2] = True
  np.testing.assert_array_equal(mask, want)


@pytest.mark.timeout(900)
def test_query_sets_do_not_see_each_other():
  config = micro_config(one_to_many_queries=12, query_groups=3)
  model, variables = build(config)
  batch = micro_batch(config)
  run = apply_fn(model)
  out = run(variables, batch)
  sets = lambda o: [o, o[O2M]] + list(o[GROUPS])
  assert [s['pred_logits'].shape[1] for s in sets(out)] == [10, 12, 10, 10]
  assert all(len(s['aux_outputs']) == 1 for s in sets(out))
  # Perturbing one set's queries changes that set only; every other set's outputs (every
  # decoder layer) stay bit for bit.
  second_group = lambda e: e.at[10:].add(1.0)      # rows of group 2 (group 1 is rows 0..9)
  perturbed = {0: with_param(variables, 'query_embed', lambda e: -e),
               1: with_param(variables, 'query_embed_one_to_many', lambda e: e + 1.0),
               3: with_param(variables, 'query_embed_groups', second_group)}
  for moved, changed in perturbed.items():
    new = sets(run(changed, batch))
    for index, (got, want) in enumerate(zip(new, sets(out))):
      if index == moved:
        assert not np.allclose(got['pred_logits'], want['pred_logits'])
      else:
        for a, b in zip(query_arrays(got), query_arrays(want)):
          np.testing.assert_array_equal(a, b)
  # Inference runs the one-to-one set alone, with the same values.
  evaluated = jax.jit(lambda v: model.apply(v, batch['images'], batch['pad_mask']))(variables)
  assert set(evaluated) == {'pred_logits', 'pred_boxes', 'pred_vectors', 'aux_outputs'}
  for got, want in zip(query_arrays(evaluated), query_arrays(out)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_counts_are_named():
  with pytest.raises(ValueError, match='one_to_many_queries'):
    build(micro_config(one_to_many_queries=-3))
  with pytest.raises(ValueError, match='query_groups'):
    build(micro_config(query_groups=0))
