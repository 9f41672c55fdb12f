"""`python -m solq_jax.data.check --config CONFIG [--config.data.root=...]`: decodes every image
of the train and val splits (`data.train_split`, `data.val_split`) once and lists the ones that
cannot be read, before a long run meets them (exit status 1 when any is bad, 0 otherwise).

A run stops at the first bad image it loads; `--config.data.skip_bad_images=True` skips them
instead (each logged, counted).
"""
import sys
from typing import List, Tuple

from solq_jax.data import coco
from solq_jax.data import pipeline


def _source(config, split):
  """The split's source; a COCO folder is opened without its file check, so that missing files
  are listed with the undecodable ones rather than stopping at the first."""
  d = config.data
  if d.source == 'coco' and d.root:
    return coco.CocoSource(d.root, split, num_classes=config.model.num_classes,
                           check_files=False)
  return pipeline.build_source(config, split)


def bad_images(source) -> List[Tuple[int, str]]:
  """(record index, message) of every record of `source` whose image cannot be loaded."""
  bad = []
  for index in range(len(source)):
    try:
      source.load(index)
    except coco.DataError as e:
      bad.append((index, str(e)))
  return bad


def check(config, splits) -> int:
  """Prints each bad image of `splits` and a summary line per split; returns the bad count."""
  total = 0
  for split in splits:
    source = _source(config, split)
    bad = bad_images(source)
    for _, message in bad:
      print(f'{split}: {message}')
    print(f'{split}: {len(source)} image(s) checked, {len(bad)} bad')
    total += len(bad)
  return total


def main(argv=None) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from solq_jax import cli  # pylint: disable=g-import-not-at-top
  argv = ['solq_jax.data.check'] + list(sys.argv[1:] if argv is None else argv)
  fv = flags.FlagValues()   # private: importing this module registers no global flags
  config_flag = config_flags.DEFINE_config_file(
      'config', None, 'experiment config file', flag_values=fv, sys_argv=argv)
  flags.mark_flag_as_required('config', flag_values=fv)
  cli.parse_flags(argv, fv)
  config = config_flag.value
  splits = list(dict.fromkeys([config.data.train_split, config.data.val_split]))
  try:
    bad = check(config, splits)
  except coco.DataError as e:
    print(f'solq_jax.data.check: {e}', file=sys.stderr)
    sys.exit(2)
  sys.exit(1 if bad else 0)


if __name__ == '__main__':
  main()
