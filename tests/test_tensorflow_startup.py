"""TensorFlow without Keras in the command-line tools' processes (tensorflow_startup)."""

import os
import subprocess
import sys
import textwrap

import subprocess_env

from vit_jax import tensorflow_startup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _keras_loaded_by_tensorflow(leave_out: bool) -> str:
  code = textwrap.dedent(f'''
      import sys
      from vit_jax import tensorflow_startup
      if {leave_out}:
        print('left out:', tensorflow_startup.leave_keras_out())
      import tensorflow as tf
      tf.constant(1)
      print('keras loaded:', 'keras' in sys.modules)
  ''')
  env = {k: v for k, v in os.environ.items() if k != tensorflow_startup.VARIABLE}
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  return proc.stdout


def test_tensorflow_starts_without_keras():
  # Without the setting this install's TensorFlow imports Keras (the cost it avoids).
  assert 'keras loaded: True' in _keras_loaded_by_tensorflow(leave_out=False)
  out = _keras_loaded_by_tensorflow(leave_out=True)
  assert 'left out: True' in out and 'keras loaded: False' in out


def test_an_explicit_setting_is_kept(monkeypatch):
  monkeypatch.setenv(tensorflow_startup.VARIABLE, '0')
  assert tensorflow_startup.leave_keras_out() is False
  assert os.environ[tensorflow_startup.VARIABLE] == '0'


def test_nothing_changes_once_tensorflow_is_imported(monkeypatch):
  monkeypatch.delenv(tensorflow_startup.VARIABLE, raising=False)
  monkeypatch.setitem(sys.modules, 'tensorflow', object())
  assert tensorflow_startup.leave_keras_out() is False
  assert tensorflow_startup.VARIABLE not in os.environ
