"""BatchNorm under the sharded train step: statistics are those of the global batch.

A small ResNet (BatchNorm) trains 3 steps on 1 device and on 8 devices (data=8). The running statistics, parameters and losses agree within float32 reordering;
the statistics differ clearly from what one device's share of the batch would give, so the
agreement shows the statistics really are synchronised across devices.
"""

import pathlib
import subprocess
import sys

import numpy as np
import pytest
import subprocess_env

HERE = pathlib.Path(__file__).resolve().parent
TOL = 1e-4


def _run(tmp_path, data, fsdp, accum):
  out = tmp_path / f'bn_{data}_{fsdp}_{accum}.npz'
  env = subprocess_env.cpu_env(devices=8)
  proc = subprocess.run([sys.executable, str(HERE / 'bn_sharded_run.py'), str(data),
                         str(fsdp), str(accum), str(out)], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  return dict(np.load(out))


class _Runs(dict):
  """Runs on demand: CI needs only the 8-device one."""

  def __init__(self, tmp):
    super().__init__()
    self.tmp = tmp

  def __missing__(self, key):
    self[key] = _run(self.tmp, *key)
    return self[key]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  return _Runs(tmp_path_factory.mktemp('bn'))


def _max_diff(a, b, prefix):
  keys = [k for k in a if k.startswith(prefix)]
  assert keys and set(keys) == {k for k in b if k.startswith(prefix)}
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in keys), keys


# Slow: the first-step test below compares the 8-device statistics with a plain forward
# pass over the whole batch on one device, within the same run.
@pytest.mark.slow
def test_batch_stats_on_8_devices_equal_one_device(runs):
  one, many = runs[(1, 1, 1)], runs[(8, 1, 1)]
  stats_diff, keys = _max_diff(one, many, 'stats:')
  assert any(k.endswith('/mean') for k in keys) and any(k.endswith('/var') for k in keys)
  param_diff, _ = _max_diff(one, many, 'param:')
  print(f'[tolerance] max |batch_stats diff| {stats_diff:.2e}, |param diff| {param_diff:.2e}')
  assert stats_diff < TOL and param_diff < TOL
  np.testing.assert_allclose(one['losses'], many['losses'], atol=TOL, rtol=TOL)


def _as(arrays, src, dst):
  return {dst + k[len(src):]: v for k, v in arrays.items() if k.startswith(src)}


def test_first_step_statistics_are_the_global_batch_statistics(runs):
  many = runs[(8, 1, 1)]
  # The 8-device step equals one plain forward pass over the whole batch on one device...
  to_global, keys = _max_diff(_as(many, 'step1:', 'x:'), _as(many, 'global1:', 'x:'), 'x:')
  # ...and not the statistics of one device's 2 examples (what unsynchronised BN keeps).
  to_local, _ = _max_diff(_as(many, 'step1:', 'x:'), _as(many, 'local1:', 'x:'), 'x:')
  print(f'[tolerance] step-1 stats vs global batch {to_global:.2e}, vs one device\'s '
        f'share {to_local:.2e}')
  assert len(keys) >= 10
  assert to_global < TOL
  assert to_local > 100 * TOL
