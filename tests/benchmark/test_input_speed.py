"""The input benchmark command runs end to end and writes its record (speed targets live in
the benchmark itself, never in tests)."""

import json
import pathlib
import subprocess
import sys

from PIL import Image
import subprocess_env

from vit_jax.benchmark import photos

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_photos_are_real_jpegs_of_imagenet_sizes(tmp_path):
  paths = photos.write_photos(str(tmp_path), 6)
  sizes = set()
  for p in paths:
    with Image.open(p) as im:
      assert im.format == 'JPEG' and im.mode == 'RGB'
      sizes.add(im.size)
      assert 333 <= min(im.size) <= 500 and max(im.size) == 500
  assert len(sizes) > 1


def test_benchmark_command_writes_json(tmp_path):
  out = tmp_path / 'input.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'vit_jax.benchmark', '--mode=input', '--compare=torchvision',
       '--workers=1', '--batch=8', '--steps=2', '--files=48', f'--json={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  record = json.loads(out.read_text())
  assert record['images_per_sec_per_core'] > 0
  assert record['baseline_images_per_sec_per_core'] > 0
  assert abs(record['ratio'] - record['images_per_sec'] / record['baseline_images_per_sec']) < 1e-9
  assert 'per core' in proc.stdout and 'ratio' in proc.stdout
  assert record['warmup'] == record['run']['warmup'] == 3  # the input mode's default


def test_per_core_divides_by_the_cores_the_workers_can_use(tmp_path, monkeypatch):
  """4 workers on 2 cores: images/s per core was images/s / 4, half the true figure."""
  from vit_jax.benchmark import input_speed  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(input_speed, 'ours', lambda root, **kwargs: 100.0)
  monkeypatch.setattr(input_speed.os, 'cpu_count', lambda: 2)
  record = input_speed.run(workers=4, batch_size=1, steps=1, warmup=0, num_files=2,
                           directory=str(tmp_path))
  assert record['workers'] == 4 and record['cores_used'] == 2
  assert record['images_per_sec_per_core'] == 50.0
  one = input_speed.run(workers=1, batch_size=1, steps=1, warmup=0, num_files=2,
                        directory=str(tmp_path / 'one'))
  assert one['images_per_sec_per_core'] == 100.0
