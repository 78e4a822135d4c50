"""Peak FLOP/s of the accelerator, for model FLOPs utilisation (MFU).

GPUs and TPUs: the datasheet's dense peak per chip for the compute dtype. CPUs have no
datasheet figure that XLA reaches, so the peak is measured: the best of a few large
matmuls in the compute dtype (with float32 accumulation for bfloat16).
"""

import time

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per JAX device: (bfloat16, float32). Sources: NVIDIA and Google
# datasheets. JAX shows each TensorCore of a TPU v2/v3 chip as a device (half the chip's
# peak); v4 and v5p chips are one device (megacore), as is a v5e chip.
_DATASHEET = {
    'H100': (989e12, 67e12),
    'H200': (989e12, 67e12),
    'A100': (312e12, 19.5e12),
    'V100': (125e12, 15.7e12),
    'TPU v2': (45e12 / 2, 45e12 / 8),
    'TPU v3': (123e12 / 2, 123e12 / 8),
    'TPU v4': (275e12, 275e12 / 4),
    'TPU v5 lite': (197e12, 197e12 / 4),
    'TPU v5p': (459e12, 459e12 / 4),
}


def host_cpu(cpuinfo: str = '/proc/cpuinfo') -> str:
  """The host CPU as a benchmark record should name it: model, cores and the matrix
  instructions XLA and PyTorch may use, e.g. 'Intel(R) Xeon(R) Processor, 2 cores,
  AMX-BF16, AVX512-BF16'. Two hosts of the same name and core count can differ 2x in
  bf16 matmul speed (BENCHMARKS.md), so the record keeps the flags."""
  import os  # pylint: disable=g-import-not-at-top
  import platform  # pylint: disable=g-import-not-at-top
  name, flags = platform.processor() or platform.machine(), set()
  try:
    with open(cpuinfo) as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'model name' and value.strip():
          name = value.strip()
        elif key.strip() in ('flags', 'Features'):
          flags = set(value.split())
  except OSError:
    pass
  extensions = [label for flag, label in (('amx_bf16', 'AMX-BF16'),
                                          ('avx512_bf16', 'AVX512-BF16'),
                                          ('avx512f', 'AVX512F'), ('avx2', 'AVX2'),
                                          ('sve', 'SVE'), ('bf16', 'BF16'))
                if flag in flags]
  return ', '.join([name, f'{os.cpu_count()} cores', *extensions])


def datasheet_peak(device, dtype) -> float | None:
  kind = getattr(device, 'device_kind', '')
  for name, (bf16, fp32) in _DATASHEET.items():
    if name.lower() in kind.lower():
      return bf16 if jnp.dtype(dtype) == jnp.bfloat16 else fp32
  return None


def matmul_probe(dtype_name: str = 'float32', n: int = 2048, repeats: int = 3):
  """A function that returns the FLOP/s of the best of `repeats` n x n matmuls, now.

  A shared CPU (a cloud VM) changes speed by 10 to 20% within seconds, so a benchmark
  calls it next to each timed step to know the peak at the time of that step.
  """
  dtype = jnp.dtype(dtype_name)
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  f(a, a).block_until_ready()

  def probe() -> float:
    best = float('inf')
    for _ in range(repeats):
      t = time.perf_counter()
      f(a, a).block_until_ready()
      best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
  return probe


class PeakMeter:
  """Peak FLOP/s of all the run's devices, for the MFU that a training run logs.

  GPU/TPU: the datasheet peak per device times the device count, constant. Otherwise
  (CPU) the peak is probed (`matmul_probe`): at start, then after each logging window
  that lasted at least `1 / max_overhead` times the probe's own time, so probing costs at
  most that share of the run. A window's peak is the mean of the probes at its two ends: a
  cloud VM drifts 10 to 20% within seconds, and one start-up figure would carry that
  error into every logged MFU. A process's CPU devices share its cores, so the probe is
  the whole host's peak: it counts once per process, not once per device.
  """

  def __init__(self, dtype, *, probe=None, clock=time.perf_counter, max_overhead=0.02):
    device = jax.devices()[0]
    sheet = datasheet_peak(device, dtype)
    self._clock = clock
    self.max_overhead = max_overhead
    if sheet is not None:
      self.source = f'datasheet peak of {device.device_kind} x {jax.device_count()}'
      self._probe = None
      self._last = sheet * jax.device_count()
    else:
      self.source = (f'{jnp.dtype(dtype).name} matmul peak measured during the run '
                     f'x {jax.process_count()} process(es) on {host_cpu()}')
      self._probe = probe or matmul_probe(jnp.dtype(dtype).name)
      self._last, self._cost = self._timed_probe()

  def _timed_probe(self) -> tuple[float, float]:
    start = self._clock()
    peak = self._probe() * jax.process_count()
    return peak, self._clock() - start

  @property
  def peak(self) -> float:
    """The latest peak: the datasheet's, or the last probe's."""
    return self._last

  def window(self, seconds: float) -> tuple[float, bool]:
    """(peak FLOP/s over a logging window of `seconds` that just ended, whether it probed).

    After a probe the caller restarts its clock: the probe is not training time.
    """
    if self._probe is None or seconds * self.max_overhead < self._cost:
      return self._last, False
    before = self._last
    self._last, self._cost = self._timed_probe()
    return (before + self._last) / 2, True
