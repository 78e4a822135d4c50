"""Shared test set-up.

PyTorch and torchvision are imported first: triton (which they pull in) segfaults when it
is imported after TensorFlow in the same process, and test modules import both.

One persistent XLA compilation cache serves the whole test session: the pytest workers
and every `python -m vit_jax.main` (and other) subprocess the tests start inherit it
through the environment. Many tests compile the same small programs in new processes
(a run resumed after a kill, the two processes of a distributed run, the CLI tools on a
trained workdir); from the cache a repeated small training run starts in about half
the time (43 s against 24 s on a slow 2-core host). The cache starts empty each session.

XLA compiles the session's programs with LLVM's optimisations off
(`--xla_backend_optimization_level=0`, added to XLA_FLAGS, which the workers and
subprocesses inherit too; tests/subprocess_env.py keeps it when a test asks for more CPU
devices). The tests' models are tiny, so compiling dominates: the small training run of
`vit_jax.main` compiles in 3.8 s instead of 7.7 s. The HLO passes, which the tests
that read compiled programs check, are the same; only the machine code is less tuned.
"""

import atexit
import collections
import os
import shutil
import tempfile
import pytest

_CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'
if _CACHE_ENV not in os.environ:  # the controller makes it; xdist workers inherit it
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix='vit_jax_tests_xla_cache_')
  atexit.register(shutil.rmtree, os.environ[_CACHE_ENV], ignore_errors=True)
  # Cache every program, however small or quick to compile.
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

_TEST_XLA_FLAGS = ('--xla_backend_optimization_level=0',)
_flags = os.environ.get('XLA_FLAGS', '').split()
os.environ['XLA_FLAGS'] = ' '.join(
    _flags + [f for f in _TEST_XLA_FLAGS
              if not any(g.split('=')[0] == f.split('=')[0] for g in _flags)])

# TensorFlow without Keras (about 3 s of each process's start), as the command-line tools
# run it: in the test processes too, and in the subprocesses they start (vit_jax.main
# sets it itself; other scripts the tests run inherit it).
from vit_jax import tensorflow_startup  # noqa: E402  pylint: disable=wrong-import-position
tensorflow_startup.leave_keras_out()

import torch  # noqa: E402,F401  pylint: disable=unused-import,wrong-import-position
import torchvision  # noqa: E402,F401  pylint: disable=unused-import,wrong-import-position

# The modules whose tests take longest in all (module fixtures included), longest first,
# from the `--durations` list of CI on a 2-core AVX2 host (2026-12-02). The README's
# command runs the suite with `--dist loadscope --no-loadscope-reorder`: each module goes
# whole to one of two workers, in the order below, so these start first and the suite
# does not end with one worker running a long module alone (pytest-xdist's own order,
# most tests first, queued test_multiprocess.py and its 220 s fixture among the last).
_LONGEST_FIRST = (
    'tests/launch/test_multiprocess.py',
    'tests/train/test_main_training.py',
    'tests/test_predict.py',
    'tests/train/test_sharding_and_accumulation.py',
    'tests/data/test_sources.py',
    'tests/train/test_family_configs.py',
    'tests/train/test_batch_norm_sync.py',
    'tests/checkpoints/test_pretrained_families.py',
    'tests/benchmark/test_model_speed.py',
)


def pytest_collection_modifyitems(items):
  """Modules in _LONGEST_FIRST's order, then the rest with the most tests first (as
  pytest-xdist orders them by default); a module's own tests keep their order."""
  module = {item: item.nodeid.split('::')[0] for item in items}
  tests_in = collections.Counter(module.values())

  def rank(item):
    if module[item] in _LONGEST_FIRST:
      return (0, _LONGEST_FIRST.index(module[item]), '')
    return (1, -tests_in[module[item]], module[item])

  items.sort(key=rank)


@pytest.fixture(autouse=True)
def _absl_verbosity_restored():
  """A command run in-process (vit_jax.convert's main sets absl's verbosity to WARNING)
  left later tests on the same worker without absl's INFO lines, which they assert."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  # The absl logger's own level (NOTSET until set_verbosity is called: then caplog's root
  # level decides), not the verbosity flag (set_verbosity would pin it to WARNING).
  logger = absl_logging.get_absl_logger()
  level = logger.level
  yield
  logger.setLevel(level)
