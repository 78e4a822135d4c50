"""Where metrics go: TensorBoard, WORKDIR/metrics.jsonl and a console progress line.

Only process 0 writes. metrics.jsonl holds one JSON object per line with `step` and the
metrics by name, readable without TensorFlow:

    import json; rows = [json.loads(l) for l in open('WORKDIR/metrics.jsonl')]

A run resumed from step S first drops what an interrupted run logged after its last
checkpoint (steps > S; everything when S is 0) from metrics.jsonl and from the TensorBoard
event files, so every reader sees each step once, with the resumed run's values.
"""

import collections
import json
import math
import os
import sys
import time

from absl import logging
from etils import epath
import numpy as np


def _finite(value):
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return int(value)  # counts stay counts (eval_examples, steps_averaged)
  value = float(value)
  return value if math.isfinite(value) else str(value)


def _trim_jsonl(path: epath.Path, last_step: int) -> int:
  """Drops the rows with step > last_step (and a line cut short); returns how many.

  The file is rewritten beside itself and renamed over the original, so a crash during
  the rewrite leaves either the old file or the new one.
  """
  if not path.exists():
    return 0
  kept, dropped = [], 0
  for line in path.read_text().splitlines():
    try:
      step = json.loads(line)['step']
    except (ValueError, KeyError, TypeError):  # the last line, if a kill cut it short
      step = None
    if step is not None and step <= last_step:
      kept.append(line + '\n')
    else:
      dropped += 1
  if dropped:
    partial = path.with_name(f'.{path.name}.tmp')
    partial.write_text(''.join(kept))
    partial.replace(path)
  return dropped


def _trim_tensorboard(tf, tb_dir: str, last_step: int) -> int:
  """Drops the summary events with step > last_step (and a record cut short); returns
  how many.

  Each file is rewritten beside itself and renamed over the original, as for the jsonl;
  the temporary name lacks 'tfevents', so TensorBoard never reads it.
  """
  dropped = 0
  for path in tf.io.gfile.glob(os.path.join(tb_dir, '*tfevents*')):
    kept, dropped_here = [], 0
    try:
      for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        event = tf.compat.v1.Event.FromString(record)
        if event.HasField('summary') and event.step > last_step:
          dropped_here += 1
        else:
          kept.append(record)
    except tf.errors.DataLossError:  # truncated by the kill
      dropped_here += 1
    if dropped_here:
      partial = os.path.join(tb_dir, '.trim.tmp')
      with tf.io.TFRecordWriter(partial) as w:
        for record in kept:
          w.write(record)
      tf.io.gfile.rename(partial, path, overwrite=True)
      dropped += dropped_here
  return dropped


class MetricsWriter:
  """Writes scalars to TensorBoard and metrics.jsonl (process 0 only).

  `start_step`: the step this run starts from (the restored checkpoint's, 0 for a new
  run). What an earlier run logged after it is dropped first (see the module docstring);
  None keeps everything.
  """

  def __init__(self, workdir, *, enabled: bool = True, start_step: int | None = None):
    self.enabled = enabled
    self._path = epath.Path(workdir) / 'metrics.jsonl'
    self._tb = None
    if enabled:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf = tf
      tb_dir = str(epath.Path(workdir) / 'tensorboard')
      if start_step is not None:
        # A new run (step 0: no checkpoint) keeps nothing, a step-0 evaluation included.
        last_step = start_step if start_step > 0 else -1
        rows = _trim_jsonl(self._path, last_step)
        events = _trim_tensorboard(tf, tb_dir, last_step) if tf.io.gfile.isdir(tb_dir) else 0
        if rows or events:
          logging.info('Starting at step %d: dropped %d metrics.jsonl row(s) and %d '
                       'TensorBoard event(s) that an interrupted run logged after its '
                       'last checkpoint.', start_step, rows, events)
      self._tb = tf.summary.create_file_writer(tb_dir)

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
    self._recent_sps = collections.deque(maxlen=5)  # the ETA's seconds per step

  def rate(self, step: int) -> tuple[float, float]:
    """(images/s since the last call, seconds per step); resets the window."""
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    dt = max(now - self._last_t, 1e-9)
    self._last_t, self._last_step = now, step
    self.last_window_s = dt
    return steps * self.batch / dt, dt / steps

  def report(self, step: int, images_per_sec: float | None, sec_per_step: float | None,
             metrics: dict, other_s: float = 0.0) -> None:
    """other_s: seconds the rest of the run spends outside the train steps (the
    evaluations still to come), added to the ETA."""
    if not self.enabled:
      return
    parts = [f'step {step}/{self.total}']
    parts += [f'{k} {float(v):.4g}' for k, v in metrics.items()]
    if images_per_sec is None:  # the first step, its time compilation's
      parts.append('compiled; img/s and ETA from the next row')
    else:
      # The median of the last few windows: one slow window (a save's copy, a probe of
      # the peak, another job on the host) made the ETA jump (6:46, then 0:43).
      self._recent_sps.append(sec_per_step)
      eta = (self.total - step) * float(np.median(self._recent_sps)) + other_s
      h, rem = divmod(int(eta), 3600)
      parts += [f'{images_per_sec:,.1f} img/s', f'ETA {h}:{rem // 60:02d}:{rem % 60:02d}']
    print(' | '.join(parts), file=self.stream, flush=True)
