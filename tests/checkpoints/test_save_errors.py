"""A failed background save names the checkpoint the run resumes from, read from disk:
with keep_checkpoints=1 Orbax had already dropped the step it was to replace from its
list, and the message said no checkpoint was complete (the user might delete it)."""

import pathlib
import subprocess
import sys

import subprocess_env

HERE = pathlib.Path(__file__).resolve().parent


def test_a_failed_save_names_the_step_that_is_still_on_disk(tmp_path):
  proc = subprocess.run([sys.executable, str(HERE / 'save_error_run.py'), str(tmp_path / 'c')],
                        env=subprocess_env.cpu_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  message, resumes = proc.stdout.strip().splitlines()[-2:]
  assert message.startswith(f'saving checkpoint step 2 in {tmp_path / "c"} failed ('), message
  assert 'File too large' in message
  assert 'the newest complete checkpoint is step 1, where the same command resumes' in message
  assert resumes == '1'
