"""Run the paper's ablations (Table 3) as sets of variants, one after another, and tabulate them.

    python -m solq_jax.ablate --base configs/demo_baseline.py --vary model.mask_coder=dct,pca,flatten,sparse \\
        --steps 1500 --out runs/table3a [--set model.num_feature_levels=1] [--eval_every 300]

Every variant trains from the same seed on the same data (the base config's: the generated
dataset unless `--set data.root=/path/to/coco`) for `--steps` steps, evaluated every
`--eval_every` steps and at the end, in its own work directory `OUT/<key=value>` (train.py's:
checkpoints, metrics.jsonl, eval/). Re-running the same command skips the finished variants
and resumes an interrupted one from its newest checkpoint. Written to OUT: `table.md` (the
layout of Table 3: mask AP, AP50, AP75, APs/m/l, box AP, from the logged evaluations),
`ap_vs_step.png` (mask and box AP against the step, every variant) and `results.json`.

Several `--vary` flags give their product. PCA and sparse-coding variants without a file get
one fitted on the training split (OUT/_coders); a flatten variant gets
num_coeffs = mask_size**2 and, unless another vector loss is set, the paper's L2 + dice
(the table's notes say so).
"""
import argparse
import json
import logging
import os
import pathlib
import sys

from solq_jax.ablation import report
from solq_jax.ablation import variants as variants_lib

log = logging.getLogger('solq_jax.ablate')
DONE_FILE = 'ablation_done.json'


def train_variant(config, workdir):
  """Trains (or resumes) one variant with periodic COCO evaluation -> `Trainer.fit`'s result."""
  # pylint: disable=g-import-not-at-top
  from solq_jax.inference import evaluate
  from solq_jax.training import loop
  trainer = loop.Trainer(config)
  evaluation = evaluate.make_evaluation(config, trainer.model, trainer.coder, trainer.mesh,
                                        progress=config.train.progress_bar)
  result = trainer.fit(workdir, evaluation=evaluation)
  result['total_steps'] = trainer.total_steps
  return result


def is_done(workdir, overrides, steps) -> bool:
  path = pathlib.Path(workdir) / DONE_FILE
  if not path.exists():
    return False
  done = json.loads(path.read_text())
  return done.get('steps') == steps and done.get('overrides') == [list(o) for o in overrides]


def run(base, vary, steps, out, fixed=(), eval_every=0, train=train_variant):
  """Runs every variant not yet finished, then writes the report; returns its paths.

  `train(config, workdir)`: `train_variant` (tests may wrap it).
  """
  if steps < 1:
    raise variants_lib.OverrideError(f'--steps must be >= 1, got {steps}')
  eval_every = int(eval_every) or max(steps // 4, 1)
  out = pathlib.Path(out)
  fixed = [variants_lib.parse_override(s) for s in fixed]
  variant_list = variants_lib.parse_vary(vary)
  run_fields = [('train.total_steps', str(steps)), ('train.eval_every_steps', str(eval_every)),
                ('train.final_eval', 'True')]
  rows = []
  for variant in variant_list:
    overrides = fixed + list(variant.varied) + run_fields
    workdir = out / variant.slug
    config = variants_lib.load_config(base, overrides)
    notes = variants_lib.prepare(config, out / '_coders')
    rows.append(dict(label=variant.label, workdir=workdir, notes=notes))
    if is_done(workdir, overrides, steps):
      log.info('%s: finished earlier, skipped', variant.slug)
      continue
    log.info('%s: training %d steps in %s', variant.slug, steps, workdir)
    from solq_jax.training import loop  # pylint: disable=g-import-not-at-top
    try:
      result = train(config, workdir)
    except loop.NonFiniteLossError as e:
      notes.append(f'stopped: {str(e).split(". ")[0]}')
      log.error('%s: %s', variant.slug, e)
      continue
    if result['step'] == result['total_steps'] and result['eval'] is not None:
      (workdir / DONE_FILE).write_text(json.dumps(dict(
          steps=steps, overrides=[list(o) for o in overrides],
          summary=result['eval']['summary']), indent=1))
  keys = [k for k, _ in variant_list[0].varied]
  header = keys[0] if len(keys) == 1 else 'variant'
  paths = report.write_report(out, header, rows, steps)
  log.info('wrote %s', ', '.join(paths.values()))
  return paths


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m solq_jax.ablate',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--base', default='configs/demo_baseline.py',
                      help='config file of every variant')
  parser.add_argument('--vary', action='append', default=[], required=True,
                      help='section.field=v1,v2,... (repeat for a product)')
  parser.add_argument('--set', action='append', default=[], dest='fixed',
                      help='section.field=value applied to every variant (repeatable)')
  parser.add_argument('--steps', type=int, required=True, help='training steps per variant')
  parser.add_argument('--eval_every', type=int, default=0,
                      help='steps between evaluations (0 = steps // 4)')
  parser.add_argument('--out', required=True, help='folder of the variants and the report')
  parser.add_argument('--compilation_cache', default='.cache/jax_compilation',
                      help="JAX's persistent compilation cache ('' = off)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(name)s: %(message)s')
  logging.getLogger('solq_jax').setLevel(logging.INFO)
  import jax  # pylint: disable=g-import-not-at-top
  if args.compilation_cache and 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    jax.config.update('jax_compilation_cache_dir', args.compilation_cache)
  try:
    paths = run(args.base, args.vary, args.steps, args.out, args.fixed, args.eval_every)
  except variants_lib.OverrideError as e:
    sys.exit(f'solq_jax.ablate: {e}')
  print(pathlib.Path(paths['table']).read_text(), end='')


if __name__ == '__main__':
  main()
