"""What the image command lines (`vit_jax.predict`, `vit_jax.visualize`) share: the
classifier of --checkpoint and the image files of the arguments, or a one-line error and
exit status 2; the checks of a --pp; predict's loop over the files a batch at a time."""

import os
import sys
import time

from vit_jax import image_files


def fail(program: str, message: str) -> None:
  """Prints `program: message` to stderr and exits with status 2 (a usage error)."""
  print(f'{program}: {message}', file=sys.stderr)
  sys.exit(2)


def images_and_classifier(program: str, args, checkpoint: str | None, **from_pretrained):
  """(image paths, `inference.ImageClassifier`) for the command line `args`.

  `checkpoint` is anything `ImageClassifier.from_pretrained` takes (local or gs://);
  `from_pretrained` are its other arguments (model, labels, pp, batch_size).
  """
  if not checkpoint:
    fail(program, '--checkpoint is required (a workdir, .npz, .safetensors, .bin or .pth)')
  try:
    paths = image_files.paths_from_args(args)
  except (FileNotFoundError, ValueError) as e:
    fail(program, str(e))
  checkpoint = os.path.expanduser(checkpoint)  # ('--checkpoint=~/w': no shell expands it)
  if '://' in checkpoint and not checkpoint.startswith('gs://'):
    fail(program, f'cannot load {checkpoint}: checkpoints are read from local paths or '
                  'gs:// (Cloud Storage); download it first')
  if '://' not in checkpoint and not os.path.exists(checkpoint):
    fail(program, f'cannot load {checkpoint}: no such checkpoint file or folder')
  labels = from_pretrained.get('labels')
  if labels and '://' not in labels:
    labels = from_pretrained['labels'] = os.path.expanduser(labels)
    if not os.path.isfile(labels):
      fail(program, f'--labels={labels}: no such file (a text file of class names, one per '
                    'line)')
  batch_size = from_pretrained.get('batch_size')
  if batch_size is not None and batch_size < 1:
    fail(program, f'--batch_size={batch_size} must be a positive int')
  pp = from_pretrained.get('pp')
  if pp:  # its syntax and ops, before the (slow) load
    from vit_jax.data import preprocess_ops  # pylint: disable=g-import-not-at-top
    try:
      preprocess_ops.ops(pp)
    except ValueError as e:
      fail(program, f'--pp={pp!r}: {e}')
  from vit_jax import inference  # pylint: disable=g-import-not-at-top
  try:
    classifier = inference.ImageClassifier.from_pretrained(checkpoint, **from_pretrained)
  except UnicodeDecodeError as e:  # (ValueError's kind: a labels file of another encoding)
    fail(program, f'--labels={labels}: not UTF-8 text ({e.reason} at byte {e.start}); save '
                  'it as UTF-8' if labels else f'cannot load {checkpoint}: {e}')
  except (FileNotFoundError, ValueError, KeyError) as e:
    fail(program, f'cannot load {checkpoint}: {e}')
  except Exception as e:  # pylint: disable=broad-except
    from vit_jax import tensorflow_startup  # pylint: disable=g-import-not-at-top
    if not tensorflow_startup.is_tensorflow_error(e):
      raise
    # TensorFlow's file system (gs://): no network, no credentials, no such object.
    fail(program, f'cannot load {checkpoint}: {type(e).__name__}: '
                  f'{str(e).strip().splitlines()[-1] if str(e).strip() else e}')
  if pp:
    problem = pp_problem(pp, classifier.config)
    if problem:
      fail(program, f'--pp={pp!r}: {problem}')
    scale = pixel_scale_note(pp, getattr(classifier, 'weights_pp', None),
                             recorded=getattr(classifier, 'weights_pp_recorded', True))
    if scale:
      print(f'{program}: warning: --pp={pp!r} {scale}', file=sys.stderr)
  if from_pretrained.get('model') and (os.path.isdir(checkpoint) or (
      '://' in checkpoint and not checkpoint.endswith(_WEIGHT_FILES))):
    print(f"{program}: --model={from_pretrained['model']} is not used: {checkpoint} records "
          'the model config it was saved with (a workdir, or a transformers config.json)',
          file=sys.stderr)
  return paths, classifier


# The weight files whose model config --model may give (a directory records its own).
_WEIGHT_FILES = ('.npz', '.safetensors', '.bin', '.pt', '.pth')


def pp_problem(pp: str, config) -> str | None:
  """Why `pp` cannot feed the model of `config` image files, or None: an op it does not
  know or arguments it does not take, no decode first (files are encoded), or for a
  model of a fixed input size (ViT, Swin) another size than the model's. (The library
  takes arrays too, already decoded and sized: there these are not errors.)"""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  from vit_jax.data import preprocess_ops  # pylint: disable=g-import-not-at-top
  try:
    problem = preprocess_ops.decode_problem(pp)
    made = preprocess_ops.output_spec(pp)[0]
  except ValueError as e:
    return str(e)
  if problem:
    return f"{problem}: image files are encoded, so start it with 'decode|'"
  random = [name for name, _ in preprocess_ops.ops(pp) if name in preprocess_ops.RANDOM_OPS]
  if random:
    return (f'{random[0]} is a random training augmentation; prediction takes the '
            "evaluation preprocessing, e.g. 'decode|resize_small(256)|central_crop(224)|"
            "value_range(-1, 1)'")
  size = config.get('image_size') if config is not None else None
  if config is not None and models.fixed_input_size(models.family_of(config)) and size and (
      made != (size, size)):
    what = f'makes {made[0]}x{made[1]} images' if made else 'does not fix the image size'
    return (f'{what}, but the model takes {size}x{size} (the size its weights were made '
            f'for): end it with resize({size}) or central_crop({size})')
  return None


def _scale_words(scale) -> str:
  if scale is None:
    return 'in 0..255 (no value_range or normalize op)'
  mean, std = scale
  if len(set(mean)) == 1 and len(set(std)) == 1:
    low, high = (0 - mean[0]) / std[0], (1 - mean[0]) / std[0]
    return f'in {low:g}..{high:g}'
  return f'normalised with mean {mean} and std {std}'


def pixel_scale_note(pp: str, weights_pp: str | None, *, recorded: bool = True) -> str | None:
  """A note when `pp` scales pixels otherwise than the preprocessing the weights come
  with (a --pp without value_range feeds 0..255 to a model trained on -1..1), else None.
  recorded=False: `weights_pp` is the family's default, a guess (the weights record
  none), and the note says so."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_jax.data import preprocess_ops  # pylint: disable=g-import-not-at-top
  if not weights_pp:
    return None
  try:
    mine, theirs = (preprocess_ops.pixel_mean_std(p) for p in (pp, weights_pp))
  except ValueError:
    return None
  if mine is not None and theirs is not None and np.allclose(mine, theirs, atol=1e-3):
    return None
  if mine is None and theirs is None:
    return None
  if not recorded:
    return (f'gives pixels {_scale_words(mine)}, and the default for these weights, which '
            f'record no preprocessing, is {weights_pp!r} (pixels {_scale_words(theirs)}): '
            'right if the --pp is what they were trained with')
  return (f'gives pixels {_scale_words(mine)}, but the weights come with '
          f'{weights_pp!r} (pixels {_scale_words(theirs)}): the predictions are off unless '
          'that is intended')


# Seconds between progress lines on stderr (images done, images/s, time left).
PROGRESS_EVERY_S = 10.0


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 60:
    return f'{seconds}s'
  minutes, seconds = divmod(seconds, 60)
  return f'{minutes}m{seconds:02d}s' if minutes < 60 else f'{minutes // 60}h{minutes % 60:02d}m'


def predict_files(clf, paths, top_k: int, emit, *, program: str = 'vit_jax.predict',
                  progress_every: float = PROGRESS_EVERY_S, err=None) -> tuple[int, int]:
  """Classifies image files a batch at a time, calling `emit(path, predictions)` as each
  batch is done (memory holds one batch, not every image; what is done is printed when a
  later image fails). Each image that cannot be read is named on `err` (stderr) and
  skipped; a progress line with images/s and the time left goes there every
  `progress_every` seconds. Returns (classified, skipped)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  err = err or sys.stderr
  bs, total = clf.batch_size, len(paths)
  done = classified = skipped = 0
  start = last = time.monotonic()
  for begin in range(0, total, bs):
    chunk = paths[begin:begin + bs]
    try:
      pixels, errors = clf.read([str(p) for p in chunk])
    except ValueError as e:
      fail(program, f'cannot preprocess the images: {e}')
    for i, error in sorted(errors.items()):
      print(f'{program}: skipping {chunk[i]}: {error}', file=err, flush=True)
    skipped += len(errors)
    if len(pixels):
      n = len(pixels)
      if total > bs and n < bs:  # the batch's shape (one compilation for every batch)
        pixels = np.concatenate([pixels, np.zeros((bs - n,) + pixels.shape[1:], pixels.dtype)])
      try:
        predictions = clf.top_k(clf.logits(pixels)[:n], top_k)
      except Exception as e:  # pylint: disable=broad-except
        fail(program, f'cannot classify the images: {type(e).__name__}: {e}')
      readable = [p for i, p in enumerate(chunk) if i not in errors]
      for path, preds in zip(readable, predictions):
        emit(path, preds)
      classified += n
    done += len(chunk)
    now = time.monotonic()
    if done < total and now - last >= progress_every:
      rate = done / (now - start)
      print(f'{program}: {done}/{total} images, {rate:.1f} images/s, '
            f'{_duration((total - done) / rate)} left', file=err, flush=True)
      last = now
  return classified, skipped
