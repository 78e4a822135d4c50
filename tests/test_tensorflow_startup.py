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


def test_the_inference_tools_print_a_usage_error_without_native_log_lines(tmp_path):
  """TensorFlow's C++ start-up lines (cpu_feature_guard) came around predict's one-line
  error, and a 'Local rendezvous is aborting' warning before each image it skips."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoints, models  # pylint: disable=g-import-not-at-top
  module = models.create('ViT-Ti/16', num_layers=1, hidden_size=32, num_heads=2, mlp_dim=64,
                         num_classes=3, image_size=32)
  checkpoints.save_npz(tmp_path / 'w.npz', models.init_params(module, 32))
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / 'ok.png')
  (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8\xff' + b'\0' * 40)
  env = {k: v for k, v in os.environ.items() if k not in (
      tensorflow_startup.NATIVE_LOG_VARIABLE, tensorflow_startup.ONEDNN_VARIABLE)}
  def predict(*args):
    return subprocess.run([sys.executable, '-m', 'vit_jax.predict',
                           f'--checkpoint={tmp_path / "w.npz"}', *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  proc = predict("--pp=decode|resise(32)", str(tmp_path / 'ok.png'))
  assert proc.returncode == 2, subprocess_env.failure(proc)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and "Unknown preprocessing op 'resise'" in lines[0], proc.stderr
  proc = predict('--pp=decode|resize(32)|value_range(-1, 1)', str(tmp_path / 'broken.jpg'),
                 str(tmp_path / 'ok.png'))
  assert proc.returncode == 1, subprocess_env.failure(proc)
  assert 'rendezvous' not in proc.stderr and 'cpu_feature_guard' not in proc.stderr, proc.stderr
  assert f'skipping {tmp_path / "broken.jpg"}' in proc.stderr


_PREPROCESS = textwrap.dedent('''
    import io, sys
    import numpy as np
    import tensorflow as tf
    from PIL import Image
    from sklearn.datasets import load_sample_image
    from vit_jax.data import preprocess_ops
    buf = io.BytesIO()
    Image.fromarray(load_sample_image('china.jpg')).save(buf, format='JPEG')
    out = []
    for spec in ['decode|resize_small(256)|central_crop(224)|value_range(-1, 1)',
                 'decode|resize(160, method="bicubic")|normalize((0.5, 0.4, 0.3), (0.2, 0.2, 0.3))',
                 'decode|inception_crop(128)|flip_lr|randaugment(2, 9)|value_range(-1, 1)']:
      example = {'image': tf.constant(buf.getvalue()), 'rng': tf.constant([1, 2], tf.int64)}
      out.append(preprocess_ops.parse(spec)(example)['image'].numpy())
    np.savez(sys.argv[1], *out)
''')


def test_the_tools_onednn_setting_leaves_the_preprocessed_pixels_unchanged(tmp_path):
  """quiet_native_logs turns TensorFlow's oneDNN custom ops off (its notice ignores
  TF_CPP_MIN_LOG_LEVEL): what the tools compute with TensorFlow must not change."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  arrays = []
  for value in ('0', '1'):
    env = dict(os.environ, **{tensorflow_startup.ONEDNN_VARIABLE: value})
    out = tmp_path / f'onednn_{value}.npz'
    proc = subprocess.run([sys.executable, '-c', _PREPROCESS, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, subprocess_env.failure(proc)
    arrays.append(np.load(out))
  assert len(arrays[0].files) == 3
  for k in arrays[0].files:
    np.testing.assert_array_equal(arrays[0][k], arrays[1][k])


def test_quiet_native_logs_keeps_explicit_settings(monkeypatch):
  monkeypatch.delitem(sys.modules, 'tensorflow', raising=False)
  monkeypatch.delitem(sys.modules, 'jaxlib', raising=False)
  monkeypatch.setenv(tensorflow_startup.ONEDNN_VARIABLE, '1')
  monkeypatch.delenv(tensorflow_startup.NATIVE_LOG_VARIABLE, raising=False)
  assert tensorflow_startup.quiet_native_logs() is True
  assert os.environ[tensorflow_startup.ONEDNN_VARIABLE] == '1'
  assert os.environ[tensorflow_startup.NATIVE_LOG_VARIABLE] == '2'
  monkeypatch.delenv(tensorflow_startup.ONEDNN_VARIABLE)
  assert tensorflow_startup.quiet_native_logs() is False  # the log level was set already
  assert os.environ[tensorflow_startup.ONEDNN_VARIABLE] == '0'
