"""Input pipeline throughput: ImageNet training preprocessing on real photographs.

Ours: the project's training pipeline (`pipeline.train_batches` over an image folder)
with `decode|inception_crop(224)|flip_lr|value_range(-1, 1)`, which decodes only the
crop window of each JPEG, on `workers` tf.data threads. Baseline, in the same process
on the same files: torchvision's `RandomResizedCrop(224)` + `RandomHorizontalFlip` +
`ToTensor` + `Normalize` on PIL-decoded images in a torch `DataLoader` with the same
number of worker processes. Images/s per core = images/s / the cores they use (workers,
or the machine's cores where there are more workers than cores).
"""

import os
import tempfile
import time

import numpy as np

from vit_jax import torch_import
from vit_jax.benchmark import photos as photos_lib

PP_TRAIN = 'decode|inception_crop(224)|flip_lr|value_range(-1, 1)'


def _time_batches(iterator, batch_size: int, warmup: int, steps: int) -> float:
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return steps * batch_size / (time.perf_counter() - start)


def ours(root: str, *, workers: int, batch_size: int, warmup: int, steps: int) -> float:
  from vit_jax.data import pipeline, preprocess_ops, sources  # pylint: disable=g-import-not-at-top
  source = sources.ImageFolderSource(root=root, split='train', cache_dir=root)
  batches = pipeline.train_batches(source, global_batch_size=batch_size,
                                   preprocess=preprocess_ops.parse(PP_TRAIN), seed=0,
                                   process_index=0, process_count=1, threads=workers)
  return _time_batches(batches, batch_size, warmup, steps)


class _TorchvisionDataset:
  def __init__(self, paths):
    transforms = torch_import.module('torchvision.transforms')
    self.paths = paths
    self.transform = transforms.Compose([
        transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(self.paths[i]) as img:
      return self.transform(img.convert('RGB')), 0


def _single_thread_worker(_):
  torch = torch_import.torch()
  torch.set_num_threads(1)


def torchvision_baseline(paths, *, workers: int, batch_size: int, warmup: int,
                         steps: int) -> float:
  torch = torch_import.torch()
  loader = torch.utils.data.DataLoader(
      _TorchvisionDataset(paths), batch_size=batch_size, shuffle=True, drop_last=True,
      num_workers=workers, persistent_workers=True, worker_init_fn=_single_thread_worker,
      multiprocessing_context='spawn')  # no fork of a process running TensorFlow threads

  def endless():
    while True:
      yield from loader

  return _time_batches(endless(), batch_size, warmup, steps)


COMPARE = ('torchvision',)  # the baselines of the input mode


def check(*, batch_size: int, steps: int, warmup: int, num_files: int,
          compare: str | None) -> None:
  """A ValueError naming the flag, for settings `run` cannot measure (before it writes a
  file or builds a pipeline)."""
  if compare is not None and compare not in COMPARE:
    raise ValueError(f'--compare={compare!r}: the input mode compares with torchvision '
                     "(--compare=torchvision); 'timm' is a baseline of --mode=train/infer")
  needed = (warmup + steps) * batch_size
  if num_files < 1 or needed > num_files:
    raise ValueError(f'--files={num_files}: (warmup {warmup} + steps {steps}) x batch '
                     f'{batch_size} = {needed} images, more than the files: use '
                     f'--files={needed} or more, so that the timing stays within one epoch '
                     '(an epoch restart is not steady-state throughput), or fewer --steps')


def run(*, workers: int | None = None, batch_size: int = 64, steps: int = 20,
        warmup: int = 3, num_files: int = 2048, compare: str | None = None,
        directory: str | None = None) -> dict:
  """Measures ours (and the baseline when compare='torchvision'); returns a record."""
  workers = workers or os.cpu_count() or 1
  check(batch_size=batch_size, steps=steps, warmup=warmup, num_files=num_files,
        compare=compare)
  with tempfile.TemporaryDirectory() as tmp:
    root = directory or tmp
    paths = photos_lib.write_photos(os.path.join(root, 'train'), num_files)
    sizes = [os.path.getsize(p) for p in paths]
    record = {
        'mode': 'input', 'pipeline': PP_TRAIN, 'workers': workers, 'batch_size': batch_size,
        'warmup': warmup, 'timed_images': steps * batch_size, 'files': num_files,
        'mean_file_kb': float(np.mean(sizes) / 1024), 'cpu_count': os.cpu_count(),
    }
    cores = min(workers, os.cpu_count() or workers)  # (4 workers on 2 cores use 2)
    record['cores_used'] = cores
    ips = ours(root, workers=workers, batch_size=batch_size, warmup=warmup, steps=steps)
    record.update(images_per_sec=ips, images_per_sec_per_core=ips / cores)
    if compare == 'torchvision':
      base = torchvision_baseline(paths, workers=workers, batch_size=batch_size,
                                  warmup=warmup, steps=steps)
      record.update(baseline='torchvision RandomResizedCrop DataLoader',
                    baseline_images_per_sec=base,
                    baseline_images_per_sec_per_core=base / cores, ratio=ips / base)
  return record
