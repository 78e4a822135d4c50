"""The start shared by the image command lines (`vit_jax.predict`, `vit_jax.visualize`):
the classifier of --checkpoint and the image files of the arguments, or a one-line error
and exit status 2."""

import os
import sys

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
  if '://' not in checkpoint and not os.path.exists(checkpoint):
    fail(program, f'cannot load {checkpoint}: no such checkpoint file or folder')
  labels = from_pretrained.get('labels')
  if labels and '://' not in labels and not os.path.isfile(labels):
    fail(program, f'--labels={labels}: no such file (a text file of class names, one per '
                  'line)')
  from vit_jax import inference  # pylint: disable=g-import-not-at-top
  try:
    classifier = inference.ImageClassifier.from_pretrained(checkpoint, **from_pretrained)
  except (FileNotFoundError, ValueError, KeyError) as e:
    text = str(e)
    if text.startswith(('pp=', 'batch_size=')):  # the flag's fault, not the checkpoint's
      fail(program, f'--{text}')
    fail(program, f'cannot load {checkpoint}: {text}')
  return paths, classifier


def readable_images(program: str, classifier, paths):
  """(preprocessed pixels, their paths, whether any were skipped) of the images
  `classifier` can read; each one it cannot is named on stderr, and none at all is a
  one-line error (status 2)."""
  try:
    pixels, errors = classifier.read([str(p) for p in paths])
  except ValueError as e:
    fail(program, f'cannot preprocess the images: {e}')
  for i, error in errors.items():
    print(f'{program}: skipping {paths[i]}: {error}', file=sys.stderr)
  if not len(pixels):
    fail(program, f'none of the {len(paths)} images could be read')
  return pixels, [p for i, p in enumerate(paths) if i not in errors], bool(errors)
