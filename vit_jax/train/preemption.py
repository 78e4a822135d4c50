"""SIGTERM as a request to save and stop: the notice a preemptible VM, `kill`, SLURM's end
of time limit or Kubernetes give before the process is killed.

In one process the signal sets a flag that the training loop reads after each step (a
Python bool: no host synchronisation). With several processes (`jax.distributed`) a
notice reaches one host, and every host must save the same step: JAX's preemption
service (on by default; it installs its own SIGTERM handler) spreads the notice and
agrees on that step, which `multihost_utils.reached_preemption_sync_point` reports.
"""

import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils


class Preempted(Exception):  # pylint: disable=g-bad-exception-name
  """Training stopped on SIGTERM after saving a checkpoint; the message says which."""


class StopRequest:
  """`stop_request(step)` is True once every process should save `step` and stop.

  Call it after every step, from step start+1 on, in every process (the service's
  protocol). Use as a context manager: the previous SIGTERM handler comes back on exit.
  A second SIGTERM stops a single process at once; with several processes JAX's handler
  takes every notice, and the processes stop at the agreed step.
  """

  def __init__(self):
    self._requested = False
    self._previous = None
    self._multiprocess = jax.process_count() > 1

  def __enter__(self):
    self._installed = False
    if not self._multiprocess and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
      self._installed = True
    return self

  def __exit__(self, *exc):
    if self._installed:  # None: a handler not set from Python (e.g. JAX's); the default then
      signal.signal(signal.SIGTERM, self._previous if self._previous is not None
                    else signal.SIG_DFL)
      self._installed = False
    return False

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    if self._requested:  # a second notice: stop now, as without this handler
      signal.signal(signal.SIGTERM, signal.SIG_DFL)
      signal.raise_signal(signal.SIGTERM)
    self._requested = True
    logging.warning('SIGTERM: saving a checkpoint after this step, then stopping '
                    '(a second SIGTERM stops at once).')

  def __call__(self, step: int) -> bool:
    if self._multiprocess:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # the preemption service is turned off
        return False
    return self._requested
