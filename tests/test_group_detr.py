"""Group DETR's criterion: every extra group gets the one-to-one terms of its own matching
(against the numpy criterion), summed into the total. (The attention masks:
tests/test_query_sets.py; 8 devices: tests/test_hybrid_matching.py.)"""
import numpy as np

from solq_jax import losses
from test_losses import make_batch, make_config, np_criterion


def test_group_terms_equal_the_numpy_criterion_per_group(tiny_config):
  outputs, targets = make_batch(7)
  groups = [make_batch(8 + g)[0] for g in range(2)]     # same targets, other predictions
  config = make_config(tiny_config, one_to_many_weight=3.0)   # no one-to-many outputs here
  got = losses.criterion_from_config(config.loss)(dict(outputs, group_outputs=groups), targets)
  total = 0.0
  for suffix, out in [('', outputs), ('_group1', groups[0]), ('_group2', groups[1])]:
    want = np_criterion(out, targets, config.loss)
    for key, value in want.items():
      if key != 'total':
        np.testing.assert_allclose(float(got[key + suffix]), value, rtol=1e-5, err_msg=key)
    total += want['total']
  np.testing.assert_allclose(float(got['total']), total, rtol=1e-5)
  assert len(got) == 3 * 12 + 1                          # 3 layers x 4 terms per group
