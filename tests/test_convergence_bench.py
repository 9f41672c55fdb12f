"""`benchmarks/convergence.py`: variants parsed, AP read at the wall-clock budget from the logged
evaluations, the table and the AP-against-time chart (no training: the logs are written here)."""
import importlib.util
import json
import pathlib

import pytest
from PIL import Image

from solq_jax.ablation import chart

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks' / 'convergence.py'


@pytest.fixture(scope='module')
def conv():
  spec = importlib.util.spec_from_file_location('convergence_bench', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _write_log(workdir, evals, train_records=3):
  workdir.mkdir(parents=True)
  lines = [dict(step=s, split='train', total=1.0, train_seconds=s * 0.5)
           for s in range(1, train_records + 1)]
  lines += [dict(step=step, split='eval', train_seconds=sec, **{'bbox/AP': box, 'segm/AP': mask})
            for step, sec, box, mask in evals]
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))


def test_variants_parse_and_bad_ones_are_named(conv):
  assert conv.parse_variant('baseline=') == ('baseline', [])
  assert conv.parse_variant('dn+ema=model.dn_groups=5; train.ema_decay=0.999') == (
      'dn+ema', [('model.dn_groups', '5'), ('train.ema_decay', '0.999')])
  assert conv.slug('dn+ema x2') == 'dn_ema_x2'
  for bad in ('nolabel', '=model.dn_groups=5', 'x=model.dn_groups', 'x=1bad=2'):
    with pytest.raises(SystemExit, match='--variant'):
      conv.parse_variant(bad)


def test_ap_at_budget_is_the_last_evaluation_inside_it(conv, tmp_path):
  # Logged out of order and with a repeated step (a re-evaluation: the last record wins).
  _write_log(tmp_path / 'a', [(300, 200.0, 0.2, 0.1), (100, 70.0, 0.05, 0.02),
                              (200, 130.0, 0.1, 0.05), (200, 140.0, 0.11, 0.06)])
  _write_log(tmp_path / 'b', [(100, 400.0, 0.3, 0.2)])
  evals = conv.evaluations(tmp_path / 'a')
  assert [(s, step) for s, step, _ in evals] == [(70.0, 100), (140.0, 200), (200.0, 300)]
  assert conv.at_budget(evals, 150.0)[1] == 200
  assert conv.at_budget(evals, 69.0) is None
  assert conv.at_budget(evals, 200.0)[1] == 300         # the budget's edge counts
  rows = [('a', evals), ('b', conv.evaluations(tmp_path / 'b')), ('c', [])]
  lines = conv.table(rows, 150.0).splitlines()
  assert lines[0].startswith('| variant | step reached in 2.5 min |')
  assert lines[2] == '| a | 200 | 0.110 | 0.060 | 0.200 | 0.100 | 3.3 |'
  assert lines[3] == '| b | - | - | - | 0.300 | 0.200 | 6.7 |'
  assert lines[4] == '| c | - | - | - | - | - | - |'


def test_chart_has_both_panels(conv, tmp_path):
  _write_log(tmp_path / 'a', [(100, 60.0, 0.05, 0.02), (200, 120.0, 0.1, 0.05)])
  path = tmp_path / 'ap.png'
  conv.draw(path, [('a', conv.evaluations(tmp_path / 'a')), ('empty', [])], 120.0)
  image = Image.open(path)
  assert image.size == (2 * chart.PANEL_W, chart.PANEL_H)
  # The series' colour is drawn in each panel (line and markers), not only in the legend.
  first = chart.PALETTE[0]
  for x0 in (0, chart.PANEL_W):
    pixels = [image.getpixel((x, y)) for x in range(x0 + chart.MARGIN_L + 40, x0 + chart.PANEL_W)
              for y in range(chart.MARGIN_T + 40, chart.PANEL_H - chart.MARGIN_B)]
    assert first in pixels


def test_a_variant_may_name_its_config_file_and_length(conv):
  _, overrides = conv.parse_variant(
      'recipe=config=configs/demo.py;train.total_steps=4000;model.dn_groups=3')
  assert conv.run_settings(overrides, 'configs/demo_baseline.py', 1400, 350) == (
      'configs/demo.py', 4000, 350, [('model.dn_groups', '3')])
  assert conv.run_settings([], 'base.py', 10, 5) == ('base.py', 10, 5, [])
  with pytest.raises(SystemExit, match='--variant'):
    conv.run_settings([('train.total_steps', 'many')], 'base.py', 10, 5)
