"""SIGTERM as a request to save and stop: the notice a preemptible VM, `kill`, SLURM's end
of time limit or Kubernetes give before the process is killed. In a single process,
Ctrl-C (SIGINT) is taken the same way: the run saves after the current step and stops.

In one process the signal sets a flag that the training loop reads after each step (a
Python bool: no host synchronisation). With several processes (`jax.distributed`) a
notice reaches one host, and every host must save the same step: JAX's preemption
service (on by default; it installs its own SIGTERM handler) spreads the notice and
agrees on that step, which `multihost_utils.reached_preemption_sync_point` reports.
"""

import os
import signal
import sys
import threading
import time

from absl import logging
import jax
from jax.experimental import multihost_utils


class Preempted(Exception):  # pylint: disable=g-bad-exception-name
  """Training stopped on a signal after saving a checkpoint; the message says which.

  `signal_number`: the signal that asked for it (SIGTERM or SIGINT); a process reports it
  as a shell does a process the signal stopped, exit status 128 + the number.
  """

  def __init__(self, message: str, signal_number: int = signal.SIGTERM):
    super().__init__(message)
    self.signal_number = int(signal_number)


class StopRequest:
  """`stop_request(step)` is True once every process should save `step` and stop.

  Call it after every step, from step start+1 on, in every process (the service's
  protocol). Use as a context manager: the previous SIGTERM and SIGINT handlers come back
  on exit. In a single process a second SIGTERM stops at once (unless it comes within
  SAME_NOTICE_S seconds of the first signal: the same notice), and a second Ctrl-C raises
  KeyboardInterrupt at once; with several processes JAX's handler takes every SIGTERM,
  the processes stop at the agreed step, and Ctrl-C keeps its usual meaning (one process
  cannot tell the others).
  """

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)
  # A SIGTERM this soon after the first signal is the same notice, not a second one: a
  # shutdown (a VM's, `systemctl stop`, a scheduler's) signals every process at once,
  # and a wrapper (launch/until_done.sh) passes the one it got on as well.
  SAME_NOTICE_S = 10.0

  def __init__(self):
    self._requested = False
    self._first_at = None
    self._previous = {}
    self._multiprocess = jax.process_count() > 1
    self.signal_number = None  # the first signal that asked to stop

  def __enter__(self):
    if not self._multiprocess and threading.current_thread() is threading.main_thread():
      for number in self._SIGNALS:
        self._previous[number] = signal.signal(number, self._on_signal)
    return self

  def __exit__(self, *exc):
    for number, previous in self._previous.items():
      # None: a handler not set from Python (e.g. JAX's); the default then.
      signal.signal(number, previous if previous is not None else signal.SIG_DFL)
    self._previous = {}
    return False

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if (self._requested and signum == signal.SIGTERM
        and time.monotonic() - self._first_at < self.SAME_NOTICE_S):
      logging.warning('%s again %.1f s after the first signal: taken as the same notice '
                      '(still saving; another one after %g s stops at once).', name,
                      time.monotonic() - self._first_at, self.SAME_NOTICE_S)
      return
    if self._requested:  # a second notice: stop now, as without this handler
      if signum == signal.SIGINT:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt
      signal.signal(signum, signal.SIG_DFL)
      signal.raise_signal(signum)
    self._requested = True
    self._first_at = time.monotonic()
    self.signal_number = signum
    how = name
    logging.warning('%s: saving a checkpoint after this step, then stopping (%s stops at '
                    'once).', name, 'Ctrl-C again' if signum == signal.SIGINT else
                    f'another {how} after {self.SAME_NOTICE_S:g} s')
    if signum == signal.SIGINT:  # os.write: print() may be inside a write already
      try:
        os.write(sys.stdout.fileno(), f'\n{name}: saving a checkpoint after this step, then '
                 'stopping (press Ctrl-C again to stop at once, without saving)\n'.encode())
      except (OSError, ValueError):  # no file descriptor behind sys.stdout
        pass

  @property
  def requested_here(self) -> bool:
    """A signal reached this single-process run (read without any collective, so it can
    be polled between evaluation batches); always False with several processes."""
    return not self._multiprocess and self._requested

  def __call__(self, step: int) -> bool:
    if self._multiprocess:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # the preemption service is turned off
        return False
    return self._requested
