"""keep_host_memory: freed blocks are reused without new page faults (glibc only)."""

import subprocess
import sys
import textwrap

import pytest

from vit_jax import host_memory

_CHILD = textwrap.dedent('''
    import ctypes, resource, sys
    from vit_jax import host_memory
    kept = host_memory.configure(sys.argv[1] == 'keep')
    libc = ctypes.CDLL('libc.so.6')
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 256 << 20  # above glibc's 32 MB mmap threshold, like XLA's step buffers
    faults = []
    for _ in range(3):  # allocate, touch every page, free: as each training step does
      p = libc.malloc(size)
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      ctypes.memset(p, 1, size)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
      libc.free(p)
    print(kept, *faults)
''')


def _faults(mode):
  out = subprocess.run([sys.executable, '-c', _CHILD, mode], check=True, capture_output=True,
                       text=True).stdout.split()
  return out[0] == 'True', [int(x) for x in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc')
def test_freed_blocks_are_reused_without_page_faults():
  kept, faults = _faults('keep')
  if not kept:
    pytest.skip('not glibc')
  pages = (256 << 20) // 4096
  assert faults[0] > pages // 2  # the first touch maps the pages
  assert max(faults[1:]) < pages // 100, faults  # later blocks reuse them
  default_kept, default_faults = _faults('system')
  assert not default_kept
  assert min(default_faults) > pages // 2, default_faults  # glibc unmaps on free


def test_configure_off_does_nothing():
  assert host_memory.configure(False) is False


def test_auto_is_off_with_an_accelerator_plugin(monkeypatch):
  monkeypatch.setattr(host_memory, 'accelerator_plugin_installed', lambda: True)
  assert host_memory.configure(None) is False


def test_tpu_plugin_is_detected(monkeypatch):
  import importlib.util  # pylint: disable=g-import-not-at-top
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: object() if name == 'libtpu' else real(name, *a))
  assert host_memory.accelerator_plugin_installed() is True
