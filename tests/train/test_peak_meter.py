"""The peak FLOP/s behind the MFU that `vit_jax.main` logs (`hardware.PeakMeter`)."""

import os

import jax
import pytest

from vit_jax.train import hardware


class FakeClock:
  """A clock the fake probe advances by `probe_s` each time it runs."""

  def __init__(self, probe_s):
    self.now = 0.0
    self.probe_s = probe_s

  def __call__(self):
    return self.now


def fake_probe(values, clock):
  it = iter(values)

  def probe():
    clock.now += clock.probe_s
    return next(it)
  return probe


def test_cpu_peak_is_probed_at_start_and_after_long_windows_only(monkeypatch):
  monkeypatch.setattr(hardware, 'datasheet_peak', lambda device, dtype: None)
  clock = FakeClock(probe_s=0.1)
  meter = hardware.PeakMeter('float32', probe=fake_probe([400.0, 300.0, 500.0], clock),
                             clock=clock, max_overhead=0.02)
  assert meter.peak == 400.0
  # 0.1 s of probing is more than 2% of a 4 s window: no probe, the last peak.
  assert meter.window(4.0) == (400.0, False)
  # A 5 s window: probed; the window's peak is the mean of the probes at its two ends.
  assert meter.window(5.0) == (350.0, True)
  assert meter.peak == 300.0
  assert meter.window(1.0) == (300.0, False)
  assert meter.window(60.0) == (400.0, True)


def test_probe_counts_once_per_process_not_once_per_device(monkeypatch):
  monkeypatch.setattr(hardware, 'datasheet_peak', lambda device, dtype: None)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'device_count', lambda: 8)  # CPU devices share the cores
  clock = FakeClock(probe_s=0.1)
  meter = hardware.PeakMeter('float32', probe=fake_probe([400.0, 300.0], clock), clock=clock)
  assert meter.peak == 800.0
  assert meter.window(100.0) == (700.0, True)


def test_datasheet_peak_is_per_device_and_never_probed(monkeypatch):
  monkeypatch.setattr(hardware, 'datasheet_peak', lambda device, dtype: 1e12)

  def probe():
    raise AssertionError('a device with a datasheet peak is not probed')
  meter = hardware.PeakMeter('bfloat16', probe=probe)
  assert meter.peak == 1e12 * jax.device_count()
  assert meter.window(1e6) == (1e12 * jax.device_count(), False)
  assert 'datasheet' in meter.source


@pytest.mark.skipif(jax.devices()[0].platform != 'cpu', reason='the CPU path')
def test_real_cpu_probe_is_the_hosts_peak_whatever_the_device_count():
  meter = hardware.PeakMeter('float32')
  direct = hardware.matmul_probe('float32')()
  # Within the VM's drift of the direct probe, not device_count times it.
  assert direct / 2 < meter.peak < 2 * direct
  assert 'measured' in meter.source and hardware.host_cpu() in meter.source


def test_host_cpu_names_model_cores_and_matrix_extensions(tmp_path):
  cpuinfo = tmp_path / 'cpuinfo'
  cpuinfo.write_text('processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n'
                     'flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\n'
                     'processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\n')
  name = hardware.host_cpu(str(cpuinfo))
  assert name == (f'Intel(R) Xeon(R) Processor, {os.cpu_count()} cores, AMX-BF16, '
                  'AVX512-BF16, AVX512F, AVX2')
  cpuinfo.write_text('model name\t: AMD EPYC\nflags\t\t: fpu avx2\n')
  assert hardware.host_cpu(str(cpuinfo)).endswith('cores, AVX2')
  # No /proc/cpuinfo (macOS): still a name and the core count.
  assert f'{os.cpu_count()} cores' in hardware.host_cpu(str(tmp_path / 'missing'))
