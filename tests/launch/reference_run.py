"""Helper: `python -m vit_jax.main` in ONE process, fed the global batches of TWO.

Run as `python reference_run.py [vit_jax.main flags]` in a process with 8 CPU devices.
A 2-process run's global batch is process 0's local batch followed by process 1's
(jax.make_array_from_process_local_data over the batch axis, devices in process order).
One process normally reads the whole split in its own order, so here the training
batches are built by the library's own pipeline for process_index 0 and 1 of 2 and
concatenated; everything else (model, mesh of 8 devices, optimizer, checkpoints,
metrics) is vit_jax.main unchanged. Its losses and parameters are the reference the
2-process run must equal.
"""

import sys

from absl import app
import numpy as np

from vit_jax import main as vit_main
from vit_jax.data import builder
from vit_jax.data import pipeline

PROCESSES = 2
_library_batches = builder.create_train_batches


def _two_process_batches(input_config, source, *, global_batch_size, seed, start_step=0,
                         process_index=None, process_count=None):
  del process_index, process_count  # this process stands for both
  if (pipeline.steps_per_epoch(source, global_batch_size, PROCESSES)
      != pipeline.steps_per_epoch(source, global_batch_size, 1)):
    raise ValueError('steps per epoch differ between 1 and 2 processes: choose a batch '
                     'size that divides both parts')
  parts = [_library_batches(input_config, source, global_batch_size=global_batch_size,
                            seed=seed, start_step=start_step, process_index=i,
                            process_count=PROCESSES) for i in range(PROCESSES)]
  for local_batches in zip(*parts):
    yield {k: np.concatenate([b[k] for b in local_batches]) for k in local_batches[0]}


if __name__ == '__main__':
  builder.create_train_batches = _two_process_batches  # the loop looks it up at call time
  app.run(vit_main.main, argv=sys.argv)
