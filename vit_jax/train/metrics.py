"""Where metrics go: TensorBoard, WORKDIR/metrics.jsonl and a console progress line.

Only process 0 writes. metrics.jsonl holds one JSON object per line with `step` and the
metrics by name, readable without TensorFlow:

    import json; rows = [json.loads(l) for l in open('WORKDIR/metrics.jsonl')]
"""

import json
import math
import sys
import time

from etils import epath
import numpy as np


def _finite(value):
  value = float(value)
  return value if math.isfinite(value) else str(value)


class MetricsWriter:
  """Writes scalars to TensorBoard and metrics.jsonl (process 0 only)."""

  def __init__(self, workdir, *, enabled: bool = True):
    self.enabled = enabled
    self._path = epath.Path(workdir) / 'metrics.jsonl'
    self._tb = None
    if enabled:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._tb = tf.summary.create_file_writer(str(epath.Path(workdir) / 'tensorboard'))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {'step': int(step)}
    row.update({k: _finite(v) for k, v in metrics.items() if v is not None})
    with self._path.open('a') as f:
      f.write(json.dumps(row) + '\n')
    with self._tb.as_default(step=int(step)):
      for k, v in metrics.items():
        if v is not None and np.isfinite(float(v)):
          self._tf.summary.scalar(k, float(v))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class Progress:
  """Console line: step/total, loss, images/s and ETA, every call to `report`."""

  def __init__(self, total_steps: int, global_batch_size: int, start_step: int,
               *, enabled: bool = True, stream=sys.stdout):
    self.total = total_steps
    self.batch = global_batch_size
    self.enabled = enabled
    self.stream = stream
    self._t0 = time.perf_counter()
    self._last_t = self._t0
    self._last_step = start_step
    self.last_window_s = 0.0

  def rate(self, step: int) -> tuple[float, float]:
    """(images/s since the last call, seconds per step); resets the window."""
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    dt = max(now - self._last_t, 1e-9)
    self._last_t, self._last_step = now, step
    self.last_window_s = dt
    return steps * self.batch / dt, dt / steps

  def report(self, step: int, images_per_sec: float, sec_per_step: float,
             metrics: dict) -> None:
    if not self.enabled:
      return
    eta = (self.total - step) * sec_per_step
    h, rem = divmod(int(eta), 3600)
    parts = [f'step {step}/{self.total}']
    parts += [f'{k} {float(v):.4g}' for k, v in metrics.items()]
    parts += [f'{images_per_sec:,.1f} img/s', f'ETA {h}:{rem // 60:02d}:{rem % 60:02d}']
    print(' | '.join(parts), file=self.stream, flush=True)
