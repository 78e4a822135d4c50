"""Sources and batches from the `config.input` block (see `input_config.py`)."""

import re

from absl import logging

from vit_jax.data import input_config as input_config_lib
from vit_jax.data import pipeline
from vit_jax.data import preprocess_ops
from vit_jax.data import sources


def create_sources(input_config) -> tuple[sources.Source, sources.Source]:
  """(train, eval) sources; eval folders use the training split's class names."""
  unknown = sorted(set(input_config.keys()) - set(input_config_lib.FIELD_DOCS))
  if unknown:
    raise ValueError(f'unknown config.input field(s) {unknown}; fields: '
                     f'{sorted(input_config_lib.FIELD_DOCS)}')
  if input_config.source == 'folder' and not input_config.get('folder'):
    raise sources.DataError("config.input.source='folder' needs config.input.folder")
  train = sources.create_source(input_config, input_config.train_split)
  if input_config.source == 'folder' and len(train.class_names or ()) == 1:
    raise sources.DataError(
        f'config.input.folder={input_config.folder!r}: split {input_config.train_split!r} '
        f'has one class ({train.class_names[0]!r}); a classifier needs at least two '
        '(the layout is <split>/<class>/<image>, one folder per class)')
  if input_config.source == 'folder':
    try:
      evaluation = sources.ImageFolderSource(root=input_config.folder,
                                             split=input_config.eval_split,
                                             class_names=train.class_names)
    except sources.DataError as e:
      if 'does not exist' not in str(e):
        raise
      raise sources.DataError(
          f'{e}\nThe run evaluates on config.input.eval_split={input_config.eval_split!r}: '
          'name one of those splits (--config.input.eval_split=NAME), or put held-out '
          f'images in <folder>/{input_config.eval_split}/<class>/') from None
  else:
    evaluation = sources.create_source(input_config, input_config.eval_split)
  if evaluation.num_examples() == 0:  # a slice that rounds to nothing: 'test[99%:]'
    raise sources.DataError(
        f'config.input.eval_split={input_config.eval_split!r} of {evaluation.name} has no '
        'examples: give a larger slice or another split')
  _check_label_count(input_config, train)
  return train, evaluation


def _check_label_count(input_config, train) -> None:
  """The one-hot width of the preprocessing holds every class of the data: fewer fails
  in the first batch (deep in TensorFlow), more trains outputs no image has."""
  classes = len(train.class_names or ())
  width = preprocess_ops.output_spec(input_config.pp_train)[2]
  if not classes or width is None or width == classes:
    return
  where = (f'config.input.folder={input_config.folder!r}' if input_config.source == 'folder'
           else f'config.input.name={input_config.name!r}')
  message = (f'{where} has {classes} classes, but config.input.pp_train one-hot encodes '
             f'{width} (onehot({width})): set onehot({classes}) in config.input.pp_train and '
             f'config.input.pp_eval, and --config.model.num_classes={classes}')
  if width < classes:
    raise sources.DataError(message)
  logging.warning('%s; the other %d outputs are never a label.', message, width - classes)


def create_train_batches(input_config, source, *, global_batch_size, seed, start_step=0,
                         process_index=None, process_count=None):
  return pipeline.train_batches(
      source, global_batch_size=global_batch_size,
      preprocess=preprocess_ops.parse(input_config.pp_train),
      seed=seed, start_step=start_step,
      process_index=process_index, process_count=process_count,
      threads=input_config.get('threads'))


def create_eval_batches(input_config, source, *, global_batch_size, process_index=None,
                        process_count=None):
  return pipeline.eval_batches(
      source, global_batch_size=global_batch_size,
      preprocess=preprocess_ops.parse(input_config.pp_eval), process_index=process_index,
      process_count=process_count, threads=input_config.get('threads'))


def preprocessing_failure(error: BaseException, field: str,
                          input_config) -> sources.DataError | None:
  """A DataError naming `field` ('pp_train' or 'pp_eval') for a failed check of one of its
  preprocessing ops (a crop larger than an image, a label outside onehot's classes: a
  TensorFlow 'assertion failed'), which every restart would meet again; None for any
  other error (a file gone, a network file system), which a restart may not."""
  text = str(getattr(error, 'message', None) or error)
  found = re.search(r'assertion failed: \[(.*)\]\s*$', text.split('\n')[0])
  if not found:
    return None
  parts = found.group(1).split('] [')  # [message] [Condition ...] [x (name) = ] [value] ...
  what = parts[0].rstrip(':').replace("\\'", "'").replace('\\"', '"')  # TF escapes
  got = next((parts[i + 1] for i, part in enumerate(parts[:-1])
              if part.startswith('x (') and part.endswith('= ')), None)
  pp = input_config.get(field)
  split = input_config.get('train_split' if field == 'pp_train' else 'eval_split')
  return sources.DataError(
      f'config.input.{field}={pp!r} fails on an example of split {split!r}: {what}'
      + (f' (got {got})' if got is not None else '')
      + '. Change the preprocessing (e.g. resize(...) before a crop, the onehot(...) '
      'class count) or the data; a restart would fail the same way')


def check_eval_preprocessing(input_config, source) -> None:
  """Runs config.input.pp_eval on the first eval example of this process, before anything
  is compiled: an evaluation crop larger than the images failed only at the first
  evaluation, after training (and each restart then failed there again)."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    next(iter(create_eval_batches(input_config, source,
                                  global_batch_size=jax.process_count())))
  except StopIteration:
    pass
  except Exception as e:  # pylint: disable=broad-except
    failure = preprocessing_failure(e, 'pp_eval', input_config)
    if failure is None:
      raise
    raise failure from None
