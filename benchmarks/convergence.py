"""AP against training time: trains each variant of a base config (one train.py process each,
evaluated every `--eval_every` steps), then tabulates box and mask AP at the same wall-clock
budget and draws AP against minutes of training.

  python benchmarks/convergence.py --base configs/demo_baseline.py --steps 2400 --eval_every 400 \\
      --variant 'baseline=' --variant 'hybrid=model.one_to_many_queries=60' \\
      --budget_s 600 --out runs/convergence --png docs/convergence_demo.png

`--variant LABEL=field=value;field=value` (empty after the first '=': the base config as is);
`config=FILE` among them trains that config file instead of `--base`, and `train.total_steps`
or `train.eval_every_steps` among them replace `--steps` / `--eval_every` for that variant.
A variant whose work directory already holds its final evaluation is not trained again (so the
command can be re-run to redraw, or to add variants); `--report_only` trains nothing.

The clock is the loop's `train_seconds` (logged with every evaluation): seconds since the first
step began, compilation included, evaluations excluded. Process start-up, the generated dataset
and the evaluation are the same for every variant and are left out. Each variant's AP at the
budget is that of its last evaluation inside the budget.
"""
import argparse
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from solq_jax.ablation import chart  # pylint: disable=g-import-not-at-top,wrong-import-position
from solq_jax.ablation import report  # pylint: disable=g-import-not-at-top,wrong-import-position
from solq_jax.ablation import variants as variants_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_variant(text):
  """'label=a.b=1;c.d=2' -> ('label', [('a.b', '1'), ('c.d', '2')]); 'config=FILE' is kept as
  ('config', 'FILE')."""
  label, sep, rest = text.partition('=')
  if not sep or not label:
    raise SystemExit(f'--variant {text!r}: expected LABEL=field=value;... (LABEL= for the base)')
  overrides = []
  for item in filter(None, (s.strip() for s in rest.split(';'))):
    if item.startswith('config='):
      overrides.append(('config', item[len('config='):]))
      continue
    try:
      overrides.append(variants_lib.parse_override(item))
    except variants_lib.OverrideError as e:
      raise SystemExit(f'--variant {text!r}: {e}') from e
  return label, overrides


def slug(label):
  return re.sub(r'[^\w.-]+', '_', label).strip('_') or 'variant'


def evaluations(workdir):
  """[(train_seconds, step, summary), ...] of the evaluations logged in workdir/metrics.jsonl
  that carry the clock (the last record of a step wins), in time order."""
  return sorted((summary['train_seconds'], step, summary)
                for step, summary in report.eval_history(workdir).items()
                if 'train_seconds' in summary)


def run_settings(overrides, base, steps, eval_every):
  """(config file, steps, eval_every, the other overrides) of one variant."""
  settings = dict(overrides)
  rest = [(f, v) for f, v in overrides
          if f not in ('config', 'train.total_steps', 'train.eval_every_steps')]
  try:
    return (settings.get('config', base), int(settings.get('train.total_steps', steps)),
            int(settings.get('train.eval_every_steps', eval_every)), rest)
  except ValueError as e:
    raise SystemExit(f'--variant: {e}') from e


def train(base, overrides, workdir, steps, eval_every):
  cmd = [sys.executable, str(REPO / 'train.py'), f'--config={base}', f'--workdir={workdir}',
         f'--config.train.total_steps={steps}', f'--config.train.eval_every_steps={eval_every}',
         '--config.train.progress_bar=false']
  cmd += [f'--config.{field}={value}' for field, value in overrides]
  print(' '.join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=REPO)


def at_budget(evals, budget_s):
  """The last evaluation inside the budget -> (seconds, step, summary) or None."""
  inside = [e for e in evals if e[0] <= budget_s]
  return inside[-1] if inside else None


def fmt(value):
  return '-' if value is None or value < 0 else f'{value:.3f}'


def table(rows, budget_s):
  lines = [f'| variant | step reached in {budget_s / 60:g} min | box AP | mask AP | '
           'final step: box AP | mask AP | its minutes |', '|---|---:|---:|---:|---:|---:|---:|']
  for label, evals in rows:
    hit = at_budget(evals, budget_s)
    last = evals[-1] if evals else None
    cells = ([str(hit[1]), fmt(hit[2].get('bbox/AP')), fmt(hit[2].get('segm/AP'))] if hit
             else ['-', '-', '-'])
    cells += ([fmt(last[2].get('bbox/AP')), fmt(last[2].get('segm/AP')), f'{last[0] / 60:.1f}']
              if last else ['-', '-', '-'])
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def draw(path, rows, budget_s):
  panels = []
  for title, key in (('mask AP', 'segm/AP'), ('box AP', 'bbox/AP')):
    series = [(label, [(0.0, 0.0)] + [(t / 60, r[key]) for t, _, r in evals if key in r])
              for label, evals in rows]
    panels.append((f'{title} against training time (budget {budget_s / 60:g} min)', series, title))
  chart.save_chart(path, panels, x_label='minutes of training (compile included)')


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--base', default='configs/demo_baseline.py')
  p.add_argument('--variant', action='append', required=True, help='LABEL=field=value;...')
  p.add_argument('--steps', type=int, required=True, help='training steps per variant')
  p.add_argument('--eval_every', type=int, required=True)
  p.add_argument('--budget_s', type=float, required=True, help='the wall-clock budget compared')
  p.add_argument('--out', default='runs/convergence')
  p.add_argument('--png', default='', help='chart path (default OUT/ap_vs_time.png)')
  p.add_argument('--report_only', action='store_true', help='train nothing; tabulate and draw')
  args = p.parse_args()
  variants = [parse_variant(v) for v in args.variant]
  out = pathlib.Path(args.out)
  rows = []
  for label, overrides in variants:
    workdir = out / slug(label)
    evals = evaluations(workdir)
    config, steps, eval_every, rest = run_settings(overrides, args.base, args.steps,
                                                   args.eval_every)
    if not args.report_only and not any(step == steps for _, step, _ in evals):
      train(config, rest, workdir, steps, eval_every)
      evals = evaluations(workdir)
    rows.append((label, evals))
  out.mkdir(parents=True, exist_ok=True)
  text = table(rows, args.budget_s)
  (out / 'table.md').write_text(text)
  draw(args.png or out / 'ap_vs_time.png', rows, args.budget_s)
  print(text, end='')


if __name__ == '__main__':
  main()
