"""Command-line helpers of the entry points (train.py, eval.py, predict.py, `python -m
solq_jax.weights`): a bad flag or config override ends in one line on stderr and exit status 2.

ml_collections reports an unknown `--config.a.b` field as an AttributeError raised from deep
inside absl's flag parsing (a 50-line traceback before the useful "Did you mean"); absl's own
flag errors are already short but name the flag in its raw `--flag=value` form. Both become
`config.train.batch_sise: no such field; did you mean batch_size?`-style lines here.
"""
import re
import sys
from typing import Callable, List, Optional, Sequence

from absl import flags

USAGE_ERROR = 2   # the conventional exit status of a command-line usage error


def _config_overrides(argv: Sequence[str]) -> List[str]:
  """The dotted paths of the `--config.x.y[=v]` arguments, in order."""
  paths = []
  for arg in argv[1:]:
    m = re.match(r'--?(\w+(?:\.\w+)+)(?:=|$)', arg)
    if m:
      paths.append(m.group(1))
  return paths


def describe_error(error: BaseException, argv: Sequence[str]) -> str:
  """One line naming the flag or config field of a parsing error."""
  text = str(error).strip()
  if isinstance(error, (AttributeError, KeyError)):
    # ml_collections: "'batch_sise'\nDid you mean "batch_size" instead of "batch_sise"?"
    text = text.strip('"\'').encode().decode('unicode_escape')
    name = re.match(r"['\"]?([\w.]+)", text)
    name = name.group(1) if name else text
    hint = re.search(r'Did you mean "([^"]+)"', text)
    suggestion = f'; did you mean {hint.group(1)}?' if hint else ''
    for path in _config_overrides(argv):
      parts = path.split('.')
      if name in parts:
        field = '.'.join(parts[:parts.index(name) + 1])
        return f'{field}: no such field{suggestion}'
    return f'{name}: no such field{suggestion}'
  m = re.match(r'flag --?([\w.]+)=(.*?): (.*)', text, re.S)
  if m:
    return f'{m.group(1)}: bad value {m.group(2)!r}: {m.group(3).splitlines()[0]}'
  return text.splitlines()[0] if text else type(error).__name__


def parse_flags(argv: Sequence[str], flag_values: Optional[flags.FlagValues] = None) -> list:
  """`flag_values(argv)` (default: the global FLAGS); a bad flag or config override prints one
  line to stderr and exits with status 2."""
  flag_values = flags.FLAGS if flag_values is None else flag_values
  prog = argv[0].rsplit('/', 1)[-1] if argv else 'solq_jax'
  try:
    rest = flag_values(list(argv))
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, ImportError,
          OSError, SyntaxError) as e:
    print(f'{prog}: {describe_error(e, argv)}', file=sys.stderr)
    sys.exit(USAGE_ERROR)
  # A config file that fails to load is reported lazily, at its first use; load it now.
  from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top
  for name in list(flag_values):
    flag = flag_values[name]
    if isinstance(flag.parser, config_flags.ConfigFileFlagParser) and flag.value is not None:
      try:
        getattr(flag.value, 'keys')
      except (OSError, ImportError, SyntaxError, AttributeError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        print(f'{prog}: --{name}: {lines[-1] if lines else type(e).__name__}', file=sys.stderr)
        sys.exit(USAGE_ERROR)
  return rest


def run(main: Callable) -> None:
  """`absl.app.run(main)` with the one-line flag errors of `parse_flags`."""
  from absl import app  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=parse_flags)


def exit_with(error: BaseException, status: int = 1) -> None:
  """Ends an entry point on an expected failure (a corrupt checkpoint, a locked work directory,
  a diverged run): its message as one line on stderr; the traceback only with --verbosity=1."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  if logging.get_verbosity() >= logging.DEBUG:
    logging.exception('traceback of the error below')
  else:
    logging.flush()
  print(f'{type(error).__name__}: {error} (--verbosity=1 shows the traceback)', file=sys.stderr)
  sys.exit(status)
