"""The resume fallback past a damaged checkpoint renames nothing until an older step has
restored: an error that hits every step (a file system that is down) leaves them all."""

import jax
import numpy as np
import pytest

from vit_jax.checkpoints import train_state
from vit_jax.train import loop


def _checkpointer(tmp_path):
  checkpointer = train_state.TrainCheckpointer(tmp_path / 'checkpoints')
  state = {'w': jax.numpy.arange(3.0)}
  for step in (10, 20):
    checkpointer.save(step, {'w': state['w'] + step}, {'step': step, 'config': {}})
  checkpointer.wait()
  return checkpointer, jax.eval_shape(lambda: state)


def test_an_error_on_every_step_renames_none(tmp_path, monkeypatch):
  checkpointer, abstract = _checkpointer(tmp_path)
  def stale(*args, **kwargs):
    raise OSError(116, 'Stale file handle')
  monkeypatch.setattr(checkpointer, 'restore', stale)
  with pytest.raises(OSError, match='Stale file handle'):
    loop._restore_newest_readable(checkpointer, abstract, {}, tmp_path)  # pylint: disable=protected-access
  assert checkpointer.all_steps() == [10, 20]
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['10', '20']
  checkpointer.close()


def test_only_the_newer_damaged_step_is_set_aside(tmp_path, monkeypatch):
  checkpointer, abstract = _checkpointer(tmp_path)
  restore = checkpointer.restore
  def damaged_20(abstract_state, step=None):
    if step == 20:
      raise ValueError('OUT_OF_RANGE: Requested byte range is not valid')
    return restore(abstract_state, step)
  monkeypatch.setattr(checkpointer, 'restore', damaged_20)
  state, meta = loop._restore_newest_readable(checkpointer, abstract, {}, tmp_path)  # pylint: disable=protected-access
  np.testing.assert_array_equal(state['w'], np.arange(3.0) + 10)
  assert meta['step'] == 10
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['10', '20.unreadable']
  checkpointer.close()


def test_every_step_damaged_is_a_resume_error_naming_the_steps_and_the_fix(tmp_path):
  """A damaged only checkpoint failed every restart with Orbax's traceback and exit
  status 1 ('crash: restart'), so launch/until_done.sh retried it 20 times."""
  checkpointer, abstract = _checkpointer(tmp_path)
  for step in (10, 20):
    files = [p for p in (tmp_path / 'checkpoints' / str(step)).rglob('*')
             if p.is_file() and '/d/' in str(p)]
    assert files
    for p in files:  # the array data files, truncated
      with open(p, 'r+b') as f:
        f.truncate(max(p.stat().st_size // 3, 1))
  with pytest.raises(loop.ResumeError, match=r'step\(s\) 20, 10 are damaged \(.*\)\. Restore '
                     'them from a copy, or move them aside') as e:
    loop._restore_newest_readable(checkpointer, abstract, {}, tmp_path)  # pylint: disable=protected-access
  assert 'pybind11' not in str(e.value), e.value
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['10', '20']
  checkpointer.close()
