"""An ablation's results: the evaluations each variant's training logged (`metrics.jsonl`,
split 'eval'), a markdown table in the layout of the paper's Table 3, and AP-vs-step charts."""
import json
import pathlib
from typing import Dict, List, Sequence

from solq_jax.ablation import chart

# Table 3's columns: mask AP and its breakdown, then box AP.
COLUMNS = (('AP', 'segm/AP'), ('AP50', 'segm/AP50'), ('AP75', 'segm/AP75'), ('APs', 'segm/APs'),
           ('APm', 'segm/APm'), ('APl', 'segm/APl'), ('AP box', 'bbox/AP'))


def eval_history(workdir) -> Dict[int, Dict[str, float]]:
  """`{step: summary}` of the evaluations logged in `workdir/metrics.jsonl` (the last record of
  a step wins: a resumed run re-evaluates a step whose record an interruption left behind)."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  history = {}
  if path.exists():
    for line in path.read_text().splitlines():
      if line.strip():
        record = json.loads(line)
        if record.get('split') == 'eval':
          history[int(record['step'])] = {k: v for k, v in record.items()
                                          if k not in ('step', 'split')}
  return history


def format_value(value) -> str:
  """AP as the paper prints it (x100, one decimal); '-' where there is none (no masks, or
  COCOeval's -1 for an area range without ground truth)."""
  if value is None or value < 0:
    return '-'
  return f'{100 * value:.1f}'


def markdown_table(header: str, rows: Sequence[tuple], steps: int, notes: Sequence[str]) -> str:
  """`rows` = [(label, final summary or None), ...] -> the markdown of the table."""
  lines = [f'| {header} | ' + ' | '.join(name for name, _ in COLUMNS) + ' |',
           '| --- |' + ' ---: |' * len(COLUMNS)]
  for label, summary in rows:
    cells = ([format_value(summary.get(key)) for _, key in COLUMNS] if summary is not None
             else ['not run'] * len(COLUMNS))
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  lines.append('')
  lines.append(f'COCO AP (x100) of each variant after {steps} steps, from the evaluation its '
               'training logged (metrics.jsonl); mask AP columns, then box AP.')
  lines.extend(f'- {n}' for n in notes)
  return '\n'.join(lines) + '\n'


def write_report(out_dir, header: str, variants: List[dict], steps: int) -> Dict[str, str]:
  """Writes `table.md`, `ap_vs_step.png` and `results.json` to `out_dir`.

  `variants`: [{'label', 'workdir', 'notes'}, ...]; the final row of each variant is its
  evaluation at `steps`. Returns the written paths by kind.
  """
  out_dir = pathlib.Path(out_dir)
  rows, results, notes, segm_series, box_series = [], [], [], [], []
  for v in variants:
    history = eval_history(v['workdir'])
    final = history.get(steps)
    rows.append((v['label'], final))
    notes.extend(f'{v["label"]}: {n}' for n in v['notes'])
    results.append(dict(label=v['label'], workdir=str(v['workdir']), final=final,
                        history={str(s): h for s, h in sorted(history.items())}))
    steps_sorted = sorted(history)
    segm_series.append((v['label'], [(s, history[s]['segm/AP']) for s in steps_sorted
                                     if 'segm/AP' in history[s]]))
    box_series.append((v['label'], [(s, history[s]['bbox/AP']) for s in steps_sorted
                                    if 'bbox/AP' in history[s]]))
  paths = dict(table=str(out_dir / 'table.md'), chart=str(out_dir / 'ap_vs_step.png'),
               results=str(out_dir / 'results.json'))
  pathlib.Path(paths['table']).write_text(markdown_table(header, rows, steps, notes))
  chart.save_chart(paths['chart'], [('mask AP', segm_series, 'AP'),
                                    ('box AP', box_series, 'AP')])
  pathlib.Path(paths['results']).write_text(json.dumps(dict(steps=steps, variants=results),
                                                       indent=1))
  return paths
