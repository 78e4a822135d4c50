"""Where examples come from: tensorflow-datasets, image folders, the bundled MNIST.

A source is one split of one dataset. It knows its size, its class names, how it is
divided among processes, and gives, for one process and one epoch, a `tf.data.Dataset`
of {'image': encoded bytes, 'label': int64} in an order fixed by (seed, epoch), starting
at any position. The pipeline (`pipeline.py`) builds batches from that.

Per-process division: process p of P reads a disjoint part of the split; the parts cover
the split. tfds splits use `tfds.even_splits` (contiguous, sizes differing by at most
one); image folders take every P-th file.
"""

import abc
import dataclasses
import difflib
import json
import os
import unicodedata
import concurrent.futures
import hashlib
import time

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import image_files
from vit_jax.data import preprocess_ops
from vit_jax.data import traced

IMAGE_EXTENSIONS = image_files.IMAGE_SUFFIXES
BUNDLED = ('bundled_mnist',)


class DataError(ValueError):
  """A dataset that cannot be used as configured; the message says how to fix it."""


class Source(abc.ABC):
  """One split of a dataset."""

  name: str
  split: str
  class_names: list[str]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @abc.abstractmethod
  def num_examples(self, process_index: int = 0, process_count: int = 1) -> int:
    """Examples that process `process_index` of `process_count` reads."""

  def fingerprint(self) -> str:
    """A short hash of what the epochs are drawn from: the name, split and example
    count, and for a folder every file and its label (a resumed run compares it)."""
    digest = hashlib.sha256(f'{self.name}|{self.split}|{self.num_examples()}'.encode())
    paths, labels = getattr(self, 'paths', None), getattr(self, 'labels', None)
    if paths is not None and labels is not None:  # (one update: 14M paths in ~3 s)
      digest.update('\n'.join(np.asarray(paths).astype(str).tolist()).encode())
      digest.update(np.asarray(labels, np.int64).tobytes())
    return digest.hexdigest()[:16]

  @abc.abstractmethod
  def epoch_dataset(self, *, epoch: int, seed: int, shuffle: bool, start: int = 0,
                    process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    """This process's examples for one epoch, in an order fixed by (seed, epoch).

    Yields {'image': tf.string, 'label': int64, 'position': int64} with position the
    index in this epoch's order; the first `start` positions are skipped cheaply.
    """


# ----------------------------------------------------------------------------- tfds


def _tfds_builder(name: str, data_dir: str | None):
  # ('--config.input.data_dir=~/tfds': no shell expands it, and tfds prepared the dataset
  # in a folder named '~' under the working directory)
  data_dir = os.path.expanduser(data_dir) if data_dir else data_dir
  if name in BUNDLED:
    from vit_jax.data import bundled_mnist  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    # tfds's own message lists its whole catalogue (twice); it is not chained.
    # The datasets prepared in data_dir count too (a dataset built from a local builder
    # is not in tfds's catalogue).
    root = os.path.expanduser(data_dir or '~/tensorflow_datasets')
    prepared = ([d for d in tf.io.gfile.listdir(root) if tf.io.gfile.isdir(
        os.path.join(root, d))] if tf.io.gfile.isdir(root) else [])
    close = difflib.get_close_matches(
        name, tfds.list_builders(with_community_datasets=False) + list(BUNDLED)
        + [d.rstrip('/') for d in prepared], n=5)
    raise DataError(
        f'config.input.name={name!r} is not a tfds dataset (nor prepared in '
        f'{data_dir or "~/tensorflow_datasets"}). Closest names: '
        f'{", ".join(close) or "none"}. All names: python -c "import tensorflow_datasets '
        'as tfds; print(tfds.list_builders())", or '
        'https://www.tensorflow.org/datasets/catalog/overview. For your own images use '
        "config.input.source='folder'.") from None
  if not builder.is_prepared():
    if name in BUNDLED:
      builder = _prepare_once(builder, name, data_dir)
    else:
      raise DataError(
          f'tfds dataset {name!r} is not prepared in {builder.data_dir}. Prepare it once '
          f'with `python -m vit_jax.data.prepare {name} '
          f'--data_dir={data_dir or "~/tensorflow_datasets"}` '
          '(datasets with manual downloads, such as imagenet2012, need the archives in '
          '<data_dir>/downloads/manual first; ImageNet-21k is not in the tfds catalog: see '
          'docs/data.md), or point config.input.data_dir at the directory that holds it.')
  return builder


def _prepare_once(builder, name: str, data_dir: str | None):
  """Prepares a bundled dataset once, even when several processes start together.

  Processes of one machine (the workers of a multi-process run, parallel tests) share
  the data directory; an exclusive lock in it makes the first one prepare while the
  others wait, then read what it wrote. Returns a builder that sees the prepared data.
  """
  import fcntl  # pylint: disable=g-import-not-at-top
  root = os.fspath(builder.data_dir_root)
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, f'.{name}.prepare.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      builder = tfds.builder(name, data_dir=data_dir)  # what another process may have made
      if not builder.is_prepared():
        logging.info('Preparing the bundled dataset %s in %s (first use).', name,
                     builder.data_dir)
        builder.download_and_prepare()
      return builder
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


@dataclasses.dataclass
class TfdsSource(Source):
  """A split of a prepared tfds dataset (local dir or gs://), e.g. 'train[:99%]'."""
  name: str
  split: str
  data_dir: str | None = None
  shuffle_buffer: int = 50_000
  image_key: str = 'image'
  label_key: str = 'label'

  def __post_init__(self):
    self.builder = _tfds_builder(self.name, self.data_dir)
    label = self.builder.info.features[self.label_key]
    names = getattr(label, 'names', None)
    if names is None and hasattr(label, 'feature'):  # Sequence(ClassLabel): multi-label
      names = getattr(label.feature, 'names', None)
    if names is None:
      raise DataError(f'{self.name}: feature {self.label_key!r} has no class names')
    self.class_names = list(names)
    try:
      self.builder.info.splits[self.split].num_examples  # pylint: disable=expression-not-assigned
    except (KeyError, ValueError) as e:
      raise DataError(f'{self.name} has no split {self.split!r}; it has '
                      f'{sorted(self.builder.info.splits.keys())} ({e})') from e

  def _process_split(self, process_index, process_count):
    return tfds.even_splits(self.split, n=process_count, drop_remainder=False)[process_index]

  def num_examples(self, process_index=0, process_count=1):
    split = self._process_split(process_index, process_count)
    return self.builder.info.splits[split].num_examples

  def epoch_dataset(self, *, epoch, seed, shuffle, start=0, process_index=0,
                    process_count=1):
    epoch_seed = mix_seed(seed, epoch, process_index)
    read_config = tfds.ReadConfig(shuffle_seed=epoch_seed % 2**31, skip_prefetch=True,
                                  try_autocache=False)
    options = tf.data.Options()
    options.deterministic = True
    read_config.options = options
    split = self._process_split(process_index, process_count)
    # A process whose part is empty (3 examples over 4 processes) reads none; tfds
    # refuses an empty slice, so the whole split stands in for its element types.
    empty = self.builder.info.splits[split].num_examples == 0
    ds = self.builder.as_dataset(
        split=self.split if empty else split, shuffle_files=shuffle,
        read_config=read_config, decoders={self.image_key: tfds.decode.SkipDecoding()})
    if empty:
      ds = ds.take(0)
    if shuffle:
      ds = ds.shuffle(self.shuffle_buffer, seed=epoch_seed % 2**31,
                      reshuffle_each_iteration=False)
    ds = ds.map(traced.without_autograph(
        lambda ex: {'image': ex[self.image_key],
                    'label': tf.cast(ex[self.label_key], tf.int64)}))
    ds = ds.enumerate().map(traced.without_autograph(lambda i, ex: dict(ex, position=i)))
    # Skipping reads (but does not decode) the skipped records: at most one epoch.
    return ds.skip(start)


# --------------------------------------------------------------------- image folder


def mix_seed(*values) -> int:
  """A deterministic 63-bit integer from values (for seeds)."""
  digest = hashlib.sha256(','.join(str(v) for v in values).encode()).digest()
  return int.from_bytes(digest[:8], 'little') >> 1


def _check_image(path: str) -> str | None:
  """None if TensorFlow's decoders, the ones training uses, read the file, else the error.

  A JPEG is decoded at 1/8 scale (all of its data is still read, so a truncated file
  fails); other formats in full. PIL is not the judge: it opens files TensorFlow
  refuses (a 1-bit BMP, a TIFF named .png), which would stop training mid-epoch.
  """
  try:
    data = tf.io.read_file(path)
    if tf.io.is_jpeg(data):
      tf.io.decode_jpeg(data, channels=3, ratio=8)
    else:
      preprocess_ops.decode_other(data)
    return None
  except (tf.errors.OpError, ValueError) as e:
    message = image_files.decoder_error(getattr(e, 'message', None) or str(e))
    return f'{type(e).__name__}: {message.splitlines()[0] if message else ""}'


# Seconds between progress lines of the one-time image check of a folder.
CHECK_PROGRESS_EVERY_S = 30.0

# Above this many files the check cache is keyed by the names only: a stat of each file
# at every start would cost minutes on a network file system (ImageNet has 1.3M files).
STAT_KEY_MAX_FILES = 100_000


def _files_key(paths: list[str]) -> str:
  """A key of the file list and, for up to STAT_KEY_MAX_FILES local files, each file's
  size and modification time (a file replaced in place is checked again; remote files
  are keyed by name only, as a stat each would cost a round trip)."""
  digest = hashlib.sha256()
  stat = len(paths) <= STAT_KEY_MAX_FILES
  for p in paths:
    digest.update(p.encode() + b'\n')
    if stat and '://' not in p:
      try:
        st = os.stat(p)
        digest.update(f'{st.st_size},{st.st_mtime_ns}\n'.encode())
      except OSError:
        digest.update(b'missing\n')
  return digest.hexdigest()[:16]


def _gather_indices(indices: list[int]) -> list[tuple[int, int]]:
  """(index, process) of every process's indices: all processes call this together."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  counts = multihost_utils.process_allgather(np.array([len(indices)], np.int64))
  longest = max(int(np.max(counts)), 1)
  padded = np.full((longest,), -1, np.int64)
  padded[:len(indices)] = indices
  every = np.asarray(multihost_utils.process_allgather(padded)).reshape(-1, longest)
  return [(int(i), who) for who, row in enumerate(every) for i in row if i >= 0]


# Folders that file managers, notebooks and archive tools create: never classes, never read.
is_system_folder = image_files.is_system_folder  # hidden or system: not a class


def _count(ignored: dict[str, int], kind: str) -> None:
  ignored[kind] = ignored.get(kind, 0) + 1


def _inside(path: str, folder: str) -> bool:
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _into_other_class(real: str, class_real: str, split_real: str | None,
                      class_reals: tuple[str, ...]) -> bool:
  """Whether a link's target lies in the split (or in a class folder that is a link to
  somewhere else) outside this class's folder."""
  if _inside(real, class_real):
    return False
  return ((split_real is not None and _inside(real, split_real))
          or any(_inside(real, c) for c in class_reals))


def _class_files(cls_dir: str, ignored: dict[str, int], seen: set[str] | None = None,
                 split_real: str | None = None, class_real: str | None = None,
                 linked: dict[str, set[str]] | None = None,
                 class_reals: tuple[str, ...] = ()) -> list[str]:
  """The image files under one class folder, its sub-folders included, in sorted order.

  Hidden files (`.name`, e.g. macOS's `._x.jpg`) and files of other extensions are counted
  in `ignored` by kind. A local folder is listed with its entries' types (a folder named
  `album.jpg` is a folder). Symbolic links to folders are followed, except to a folder
  read already or to be read as a class (`seen`: the split, the class folders, each folder
  read in this class; a link back up the tree is one). Links to folders or files inside
  another class's folder are not read (`split_real`, the split's real path, and
  `class_reals`, every class folder's): they would give that class's images this class's
  label. A folder outside the split that links lead
  to is read in each class that links it (`linked`: its real path -> those classes).
  On remote storage
  (gs://), which has no links, only entries without an image extension are asked whether
  they are folders (one stat each).
  """
  seen = set() if seen is None else seen
  local = '://' not in cls_dir
  if local:
    class_real = class_real or os.path.realpath(cls_dir)
    seen.add(os.path.realpath(cls_dir))
    entries = sorted((e.name, e.is_dir()) for e in os.scandir(cls_dir))
  else:
    entries = [(f.rstrip('/'), True if f.endswith('/') else None)
               for f in sorted(tf.io.gfile.listdir(cls_dir))]
  found = []
  for name, is_dir in entries:
    path = os.path.join(cls_dir, name)
    if is_dir is None and not name.lower().endswith(IMAGE_EXTENSIONS):
      is_dir = tf.io.gfile.isdir(path)
    if is_dir:
      real = os.path.realpath(path) if local else None
      if local and real in seen:  # the split, a class, an ancestor, read already
        _count(ignored, 'link to a folder read elsewhere')
      elif (local and split_real and os.path.islink(path)
            and _into_other_class(real, class_real, split_real, class_reals)):
        _count(ignored, "link into another class's folder")
      elif not is_system_folder(name):
        if (local and linked is not None and split_real and os.path.islink(path)
            and not _inside(real, split_real)):
          linked.setdefault(real, set()).add(class_real)
        found.extend(_class_files(path, ignored, seen, split_real, class_real, linked,
                                  class_reals))
    elif name.startswith('.'):
      _count(ignored, 'hidden')
    elif (local and split_real and os.path.islink(path)
          and _into_other_class(os.path.realpath(path), class_real, split_real,
                                class_reals)):
      _count(ignored, "link into another class's folder")  # read there, under its label
    elif name.lower().endswith(IMAGE_EXTENSIONS):
      found.append(path)
    else:
      _count(ignored, os.path.splitext(name)[1].lower() or name)
  return found


@dataclasses.dataclass
class ImageFolderSource(Source):
  """Images under `<root>/<split>/<class>/<image>`; labels are the sorted class folders.

  Images in sub-folders of a class folder belong to that class. Hidden folders (`.name`)
  and system ones (`__MACOSX`, `@eaDir`, `lost+found`) are neither classes nor read.

  Every file is checked once with the decoders training uses (JPEGs at 1/8 scale, which
  still reads all the data): undecodable or truncated files are skipped, counted and
  named in the log, so a bad file never stops training. With several processes each
  decodes its share and they exchange what they found. The result is cached in
  `cache_dir` (default ~/.cache/vit_jax), keyed by the file list and, for local folders
  of up to STAT_KEY_MAX_FILES files, their sizes and modification times; the image
  folder itself is never written.
  """
  root: str
  split: str
  class_names: list[str] | None = None
  cache_dir: str | None = None
  check_images: bool = True

  def __post_init__(self):
    self.root = os.path.expanduser(self.root)  # ('--config.input.folder=~/d': no shell does)
    self.name = f'folder:{self.root}'
    split_dir = os.path.join(self.root, self.split)
    if '[' in self.split and not tf.io.gfile.isdir(split_dir):
      raise DataError(
          f'split {self.split!r} of the image folder {self.root!r}: slices such as '
          "'train[:90%]' are tfds syntax; a folder's splits are its sub-folders "
          '(<root>/<split>/<class>/<image>): move the held-out images into a folder of '
          'their own, e.g. <root>/val/<class>/')
    if not tf.io.gfile.isdir(split_dir):
      available = (sorted(d for d in tf.io.gfile.listdir(self.root)
                          if tf.io.gfile.isdir(os.path.join(self.root, d)))
                   if tf.io.gfile.isdir(self.root) else [])
      none = ('none (it holds no folders)' if tf.io.gfile.isdir(self.root)
              else 'none (the root does not exist)')
      parent = os.path.dirname(self.root.rstrip('/'))
      hint = (f' {self.root!r} looks like a split itself: give its parent, '
              f'--config.input.folder={parent}' if available and parent and
              os.path.basename(self.root.rstrip('/')) in ('train', 'test', 'val', 'validation',
                                                          self.split) else '')
      raise DataError(f'image folder split {split_dir!r} does not exist; expected '
                      f'<root>/<split>/<class>/<image>. Splits under {self.root!r}: '
                      f'{available or none}.{hint}')
    entries = tf.io.gfile.listdir(split_dir)
    folders = sorted(d.rstrip('/') for d in entries
                     if tf.io.gfile.isdir(os.path.join(split_dir, d)))
    loose = sorted(e for e in entries if e.lower().endswith(IMAGE_EXTENSIONS)
                   and not e.endswith('/') and not tf.io.gfile.isdir(os.path.join(split_dir, e)))
    if loose:  # (they were left out without a word)
      logging.warning('%d image(s) directly in %s are not read: %s. An image\'s class is '
                      'the folder it is in (<split>/<class>/<image>): move them into one.',
                      len(loose), split_dir, ', '.join(loose[:10]) + (' ...' if len(loose) > 10
                                                                      else ''))
    found = [d for d in folders if not is_system_folder(d)]
    if len(found) < len(folders):
      logging.info('Not classes: the hidden or system folder(s) %s of %s.',
                   ', '.join(sorted(set(folders) - set(found))), split_dir)
    defines_classes = self.class_names is None  # the training split names the classes
    if defines_classes:
      self.class_names = found
    unknown = sorted(set(found) - set(self.class_names))
    if unknown:
      shown = ', '.join(repr(c) for c in self.class_names[:20])
      more = f' and {len(self.class_names) - 20} more' if len(self.class_names) > 20 else ''
      nfc = {unicodedata.normalize('NFC', c): c for c in self.class_names}
      same = [f'{ascii(c)} (training: {ascii(nfc[unicodedata.normalize("NFC", c)])})'
              for c in unknown if unicodedata.normalize('NFC', c) in nfc]
      hint = (f'. {", ".join(same)} differ from training classes only in their Unicode form '
              '(NFC and NFD, e.g. one folder named on macOS): rename one of the two'
              if same else '')
      raise DataError(f'{split_dir} has class folders {unknown} that are not among the '
                      f'{len(self.class_names)} training classes ({shown}{more}){hint}')
    if not self.class_names:
      raise DataError(f'{split_dir} has no class folders (<class>/<image> expected)')
    paths, labels, ignored, linked, class_of = [], [], {}, {}, {}
    # Folders a symlink inside a class must not lead back to (its images would be read
    # twice, or under another class's label). Each class starts from these: a folder
    # outside the split linked from two classes is read in both (it used to be read in
    # the first only, its link in the second silently counted as read elsewhere).
    seen = ({os.path.realpath(split_dir)} | {os.path.realpath(os.path.join(split_dir, c))
                                              for c in found}
            if '://' not in split_dir else set())
    split_real = os.path.realpath(split_dir) if '://' not in split_dir else None
    class_reals = ()
    if split_real:
      reals = [os.path.realpath(os.path.join(split_dir, c)) for c in found]
      for c, real in zip(found, reals):  # kitty -> cat: cat's images, two labels
        other = [o for o, r in zip(found, reals)
                 if o != c and _inside(real, r) and os.path.islink(os.path.join(split_dir, c))]
        if other:
          raise DataError(
              f'class folder {os.path.join(split_dir, c)!r} is a link to {real!r}, the '
              f'images of class {other[0]!r} (or inside it): they would be read under two '
              'labels. Remove the link, or make it a folder of its own images.')
      # Class folders kept outside the split (links): links into them are another
      # class's images too. (Those inside are the split_real test; usually none outside.)
      class_reals = tuple(r for r in reals if not _inside(r, split_real))
      class_of = dict(zip(reals, found))
    for label, cls in enumerate(self.class_names):
      cls_dir = os.path.join(split_dir, cls)
      if not tf.io.gfile.isdir(cls_dir):
        continue
      for path in _class_files(cls_dir, ignored, set(seen), split_real, linked=linked,
                               class_reals=class_reals):
        paths.append(path)
        labels.append(label)
    shared = {real: sorted(class_of.get(c, os.path.basename(c)) for c in classes)
              for real, classes in linked.items() if len(classes) > 1}
    if shared:
      logging.warning('Folder(s) linked from several classes of %s: their images are read '
                      'under each of those labels: %s', split_dir,
                      '; '.join(f'{real} ({", ".join(c)})' for real, c in shared.items()))
    if ignored:
      logging.warning('Ignoring %d file(s) under %s that are not %s images, or hidden: %s',
                      sum(ignored.values()), split_dir, '/'.join(IMAGE_EXTENSIONS),
                      ', '.join(f'{n} {e}' for e, n in sorted(ignored.items())))
    if not paths:
      raise DataError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) under {split_dir}')
    self.skipped: dict[str, str] = {}
    if self.check_images:
      bad = self._bad_files(split_dir, paths)
      if bad:
        self.skipped = bad
        logging.warning('Skipping %d undecodable image(s) in %s: %s', len(bad), split_dir,
                        '; '.join(f'{p} ({e})' for p, e in list(bad.items())[:10]))
        keep = [i for i, p in enumerate(paths) if p not in bad]
        paths = [paths[i] for i in keep]
        labels = [labels[i] for i in keep]
        if not paths:
          raise DataError(f'none of the {len(bad)} image files under {split_dir} can be '
                          f'decoded (e.g. {next(iter(bad))}: {next(iter(bad.values()))})')
    self.paths = np.array(paths)
    self.labels = np.array(labels, np.int64)
    empty = [c for c, n in zip(self.class_names,
                               np.bincount(self.labels, minlength=len(self.class_names)))
             if n == 0]
    listed = ', '.join(empty[:20]) + (' ...' if len(empty) > 20 else '')
    if empty and defines_classes:
      logging.warning('%d class folder(s) of %s hold no usable image: %s. They still count '
                      'as classes (labels are the sorted folder names); remove them if '
                      'they are not meant to be classes.', len(empty), split_dir, listed)
    elif empty:
      logging.warning('%s has no usable image of %d of the %d training classes: %s.',
                      split_dir, len(empty), len(self.class_names), listed)

  def _bad_files(self, split_dir, paths) -> dict[str, str]:
    """{path: error} of the files TensorFlow cannot decode, from the cache or checked now.

    With several processes (jax.process_count() > 1), process p decodes only every P-th
    file and the processes exchange the indices of the bad ones, so that each file is
    decoded once across hosts and every process ends with the same list.
    """
    import jax  # pylint: disable=g-import-not-at-top
    key = _files_key(paths)
    cache_dir = self.cache_dir or os.path.expanduser('~/.cache/vit_jax')
    cache = os.path.join(cache_dir, f'checked_images_{key}.json')
    cached = None
    if tf.io.gfile.exists(cache):
      try:
        with tf.io.gfile.GFile(cache) as f:
          cached = json.load(f)
      except (ValueError, OSError, tf.errors.OpError) as e:  # e.g. a write cut short
        logging.warning('Ignoring the unreadable image-check cache %s (%s); checking the '
                        'images again.', cache, e)
        cached = None
    index, count = jax.process_index(), jax.process_count()
    if cached is not None:
      logging.info('Image check of %s read from %s (delete it to check again).', split_dir,
                   cache)
    if cached is not None and count == 1:
      return cached
    mine = list(range(index, len(paths), count))
    if cached is not None:  # this host has the answer; the others may not
      errors = {i: cached[paths[i]] for i in mine if paths[i] in cached}
    else:
      logging.info('Checking %d of %d images under %s once (process %d of %d; cached in '
                   '%s).', len(mine), len(paths), split_dir, index, count, cache)
      checked, start = [], time.monotonic()
      last = start
      with concurrent.futures.ThreadPoolExecutor(max(os.cpu_count() or 1, 2) * 2) as pool:
        for n, error in enumerate(pool.map(_check_image, [paths[i] for i in mine],
                                           chunksize=64), 1):
          checked.append(error)
          now = time.monotonic()
          if n < len(mine) and now - last >= CHECK_PROGRESS_EVERY_S:  # ImageNet: minutes
            rate = n / (now - start)
            logging.info('Checked %d of %d images under %s (%.0f images/s, about %.0f s '
                         'left).', n, len(mine), split_dir, rate, (len(mine) - n) / rate)
            last = now
      errors = {i: e for i, e in zip(mine, checked) if e is not None}
      logging.info('Checked %d images under %s in %.1f s: %d undecodable.', len(mine),
                   split_dir, time.monotonic() - start, len(errors))
    bad = {paths[i]: e for i, e in errors.items()}
    if count > 1:
      for i, who in _gather_indices(sorted(errors)):
        bad.setdefault(paths[i], f'undecodable (found by process {who})')
      bad = dict(sorted(bad.items()))
    if cached is None:
      try:
        tf.io.gfile.makedirs(cache_dir)
        partial = f'{cache}.{os.getpid()}.tmp'  # hosts and processes may write it at once
        with tf.io.gfile.GFile(partial, 'w') as f:
          json.dump(bad, f)
        tf.io.gfile.rename(partial, cache, overwrite=True)
      except (OSError, tf.errors.OpError) as e:
        logging.warning('Could not cache the image check in %s: %s', cache, e)
    return bad

  def _shard(self, process_index, process_count):
    return np.arange(process_index, len(self.paths), process_count)

  def num_examples(self, process_index=0, process_count=1):
    return len(self._shard(process_index, process_count))

  def epoch_dataset(self, *, epoch, seed, shuffle, start=0, process_index=0,
                    process_count=1):
    idx = self._shard(process_index, process_count)
    if shuffle:
      idx = np.random.default_rng(mix_seed(seed, epoch, process_index)).permutation(idx)
    positions = np.arange(len(idx), dtype=np.int64)
    ds = tf.data.Dataset.from_tensor_slices({
        'path': self.paths[idx][start:], 'label': self.labels[idx][start:],
        'position': positions[start:]})
    return ds.map(traced.without_autograph(
        lambda ex: {'image': tf.io.read_file(ex['path']), 'label': ex['label'],
                    'position': ex['position']}),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def create_source(input_config, split: str) -> Source:
  """The source named by config.input (`source` = 'tfds' or 'folder')."""
  kind = input_config.get('source', 'tfds')
  if kind == 'tfds':
    return TfdsSource(name=input_config.name, split=split,
                      data_dir=input_config.get('data_dir'),
                      shuffle_buffer=input_config.get('shuffle_buffer', 50_000))
  if kind == 'folder':
    return ImageFolderSource(root=input_config.folder, split=split,
                             class_names=input_config.get('class_names'))
  raise DataError(f"config.input.source={kind!r}: use 'tfds' or 'folder'")
