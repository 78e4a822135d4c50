"""Real photographs written as JPEGs of typical ImageNet sizes, for input benchmarks.

scikit-image and scikit-learn ship a few photos (no download). Each file is a random
crop of one of them, resized so its shorter side is 333-500 px and its longer side
about 500 px, the usual ImageNet shapes, saved at JPEG quality 95 (~90 KB; ImageNet
files average ~110 KB).
"""

import os

import numpy as np
from PIL import Image


def _photos() -> list[np.ndarray]:
  from skimage import data  # pylint: disable=g-import-not-at-top
  photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
  try:
    from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
    photos += list(load_sample_images().images)
  except ImportError:
    pass
  return [p for p in photos if p.ndim == 3]


def write_photos(directory: str, count: int, seed: int = 0) -> list[str]:
  """Writes `count` JPEGs under directory/photos/ and returns their paths."""
  rng = np.random.default_rng(seed)
  photos = _photos()
  out_dir = os.path.join(directory, 'photos')
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  shapes = [(375, 500), (333, 500), (500, 375), (500, 500), (400, 500), (500, 333)]
  for i in range(count):
    src = photos[i % len(photos)]
    h, w = src.shape[:2]
    ch, cw = int(h * rng.uniform(0.8, 1.0)), int(w * rng.uniform(0.8, 1.0))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    th, tw = shapes[i % len(shapes)]
    img = Image.fromarray(src[y:y + ch, x:x + cw]).resize((tw, th), Image.BICUBIC)
    path = os.path.join(out_dir, f'{i:05d}.jpg')
    img.save(path, quality=95)
    paths.append(path)
  return paths
