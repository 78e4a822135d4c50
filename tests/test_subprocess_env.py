"""The test helper that reports a failed subprocess keeps a crash's fatal message."""

import subprocess
import sys

import subprocess_env


def test_failure_keeps_the_fatal_message_above_a_crash_dump():
  code = ('import faulthandler, os, sys\n'
          'faulthandler.enable()\n'
          'sys.stderr.write("F0000 00:00 thing.cc:1] Check failed: x == y\\n" + "noise\\n" * 2000)\n'
          'sys.stderr.flush()\n'
          'os.abort()\n')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode < 0
  assert 'Check failed: x == y' not in proc.stderr[-3000:]  # what the old report kept
  report = subprocess_env.failure(proc)
  assert 'fatal message: F0000 00:00 thing.cc:1] Check failed: x == y' in report
  assert 'Extension modules' not in report and f'exit status {proc.returncode}' in report


def test_failure_of_a_plain_error_is_its_last_lines():
  proc = subprocess.run([sys.executable, '-c', 'raise SystemExit("bad value for --x")'],
                        capture_output=True, text=True, timeout=60)
  report = subprocess_env.failure(proc)
  assert report == 'exit status 1\nbad value for --x\n'
