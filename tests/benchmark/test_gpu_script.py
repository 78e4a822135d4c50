"""experiments/benchmarks_gpu.sh, run with a stand-in python and nvidia-smi: a failed run
is reported and the runs after it still happen (a lent GPU's minutes are few)."""

import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_a_failed_run_does_not_stop_the_others(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'nvidia-smi').write_text('#!/usr/bin/env bash\necho "NVIDIA H200, 1, 141 GiB"\n')
  calls = tmp_path / 'calls'
  # The stand-in fails the cuDNN attention run and records every call.
  (bin_dir / 'python').write_text(
      '#!/usr/bin/env bash\n'
      f'echo "$*" >> {calls}\n'
      'if [[ "$*" == *cudnn* ]]; then echo "cuDNN refused" >&2; exit 1; fi\n')
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  proc = subprocess.run(
      ['bash', str(ROOT / 'experiments' / 'benchmarks_gpu.sh'), str(tmp_path / 'out')],
      env={'PATH': f'{bin_dir}:/usr/bin:/bin', 'PYTHON': str(bin_dir / 'python')},
      capture_output=True, text=True, timeout=60)
  assert proc.returncode == 1, proc.stderr
  assert "FAILED: vit_jax.benchmark --mode=train --dtype=bfloat16 --batch=256 --variant=" \
         "attention_impl='cudnn'" in proc.stderr
  runs = [l for l in calls.read_text().splitlines() if 'vit_jax.benchmark' in l]
  assert len(runs) == 4  # both inference runs came after the failed one
  assert sum('--mode=infer' in r for r in runs) == 2
  assert (tmp_path / 'out' / 'gpu.txt').read_text().startswith('NVIDIA H200')


def test_a_relative_out_dir_is_of_the_folder_the_script_was_started_in(tmp_path):
  """`cd experiments && bash benchmarks_gpu.sh myout` made myout there, then wrote
  myout/gpu.txt from the repo root: 'No such file or directory', exit 1."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'nvidia-smi').write_text('#!/usr/bin/env bash\necho "NVIDIA H100, 1, 80 GiB"\n')
  (bin_dir / 'python').write_text('#!/usr/bin/env bash\ntrue\n')
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  start = tmp_path / 'start'
  start.mkdir()
  proc = subprocess.run(
      ['bash', str(ROOT / 'experiments' / 'benchmarks_gpu.sh'), 'myout'], cwd=start,
      env={'PATH': f'{bin_dir}:/usr/bin:/bin', 'PYTHON': str(bin_dir / 'python')},
      capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert (start / 'myout' / 'gpu.txt').read_text().startswith('NVIDIA H100')
  assert not (ROOT / 'myout').exists()
