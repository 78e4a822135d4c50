"""TensorFlow without Keras, in the processes of vit_jax's command-line tools.

TensorFlow 2.16 and later import Keras 3 at `import tensorflow`, and Keras imports
scikit-learn and SciPy: about 3 s of each process's start on a 2-core host (7.5 to 7.8 s
against 4.2 to 5.0 s for `import tensorflow`). Neither vit_jax nor tensorflow-datasets
uses Keras. With `TF_USE_LEGACY_KERAS=1` TensorFlow looks for the `tf_keras` package
instead and, where it is not installed, leaves Keras out (`tf.keras` is then missing).

Only the entry points (`vit_jax.main`, `vit_jax.predict`, `vit_jax.visualize`,
`vit_jax.convert`, `vit_jax.benchmark`) and the test session call `leave_keras_out()`:
importing vit_jax as a library changes nothing in the importing process.

`quiet_native_logs()`: the inference tools (predict, visualize, convert) keep stderr for
their own messages. TensorFlow's and XLA's C++ logging printed start-up lines
(cpu_feature_guard) around a one-line usage error, and a warning ("Local rendezvous is
aborting ...") before each unreadable image the tool names itself. On CPUs with
AVX512-VNNI, AVX512-BF16 or AMX, TensorFlow also printed "oneDNN custom operations are on"
(twice, whatever TF_CPP_MIN_LOG_LEVEL says): the tools set TF_ENABLE_ONEDNN_OPTS=0 unless
it is set. They use TensorFlow only to decode, crop and resize images, which oneDNN's
custom operations (convolutions, matmuls) do not compute: the preprocessed pixels are the
same bit for bit (checked on such a host for resize, resize_small, central_crop,
normalize, inception_crop, flip_lr and randaugment).
"""

import importlib.util
import os
import sys

VARIABLE = 'TF_USE_LEGACY_KERAS'


def leave_keras_out() -> bool:
  """Sets TF_USE_LEGACY_KERAS=1 unless it is set already, TensorFlow is already imported,
  or tf_keras is installed (which the setting would load instead). True if TensorFlow
  will now start without Keras."""
  if VARIABLE in os.environ:
    return os.environ[VARIABLE] in ('1', 'true', 'True') and not _tf_keras_installed()
  if 'tensorflow' in sys.modules or _tf_keras_installed():
    return False
  os.environ[VARIABLE] = '1'
  return True


NATIVE_LOG_VARIABLE = 'TF_CPP_MIN_LOG_LEVEL'
ONEDNN_VARIABLE = 'TF_ENABLE_ONEDNN_OPTS'


def quiet_native_logs() -> bool:
  """Sets TF_CPP_MIN_LOG_LEVEL=2 (native errors only) and TF_ENABLE_ONEDNN_OPTS=0 (see
  above), each unless it is set already, and neither when TensorFlow or jaxlib is already
  imported (their logging has read them). True if TF_CPP_MIN_LOG_LEVEL was set."""
  if 'tensorflow' in sys.modules or 'jaxlib' in sys.modules:
    return False
  os.environ.setdefault(ONEDNN_VARIABLE, '0')
  if NATIVE_LOG_VARIABLE in os.environ:
    return False
  os.environ[NATIVE_LOG_VARIABLE] = '2'
  return True


def is_tensorflow_error(e: BaseException) -> bool:
  """An error of TensorFlow's ops (tf.errors.OpError: the input pipeline's, its gs://
  file system's), told without importing TensorFlow."""
  return any(c.__name__ == 'OpError' and c.__module__.startswith('tensorflow')
             for c in type(e).__mro__)


def _tf_keras_installed() -> bool:
  return importlib.util.find_spec('tf_keras') is not None
