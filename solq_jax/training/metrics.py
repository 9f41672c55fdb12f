"""Train metrics: TensorBoard event files (tensorboardX), a JSONL log, and a console progress bar."""
import json
import math
import pathlib
import sys
import time
from typing import Dict, Mapping

import numpy as np


def to_floats(metrics: Mapping) -> Dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


def nonfinite(metrics: Mapping[str, float]) -> Dict[str, float]:
  """The loss terms and the gradient norm that are NaN or inf."""
  return {k: v for k, v in metrics.items() if k.startswith(('loss', 'total', 'grad_norm')) and
          not math.isfinite(v)}


class MetricWriter:
  """Writes scalars to `workdir/tb` (TensorBoard) and `workdir/metrics.jsonl` (one dict per line)."""

  def __init__(self, workdir, enabled: bool = True):
    self.enabled = enabled
    self.jsonl_path = pathlib.Path(workdir) / 'metrics.jsonl'
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / 'tb'))

  def truncate_after(self, step: int) -> None:
    """Drops JSONL records of steps after `step` (written by a run that died before saving them)."""
    if not self.enabled or not self.jsonl_path.exists():
      return
    kept = [line for line in self.jsonl_path.read_text().splitlines()
            if line.strip() and json.loads(line).get('step', 0) <= step]
    self.jsonl_path.write_text(''.join(line + '\n' for line in kept))

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = 'train') -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'split': prefix}
    for k, v in scalars.items():
      self._tb.add_scalar(f'{prefix}/{k}', float(v), int(step))
      record[k] = float(v)
    with open(self.jsonl_path, 'a') as f:
      f.write(json.dumps(record) + '\n')

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _hms(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class ProgressBar:
  """One console line `[#####.....] step/total  it/s  ETA  loss`, redrawn in place on a tty;
  elsewhere (a log file, CI) a new line at most every `log_interval` seconds and at the end."""

  def __init__(self, total: int, start: int = 0, stream=None, width: int = 24,
               enabled: bool = True, log_interval: float = 30.0):
    self.total, self.start = total, start
    self.stream = stream or sys.stderr
    self.width, self.enabled = width, enabled
    self.t0 = time.time()
    self._tty = hasattr(self.stream, 'isatty') and self.stream.isatty()
    self.log_interval = log_interval
    self._last_line = -math.inf

  def line(self, step: int, info: str = '') -> str:
    done = step - self.start
    elapsed = time.time() - self.t0
    rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float('nan')
    frac = step / max(self.total, 1)
    fill = int(round(frac * self.width))
    eta_s = _hms(eta) if math.isfinite(eta) else '?'
    return (f'[{"#" * fill}{"." * (self.width - fill)}] {step}/{self.total} {100 * frac:5.1f}% '
            f'{rate:.2f} it/s elapsed {_hms(elapsed)} ETA {eta_s} {info}')

  def update(self, step: int, info: str = '') -> None:
    if not self.enabled:
      return
    if not self._tty:
      now = time.time()
      if step < self.total and now - self._last_line < self.log_interval:
        return
      self._last_line = now
    end = '' if self._tty else '\n'
    self.stream.write(('\r' if self._tty else '') + self.line(step, info) + end)
    self.stream.flush()

  def close(self) -> None:
    if self.enabled and self._tty:
      self.stream.write('\n')
      self.stream.flush()


def format_losses(m: Mapping[str, float], keys=('total', 'loss_ce', 'loss_bbox', 'loss_giou',
                                                 'loss_vector')) -> str:
  return ' '.join(f'{k.replace("loss_", "")} {m[k]:.4f}' for k in keys if k in m)

