"""One run per workdir: the lock another process holds is refused, naming it; a process
that dies (SIGKILL) leaves no stale lock."""

import os
import signal
import subprocess
import sys
import time

import pytest

from vit_jax.train import workdir_lock

HOLDER = """
import sys, time
from vit_jax.train import workdir_lock
with workdir_lock.hold(sys.argv[1]):
  print('held', flush=True)
  time.sleep(120)
"""


def test_a_second_holder_is_refused_and_a_killed_one_leaves_no_stale_lock(tmp_path):
  proc = subprocess.Popen([sys.executable, '-c', HOLDER, str(tmp_path)],
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == 'held'
    with pytest.raises(workdir_lock.WorkdirBusyError) as e:
      with workdir_lock.hold(tmp_path):
        pass
    assert f'pid {proc.pid} on ' in str(e.value) and 'another --workdir' in str(e.value)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  with workdir_lock.hold(tmp_path):  # the kernel released the dead process's lock
    assert f'pid {os.getpid()} on ' in (tmp_path / workdir_lock.LOCK_FILE).read_text()
  with workdir_lock.hold(tmp_path):  # and a finished holder's
    pass


def test_a_run_in_a_busy_workdir_stops_before_touching_its_checkpoints(tmp_path):
  proc = subprocess.Popen([sys.executable, '-c', HOLDER, str(tmp_path)],
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == 'held'
    (tmp_path / 'checkpoints' / '7.orbax-checkpoint-tmp').mkdir(parents=True)  # its save
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, '-m', 'vit_jax.main', '--config=configs/demo.py',
         f'--workdir={tmp_path}', '--config.total_steps=2', '--config.schedule.warmup_steps=1'],
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-3000:]
    assert 'error (WorkdirBusyError)' in run.stderr and f'pid {proc.pid}' in run.stderr
    assert (tmp_path / 'checkpoints' / '7.orbax-checkpoint-tmp').is_dir()  # left alone
    assert not (tmp_path / 'config.json').exists()
    assert 'forward GFLOPs' not in run.stdout  # refused before the model summary compiled
    assert time.monotonic() - start < 200
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
  import errno  # pylint: disable=g-import-not-at-top
  def no_locks(fd, operation):
    raise OSError(errno.ENOSYS, 'Function not implemented')
  monkeypatch.setattr(workdir_lock.fcntl, 'flock', no_locks)
  with workdir_lock.hold(tmp_path):  # not "in use by another run"
    pass
