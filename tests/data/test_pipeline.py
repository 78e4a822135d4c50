"""Batching, determinism, resumption, exact-once evaluation and per-process parts."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vit_jax.data import pipeline
from vit_jax.data import sources
import subprocess_env

NUM_CLASSES, PER_CLASS = 3, 23  # 69 images: not a multiple of any batch size used


def _write_id_images(root: pathlib.Path, split='train', num_classes=NUM_CLASSES,
                     per_class=PER_CLASS):
  """PNG images whose first pixel encodes a unique id (R = id % 256, G = id // 256)."""
  i = 0
  for c in range(num_classes):
    d = root / split / f'class_{c}'
    d.mkdir(parents=True)
    for _ in range(per_class):
      img = np.full((6, 5, 3), 7, np.uint8)
      img[0, 0] = (i % 256, i // 256, c)
      Image.fromarray(img).save(d / f'{i:04d}.png')
      i += 1
  return i


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('ids')
  n = _write_id_images(root)
  return sources.ImageFolderSource(root=str(root), split='train'), n


def _pp(ex):
  """Decode, and a random value from the example's seed (to see the randomness)."""
  img = tf.io.decode_png(ex['image'], channels=3)
  noise = tf.random.stateless_uniform([], seed=ex['rng'])
  return {'id': tf.cast(img[0, 0, 0], tf.int32) + 256 * tf.cast(img[0, 0, 1], tf.int32),
          'label': ex['label'], 'noise': noise, 'rng': ex['rng']}


def _take(it, n):
  return [next(it) for _ in range(n)]


def _train(source, **kw):
  kw.setdefault('global_batch_size', 8)
  kw.setdefault('process_index', 0)
  kw.setdefault('process_count', 1)
  return pipeline.train_batches(source, preprocess=_pp, **kw)


def test_batches_shapes_labels_and_epochs(folder):
  source, n = folder
  spe = pipeline.steps_per_epoch(source, 8, process_count=1)
  assert spe == n // 8
  batches = _take(_train(source, seed=1), 2 * spe)
  for b in batches:
    assert b['id'].shape == (8,) and b['label'].shape == (8,)
    # Labels follow the folder of the image: ids 0..22 are class 0, and so on.
    np.testing.assert_array_equal(b['label'], b['id'] // PER_CLASS)
  first_epoch = np.concatenate([b['id'] for b in batches[:spe]])
  assert len(set(first_epoch)) == len(first_epoch) == spe * 8  # no repeats in an epoch
  second_epoch = np.concatenate([b['id'] for b in batches[spe:]])
  assert not np.array_equal(first_epoch, second_epoch)  # reshuffled per epoch


def test_same_seed_same_batches_other_seed_other_batches(folder):
  source, _ = folder
  a = _take(_train(source, seed=3), 5)
  b = _take(_train(source, seed=3), 5)
  c = _take(_train(source, seed=4), 5)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['id'], y['id'])
    np.testing.assert_array_equal(x['noise'], y['noise'])
  assert any(not np.array_equal(x['id'], z['id']) for x, z in zip(a, c))


@pytest.mark.parametrize('start_step', [1, 7, 8, 13])  # 8 steps per epoch: 8 and 13 cross it
def test_resumed_pipeline_yields_the_uninterrupted_batches(folder, start_step):
  source, _ = folder
  full = _take(_train(source, seed=5), start_step + 4)
  resumed = _take(_train(source, seed=5, start_step=start_step), 4)
  for x, y in zip(full[start_step:], resumed):
    np.testing.assert_array_equal(x['id'], y['id'])
    np.testing.assert_array_equal(x['label'], y['label'])
    np.testing.assert_array_equal(x['noise'], y['noise'])  # same augmentation randomness


def test_batch_preprocess_is_seeded_by_the_global_step(folder):
  source, _ = folder

  def batch_pp(batch):
    return dict(batch, mixed=tf.random.stateless_uniform([], seed=batch['rng']))

  full = _take(_train(source, seed=6, batch_preprocess=batch_pp), 10)
  resumed = _take(_train(source, seed=6, batch_preprocess=batch_pp, start_step=9), 1)
  assert resumed[0]['mixed'] == full[9]['mixed']
  assert len({float(b['mixed']) for b in full}) == 10


def test_two_processes_read_disjoint_parts_that_cover_the_split(folder):
  source, n = folder
  parts = []
  for p in range(2):
    ds = source.epoch_dataset(epoch=0, seed=0, shuffle=True, process_index=p, process_count=2)
    parts.append({int(_pp(dict(ex, rng=tf.constant([0, 0], tf.int64)))['id'])
                  for ex in ds})
  assert not parts[0] & parts[1]
  assert parts[0] | parts[1] == set(range(n))
  # Training: equal step counts, local batches of half the global batch, disjoint ids.
  batches = [_take(_train(source, seed=0, process_index=p, process_count=2), 4)
             for p in range(2)]
  for b0, b1 in zip(*batches):
    assert b0['id'].shape == (4,)
    assert not set(b0['id']) & set(b1['id'])


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_sees_every_example_exactly_once(folder, process_count):
  source, n = folder
  seen, batches_per_process = [], []
  for p in range(process_count):
    batches = list(pipeline.eval_batches(
        source, global_batch_size=16, preprocess=_pp, process_index=p,
        process_count=process_count))
    batches_per_process.append(len(batches))
    for b in batches:
      assert b['id'].shape == (16 // process_count,)
      seen += list(b['id'][b['_mask'] == 1])
      assert np.all(b['id'][b['_mask'] == 0] == 0)  # padding is zeros
  assert sorted(seen) == list(range(n))
  assert len(set(batches_per_process)) == 1  # every process runs the same number of steps


def test_too_small_dataset_and_bad_batch_are_clear_errors(folder):
  source, n = folder
  with pytest.raises(sources.DataError, match=f'{n} examples.*global batch of 128'):
    next(_train(source, global_batch_size=128))
  with pytest.raises(sources.DataError, match='not divisible'):
    next(_train(source, global_batch_size=9, process_count=2))


def test_global_arrays_on_8_devices(tmp_path):
  """Local batches become one jax.Array sharded along the batch over 8 CPU devices."""
  _write_id_images(tmp_path)
  code = f"""
import jax, numpy as np, tensorflow as tf
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from vit_jax.data import pipeline, sources
src = sources.ImageFolderSource(root={str(tmp_path)!r}, split='train')
pp = lambda ex: {{'image': tf.cast(tf.io.decode_png(ex['image'], channels=3), tf.float32),
                 'label': ex['label']}}
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'fsdp'))
sharding = NamedSharding(mesh, P(('data', 'fsdp')))
it = pipeline.prefetch_to_device(pipeline.train_batches(src, global_batch_size=16, preprocess=pp,
                                                         seed=0), sharding)
local = next(pipeline.train_batches(src, global_batch_size=16, preprocess=pp, seed=0))
b = next(it)
assert b['image'].shape == (16, 6, 5, 3), b['image'].shape
assert len(b['image'].sharding.device_set) == 8
assert b['image'].addressable_shards[0].data.shape == (2, 6, 5, 3)
np.testing.assert_array_equal(np.asarray(b['image']), local['image'])
print('OK')
"""
  env = subprocess_env.cpu_env(devices=8)
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                        timeout=300)
  assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stderr[-3000:]


def test_prefetcher_stops_its_thread_on_close_and_passes_errors_on():
  """close() stops the producer of an endless stream; a producer error reaches the consumer."""
  import jax  # pylint: disable=import-outside-toplevel
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  pulled = []

  def endless():
    while True:
      pulled.append(1)
      yield {'x': np.zeros((2,), np.float32)}

  with pipeline.prefetch_to_device(endless(), sharding, size=2) as it:
    assert next(it)['x'].shape == (2,)
    thread = it._thread  # pylint: disable=protected-access
  assert not thread.is_alive()
  n = len(pulled)
  assert n <= 5, n  # at most queue size + the batch in hand + the one consumed
  with pytest.raises(StopIteration):
    next(it)

  def failing():
    yield {'x': np.ones((2,), np.float32)}
    raise ValueError('broken record 7')

  it = pipeline.prefetch_to_device(failing(), sharding)
  np.testing.assert_array_equal(np.asarray(next(it)['x']), 1.0)
  with pytest.raises(ValueError, match='broken record 7'):
    next(it)
  it.close()
