"""Keeps the memory XLA:CPU frees for reuse, instead of handing it back to the OS each step.

On CPU, every execution of a compiled step allocates its temporary buffer and frees it at
the end: 1.07 GB for ViT-B/16's train step at batch 8. glibc's malloc serves blocks over
32 MB with mmap and unmaps them on free, so each step writes to fresh pages: 260,000 page
faults and 0.4 s of kernel time per step on a 2-core EPYC, where the step takes 2.7 s.
`keep_freed_memory()` sets glibc's malloc options so that such blocks come from the heap
and stay there (no page faults after the first step; the process keeps its peak memory).
It only works if it runs before jax starts its CPU backend (whose threads pick their
malloc arenas when they start), so `vit_jax.main` and the benchmark call `configure()`
first. Elsewhere (macOS, musl) it does nothing and says so.

An alternative that helps PyTorch too is transparent huge pages for those blocks, which
glibc takes only from the environment at process start:
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (ViT-B/16's step 2.52 s with it alone, 2.61 s with
keep_freed_memory alone; combining the two gained nothing more; BENCHMARKS.md).
"""

import ctypes
import importlib.util
import pkgutil
import sys

from absl import logging

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1

_applied = False


def accelerator_plugin_installed() -> bool:
  """True if jax can see a GPU or TPU plugin (without starting any backend)."""
  if importlib.util.find_spec('libtpu') is not None:
    return True
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def keep_freed_memory() -> bool:
  """Sets glibc malloc to keep freed blocks (see module doc); False where not possible."""
  global _applied
  if _applied:
    return True
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement
  except (OSError, AttributeError):
    return False  # not glibc
  settings = ((_M_ARENA_MAX, 1),        # one heap for every thread: big blocks from sbrk,
              (_M_MMAP_MAX, 0),         # never from mmap,
              (_M_TRIM_THRESHOLD, _INT_MAX),  # and the heap's free top is not returned
              (_M_TOP_PAD, 1 << 30))    # (nor the 1 GB above what is in use).
  _applied = all(libc.mallopt(param, value) == 1 for param, value in settings)
  return _applied


def configure(setting: bool | None) -> bool:
  """Applies config.keep_host_memory: True, False, or None (on when jax has no GPU/TPU
  plugin, i.e. runs on the CPU). Returns whether freed memory is now kept."""
  if setting is None:
    setting = not accelerator_plugin_installed()
  if not setting:
    return False
  kept = keep_freed_memory()
  if kept:
    logging.info('keep_host_memory: glibc malloc keeps freed memory for reuse')
  else:
    logging.info('keep_host_memory: not available on this platform (needs glibc)')
  return kept
