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
