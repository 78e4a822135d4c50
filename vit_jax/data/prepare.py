"""Downloads and prepares a tfds dataset once, for `config.input.source='tfds'`.

    python -m vit_jax.data.prepare cifar10 --data_dir=DIR
    python -m vit_jax.data.prepare imagenet2012 --data_dir=DIR   # archives in DIR/downloads/manual

What `tfds build NAME --data_dir=DIR` does for the datasets the recipes read, without
that command's start-up: tensorflow-datasets' command-line tool imports Apache Beam,
which this project does not install ("No module named 'apache_beam'"). The datasets the
recipes use are prepared without Beam.
"""

import dataclasses
import os
import sys

from vit_jax import cli_flags
from vit_jax import tensorflow_startup


class PrepareError(ValueError):
  """A dataset name or folder that cannot work; one line, exit status 2."""


@dataclasses.dataclass
class Prepared:
  name: str
  data_dir: str
  splits: dict[str, int]  # split -> examples
  already: bool  # prepared before this call


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None) -> Prepared:
  """Prepares tfds dataset `name` (e.g. 'cifar10', 'oxford_iiit_pet:4.*.*') in `data_dir`
  (default ~/tensorflow_datasets); a dataset prepared already is left as it is.
  manual_dir: the archives of a dataset with manual downloads (default
  <data_dir>/downloads/manual)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from vit_jax.data import bundled_mnist  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  try:
    builder = tfds.builder(name, data_dir=os.path.expanduser(data_dir) if data_dir else None)
  except tfds.core.registered.DatasetNotFoundError:
    import difflib  # pylint: disable=g-import-not-at-top
    close = difflib.get_close_matches(name.split(':')[0], tfds.list_builders(
        with_community_datasets=False), n=5)
    raise PrepareError(f'{name!r} is not a tfds dataset. Closest names: '
                       f'{", ".join(close) or "none"}; all of them: '
                       'https://www.tensorflow.org/datasets/catalog/overview') from None
  except (AssertionError, ValueError) as e:  # a version or config the dataset lacks
    raise PrepareError(f'{name!r}: {" ".join(str(e).split())}') from None
  already = builder.is_prepared()
  if not already:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (gs:// too)
    manual = manual_dir or os.path.join(builder.data_dir_root, 'downloads', 'manual')
    instructions = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
    if instructions and not (tf.io.gfile.isdir(manual) and tf.io.gfile.listdir(manual)):
      raise PrepareError(
          f'{name} needs its archives downloaded by hand into {manual} (or give '
          f'--manual_dir): {" ".join(instructions.split())}')
    config = tfds.download.DownloadConfig(manual_dir=manual) if instructions else None
    builder.download_and_prepare(download_config=config)
  splits = {split: info.num_examples for split, info in builder.info.splits.items()}
  return Prepared(builder.info.full_name, builder.data_dir_root, splits, already)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  return dict(
      data_dir=flags.DEFINE_string('data_dir', None, 'Where tfds datasets are kept '
                                   '(default ~/tensorflow_datasets; gs:// works).'),
      manual_dir=flags.DEFINE_string('manual_dir', None, 'The archives of a dataset with '
                                     'manual downloads (default DATA_DIR/downloads/manual).'))


def main(argv, flag_values) -> None:
  tensorflow_startup.leave_keras_out()
  tensorflow_startup.quiet_native_logs()
  if len(argv) != 2:
    print('usage: python -m vit_jax.data.prepare NAME [--data_dir=DIR] [--manual_dir=DIR] '
          '(one tfds dataset name, e.g. cifar10)', file=sys.stderr)
    sys.exit(2)
  try:
    done = prepare(argv[1], flag_values['data_dir'].value, flag_values['manual_dir'].value)
  except PrepareError as e:
    print(f'vit_jax.data.prepare: {e}', file=sys.stderr)
    sys.exit(2)
  state = 'was prepared already' if done.already else 'is prepared'
  print(f'{done.name} {state} in {done.data_dir}: ' + ', '.join(
      f'{split} {n:,}' for split, n in sorted(done.splits.items())))
  print(f'Use it with --config.input.name={argv[1]} --config.input.data_dir={done.data_dir}')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _flags = _define_flags()
  app.run(lambda argv: main(argv, _flags),
          flags_parser=lambda argv: cli_flags.parse_flags(argv, bad_flag_status=2))
