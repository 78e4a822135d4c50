"""Batches for training and evaluation: deterministic, resumable, multi-process.

Training order. Each process has a fixed part of the split (see `sources.py`). An epoch
is a permutation of that part fixed by (seed, epoch, process); it yields
`steps_per_epoch = min over processes of (examples // local batch)` batches, so every
process takes the same number of steps and the few examples beyond the last full batch
(different ones each epoch) wait for the next epoch. Global step s therefore lies in
epoch s // steps_per_epoch at batch s % steps_per_epoch: a pipeline started at step k
starts that epoch's order at example (k % steps_per_epoch) * local_batch and yields
exactly the batches an uninterrupted pipeline yields from step k.

Randomness. Every random op is stateless and seeded by the example's own seed,
fold_in(hash(seed, epoch, process), position in the epoch), and a batch_preprocess by
fold_in(hash(seed), global step): augmentations do not depend on threading, prefetching
or on where the pipeline was started.

Cost of resuming. Image folders (and any source with random access) start at the
right example at no cost. tfds sources stored as TFRecords have no random access: the
epoch's records before the start position are read and dropped (not decoded). That is
at most one epoch of this process's part: for ImageNet-21k (~13M images, ~1.3 TB) on a
32-host TPU pod, at most ~40 GB per host, about a minute at typical GCS throughput.

Evaluation. Each process reads its part in order once; the last batch is padded with
zero examples whose `_mask` is 0 (1 for real examples), and every process yields the
same number of batches.
"""

import atexit
import math
import queue
import threading
import weakref
from collections.abc import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf

from vit_jax.data import sources as sources_lib
from vit_jax.data import traced

Example = dict
_AUTOTUNE = tf.data.AUTOTUNE


def _seed_pair(value: int) -> tf.Tensor:
  return tf.constant([value & (2**62 - 1), (value >> 31) & (2**62 - 1)], tf.int64)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise sources_lib.DataError(
        f'global batch size {global_batch_size} is not divisible by the {process_count} '
        'processes; choose a multiple')
  return global_batch_size // process_count


def _processes(process_index, process_count):
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  return process_index, process_count


def steps_per_epoch(source: sources_lib.Source, global_batch_size: int,
                    process_count: int | None = None) -> int:
  """Training steps per epoch (equal on every process)."""
  _, process_count = _processes(0, process_count)
  local = _local_batch_size(global_batch_size, process_count)
  smallest = min(source.num_examples(i, process_count) for i in range(process_count))
  steps = smallest // local
  if steps == 0:
    total = sum(source.num_examples(i, process_count) for i in range(process_count))
    raise sources_lib.DataError(
        f'{source.name} split {source.split!r} has {total} examples ({smallest} on the '
        f'smallest of {process_count} process parts), fewer than one global batch of '
        f'{global_batch_size}. Lower config.batch_size or use a larger split.')
  return steps


def _without_bookkeeping(example: Example) -> Example:
  return {k: v for k, v in example.items() if k not in ('rng', 'position')}


def train_batches(source: sources_lib.Source, *, global_batch_size: int,
                  preprocess: Callable[[Example], Example],
                  batch_preprocess: Callable[[Example], Example] | None = None,
                  seed: int = 0, start_step: int = 0, process_index: int | None = None,
                  process_count: int | None = None,
                  threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless local training batches (numpy) of global_batch_size / process_count.

  `preprocess` (per example) and `batch_preprocess` are traced without AutoGraph
  (`traced.py`): they branch on a tensor's value with `tf.cond`, not a Python `if`.
  """
  process_index, process_count = _processes(process_index, process_count)
  local = _local_batch_size(global_batch_size, process_count)
  spe = steps_per_epoch(source, global_batch_size, process_count)
  epoch, step_in_epoch = divmod(start_step, spe)
  batch_seed = _seed_pair(sources_lib.mix_seed(seed, 'batch'))
  while True:
    ds = source.epoch_dataset(epoch=epoch, seed=seed, shuffle=True,
                              start=step_in_epoch * local, process_index=process_index,
                              process_count=process_count)
    ds = ds.take((spe - step_in_epoch) * local)
    example_seed = _seed_pair(sources_lib.mix_seed(seed, epoch, process_index))

    def per_example(ex, example_seed=example_seed):
      rng = tf.random.experimental.stateless_fold_in(example_seed, ex['position'])
      return _without_bookkeeping(preprocess(dict(ex, rng=rng)))

    ds = ds.map(traced.without_autograph(per_example), num_parallel_calls=_AUTOTUNE,
                deterministic=True)
    ds = ds.batch(local, drop_remainder=True)
    if batch_preprocess is not None:
      first_step = epoch * spe + step_in_epoch

      def per_batch(i, batch, first_step=first_step):
        rng = tf.random.experimental.stateless_fold_in(batch_seed, first_step + i)
        return _without_bookkeeping(batch_preprocess(dict(batch, rng=rng)))

      ds = ds.enumerate().map(traced.without_autograph(per_batch),
                              num_parallel_calls=_AUTOTUNE, deterministic=True)
    ds = ds.prefetch(_AUTOTUNE).with_options(_options(threads))
    yield from ds.as_numpy_iterator()
    epoch, step_in_epoch = epoch + 1, 0


def eval_batches(source: sources_lib.Source, *, global_batch_size: int,
                 preprocess: Callable[[Example], Example],
                 process_index: int | None = None, process_count: int | None = None,
                 threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the split; every example exactly once, padding masked by `_mask`."""
  process_index, process_count = _processes(process_index, process_count)
  local = _local_batch_size(global_batch_size, process_count)
  largest = max(source.num_examples(i, process_count) for i in range(process_count))
  num_batches = math.ceil(largest / local)
  mine = source.num_examples(process_index, process_count)
  ds = source.epoch_dataset(epoch=0, seed=0, shuffle=False, process_index=process_index,
                            process_count=process_count)
  fixed_rng = _seed_pair(0)

  def per_example(ex):
    out = _without_bookkeeping(preprocess(dict(ex, rng=fixed_rng)))
    out['_mask'] = tf.constant(1, tf.int32)
    return out

  ds = ds.map(traced.without_autograph(per_example), num_parallel_calls=_AUTOTUNE,
              deterministic=True)
  padding = num_batches * local - mine
  if padding:
    spec = ds.element_spec
    for key, s in spec.items():
      if not s.shape.is_fully_defined():
        raise sources_lib.DataError(
            f'evaluation preprocessing gives {key!r} of shape {s.shape}; batches need a '
            'fixed shape: end it with resize(...) or central_crop(...)')
    zeros = {k: tf.zeros(s.shape, s.dtype) for k, s in spec.items()}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(zeros).repeat(padding))
  ds = ds.batch(local, drop_remainder=True).prefetch(_AUTOTUNE).with_options(_options(threads))
  yield from ds.as_numpy_iterator()


def _options(threads: int | None) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  if threads:
    options.threading.private_threadpool_size = threads
  return options


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict:
  """Process-local numpy batch -> global jax.Arrays sharded along the batch axis."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


class prefetch_to_device:  # pylint: disable=invalid-name
  """Places batches on the devices in a background thread, `size` batches ahead.

  An iterator; also a context manager. `close()` (or leaving the `with` block) stops
  the thread after the batch it is reading. Prefetchers still running when the
  interpreter exits are stopped by an atexit hook first: a thread left inside
  TensorFlow's C++ input code while Python finalises aborts the process
  ("terminate called ... exception not rethrown").
  """

  _live: 'weakref.WeakSet[prefetch_to_device]' = None  # set below

  def __init__(self, batches: Iterator[dict], sharding: jax.sharding.Sharding, size: int = 2):
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._done = object()
    self._finished = False
    self._thread = threading.Thread(target=self._produce, args=(batches, sharding),
                                    name='prefetch_to_device', daemon=True)
    prefetch_to_device._live.add(self)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self, batches, sharding):
    try:
      for batch in batches:
        if self._stop.is_set() or not self._put(to_global(batch, sharding)):
          return
    except BaseException as e:  # pylint: disable=broad-except
      self._put(e)
      return
    self._put(self._done)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._finished:
      raise StopIteration
    item = self._queue.get()
    if item is self._done:
      self._finished = True
      raise StopIteration
    if isinstance(item, BaseException):
      self._finished = True
      raise item
    return item

  def close(self, timeout: float = 30.0) -> None:
    """Stops the producer thread and waits (up to `timeout` s) for it to leave."""
    self._finished = True
    self._stop.set()
    if self._thread.is_alive() and self._thread is not threading.current_thread():
      self._thread.join(timeout)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


prefetch_to_device._live = weakref.WeakSet()


@atexit.register
def _close_live_prefetchers():
  for p in list(prefetch_to_device._live):
    p.close()
