"""Images given by users: file and folder arguments, and the inputs the models accept
(paths, encoded bytes, PIL images, uint8 arrays). Light: no JAX or TensorFlow import."""

import os
import pathlib

import numpy as np

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.gif', '.bmp')


def expand_images(args) -> list[pathlib.Path]:
  """Files as given; folders -> their image files (sorted, recursively)."""
  out, missing = [], []
  for a in args:
    p = pathlib.Path(a)
    if p.is_dir():
      out.extend(sorted(f for f in p.rglob('*') if f.suffix.lower() in IMAGE_SUFFIXES))
    elif p.is_file():
      out.append(p)
    else:
      missing.append(str(a))
  if missing:
    raise FileNotFoundError(f'no such image file or folder: {", ".join(missing)}')
  return out


def paths_from_args(args) -> list[pathlib.Path]:
  """The images of command-line arguments; ValueError/FileNotFoundError saying what is
  wrong (no arguments, a missing path, folders without images)."""
  if not args:
    raise ValueError('give one or more image files or folders after the flags')
  paths = expand_images(args)
  if not paths:
    raise ValueError(f'no images ({", ".join(IMAGE_SUFFIXES)}) in {" ".join(map(str, args))}')
  return paths


def read_image(image):
  """A path, encoded bytes, PIL image or uint8 array -> what the 'decode' op takes."""
  if isinstance(image, (str, os.PathLike)):
    path = pathlib.Path(image)
    if not path.is_file():
      raise FileNotFoundError(f'no image file {path}')
    return path.read_bytes()
  if isinstance(image, bytes):
    return image
  if hasattr(image, 'convert') and hasattr(image, 'size'):  # PIL
    return np.asarray(image.convert('RGB'))
  array = np.asarray(image)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
    raise ValueError(f'expected an HxWxC image (C 1-4), got an array of shape {array.shape}')
  if array.dtype != np.uint8:
    raise ValueError(f'expected uint8 pixels (0..255), got {array.dtype}; pass the image '
                     'as loaded, preprocessing scales it')
  return array
