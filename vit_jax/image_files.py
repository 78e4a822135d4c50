"""Images given by users: file and folder arguments, and the inputs the models accept
(paths, encoded bytes, PIL images, uint8 arrays). Light: no JAX or TensorFlow import."""

import glob
import os
import pathlib
import re

import numpy as np

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.gif', '.bmp', '.webp')
SYSTEM_FOLDERS = ('__MACOSX', '@eaDir', 'lost+found')


def is_system_folder(name: str) -> bool:
  """A hidden folder (`.name`) or one a tool makes (`__MACOSX`, ...): no images to read."""
  return name.startswith('.') or name in SYSTEM_FOLDERS


def decoder_error(message: str) -> str:
  """A TensorFlow decoder's error without its op plumbing: '{{function_node
  __wrapped__DecodeImage_device_/job:localhost/...}} Input is empty. [Op:DecodeImage]
  name:' -> 'Input is empty.'"""
  message = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', message)
  message = re.sub(r'\s*\[Op:\w+\](\s*name:\s*\S*)?\s*$', '', message).strip()
  # A failed tf.debugging.Assert: "Expected 'tf.Tensor(False, ...)' to be true. Summarized
  # data: b'<its message>'" -> its message.
  asserted = re.match(r"Expected '.*?' to be true\. Summarized data: b?(['\"])(.*)\1$",
                      message, re.S)
  return asserted.group(2) if asserted else message


def folder_images(folder) -> list[pathlib.Path]:
  """The image files under `folder`, sorted, as training reads a class folder: hidden
  files (macOS's `._x.jpg`) and hidden or system folders (`.ipynb_checkpoints`,
  `__MACOSX`) left out, a folder named like an image (`album.jpg/`) read as a folder,
  links to folders followed once, except links back up the tree (not read)."""
  out, seen = [], set()
  top = os.path.realpath(folder)

  def walk(path, first=False):
    real = os.path.realpath(path)
    # (A link to the folder given, or to one above it, would read images outside it.)
    if real in seen or (not first and os.path.commonpath([top, real]) == real):
      return
    seen.add(real)
    for entry in os.scandir(path):
      if entry.name.startswith('.'):
        continue
      if entry.is_dir():
        if not is_system_folder(entry.name):
          walk(entry.path)
      elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
        out.append(pathlib.Path(entry.path))

  walk(folder, first=True)
  return sorted(out)


def expand_images(args) -> list[pathlib.Path]:
  """Files as given; folders -> their image files (`folder_images`). A '~' and a glob
  pattern the shell left as they are ('--x=~/a', a quoted 'img/*.png') are expanded."""
  out, missing, urls = [], [], []
  for a in args:
    text = os.path.expanduser(str(a))
    if '://' in text:
      urls.append(text)
      continue
    matches = (sorted(glob.glob(text)) if glob.has_magic(text) and not os.path.exists(text)
               else [text])
    if not matches:
      missing.append(str(a))
    for match in matches:
      p = pathlib.Path(match)
      if p.is_dir():
        out.extend(folder_images(p))
      elif p.is_file():
        out.append(p)
      else:
        missing.append(str(a))
  if urls:
    raise ValueError(f'images are read from local files: download {", ".join(urls)} first '
                     '(e.g. curl -O URL)')
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
    values = np.asarray(image) if image.mode == 'I' else None
    if image.mode.startswith('I;16') or (values is not None and values.min() >= 0
                                         and 255 < values.max() < 2**16):
      # 16-bit grey: the high byte, as TensorFlow decodes the file (PIL's convert('RGB')
      # clips every value above 255 to white)
      grey = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
      return np.repeat(grey[..., None], 3, axis=-1)
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
