"""One run per workdir: process 0 holds an advisory lock on WORKDIR/.vit_jax.lock while it
trains.

Two runs in one workdir overwrite each other's checkpoints, config.json and metrics (and
an Orbax save can fail on the other's temporary directory). The lock is `flock`, which the
kernel releases when the process ends in any way (SIGKILL included), so a crashed run
never leaves a stale lock behind. It works on local file systems and NFS; a gs:// workdir
is not locked (object stores have no such lock).
"""

import contextlib
import datetime
import fcntl
import os
import socket

from absl import logging

LOCK_FILE = '.vit_jax.lock'


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir; the message names it."""


@contextlib.contextmanager
def hold(workdir):
  """Holds the workdir's lock for the `with` block; WorkdirBusyError if another run does."""
  if '://' in str(workdir):
    logging.info('%s is not on a local or network file system: it is not locked against a '
                 'second run', workdir)
    yield
    return
  path = os.path.join(os.fspath(workdir), LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held by another process
      holder = os.pread(fd, 4096, 0).decode(errors='replace').strip() or 'unknown'
      raise WorkdirBusyError(
          f'--workdir={workdir} is in use by another run ({holder}). Two runs in one '
          'workdir overwrite each other\'s checkpoints and metrics: wait for that run to '
          'end or stop it (it saves on SIGTERM), or give this one another --workdir.'
      ) from None
    except OSError as e:  # no locks on this file system (Lustre without -o flock, ...)
      logging.warning('%s cannot be locked (%s): it is not protected against a second run.',
                      path, e)
      yield
      return
    now = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()}, since {now}\n'.encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock
