"""Class-name lists for the heads of published checkpoints.

ImageNet-1k: the human-readable names and WordNet ids that tensorflow-datasets ships
(no download). ImageNet-21k: not shipped by any installed package; pass the list of the
original release (`imagenet21k_wordnet_lemmas.txt`, one name per line) as a file.
"""

import os


def read_label_file(path) -> list[str]:
  """One class name per line (blank lines at the end ignored; a byte-order mark and
  Windows line ends, as Notepad writes, are not part of the names)."""
  with open(path, encoding='utf-8-sig') as f:
    names = [line.rstrip('\r\n') for line in f]
  while names and not names[-1].strip():
    names.pop()
  if not names:
    raise ValueError(f'label file {path} is empty')
  return names


def imagenet1k_names() -> list[str]:
  """The 1,000 ImageNet-1k class names in label order ('tench, Tinca tinca', ...)."""
  from tensorflow_datasets.datasets.siscore import labels  # pylint: disable=g-import-not-at-top
  return list(labels.IMAGENET_LABELS_LIST)


def imagenet1k_wnids() -> list[str]:
  """The 1,000 ImageNet-1k WordNet ids in label order ('n01440764', ...)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(tfds.__file__), 'datasets', 'imagenet2012', 'labels.txt')
  return read_label_file(path)


IMAGENET21K_CLASSES = 21843


def names_for_head(num_classes: int) -> list[str] | None:
  """Known names for a head of this size, or None (ImageNet-21k needs a label file)."""
  if num_classes == 1000:
    return imagenet1k_names()
  return None
