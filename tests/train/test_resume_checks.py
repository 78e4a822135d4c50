"""What a run started again in a workdir says about the config it was given: other
classes or another batch size stop it, an ignored init_from is named, and a finished run
reports its old result as old without rewriting its config.json; what a stop or a failed
evaluation leaves for it (a small in-process run on an image folder)."""

import json
import re

from absl import logging
import numpy as np
import pytest
from PIL import Image

from vit_jax import models
from vit_jax.data import sources
from vit_jax.train import defaults
from vit_jax.train import loop
from vit_jax.train import preemption


def _folder(root, classes):
  for split in ('train', 'test'):
    for i, cls in enumerate(classes):
      (root / split / cls).mkdir(parents=True)
      for j in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * i + j, np.uint8)).save(
            root / split / cls / f'{j}.png')
  return root


def _config(folder, **overrides):
  c = defaults.default_config()
  c.model = models.get_config('ViT-Ti/16')
  c.model.update(name='tiny', image_size=16, num_classes=3, patch_size=(8, 8), hidden_size=16,
                 num_layers=1, num_heads=2, mlp_dim=32)
  c.input.source, c.input.folder = 'folder', str(folder)
  c.input.pp_train = 'decode|resize(16)|value_range(-1, 1)|onehot(3)'
  c.input.pp_eval = 'decode|resize(16)|value_range(-1, 1)|onehot(3)'
  c.batch_size, c.total_steps = 4, 2
  c.schedule.warmup_steps = 1
  c.log_every = c.eval_every = c.checkpoint_every = 2
  c.async_checkpoint = False
  for k, v in overrides.items():
    node = c
    *path, last = k.split('.')
    for p in path:
      node = node[p]
    node[last] = v
  return c


@pytest.fixture
def warnings(monkeypatch):
  got = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *args: got.append(msg % args))
  return got


def test_a_run_started_again_names_what_it_does_not_use(tmp_path, warnings, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path))  # the image check's cache
  data = _folder(tmp_path / 'data', ['cat', 'dog', 'fox'])
  workdir = tmp_path / 'run'
  first = loop.train_and_evaluate(_config(data), workdir)
  recorded = (workdir / 'config.json').read_text()
  # The same command again: nothing differs (it said init_from: None -> '' before).
  warnings.clear()
  assert loop.train_and_evaluate(_config(data), workdir) == first
  (same,) = [w for w in warnings if 'already finished at step 2 of 2' in w]
  assert 'differs' not in same, same
  # Finished, started again with another evaluation preprocessing: it used to print the
  # old result as this config's and write this config into config.json.
  warnings.clear()
  again = loop.train_and_evaluate(
      _config(data, **{'input.pp_eval': 'decode|resize(16)|value_range(0, 1)|onehot(3)'}),
      workdir)
  assert again == first
  (finished,) = [w for w in warnings if 'already finished at step 2 of 2' in w]
  assert 'nothing is trained or evaluated' in finished
  assert ("input.pp_eval: 'decode|resize(16)|value_range(-1, 1)|onehot(3)' -> "
          "'decode|resize(16)|value_range(0, 1)|onehot(3)'") in finished
  assert (workdir / 'config.json').read_text() == recorded
  # Resumed (a raised total_steps) with an init_from: it is not used, and says so.
  warnings.clear()
  loop.train_and_evaluate(_config(data, total_steps=4, init_from=str(workdir)), workdir)
  assert any(f"config.init_from='{workdir}' is not used: the run resumes from its "
             'own checkpoint' in w and 'a random initialisation' in w for w in warnings), warnings
  assert json.loads((workdir / 'config.json').read_text())['total_steps'] == 4
  assert not any('training data differs' in w for w in warnings), warnings
  # An image added since the checkpoint: the rest of its epoch is drawn anew (it did not
  # say so: some examples were trained twice and others skipped).
  Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(data / 'train' / 'cat' / 'new.png')
  warnings.clear()
  loop.train_and_evaluate(_config(data, total_steps=5), workdir)
  assert any("The training data differs from the checkpoint's (12 examples then, 13 now)"
             in w for w in warnings), warnings
  # Other data with as many classes: the head's outputs would change meaning silently.
  other = _folder(tmp_path / 'other_data', ['ant', 'bee', 'cow'])
  with pytest.raises(loop.ResumeError, match=r'trained on the classes \[cat, dog, fox\], but '
                     r"this run's training data has \[ant, bee, cow\].*--config.init_from="):
    loop.train_and_evaluate(_config(other, total_steps=6), workdir)
  # init_head='keep' on weights of other classes: a warning.
  warnings.clear()
  loop.train_and_evaluate(_config(other, init_from=str(workdir), init_head='keep'),
                          tmp_path / 'keep')
  assert any("init_head='keep' keeps the head of" in w and "['cat', 'dog', 'fox']" in w
             and "['ant', 'bee', 'cow']" in w for w in warnings), warnings


def test_a_resumed_fine_tune_keeps_the_weights_it_started_from(tmp_path, warnings,
                                                               monkeypatch):
  """A resume given another init_from recorded that one as the run's origin (a later
  resume then named the wrong weights); and a resume whose init_from path was gone since
  (a /tmp of another machine) was refused before it looked at its own checkpoints (exit 3,
  never restarted by until_done.sh)."""
  monkeypatch.setenv('HOME', str(tmp_path))
  data = _folder(tmp_path / 'data', ['cat', 'dog', 'fox'])
  base, ft = tmp_path / 'base', tmp_path / 'ft'
  loop.train_and_evaluate(_config(data), base)
  loop.train_and_evaluate(_config(data, init_from=str(base)), ft)
  other = str(base / 'checkpoints')
  loop.train_and_evaluate(_config(data, total_steps=4, init_from=other), ft)
  assert json.loads((ft / 'config.json').read_text())['init_from'] == str(base)
  warnings.clear()
  gone = str(tmp_path / 'gone.npz')
  loop.train_and_evaluate(_config(data, total_steps=6, init_from=gone), ft)
  assert any(f"config.init_from='{gone}' is not used" in w and f"(it started from "
             f"'{base}')" in w for w in warnings), warnings
  meta = json.loads((ft / 'checkpoints' / '6' / 'meta' / 'metadata').read_text())
  assert meta['config']['init_from'] == str(base)
  # A fresh workdir still refuses the missing weights at once.
  with pytest.raises(defaults.ConfigError, match='does not exist'):
    loop.train_and_evaluate(_config(data, init_from=gone), tmp_path / 'fresh')


def test_an_evaluation_that_fails_saves_its_step_first(tmp_path, monkeypatch):
  """A crash in evaluation used to lose the steps since the last checkpoint. The run
  trains with mixup and cutmix (in the train step) on the way."""
  monkeypatch.setenv('HOME', str(tmp_path))
  data = _folder(tmp_path / 'data', ['cat', 'dog', 'fox'])
  workdir = tmp_path / 'run'
  config = _config(data, total_steps=4, checkpoint_every=0, **{
      'input.mixup_alpha': 0.8, 'input.cutmix_alpha': 1.0})
  real_evaluate = loop.evaluate

  def broken(*args, **kwargs):
    raise OSError('an unreadable evaluation image')

  monkeypatch.setattr(loop, 'evaluate', broken)
  with pytest.raises(OSError, match='unreadable'):
    loop.train_and_evaluate(config, workdir)
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()
                if p.name.isdigit()) == ['2']
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert np.isfinite([r['loss'] for r in rows if 'loss' in r]).all()
  monkeypatch.setattr(loop, 'evaluate', real_evaluate)
  final = loop.train_and_evaluate(config, workdir)
  assert final['step'] == 4 and 'eval_top1' in final


def test_a_training_file_gone_mid_run_saves_the_last_step_first(tmp_path, monkeypatch):
  """A training image moved away during the run stopped it with a bare TensorFlow
  NotFoundError and lost the steps since the last checkpoint."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from vit_jax.data import builder  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('HOME', str(tmp_path))
  data = _folder(tmp_path / 'data', ['cat', 'dog', 'fox'])
  workdir = tmp_path / 'run'
  config = _config(data, total_steps=5, checkpoint_every=0, eval_every=0)
  real = builder.create_train_batches

  def failing(*args, **kwargs):
    def batches():
      for i, batch in enumerate(real(*args, **kwargs)):
        if i == 3:
          raise tf.errors.NotFoundError(None, None, 'train/cat/0.png; No such file')
        yield batch
    return batches()

  monkeypatch.setattr(builder, 'create_train_batches', failing)
  errors = []
  monkeypatch.setattr(logging, 'error', lambda msg, *a: errors.append(msg % a))
  with pytest.raises(tf.errors.NotFoundError):
    loop.train_and_evaluate(config, workdir)
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()
                if p.name.isdigit()) == ['3']
  assert any('Reading the training data for step 4 failed' in e and 'Saving step 3 first'
             in e for e in errors), errors
  monkeypatch.setattr(builder, 'create_train_batches', real)
  assert loop.train_and_evaluate(config, workdir)['step'] == 5


def test_a_checkpoint_that_took_a_hidden_folder_for_a_class_is_explained(tmp_path):
  with pytest.raises(loop.ResumeError, match=r"include '\.ipynb_checkpoints': a hidden or "
                     'system folder'):
    loop._check_same_classes(['.ipynb_checkpoints', 'cat', 'dog'], ['cat', 'dog'], tmp_path)
  with pytest.raises(loop.ResumeError) as other:   # other data as well: no such note
    loop._check_same_classes(['.ipynb_checkpoints', 'cat', 'dog'], ['ant', 'bee'], tmp_path)
  assert 'hidden' not in str(other.value)


def test_another_batch_size_is_refused_on_resume(tmp_path, monkeypatch):
  """Its steps count batches of the old size: an epoch-based run with a 4x batch was
  declared finished at once, a larger batch skipped examples."""
  monkeypatch.setenv('HOME', str(tmp_path))
  data = _folder(tmp_path / 'data', ['cat', 'dog', 'fox'])
  workdir = tmp_path / 'run'
  loop.train_and_evaluate(_config(data), workdir)
  # Refused before the arrays are read (a large state took minutes to restore, or ran
  # out of memory on fewer devices, before the message).
  restored = []
  real_restore = loop.ckpt_lib.TrainCheckpointer.restore
  monkeypatch.setattr(loop.ckpt_lib.TrainCheckpointer, 'restore',
                      lambda self, *a, **k: restored.append(a) or real_restore(self, *a, **k))
  with pytest.raises(loop.ResumeError, match=r'trained with config.batch_size=4, this run has '
                     r'8: .* keep --config.batch_size=4 and fit it to the devices with '
                     r'--config.accum_steps'):
    loop.train_and_evaluate(_config(data, batch_size=8, total_steps=4), workdir)
  assert not restored


def test_a_stop_at_an_evaluation_step_saves_first_and_the_resumed_run_evaluates(
    tmp_path, monkeypatch):
  """A preemption grants seconds: the step's evaluation used to run before the save."""
  monkeypatch.setenv('HOME', str(tmp_path))
  data = _folder(tmp_path / 'data', ['cat', 'dog', 'fox'])
  workdir = tmp_path / 'run'
  config = _config(data, total_steps=4, checkpoint_every=0, log_every=1)
  evaluated = []
  real_evaluate = loop.evaluate

  def counting(*args, **kwargs):
    evaluated.append(True)
    return real_evaluate(*args, **kwargs)

  monkeypatch.setattr(loop, 'evaluate', counting)
  monkeypatch.setattr(preemption.StopRequest, '__call__', lambda self, step: step == 2)
  with pytest.raises(preemption.Preempted, match='at step 2 of 4'):
    loop.train_and_evaluate(config, workdir)
  assert not evaluated
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == ['2']
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert not [r for r in rows if 'eval_top1' in r]
  # The first row's window is the first step alone, compilation included: no images/s,
  # MFU or ETA from it (they read 12 img/s against 350 in a resumed run's first row).
  assert [r['step'] for r in rows] == [1, 2]
  assert 'images_per_sec' not in rows[0] and 'mfu' not in rows[0]
  assert rows[1]['images_per_sec'] > 0 and rows[1]['mfu'] > 0
  monkeypatch.setattr(preemption.StopRequest, '__call__', lambda self, step: False)
  final = loop.train_and_evaluate(config, workdir)
  assert final['step'] == 4 and len(evaluated) == 2   # the put-off one at 2, then 4
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if 'eval_top1' in r] == [2, 4]


def test_the_config_a_workdir_recorded_resumes_it(tmp_path, monkeypatch):
  """The ResumeError for another model names configs/from_workdir.py, which reads the
  run's config.json (no --config could read it before)."""
  import importlib.util
  import pathlib
  monkeypatch.setenv('HOME', str(tmp_path))
  data = _folder(tmp_path / 'data', ['cat', 'dog', 'fox'])
  workdir = tmp_path / 'run'
  loop.train_and_evaluate(_config(data), workdir)
  with pytest.raises(loop.ResumeError, match=re.escape(
      f'--config=configs/from_workdir.py:{workdir} (it reads')):
    loop.train_and_evaluate(_config(data, **{'model.hidden_size': 32}), workdir)
  path = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'from_workdir.py'
  spec = importlib.util.spec_from_file_location('from_workdir', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(str(workdir))
  config.total_steps = 4   # as --config.total_steps=4 on top of it
  defaults.validate(config, num_devices=1, process_count=1)
  assert loop.train_and_evaluate(config, workdir)['step'] == 4


def test_a_signal_during_an_evaluation_stops_it_and_saves(tmp_path, monkeypatch):
  """The evaluation used to run to its end (minutes on a large split) before the save,
  past a preemption's grace period."""
  monkeypatch.setenv('HOME', str(tmp_path))
  data = _folder(tmp_path / 'data', ['cat', 'dog', 'fox'])
  workdir = tmp_path / 'run'
  config = _config(data, total_steps=4, checkpoint_every=0, **{'input.eval_split': 'train'})
  config.batch_size = 2   # 6 evaluation batches of 2: stopped after the first
  config.log_every = 1
  polled = []

  def requested(self):
    polled.append(True)
    return True

  monkeypatch.setattr(preemption.StopRequest, 'requested_here', property(requested))
  with pytest.raises(preemption.Preempted, match='during the evaluation at step 2 of 4'):
    loop.train_and_evaluate(config, workdir)
  assert len(polled) == 1
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == ['2']
  monkeypatch.setattr(preemption.StopRequest, 'requested_here', property(lambda self: False))
  final = loop.train_and_evaluate(config, workdir)
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert final['step'] == 4 and [r['step'] for r in rows if 'eval_top1' in r] == [2, 4]


def test_a_stop_during_the_final_evaluation_is_made_up_once(tmp_path, monkeypatch):
  """The final step's put-off evaluation used to be skipped (the run counted as finished)
  and the previous evaluation reported as the final one."""
  monkeypatch.setenv('HOME', str(tmp_path))
  data = _folder(tmp_path / 'data', ['cat', 'dog', 'fox'])
  workdir = tmp_path / 'run'
  config = _config(data, total_steps=2, eval_every=0)   # evaluated at the end only
  monkeypatch.setattr(preemption.StopRequest, 'requested_here', property(lambda self: True))
  with pytest.raises(preemption.Preempted, match='during the evaluation at step 2 of 2'):
    loop.train_and_evaluate(config, workdir)
  monkeypatch.setattr(preemption.StopRequest, 'requested_here', property(lambda self: False))
  final = loop.train_and_evaluate(config, workdir)
  assert final['step'] == 2 and 'eval_top1' in final
  evals = lambda: [json.loads(l)['step'] for l in  # noqa: E731
                   (workdir / 'metrics.jsonl').read_text().splitlines() if 'eval_' in l]
  assert evals() == [2]
  # Started again: the checkpoint still says its evaluation was put off, but it is in
  # metrics.jsonl now, so it is not made up twice.
  again = loop.train_and_evaluate(config, workdir)
  assert again == final and evals() == [2]


def test_with_keep_best_a_checkpoint_whose_evaluation_was_stopped_is_ranked_on_resume(
    tmp_path, monkeypatch):
  """A stop during an evaluation saves the checkpoint without metrics. With keep_best it
  used to stay unranked after the resumed run made the evaluation up, so the best
  checkpoint could be deleted as soon as it was no longer among the newest."""
  from vit_jax.checkpoints import train_state  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('HOME', str(tmp_path))
  data = _folder(tmp_path / 'data', ['cat', 'dog', 'fox'])
  workdir = tmp_path / 'run'
  config = _config(data, total_steps=4, keep_best=1, **{'input.eval_split': 'train'})
  config.batch_size = 2   # 6 evaluation batches: the stop ends the evaluation of step 2
  monkeypatch.setattr(preemption.StopRequest, 'requested_here', property(lambda self: True))
  with pytest.raises(preemption.Preempted, match='during the evaluation at step 2 of 4'):
    loop.train_and_evaluate(config, workdir)
  ckpt = train_state.TrainCheckpointer(workdir / 'checkpoints', keep_best=1, async_save=False)
  assert ckpt.all_steps() == [2] and ckpt.metrics(2) is None
  ckpt.close()
  monkeypatch.setattr(preemption.StopRequest, 'requested_here', property(lambda self: False))
  assert loop.train_and_evaluate(config, workdir)['step'] == 4
  rows = {r['step']: r for r in map(json.loads,
                                     (workdir / 'metrics.jsonl').read_text().splitlines())
          if 'eval_top1' in r}
  ckpt = train_state.TrainCheckpointer(workdir / 'checkpoints', keep_best=1, async_save=False)
  for step in (2, 4):
    assert ckpt.metrics(step) == pytest.approx(
        {k: v for k, v in rows[step].items() if k.startswith('eval_')}), step
  ckpt.close()


def test_a_run_resumed_with_keep_best_ranks_the_checkpoints_saved_without(tmp_path,
                                                                         monkeypatch):
  """A run saved with keep_best=0 writes no metrics. Resumed with keep_best=1, its
  checkpoints used to stay unranked for good, so the best of them was deleted once it was
  no longer among the newest. They are ranked by metrics.jsonl's evaluations now."""
  from vit_jax.checkpoints import train_state  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('HOME', str(tmp_path))
  data = _folder(tmp_path / 'data', ['cat', 'dog', 'fox'])
  workdir = tmp_path / 'run'
  config = _config(data, total_steps=2, keep_checkpoints=3, **{'input.eval_split': 'train'})
  config.eval_every = config.checkpoint_every = 1
  loop.train_and_evaluate(config, workdir)
  ckpt = train_state.TrainCheckpointer(workdir / 'checkpoints', keep_last=3, keep_best=1,
                                       async_save=False)
  assert ckpt.all_steps() == [1, 2] and ckpt.metrics(1) is None
  ckpt.close()
  config.keep_best, config.total_steps = 1, 3
  assert loop.train_and_evaluate(config, workdir)['step'] == 3
  rows = {r['step']: r for r in map(json.loads,
                                     (workdir / 'metrics.jsonl').read_text().splitlines())
          if 'eval_top1' in r}
  ckpt = train_state.TrainCheckpointer(workdir / 'checkpoints', keep_last=3, keep_best=1,
                                       async_save=False)
  for step in (1, 2, 3):
    assert ckpt.metrics(step) == pytest.approx(
        {k: v for k, v in rows[step].items() if k.startswith('eval_')}), step
  ckpt.close()


def test_a_relative_workdir_saves_and_resumes(tmp_path, monkeypatch):
  """Orbax saves only to absolute paths: `--workdir=run` used to train up to its first
  checkpoint, then fail there (again after every restart)."""
  monkeypatch.setenv('HOME', str(tmp_path))
  data = _folder(tmp_path / 'data', ['cat', 'dog', 'fox'])
  monkeypatch.chdir(tmp_path)
  config = _config(data)
  assert loop.train_and_evaluate(config, 'run')['step'] == 2
  assert sorted(p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir()
                if p.name.isdigit()) == ['2']
  config.total_steps = 4
  assert loop.train_and_evaluate(config, 'run')['step'] == 4   # resumed from step 2


@pytest.mark.parametrize('given,expected', [
    ('run', '{cwd}/run'), ('./a/../run', '{cwd}/run'), ('/abs/run', '/abs/run'),
    ('gs://bucket/run', 'gs://bucket/run'), ('~/run', '{home}/run')])
def test_the_workdir_path_is_absolute(tmp_path, monkeypatch, given, expected):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('HOME', '/home/someone')
  assert str(loop.workdir_path(given)) == expected.format(cwd=tmp_path, home='/home/someone')


@pytest.mark.parametrize('given', ['', '  '])
def test_an_empty_workdir_is_refused(given):
  with pytest.raises(defaults.ConfigError, match='--workdir is empty'):
    loop.workdir_path(given)


@pytest.mark.parametrize('decay,warned', [('constant', False), ('cosine', True)])
def test_a_longer_run_warns_of_its_schedule_unless_the_rate_is_constant(warnings, decay,
                                                                         warned):
  """A constant rate is the same whatever the run's length: the warning used to say 'at
  step 5 the rate is 0.1 (it was 0.1)'."""
  from vit_jax.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  schedule = dict(base_lr=0.1, warmup_steps=0, decay=decay, end_lr_fraction=0.0)
  saved_meta = {'config': {'total_steps': 60, 'schedule': schedule},
                'steps_per_epoch': 10, 'global_batch_size': 32}
  import ml_collections  # pylint: disable=g-import-not-at-top
  now = optimizer_lib.learning_rate_schedule(ml_collections.ConfigDict(schedule), 90,
                                             batch_size=32, steps_per_epoch=10)
  loop._warn_schedule_change(saved_meta, 90, 10, now, 5)  # pylint: disable=protected-access
  assert bool(warnings) == warned, warnings


def test_the_same_length_with_another_schedule_warns(warnings):
  """E.g. a batch override that rescales base_lr_batch's rate, or a changed base_lr."""
  from vit_jax.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  schedule = dict(base_lr=0.1, warmup_steps=2, decay='cosine', end_lr_fraction=0.0)
  saved_meta = {'config': {'total_steps': 60, 'schedule': schedule},
                'steps_per_epoch': 10, 'global_batch_size': 32}
  now = optimizer_lib.learning_rate_schedule(
      ml_collections.ConfigDict(dict(schedule, base_lr=0.5)), 60, batch_size=32,
      steps_per_epoch=10)
  loop._warn_schedule_change(saved_meta, 60, 10, now, 30)  # pylint: disable=protected-access
  assert len(warnings) == 1 and warnings[0].startswith(
      "This run's schedule differs from the checkpoint's run's: the learning-rate "
      'schedule'), warnings
  # Named by the step metrics.jsonl logs the rate at: the update from 30 to 31 takes
  # schedule(30), logged as step 31's learning_rate (it said 'at step 30').
  assert (f'so step 31 (the first of this run, learning_rate in metrics.jsonl) takes the '
          f'rate {float(now(30)):.4g}') in warnings[0], warnings
  warnings.clear()
  same = optimizer_lib.learning_rate_schedule(ml_collections.ConfigDict(schedule), 60,
                                              batch_size=32, steps_per_epoch=10)
  loop._warn_schedule_change(saved_meta, 60, 10, same, 30)  # pylint: disable=protected-access
  assert not warnings


def test_weights_that_raise_a_key_error_are_a_config_error(tmp_path, monkeypatch):
  """A foreign file whose reader meets a missing key (a KeyError) ended the run with a
  traceback and exit status 1, which until_done.sh restarts; it is one message (exit 3)."""
  from vit_jax.checkpoints import pretrained  # pylint: disable=g-import-not-at-top

  def missing_key(path, model=None):
    raise KeyError('blocks.0.norm1.bias')
  monkeypatch.setattr(pretrained, 'load_checkpoint', missing_key)
  config = _config(tmp_path, init_from=str(tmp_path / 'w.safetensors'))
  with pytest.raises(defaults.ConfigError,
                     match=r"init_from='.*w.safetensors': KeyError 'blocks.0.norm1.bias'"):
    loop.load_pretrained(config)


def test_has_checkpoint_counts_step_folders_only(tmp_path):
  """A stray file named like a step skipped the missing-init_from check of a run that
  then did not resume (the loop found no checkpoint)."""
  assert not loop.has_checkpoint(tmp_path)
  (tmp_path / 'checkpoints').mkdir()
  (tmp_path / 'checkpoints' / '5').write_text('not a step')
  (tmp_path / 'checkpoints' / '6.orbax-checkpoint-tmp-1').mkdir()
  assert not loop.has_checkpoint(tmp_path)
  (tmp_path / 'checkpoints' / '7').mkdir()
  assert loop.has_checkpoint(tmp_path)


def test_a_sigterm_while_the_final_save_completes_is_noted_not_fatal(tmp_path, monkeypatch):
  """The stop handler was put back to the default before the final asynchronous save was
  waited for, so a late SIGTERM killed the process and lost the final checkpoint."""
  import os  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints import train_state  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('HOME', str(tmp_path))
  data = _folder(tmp_path / 'data', ['cat', 'dog', 'fox'])
  wait = train_state.TrainCheckpointer.wait
  sent = []
  def wait_with_a_notice(self):
    if not sent:  # the first wait: the one after the last step
      sent.append(True)
      os.kill(os.getpid(), signal.SIGTERM)
    return wait(self)
  monkeypatch.setattr(train_state.TrainCheckpointer, 'wait', wait_with_a_notice)
  before = signal.getsignal(signal.SIGTERM)
  final = loop.train_and_evaluate(_config(data, async_checkpoint=True), tmp_path / 'run')
  assert sent and final['step'] == 2
  assert signal.getsignal(signal.SIGTERM) is before
  assert sorted(p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir()
                if p.name.isdigit())[-1] == '2'


def test_changed_data_at_the_end_of_an_epoch_is_no_warning(warnings):
  """Resumed at an epoch's end nothing of the epoch is cut short: the next epochs are
  drawn over the new data (the warning said examples were seen twice)."""
  saved = {'examples': 12, 'fingerprint': 'a'}
  now = {'examples': 13, 'fingerprint': 'b'}
  loop._warn_if_data_changed(saved, now, 3, 6, 3)  # pylint: disable=protected-access
  assert not warnings
  loop._warn_if_data_changed(saved, now, 3, 7, 3)  # pylint: disable=protected-access
  assert len(warnings) == 1 and '12 examples then, 13 now' in warnings[0]


def test_an_evaluation_crop_larger_than_the_images_fails_before_training(tmp_path, monkeypatch):
  """central_crop(24) of 16 px evaluation images failed only at the first evaluation,
  after training, with status 1 (TensorFlow's assertion): a restart loop retried it, and
  every resumed run evaluated first and failed again."""
  monkeypatch.setenv('HOME', str(tmp_path))
  data = _folder(tmp_path / 'data', ['cat', 'dog', 'fox'])
  workdir = tmp_path / 'run'
  config = _config(data, **{'model.image_size': 24,
                            'input.pp_train': 'decode|resize(24)|value_range(-1, 1)|onehot(3)',
                            'input.pp_eval': 'decode|central_crop(24)|onehot(3)'})
  with pytest.raises(sources.DataError,
                     match=r"config.input.pp_eval='decode\|central_crop\(24\)\|onehot\(3\)' "
                     r"fails on an example of split 'test': central_crop\(24\): image height "
                     r'is smaller than 24 \(got 16\)\. Change the preprocessing'):
    loop.train_and_evaluate(config, workdir)
  assert not loop.has_checkpoint(workdir)
  assert not (workdir / 'metrics.jsonl').exists()  # nothing trained


def test_an_image_too_small_later_in_the_evaluation_saves_then_is_a_data_error(
    tmp_path, monkeypatch):
  """The first evaluation image passes the check before training; one further on that
  fails an op's check saves the step, then names config.input.pp_eval (a DataError: a
  restart would fail the same way), not a TensorFlow traceback."""
  monkeypatch.setenv('HOME', str(tmp_path))
  data = _folder(tmp_path / 'data', ['cat', 'dog', 'fox'])
  for j in range(4):  # the eval split's last class holds 12 px images
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(data / 'test' / 'fox' / f'{j}.png')
  workdir = tmp_path / 'run'
  config = _config(data, total_steps=4, checkpoint_every=0,
                   **{'input.pp_eval': 'decode|central_crop(14)|resize(16)|onehot(3)'})
  with pytest.raises(sources.DataError, match=r"pp_eval=.* fails on an example of split "
                     r"'test': central_crop\(14\): image height is smaller than 14 \(got 12\)"):
    loop.train_and_evaluate(config, workdir)
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()
                if p.name.isdigit()) == ['2']


def test_preprocessing_failure_reads_only_the_checks_of_the_ops():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from vit_jax.data import builder, preprocess_ops  # pylint: disable=g-import-not-at-top
  config = _config('/nowhere', **{'input.pp_train': 'onehot(3)'})
  op = preprocess_ops.parse('onehot(3)')
  with pytest.raises(tf.errors.InvalidArgumentError) as raised:  # as in the pipeline
    list(tf.data.Dataset.from_tensors({'label': tf.constant(7)}).map(op))
  failure = builder.preprocessing_failure(raised.value, 'pp_train', config.input)
  assert str(failure) == (
      "config.input.pp_train='onehot(3)' fails on an example of split 'train': onehot: "
      "'label' must be in [0, num_classes=3) (got 7). Change the preprocessing (e.g. "
      'resize(...) before a crop, the onehot(...) class count) or the data; a restart '
      'would fail the same way')
  # A file gone, an undecodable image: not the preprocessing's fault; a restart may pass.
  gone = tf.errors.NotFoundError(None, None, 'train/cat/0.png; No such file')
  assert builder.preprocessing_failure(gone, 'pp_train', config.input) is None
  bad = tf.errors.InvalidArgumentError(None, None, 'Invalid JPEG data or crop window')
  assert builder.preprocessing_failure(bad, 'pp_eval', config.input) is None


def test_a_stopped_run_given_a_final_step_it_passed_is_refused_or_ends_there(
    tmp_path, monkeypatch):
  """Stopped at step 3 of 4, then started with total_steps=2: it said 'already finished
  at step 3 of 2', reported step 2's evaluation as step 3's, exited 0, and a restart loop
  (whose status check reads the run's own length, 4) started it again and again."""
  monkeypatch.setenv('HOME', str(tmp_path))
  data = _folder(tmp_path / 'data', ['cat', 'dog', 'fox'])
  workdir = tmp_path / 'run'
  monkeypatch.setattr(preemption.StopRequest, '__call__', lambda self, step: step == 3)
  with pytest.raises(preemption.Preempted, match='at step 3 of 4'):
    loop.train_and_evaluate(_config(data, total_steps=4, checkpoint_every=0), workdir)
  monkeypatch.setattr(preemption.StopRequest, '__call__', lambda self, step: False)
  with pytest.raises(loop.ResumeError, match=r"is at step 3, past this run's final step 2 .*"
                     r'To end it at step 3, give --config.total_steps=3'):
    loop.train_and_evaluate(_config(data, total_steps=2), workdir)
  # Ended where it stopped: step 3, which has no evaluation yet, is evaluated.
  final = loop.train_and_evaluate(_config(data, total_steps=3), workdir)
  assert final['step'] == 3 and 'eval_top1' in final
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if 'eval_top1' in r] == [2, 3]
  again = loop.train_and_evaluate(_config(data, total_steps=3), workdir)
  assert again == final   # its own evaluation, once
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if 'eval_top1' in r] == [2, 3]


def test_a_sigterm_during_the_made_up_evaluation_stops_with_its_message(tmp_path,
                                                                       monkeypatch):
  """The put-off evaluation (and eval_at_start) ran before the stop handler was in place:
  a SIGTERM then killed the process without a word (status -15)."""
  monkeypatch.setenv('HOME', str(tmp_path))
  data = _folder(tmp_path / 'data', ['cat', 'dog', 'fox'])
  workdir = tmp_path / 'run'
  config = _config(data, total_steps=4, checkpoint_every=0)
  monkeypatch.setattr(preemption.StopRequest, 'requested_here', property(lambda self: True))
  with pytest.raises(preemption.Preempted, match='during the evaluation at step 2 of 4'):
    loop.train_and_evaluate(config, workdir)
  with pytest.raises(preemption.Preempted, match='during the evaluation at step 2 of 4, '
                     'after saving .* and evaluates it first'):
    loop.train_and_evaluate(config, workdir)   # the made-up evaluation, stopped again
  with pytest.raises(preemption.Preempted, match='during the evaluation before training '
                     r'\(config.eval_at_start\): nothing was trained'):
    loop.train_and_evaluate(_config(data, eval_at_start=True), tmp_path / 'fresh')
  monkeypatch.setattr(preemption.StopRequest, 'requested_here', property(lambda self: False))
  final = loop.train_and_evaluate(config, workdir)
  assert final['step'] == 4
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if 'eval_top1' in r] == [2, 4]
