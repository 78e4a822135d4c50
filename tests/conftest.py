"""Shared test set-up.

PyTorch and torchvision are imported first: triton (which they pull in) segfaults when it
is imported after TensorFlow in the same process, and test modules import both.

One persistent XLA compilation cache serves the whole test session: the pytest workers
and every `python -m vit_jax.main` (and other) subprocess the tests start inherit it
through the environment. Many tests compile the same small programs in new processes
(a run resumed after a kill, the two processes of a distributed run, the CLI tools on a
trained workdir); from the cache a repeated small training run starts in about half
the time (43 s against 24 s on a slow 2-core host). The cache starts empty each session.
"""

import atexit
import os
import shutil
import tempfile

_CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'
if _CACHE_ENV not in os.environ:  # the controller makes it; xdist workers inherit it
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix='vit_jax_tests_xla_cache_')
  atexit.register(shutil.rmtree, os.environ[_CACHE_ENV], ignore_errors=True)
  # Cache every program, however small or quick to compile.
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

import torch  # noqa: E402,F401  pylint: disable=unused-import,wrong-import-position
import torchvision  # noqa: E402,F401  pylint: disable=unused-import,wrong-import-position
