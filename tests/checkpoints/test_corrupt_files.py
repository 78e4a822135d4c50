"""A damaged or mislabelled weight file is refused with one ValueError that names the
file, says what format was expected and what was found, and never advises loading it
unsafely (numpy's allow_pickle, torch's weights_only=False)."""

import datetime
import os

import numpy as np
import pytest
import torch

from vit_jax.checkpoints import bit_npz
from vit_jax.checkpoints import npz
from vit_jax.checkpoints import pretrained
from vit_jax.checkpoints import state_dict_io

UNSAFE_ADVICE = ('allow_pickle', 'weights_only=False', 'set to `False`', 'add_safe_globals')


def _write(path, data: bytes) -> str:
  with open(path, 'wb') as f:
    f.write(data)
  return str(path)


def _refusal(load, path, expected) -> str:
  """The message of the ValueError `load(path)` raises, checked for what all say."""
  with pytest.raises(ValueError) as info:
    load(path)
  message = str(info.value)
  assert os.path.basename(path) in message and path in message
  assert expected in message
  for advice in UNSAFE_ADVICE:
    assert advice not in message, message
  return message


@pytest.mark.parametrize('load', [npz.load_npz, pretrained.load, bit_npz.load_bit_npz])
def test_text_file_named_npz(tmp_path, load):
  path = _write(tmp_path / 'x.npz', b'hello, this is not an archive\n')
  message = _refusal(load, path, 'is not a NumPy .npz archive')
  assert "it starts with b'hello, this is n'" in message


def test_npz_of_python_objects(tmp_path):
  path = str(tmp_path / 'objects.npz')
  np.savez(path, a=np.array([{'x': 1}], dtype=object))  # numpy pickles object arrays
  message = _refusal(npz.load_npz, path, 'is not a NumPy .npz archive of arrays')
  assert 'Python objects' in message
  with pytest.raises(ValueError) as info:
    npz.load_npz(path)
  assert 'allow_pickle' in str(info.value.__cause__)  # numpy's own error, chained


def test_empty_and_truncated_npz(tmp_path):
  _refusal(npz.load_npz, _write(tmp_path / 'empty.npz', b''), 'it is empty')
  whole = tmp_path / 'whole.npz'
  np.savez(whole, a=np.zeros((64, 64), np.float32))
  cut = _write(tmp_path / 'cut.npz', whole.read_bytes()[:200])
  _refusal(npz.load_npz, cut, 'is not a NumPy .npz archive of arrays')


@pytest.mark.parametrize('load', [state_dict_io.read_state_dict, pretrained.load])
@pytest.mark.parametrize('name, expected, cause', [
    ('x.pth', 'is not a PyTorch checkpoint torch.load can read safely', None),
    ('x.safetensors', 'is not a safetensors file', 'SafetensorError'),
])
def test_random_bytes_named_as_a_state_dict(tmp_path, load, name, expected, cause):
  path = _write(tmp_path / name, np.random.RandomState(0).bytes(4096))
  with pytest.raises(ValueError) as info:
    load(path)
  assert isinstance(info.value.__cause__, Exception)  # the library's error, chained
  assert cause is None or type(info.value.__cause__).__name__ == cause
  message = _refusal(load, path, expected)
  assert 'it starts with' in message


def test_torch_file_holding_other_objects(tmp_path):
  """A real torch file that weights-only loading refuses (a pickled non-tensor object)."""
  path = str(tmp_path / 'objects.pth')
  torch.save({'w': torch.zeros(2), 'when': datetime.date(2024, 1, 1)}, path)
  message = _refusal(state_dict_io.read_state_dict, path,
                     'is not a PyTorch checkpoint torch.load can read safely')
  assert 'datetime.date' in message


def test_torch_file_holding_one_tensor(tmp_path):
  path = str(tmp_path / 'tensor.pth')
  torch.save(torch.zeros(2), path)
  _refusal(state_dict_io.read_state_dict, path, 'holds a Tensor, not a state dict')


def test_good_files_still_load(tmp_path):
  """The checks let real files through."""
  arrays = {'a': np.arange(6, dtype=np.float32).reshape(2, 3)}
  npz_path = str(tmp_path / 'good.npz')
  np.savez(npz_path, **arrays)
  np.testing.assert_array_equal(npz.load_npz(npz_path)['a'], arrays['a'])
  for suffix in ('.safetensors', '.pth'):
    path = str(tmp_path / f'good{suffix}')
    state_dict_io.write_state_dict(arrays, path)
    np.testing.assert_array_equal(state_dict_io.read_state_dict(path)['a'], arrays['a'])


@pytest.mark.parametrize('name', ['w.safetensors', 'w.pth'])
def test_written_state_dicts_have_the_permissions_of_other_files(tmp_path, name):
  """As np.savez and torch.save write them (the umask's), not owner-only."""
  old = os.umask(0o022)
  try:
    state_dict_io.write_state_dict({'w': np.zeros(3, np.float32)}, tmp_path / name)
    (tmp_path / 'other').write_text('x')
  finally:
    os.umask(old)
  assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644
  assert os.stat(tmp_path / 'other').st_mode & 0o777 == 0o644
