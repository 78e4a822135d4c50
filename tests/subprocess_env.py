"""The environment of a subprocess a test starts (`python -m vit_jax.main`, a helper
script): the test session's own (its compilation cache and XLA flags, see conftest.py),
on the CPU, with `devices` CPU devices."""

import os

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
