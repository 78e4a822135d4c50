"""StopRequest in one process: the signals it takes, the second signal, the handlers it
gives back."""

import os
import signal

import pytest

from vit_jax.train import preemption


def _noop(signum, frame):  # pylint: disable=unused-argument
  pass


@pytest.mark.parametrize('signal_number', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_asks_to_stop_and_the_previous_handlers_come_back(signal_number):
  before = {n: signal.signal(n, _noop) for n in (signal.SIGTERM, signal.SIGINT)}
  try:
    with preemption.StopRequest() as stop:
      assert not stop(1) and stop.signal_number is None
      signal.raise_signal(signal_number)
      assert stop(2) and stop.signal_number == signal_number
    assert signal.getsignal(signal.SIGTERM) is _noop
    assert signal.getsignal(signal.SIGINT) is _noop
  finally:
    for n, handler in before.items():
      signal.signal(n, handler)


def test_a_second_ctrl_c_interrupts_at_once():
  before = signal.getsignal(signal.SIGINT)
  try:
    with pytest.raises(KeyboardInterrupt):
      with preemption.StopRequest():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
  finally:
    signal.signal(signal.SIGINT, before)


def test_a_sigterm_soon_after_the_first_is_the_same_notice(monkeypatch):
  """A shutdown signals every process at once and launch/until_done.sh passes its own
  SIGTERM on: the second one used to stop the run at once, before it had saved."""
  raised = []
  before = signal.getsignal(signal.SIGTERM)
  try:
    with preemption.StopRequest() as stop:
      monkeypatch.setattr(signal, 'raise_signal', raised.append)  # instead of dying
      os.kill(os.getpid(), signal.SIGTERM)
      os.kill(os.getpid(), signal.SIGTERM)   # within SAME_NOTICE_S: ignored
      assert stop(1) and raised == []
      monkeypatch.setattr(preemption.StopRequest, 'SAME_NOTICE_S', 0.0)
      os.kill(os.getpid(), signal.SIGTERM)   # later: stops at once, as without a handler
      assert raised == [signal.SIGTERM]
      assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
  finally:
    signal.signal(signal.SIGTERM, before)


def test_preempted_reports_its_signal():
  assert preemption.Preempted('x').signal_number == signal.SIGTERM
  assert preemption.Preempted('x', signal.SIGINT).signal_number == signal.SIGINT


def test_checkpoint_saves_leave_the_preemption_service_to_the_loop(monkeypatch, tmp_path):
  """Orbax's manager asks the preemption service in save() and, from its finalize
  thread, with older steps; only the loop may (once per step, in order)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints import train_state  # pylint: disable=g-import-not-at-top
  asked = []
  monkeypatch.setattr(multihost_utils, 'reached_preemption_sync_point',
                      lambda step: asked.append(step) or False)
  checkpointer = train_state.TrainCheckpointer(tmp_path / 'checkpoints')
  state = {'w': jax.numpy.arange(4.0)}
  for step in (1, 2):
    checkpointer.save(step, state, {'step': step})
  checkpointer.wait()
  assert checkpointer.all_steps() == [1, 2]
  restored, meta = checkpointer.restore(jax.eval_shape(lambda: state))
  np.testing.assert_array_equal(restored['w'], np.arange(4.0))
  assert meta['step'] == 2
  assert not asked
  checkpointer.close()
