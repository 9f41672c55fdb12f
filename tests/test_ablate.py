"""The ablation runner end to end on the micro config: two variants (SOLQ and detection only,
both with the single C5 feature level of the paper's ablations), an interrupted first run, the
resume, the skip of finished variants, and the report's numbers against the logged ones."""
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from solq_jax import ablate
from solq_jax.ablation import chart
from solq_jax.ablation import report
from solq_jax.ablation import variants

MICRO = str(pathlib.Path(__file__).resolve().parent / 'train_micro_config.py')


def test_vary_product_labels_and_slugs():
  got = variants.parse_vary(['model.mask_coder=dct,pca', 'loss.vector_loss_scale=1,3'])
  assert [v.varied for v in got] == [
      (('model.mask_coder', 'dct'), ('loss.vector_loss_scale', '1')),
      (('model.mask_coder', 'dct'), ('loss.vector_loss_scale', '3')),
      (('model.mask_coder', 'pca'), ('loss.vector_loss_scale', '1')),
      (('model.mask_coder', 'pca'), ('loss.vector_loss_scale', '3'))]
  assert got[1].label == 'mask_coder=dct, vector_loss_scale=3'
  assert got[1].slug == 'model.mask_coder=dct__loss.vector_loss_scale=3'
  tuples = variants.parse_vary(['data.train_scales=(64, 80);(96,)'])
  assert [v.varied[0][1] for v in tuples] == ['(64, 80)', '(96,)']
  assert variants.load_config(MICRO, tuples[0].varied).data.train_scales == (64, 80)
  for bad in (['model.mask_coder'], ['mask_coder=dct'], ['model.mask_coder=dct,']):
    with pytest.raises(variants.OverrideError):
      variants.parse_vary(bad)
  with pytest.raises(variants.OverrideError, match='mask_codr'):
    variants.load_config(MICRO, [('model.mask_codr', 'dct')])


def test_prepare_sizes_flatten_and_fits_coder_files(tmp_path):
  config = variants.load_config(MICRO, [('model.mask_coder', 'flatten'), ('model.mask_size', '8')])
  notes = variants.prepare(config, tmp_path)
  assert config.model.num_coeffs == 64 and 'mask_size**2' in notes[0]
  assert config.loss.vector_loss == 'l2+dice' and 'l2+dice' in notes[1]
  config = variants.load_config(MICRO, [('model.mask_coder', 'sparse'), ('model.mask_size', '8'),
                                        ('model.num_coeffs', '6')])
  variants.prepare(config, tmp_path, max_instances=40)
  from solq_jax import masks
  coder = masks.build_coder(config.model)
  assert (coder.mask_size, coder.num_coeffs) == (8, 6)
  assert pathlib.Path(config.model.sparse_path).parent == tmp_path


def test_chart_draws_every_series(tmp_path):
  path = tmp_path / 'c.png'
  chart.save_chart(path, [('AP', [('a', [(0, 0.0), (10, 0.2)]), ('b', [(5, 0.1)])], 'AP')])
  pixels = np.asarray(Image.open(path).convert('RGB')).reshape(-1, 3)
  for color in chart.PALETTE[:2]:
    assert (pixels == color).all(1).sum() > 20
  assert chart.nice_ticks(0.153) == pytest.approx([0, 0.05, 0.1, 0.15, 0.2])


def _table_rows(text):
  rows = {}
  for line in text.splitlines()[2:]:
    if not line.startswith('|'):
      break
    cells = [c.strip() for c in line.strip('|').split('|')]
    rows[cells[0]] = cells[1:]
  return rows


def _logged_evals(workdir):
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: r for r in records if r['split'] == 'eval'}


def test_report_numbers_are_the_logged_ones(tmp_path):
  """The table and results.json hold each variant's final logged evaluation (x100, one
  decimal; '-' for no masks or COCOeval's -1); earlier evaluations only feed the chart."""
  logged = {'a': {3: {'bbox/AP': 0.1234, 'segm/AP': 0.0567, 'segm/AP50': 0.2, 'segm/AP75': 0.01,
                      'segm/APs': -1.0, 'segm/APm': 0.3, 'segm/APl': 0.44449},
                  6: {'bbox/AP': 0.25, 'segm/AP': 0.125, 'segm/AP50': 0.5, 'segm/AP75': 0.0625,
                      'segm/APs': -1.0, 'segm/APm': 0.333, 'segm/APl': 0.41}},
            'b': {6: {'bbox/AP': 0.3}}}
  rows = []
  for name, evals in logged.items():
    workdir = tmp_path / name
    workdir.mkdir()
    lines = [dict(step=s, split='eval', **m) for s, m in evals.items()]
    lines.insert(1, dict(step=4, split='train', total=1.0))
    (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))
    rows.append(dict(label=name, workdir=workdir, notes=['a note'] if name == 'b' else []))
  rows.append(dict(label='c', workdir=tmp_path / 'never', notes=[]))
  paths = report.write_report(tmp_path, 'model.mask_coder', rows, 6)
  text = pathlib.Path(paths['table']).read_text()
  assert text.splitlines()[0].startswith('| model.mask_coder | AP | AP50 |')
  table = _table_rows(text)
  assert table['a'] == ['12.5', '50.0', '6.2', '-', '33.3', '41.0', '25.0']
  assert table['b'] == ['-'] * 6 + ['30.0']
  assert table['c'] == ['not run'] * 7
  assert '- b: a note' in text
  results = json.loads(pathlib.Path(paths['results']).read_text())
  assert results['variants'][0]['final'] == logged['a'][6]
  assert sorted(results['variants'][0]['history']) == ['3', '6']
  assert Image.open(paths['chart']).size == (2 * chart.PANEL_W, chart.PANEL_H)


def test_runner_interrupt_resume_skip_and_table(tmp_path):
  """Detection only with the single C5 level: two variants of the same programs (one compile),
  the second interrupted after step 1 and resumed by the next invocation, which skips the
  first; the table's box AP is the logged final evaluation."""
  out = tmp_path / 'table'
  vary = ['data.flip_prob=0.5,0']
  # Kept cheap: one device, one padded shape, no backward pass through the (frozen) backbone.
  fixed = ['model.with_masks=False', 'model.num_feature_levels=1', 'train.progress_bar=False',
           'train.num_devices=1', 'data.bucket_sizes=(96,)', 'data.synthetic_val_images=4',
           'model.backbone_frozen_stages=4']
  calls = []

  def train(config, workdir, interrupt=False):
    ckpt = workdir / 'checkpoints'
    steps = sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []
    if interrupt and workdir.name.endswith('=0'):
      config.train.stop_at_step = 1
    result = ablate.train_variant(config, workdir)
    calls.append((workdir.name, steps, len(result['history'])))
    return result

  ablate.run(MICRO, vary, 2, out, fixed, eval_every=1,
             train=lambda c, w: train(c, w, interrupt=True))
  assert calls == [('data.flip_prob=0.5', [], 2), ('data.flip_prob=0', [], 1)]
  assert [p.parent.name for p in out.glob(f'*/{ablate.DONE_FILE}')] == ['data.flip_prob=0.5']
  calls.clear()
  paths = ablate.run(MICRO, vary, 2, out, fixed, eval_every=1, train=train)
  assert calls == [('data.flip_prob=0', ['1'], 1)]     # resumed from step 1; the other skipped
  calls.clear()
  ablate.run(MICRO, vary, 2, out, fixed, eval_every=1, train=train)
  assert calls == []

  table = _table_rows(pathlib.Path(paths['table']).read_text())
  for label in ('0.5', '0'):
    evals = _logged_evals(out / f'data.flip_prob={label}')
    assert sorted(evals) == [1, 2]
    assert not any(k.startswith('segm') for k in evals[2])    # bbox-only evaluation
    assert table[label] == ['-'] * 6 + [f'{100 * evals[2]["bbox/AP"]:.1f}']
  # The clock of AP-against-time charts: training seconds (evaluation excluded) at each
  # evaluation, growing with the step within one uninterrupted call.
  evals = _logged_evals(out / 'data.flip_prob=0.5')
  assert 0 < evals[1]['train_seconds'] < evals[2]['train_seconds']
