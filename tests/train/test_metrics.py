"""MetricsWriter on resume: what an interrupted run logged after its last checkpoint is
dropped from metrics.jsonl and from the TensorBoard event files, so that every reader
sees each step once, with the resumed run's values."""

import json
import logging
import time

from etils import epath
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import plugin_event_accumulator

from vit_jax.train import metrics


def _log(workdir, start_step, steps, offset, close=True):
  writer = metrics.MetricsWriter(workdir, start_step=start_step)
  for step in steps:
    writer.write(step, {'loss': offset + step})
  if close:
    writer.close()


def _jsonl(workdir):
  return [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]


def _tensorboard(workdir):
  """{step: loss} as TensorBoard's loader sees the run, and the raw (step, loss) events."""
  acc = plugin_event_accumulator.EventAccumulator(str(workdir / 'tensorboard'),
                                                  size_guidance={'tensors': 0})
  acc.Reload()
  seen = [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors('loss')]
  raw = []
  for path in sorted(tf.io.gfile.glob(str(workdir / 'tensorboard' / '*tfevents*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      raw += [(event.step, float(tf.make_ndarray(v.tensor))) for v in event.summary.value
              if v.tag == 'loss']
  return seen, raw


def test_resume_drops_what_the_interrupted_run_logged_after_its_checkpoint(tmp_path, caplog):
  # A run logs steps 1..10 and is killed (its writer never closed) while writing step 11:
  # half a jsonl line and half an event record are left at the ends of the files.
  _log(tmp_path, 0, range(1, 11), offset=0, close=False)
  with (tmp_path / 'metrics.jsonl').open('a') as f:
    f.write('{"step": 11, "lo')
  record = tmp_path / 'step11.tfrecord'
  with tf.io.TFRecordWriter(str(record)) as w:
    w.write(tf.compat.v1.Event(step=11, summary=tf.compat.v1.Summary(value=[
        tf.compat.v1.Summary.Value(tag='loss', simple_value=11.0)])).SerializeToString())
  (event_file,) = (tmp_path / 'tensorboard').iterdir()
  with event_file.open('ab') as f:
    f.write(record.read_bytes()[:-3])
  # Its last checkpoint was step 6: the resumed run logs 7..12 with other values. (A
  # second later, as a resumed process is: TensorBoard reads event files in name order,
  # events.out.tfevents.<second>.<host>.<pid>.<writer count>, and within one second and
  # process the 10th writer's name sorts before the 9th's, a flaky failure in a long run.)
  time.sleep(1.05)
  with caplog.at_level(logging.INFO):
    _log(tmp_path, 6, range(7, 13), offset=100)
  expected = [(s, float(s)) for s in range(1, 7)] + [(s, 100.0 + s) for s in range(7, 13)]
  assert [(r['step'], r['loss']) for r in _jsonl(tmp_path)] == expected
  seen, raw = _tensorboard(tmp_path)
  assert seen == expected  # what TensorBoard plots
  assert raw == expected  # what any reader of the event files finds, in file order
  assert ('Starting at step 6: dropped 5 metrics.jsonl row(s) and 5 TensorBoard event(s)'
          in caplog.text)


def test_a_new_run_drops_everything_and_none_keeps_everything(tmp_path):
  # Killed before its first checkpoint: the restarted run starts from 0.
  _log(tmp_path, 0, range(1, 5), offset=0)
  _log(tmp_path, 0, range(1, 3), offset=100)
  expected = [(1, 101.0), (2, 102.0)]
  assert [(r['step'], r['loss']) for r in _jsonl(tmp_path)] == expected
  assert _tensorboard(tmp_path) == (expected, expected)
  # start_step=None (no resume information) appends to what is there.
  _log(tmp_path, None, [1], offset=200)
  assert [r['step'] for r in _jsonl(tmp_path)] == [1, 2, 1]


def test_a_failed_rewrite_leaves_metrics_jsonl_as_it_was(tmp_path, monkeypatch):
  _log(tmp_path, 0, range(1, 5), offset=0)
  before = (tmp_path / 'metrics.jsonl').read_text()

  def crash(self, target):
    raise OSError(f'simulated crash before renaming {self} to {target}')

  monkeypatch.setattr(type(epath.Path(tmp_path)), 'replace', crash)
  with pytest.raises(OSError, match='simulated crash'):
    metrics.MetricsWriter(tmp_path, start_step=2)
  assert (tmp_path / 'metrics.jsonl').read_text() == before


def test_the_eta_counts_the_evaluations_still_to_come():
  import io  # pylint: disable=g-import-not-at-top
  stream = io.StringIO()
  progress = metrics.Progress(100, 8, 0, stream=stream)
  progress.report(40, 80.0, 0.1, {'loss': 1.0})  # 60 steps x 0.1 s
  progress.report(40, 80.0, 0.1, {'loss': 1.0}, other_s=3 * 40.0)  # and 3 evals of 40 s
  first, second = stream.getvalue().splitlines()
  assert first.endswith('ETA 0:00:06') and second.endswith('ETA 0:02:06'), (first, second)


def test_one_slow_window_does_not_make_the_eta_jump():
  import io  # pylint: disable=g-import-not-at-top
  stream = io.StringIO()
  progress = metrics.Progress(1000, 8, 0, stream=stream)
  for step, sps in ((100, 0.1), (200, 0.1), (300, 2.0), (400, 0.1)):
    progress.report(step, 8 / sps, sps, {})
  etas = [line.rsplit('ETA ', 1)[1] for line in stream.getvalue().splitlines()]
  # 900 / 800 / 700 / 600 steps at 0.1 s: the 2 s window moves the median by nothing.
  assert etas == ['0:01:30', '0:01:20', '0:01:10', '0:01:00'], etas
