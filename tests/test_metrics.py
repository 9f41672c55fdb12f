"""Console progress and metric files of the training loop."""
import io
import json

from solq_jax.training import metrics


class _Tty(io.StringIO):
  def isatty(self):
    return True


def test_progress_bar_redraws_on_a_tty_and_throttles_elsewhere(monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(metrics.time, 'time', lambda: clock[0])
  tty = _Tty()
  bar = metrics.ProgressBar(10, stream=tty)
  for step in range(1, 11):
    clock[0] += 1.0
    bar.update(step, 'total 1.0')
  bar.close()
  assert tty.getvalue().count('\r') == 10 and tty.getvalue().endswith('\n')
  assert '10/10 100.0%' in tty.getvalue() and '1.00 it/s' in tty.getvalue()
  log = io.StringIO()
  bar = metrics.ProgressBar(100, stream=log, log_interval=30.0)
  for step in range(1, 101):
    clock[0] += 1.0  # 100 s in all: lines at steps 1, 31, 61, 91 and the last
    bar.update(step)
  lines = log.getvalue().splitlines()
  assert [l.split()[1] for l in lines] == ['1/100', '31/100', '61/100', '91/100', '100/100']
  assert '\r' not in log.getvalue()


def test_metric_writer_jsonl_and_truncate(tmp_path):
  """JSONL rows per write; a resume at step 20 drops the rows a killed run wrote after it."""
  writer = metrics.MetricWriter(tmp_path)
  for step, total in ((10, 2.5), (20, 2.0), (30, 1.5)):
    writer.write(step, {'total': total, 'lr': 1e-4})
  writer.close()
  assert any((tmp_path / 'tb').iterdir())  # TensorBoard event file
  resumed = metrics.MetricWriter(tmp_path)
  resumed.truncate_after(20)
  resumed.close()
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['total'], r['split']) for r in rows] == [(10, 2.5, 'train'),
                                                                 (20, 2.0, 'train')]
