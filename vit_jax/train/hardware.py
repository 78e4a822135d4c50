"""Peak FLOP/s of the accelerator, for model FLOPs utilisation (MFU).

GPUs and TPUs: the datasheet's dense peak per chip for the compute dtype. CPUs have no
datasheet figure that XLA reaches, so the peak is measured: the best of a few large
matmuls in the compute dtype (with float32 accumulation for bfloat16).
"""

import functools
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


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(dtype_name: str = 'float32', n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` n x n matmuls on the default device."""
  return matmul_probe(dtype_name, n, repeats)()


def peak_flops_per_second(dtype) -> float:
  """Peak FLOP/s of one device for `dtype` compute (datasheet, else measured)."""
  device = jax.devices()[0]
  peak = datasheet_peak(device, dtype)
  if peak is None:
    peak = measured_matmul_peak(jnp.dtype(dtype).name)
  return peak
