"""Helper script: a save that fails in the background (files limited to 100 kB, as on a
full disk) after a good one, with keep_last=1. Prints the CheckpointSaveError message,
then the step a new checkpointer resumes from. Run as `python save_error_run.py DIR`."""

import resource
import signal
import sys
import time

import jax.numpy as jnp
import numpy as np

from vit_jax.checkpoints import train_state


def main():
  directory = sys.argv[1]
  checkpointer = train_state.TrainCheckpointer(directory, keep_last=1, async_save=True)
  checkpointer.save(1, {'w': jnp.ones((100_000,), jnp.float32)}, {'step': 1})
  checkpointer.wait()
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
  checkpointer.save(2, {'w': jnp.asarray(np.random.rand(100_000).astype(np.float32))},
                    {'step': 2})
  deadline = time.monotonic() + 60
  message = None
  while message is None and time.monotonic() < deadline:
    try:
      checkpointer.check_for_errors()
      time.sleep(0.1)
    except train_state.CheckpointSaveError as e:
      message = str(e)
  resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
  checkpointer.close()
  print(message)
  print(train_state.TrainCheckpointer(directory, keep_last=1).latest_step())


if __name__ == '__main__':
  main()
