"""`python -m vit_jax.data.prepare`: tfds datasets prepared without `tfds build`, whose
command-line tool needs Apache Beam (not installed: "No module named 'apache_beam'")."""

import os
import subprocess
import sys

import pytest

from vit_jax.data import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_prepares_a_dataset_once_and_training_reads_it(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  def run(*args):
    return subprocess.run([sys.executable, '-m', 'vit_jax.data.prepare', *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
  proc = run('bundled_mnist', f'--data_dir={tmp_path}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'bundled_mnist/1.0.0 is prepared in {tmp_path}: test 1,000, train 4,000' in proc.stdout
  assert f'--config.input.data_dir={tmp_path}' in proc.stdout
  # What the input pipeline opens: the prepared files, read without preparing again.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder('bundled_mnist', data_dir=str(tmp_path))
  assert builder.is_prepared()
  assert len(list(builder.as_dataset(split='test'))) == 1000
  again = prepare.prepare('bundled_mnist', str(tmp_path))
  assert again.already and again.splits == {'train': 4000, 'test': 1000}
  proc = run()
  assert proc.returncode == 2 and 'usage: python -m vit_jax.data.prepare NAME' in proc.stderr


def test_errors_name_the_dataset_and_the_fix(tmp_path):
  with pytest.raises(prepare.PrepareError, match=r"'cifar11' is not a tfds dataset. Closest "
                     r'names: .*cifar10'):
    prepare.prepare('cifar11', str(tmp_path))
  # A dataset with manual downloads: the folder its archives go in, before any work.
  with pytest.raises(prepare.PrepareError, match=r'imagenet2012 needs its archives '
                     rf'downloaded by hand into {tmp_path}/downloads/manual .*'
                     r'ILSVRC2012_img_train.tar'):
    prepare.prepare('imagenet2012', str(tmp_path))
  assert not (tmp_path / 'imagenet2012').exists() or not any(
      (tmp_path / 'imagenet2012').rglob('*.tfrecord*'))
  # A version or config the dataset lacks: one line (was a 43-line AssertionError).
  with pytest.raises(prepare.PrepareError, match=r"'cifar10:9.\*.\*': .*only: 3"):
    prepare.prepare('cifar10:9.*.*', str(tmp_path))
  # The manual archives on another file system (gs://): found through tf.io.gfile, here
  # on TensorFlow's in-memory one (they were looked for with os.path, never found).
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.io.gfile.makedirs('ram://manual')
  with tf.io.gfile.GFile('ram://manual/ILSVRC2012_img_val.tar', 'wb') as f:
    f.write(b'not really a tar')
  with pytest.raises(Exception) as e:  # past the check: tfds then reads the archives
    prepare.prepare('imagenet2012', str(tmp_path), manual_dir='ram://manual')
  assert not isinstance(e.value, prepare.PrepareError), e.value
