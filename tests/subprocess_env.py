"""The environment of a subprocess a test starts (`python -m vit_jax.main`, a helper
script): the test session's own (its compilation cache and XLA flags, see conftest.py),
on the CPU, with `devices` CPU devices."""

import os
import re

_DEVICE_FLAG = '--xla_force_host_platform_device_count'


def cpu_env(devices=None, **extra):
  """os.environ plus `extra`, JAX_PLATFORMS=cpu, and XLA_FLAGS with the session's flags
  and, if `devices` is given, that many CPU devices (otherwise none asked for)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', **extra)
  flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith(_DEVICE_FLAG)]
  if devices is not None:
    flags.append(f'{_DEVICE_FLAG}={devices}')
  env['XLA_FLAGS'] = ' '.join(flags)
  return env


# absl's `F1202 12:00:00.1 7 file.cc:1]`, TensorFlow's `2026-12-02 12:00:00.1: F file.cc:1]`,
# glibc's `*** ...`, LLVM's and C++'s fatal errors.
_FATAL_LINE = re.compile(r'^F\d{4} |^\d{4}-\d\d-\d\d [\d:.]+: F |^\*\*\* |LLVM ERROR|'
                         r'terminate called|Check failed')


def failure(proc, limit=3000) -> str:
  """What a failed subprocess printed, readable in a test report: its stderr's last
  `limit` characters; for a crash (SIGABRT, SIGSEGV) also the fatal message that the C++
  side printed above Python's thread dump (a CHECK failure, an absl `F` line, an LLVM
  error), which the dump and its list of extension modules otherwise push out."""
  err = re.sub(r'Extension modules:.*', '', proc.stderr or '', flags=re.DOTALL)
  text = f'exit status {proc.returncode}\n' + err[-limit:]
  if proc.returncode < 0 or 'Fatal Python error' in err:
    head = err.split('Fatal Python error')[0]
    fatal = [ln for ln in head.splitlines() if _FATAL_LINE.search(ln)]
    text = ('fatal message: ' + ('\n'.join(fatal[:10]) or '(none printed)') + '\n'
            + 'before the dump: ' + head[-1500:] + '\n' + text)
  return text
