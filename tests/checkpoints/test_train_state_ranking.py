"""`TrainCheckpointer`'s `keep_best`: checkpoints are kept by their evaluation metric, and a
checkpoint saved without metrics (a stop put its evaluation off, or the run had keep_best=0)
is ranked once the metrics are added, instead of being deleted as unranked."""

import jax.numpy as jnp
import pytest

from vit_jax.checkpoints import train_state


def _steps_kept(tmp_path, add_metrics: bool, async_save: bool):
  ckpt = train_state.TrainCheckpointer(tmp_path / 'checkpoints', keep_last=1, keep_best=1,
                                       async_save=async_save)
  state = {'w': jnp.arange(3.0)}
  ckpt.save(10, state, {'step': 10}, metrics={'eval_top1': 0.5})
  ckpt.save(20, state, {'step': 20, 'eval_pending': True})  # stopped during its evaluation
  assert ckpt.metrics(20) is None
  if add_metrics:  # the resumed run's made-up evaluation
    assert ckpt.rank({20: {'eval_top1': 0.9, 'eval_loss': 0.3}}) == [20]
    assert ckpt.metrics(20) == {'eval_top1': 0.9, 'eval_loss': 0.3}
  ckpt.save(30, state, {'step': 30}, metrics={'eval_top1': 0.1})
  ckpt.save(40, state, {'step': 40}, metrics={'eval_top1': 0.2})
  ckpt.wait()
  kept = ckpt.all_steps()
  ckpt.close()
  on_disk = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()
                   if p.name.isdigit())
  assert on_disk == sorted(kept)
  return sorted(kept)


@pytest.mark.parametrize('async_save', [False, True])
def test_a_checkpoint_ranked_after_its_save_is_kept_as_the_best(tmp_path, async_save):
  assert _steps_kept(tmp_path, add_metrics=True, async_save=async_save) == [20, 40]


def test_without_metrics_the_best_checkpoint_would_be_lost(tmp_path):
  # What rank repairs: the unranked step 20 (the best) is deleted, 10 kept instead.
  assert _steps_kept(tmp_path, add_metrics=False, async_save=False) == [10, 40]


def test_the_metrics_survive_a_new_checkpointer(tmp_path):
  ckpt = train_state.TrainCheckpointer(tmp_path, keep_last=2, keep_best=1, async_save=False)
  ckpt.save(5, {'w': jnp.zeros(2)}, {'step': 5})
  ckpt.rank({5: {'eval_top1': 0.7}})
  ckpt.close()
  again = train_state.TrainCheckpointer(tmp_path, keep_last=2, keep_best=1, async_save=False)
  assert again.metrics(5) == {'eval_top1': 0.7}
  again.close()


@pytest.mark.parametrize('async_save', [False, True])
def test_the_best_checkpoint_is_kept_among_saves_with_and_without_metrics(tmp_path,
                                                                           async_save):
  """keep_best used to keep nothing: Orbax wrote a save's metrics only with its best_fn,
  which the BestN policy alone does not set, so every checkpoint was unranked."""
  ckpt = train_state.TrainCheckpointer(tmp_path, keep_last=1, keep_best=2,
                                       async_save=async_save)
  state = {'w': jnp.ones(2)}
  for step, top1 in [(10, 0.5), (15, None), (20, 0.9), (30, 0.1), (35, None), (40, 0.7),
                     (50, 0.2), (55, None)]:
    ckpt.save(step, state, {'step': step},
              metrics=None if top1 is None else {'eval_top1': top1})
  ckpt.wait()
  assert sorted(ckpt.all_steps()) == [20, 40, 55]
  assert ckpt.metrics(20) == {'eval_top1': 0.9}
  ckpt.close()


def test_a_save_without_metrics_does_not_log_orbax_s_warning(tmp_path, caplog):
  ckpt = train_state.TrainCheckpointer(tmp_path, keep_best=1, async_save=False)
  with caplog.at_level('WARNING'):
    ckpt.save(1, {'w': jnp.ones(2)}, {'step': 1})
  ckpt.close()
  assert not [r for r in caplog.records if 'metrics' in r.getMessage()]


def test_rank_leaves_ranked_and_missing_checkpoints_alone(tmp_path):
  ckpt = train_state.TrainCheckpointer(tmp_path, keep_last=3, keep_best=1, async_save=False)
  ckpt.save(1, {'w': jnp.zeros(2)}, {'step': 1}, metrics={'eval_top1': 0.4})
  ckpt.save(2, {'w': jnp.zeros(2)}, {'step': 2})
  # Step 1 keeps the metrics it was saved with; step 3 has no checkpoint (not created).
  assert ckpt.rank({1: {'eval_top1': 0.9}, 2: {'eval_top1': 0.6},
                    3: {'eval_top1': 0.8}}) == [2]
  assert ckpt.metrics(1) == {'eval_top1': 0.4} and ckpt.metrics(2) == {'eval_top1': 0.6}
  assert not (tmp_path / '3').exists() and sorted(ckpt.all_steps()) == [1, 2]
  ckpt.close()
