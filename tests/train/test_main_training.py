"""`python -m vit_jax.main` as a user runs it: resume after SIGKILL, non-finite losses,
configs that cannot work."""

import json
import pathlib
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOTAL_STEPS = 24

TINY = [
    '--config=configs/demo.py', f'--config.total_steps={TOTAL_STEPS}',
    '--config.model.hidden_size=32', '--config.model.num_layers=1', '--config.model.num_heads=2',
    '--config.model.mlp_dim=64', '--config.model.dropout_rate=0.1', '--config.batch_size=32',
    '--config.schedule.warmup_steps=2', '--config.log_every=4', '--config.eval_every=0',
    '--config.checkpoint_every=3', '--config.keep_checkpoints=2',
]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _cmd(workdir, data_dir, *extra):
  return [sys.executable, '-m', 'vit_jax.main', *TINY, f'--config.input.data_dir={data_dir}',
          f'--workdir={workdir}', *extra]


def _env(devices=1):
  return subprocess_env.cpu_env(devices)


def _run(workdir, data_dir, *extra, devices=1, timeout=600):
  return subprocess.run(_cmd(workdir, data_dir, *extra), cwd=ROOT, env=_env(devices),
                        capture_output=True, text=True, timeout=timeout)


def _final_params(workdir, step=TOTAL_STEPS):
  state = ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / 'checkpoints' / str(step)
                                             / 'state')
  return {'/'.join(map(str, k)): np.asarray(v) for k, v in _flatten(state['params'])}


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


@pytest.fixture(scope='module')
def reference(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp('reference')
  start = time.monotonic()
  proc = _run(workdir, data_dir)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  return workdir, time.monotonic() - start


def test_uninterrupted_run_logs_metrics(reference):
  workdir, _ = reference
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_rows = [r for r in rows if 'loss' in r]
  assert [r['step'] for r in train_rows] == list(range(4, TOTAL_STEPS + 1, 4))
  assert all(r['images_per_sec'] > 0 and 0 < r['learning_rate'] for r in train_rows)
  assert all(0 < r['mfu'] < 1 for r in train_rows), [r['mfu'] for r in train_rows]
  # The MFU counts the model summary's forward FLOPs, 3x (forward and backward) per image.
  summary = json.loads((workdir / 'model_summary.json').read_text())
  config = json.loads((workdir / 'config.json').read_text())
  for r in train_rows:
    assert r['mfu'] * r['peak_flops_per_sec'] * r['sec_per_step'] == pytest.approx(
        3 * summary['forward_gflops_per_image'] * 1e9 * config['batch_size'], rel=1e-6)
  final_eval = [r for r in rows if 'eval_top1' in r][-1]
  assert final_eval['step'] == TOTAL_STEPS and final_eval['eval_examples'] == 1000
  assert 0.0 <= final_eval['eval_top5'] <= 1.0 and final_eval['eval_top1'] <= final_eval['eval_top5']
  assert list((workdir / 'tensorboard').iterdir())  # TensorBoard event files
  meta_dirs = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert meta_dirs[-1] == TOTAL_STEPS and len(meta_dirs) <= 2  # keep_checkpoints=2


def test_a_finished_run_started_again_trains_nothing_and_reports_its_evaluation(
    reference, data_dir, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  ref_dir, _ = reference
  workdir = tmp_path / 'again'
  shutil.copytree(ref_dir, workdir)
  before = (workdir / 'metrics.jsonl').read_text()
  proc = _run(workdir, data_dir)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  final_eval = [json.loads(l) for l in before.splitlines() if 'eval_top1' in l][-1]
  assert f"final: eval_top1 {final_eval['eval_top1']:.4f}" in proc.stdout, proc.stdout
  assert f'step {TOTAL_STEPS}' in proc.stdout
  assert (workdir / 'metrics.jsonl').read_text() == before  # nothing logged again
  # A checkpoint of a run with another number of processes: its data order was another.
  meta_file = workdir / 'checkpoints' / str(TOTAL_STEPS) / 'meta' / 'metadata'
  meta = json.loads(meta_file.read_text())
  assert meta['process_count'] == 1
  meta_file.write_text(json.dumps(dict(meta, process_count=2)))
  proc = _run(workdir, data_dir)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  assert ('Checkpoint was written with process_count=2, this run has 1: the data order'
          in proc.stderr), proc.stderr[-3000:]
  assert 'Metadata file does not exist' not in proc.stderr  # the resume check is quiet


def test_resuming_with_another_model_names_the_arrays_and_fields_and_changes_nothing(
    reference, data_dir, tmp_path):
  """A workdir's checkpoint restored with a config that makes other arrays: one message
  (the arrays, the config fields changed, what to do), not Orbax's tracebacks."""
  import shutil  # pylint: disable=import-outside-toplevel
  ref_dir, _ = reference
  workdir = tmp_path / 'changed'
  shutil.copytree(ref_dir, workdir)
  before = (workdir / 'metrics.jsonl').read_text()
  config_before = (workdir / 'config.json').read_text()
  summary_before = (workdir / 'model_summary.json').read_text()
  proc = _run(workdir, data_dir, '--config.model.mlp_dim=128')
  assert proc.returncode != 0
  assert f'holds a checkpoint (step {TOTAL_STEPS}) of another train state' in proc.stderr
  assert ('params/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel: (32, 64) in the '
          'checkpoint, (32, 128) in this config') in proc.stderr, proc.stderr[-3000:]
  assert 'model.mlp_dim: 64 -> 128' in proc.stderr
  assert f'--config.init_from={workdir}' in proc.stderr
  assert 'Event loop is closed' not in proc.stderr
  assert (workdir / 'metrics.jsonl').read_text() == before
  assert (workdir / 'config.json').read_text() == config_before  # the run's own, kept
  assert (workdir / 'model_summary.json').read_text() == summary_before


def _latest_checkpoint(workdir):
  ckpt = workdir / 'checkpoints'
  return max((int(p.name) for p in ckpt.iterdir() if p.name.isdigit()), default=0) if (
      ckpt.exists()) else 0


def test_sigkill_at_random_moments_then_resume_is_bit_exact(reference, data_dir, tmp_path):
  ref_dir, _ = reference
  workdir = tmp_path / 'killed'
  rng = random.Random(1234)
  kills, restores = 0, []
  for attempt in range(10):
    proc = subprocess.Popen(_cmd(workdir, data_dir), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    if attempt == 0:
      # Kill during a checkpoint save: as soon as Orbax's temporary directory appears.
      while time.monotonic() < deadline and proc.poll() is None:
        ckpt = workdir / 'checkpoints'
        if ckpt.exists() and any('tmp' in p.name for p in ckpt.iterdir()):
          break
        time.sleep(0.005)
    elif attempt <= 3:
      # Let the resumed run make progress (a new checkpoint), then kill it a random
      # moment later: inside a step, between steps, or while saving.
      before = _latest_checkpoint(workdir)
      while (time.monotonic() < deadline and proc.poll() is None
             and _latest_checkpoint(workdir) <= before):
        time.sleep(0.01)
      time.sleep(rng.uniform(0.0, 1.0))
    if attempt <= 3 and proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      kills += 1
    out = proc.communicate(timeout=600)[0]
    restores += [line for line in out.splitlines() if 'Restoring checkpoint' in line]
    if proc.returncode == 0:
      break
  else:
    pytest.fail('the run did not finish after 10 attempts')
  assert kills >= 3, 'the test should have interrupted the run several times'
  assert restores, 'a restarted run should have resumed from a checkpoint'
  ref, got = _final_params(ref_dir), _final_params(workdir)
  assert ref.keys() == got.keys()
  for k in ref:
    np.testing.assert_array_equal(ref[k], got[k], err_msg=k)  # bit-exact
  # The training metrics of the steps after the last resume equal the reference's.
  ref_rows = {r['step']: r['loss'] for r in map(json.loads, (ref_dir / 'metrics.jsonl')
                                                .read_text().splitlines()) if 'loss' in r}
  got = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  got_rows = {r['step']: r['loss'] for r in got if 'loss' in r}
  # A row averages the steps since the previous row; the first row after a resume can
  # only average the steps since the checkpoint. The last row equals the reference's
  # where its whole window ran after the last resume.
  resumed_at = int(restores[-1].split('Restoring checkpoint ')[1].split()[0])
  last_row = [r for r in got if 'loss' in r][-1]
  if resumed_at <= TOTAL_STEPS - 4:
    assert got_rows[TOTAL_STEPS] == ref_rows[TOTAL_STEPS]
    assert 'steps_averaged' not in last_row
  else:  # the row says it averages fewer steps than log_every
    assert np.isfinite(got_rows[TOTAL_STEPS])
    if resumed_at < TOTAL_STEPS:  # (not a kill after the final save)
      assert last_row['steps_averaged'] == TOTAL_STEPS - resumed_at
  # Each step is logged once: a resumed run drops what the killed one logged after its
  # last checkpoint.
  assert [r['step'] for r in got if 'loss' in r] == list(range(4, TOTAL_STEPS + 1, 4))
  assert [r['step'] for r in got if 'eval_top1' in r] == [TOTAL_STEPS]


@pytest.mark.parametrize('signal_number', [signal.SIGTERM, signal.SIGINT])
def test_sigterm_saves_the_current_step_then_exits_and_the_resumed_run_is_bit_exact(
    reference, data_dir, tmp_path, signal_number):
  """A preemption notice (or Ctrl-C) between scheduled checkpoints loses no step: the step
  it lands after is saved, the process exits with 143 (130), and the resumed run ends
  bit-exact."""
  ref_dir, _ = reference
  workdir = tmp_path / 'terminated'
  # Checkpoints would come every 100 steps only: whatever is saved is SIGTERM's.
  proc = subprocess.Popen(_cmd(workdir, data_dir, '--config.checkpoint_every=100',
                               '--config.log_every=1'),
                          cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and proc.poll() is None and not (
      metrics.exists() and metrics.read_text().count('"loss"') >= 3):
    time.sleep(0.01)
  assert proc.poll() is None, proc.communicate()[0][-3000:]
  proc.send_signal(signal_number)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 128 + signal_number, out[-3000:]
  saved = _latest_checkpoint(workdir)
  assert 3 <= saved < TOTAL_STEPS, out[-3000:]
  name = signal.Signals(signal_number).name
  assert f'stopped by {name} at step {saved} of {TOTAL_STEPS}' in out
  assert 'KeyboardInterrupt' not in out and 'Traceback' not in out, out[-3000:]
  logged = [json.loads(l)['step'] for l in metrics.read_text().splitlines()]
  assert logged[-1] == saved  # the saved step's metrics are written too
  if signal_number != signal.SIGTERM:
    return  # the same save as SIGTERM's (checked above); its resume is SIGTERM's below
  proc = _run(workdir, data_dir, '--config.checkpoint_every=100', '--config.log_every=1')
  assert proc.returncode == 0, subprocess_env.failure(proc)
  assert 'Restoring checkpoint' in proc.stdout + proc.stderr
  ref, got = _final_params(ref_dir), _final_params(workdir)
  for k in ref:
    np.testing.assert_array_equal(ref[k], got[k], err_msg=k)  # bit-exact
  # This run logged every step: each row of the reference (log_every=4, a checkpoint
  # every 3 steps syncing in between) is the mean over its whole window of 4 steps.
  per_step = {r['step']: r for r in map(json.loads, metrics.read_text().splitlines())
              if 'loss' in r}
  assert sorted(per_step) == list(range(1, TOTAL_STEPS + 1))
  for row in (json.loads(l) for l in (ref_dir / 'metrics.jsonl').read_text().splitlines()):
    if 'loss' in row:
      assert 'steps_averaged' not in row  # every row averages log_every steps
      window = [per_step[s] for s in range(row['step'] - 3, row['step'] + 1)]
      for k in ('loss', 'grad_norm'):
        assert row[k] == pytest.approx(np.mean([w[k] for w in window]), rel=1e-5), (row, k)


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_resumes(
    reference, data_dir, tmp_path):
  """A truncated data file in the newest checkpoint, and an empty step directory newer
  still (an interrupted copy): both are kept under other names, the run resumes from the
  step before them and ends bit-exact. Each restart used to fail on them."""
  ref_dir, _ = reference
  workdir = tmp_path / 'damaged'
  shutil.copytree(ref_dir, workdir)
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  newest, before = steps[-1], steps[-2]
  data = max((p for p in (workdir / 'checkpoints' / str(newest) / 'state').rglob('*')
              if p.is_file()), key=lambda p: p.stat().st_size)
  data.write_bytes(data.read_bytes()[:1000])
  (workdir / 'checkpoints' / str(newest + 6)).mkdir()
  proc = _run(workdir, data_dir)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  assert f'Resumed from step {before}' in proc.stderr, proc.stderr[-3000:]
  for step in (newest, newest + 6):
    assert f'Checkpoint step {step} in ' in proc.stderr
    assert (workdir / 'checkpoints' / f'{step}.unreadable').is_dir()
  ref, got = _final_params(ref_dir), _final_params(workdir)
  for k in ref:
    np.testing.assert_array_equal(ref[k], got[k], err_msg=k)


def test_unreadable_weights_and_a_warmup_beyond_the_epochs_are_one_message(data_dir,
                                                                           tmp_path):
  garbage = tmp_path / 'garbage.npz'
  garbage.write_bytes(b'garbage')
  proc = _run(tmp_path / 'a', data_dir, f'--config.init_from={garbage}')
  assert proc.returncode == 3  # main.EXIT_USER_ERROR: a restart would fail again
  assert (f"error (ConfigError): config.init_from='{garbage}': {garbage} is not a NumPy .npz "
          'archive') in proc.stderr, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr and 'cannot schedule new futures' not in proc.stderr
  # num_epochs gives the steps only once the dataset is known: still one message.
  proc = _run(tmp_path / 'b', data_dir, '--config.total_steps=None', '--config.num_epochs=1',
              '--config.schedule.warmup_steps=1000')
  assert proc.returncode == 3  # main.EXIT_USER_ERROR: a restart would fail again
  assert 'error (ScheduleError): config.schedule.warmup_steps=1000 is not below' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_raising_total_steps_on_resume_warns_that_the_schedule_changes(reference, data_dir,
                                                                       tmp_path):
  ref_dir, _ = reference
  workdir = tmp_path / 'longer'
  shutil.copytree(ref_dir, workdir)
  proc = _run(workdir, data_dir, f'--config.total_steps={TOTAL_STEPS + 4}')
  assert proc.returncode == 0, subprocess_env.failure(proc)
  assert (f"The checkpoint's run ended at step {TOTAL_STEPS}, this one at step "
          f'{TOTAL_STEPS + 4}: the learning-rate schedule') in proc.stderr, proc.stderr[-3000:]
  assert '(it was 0)' in proc.stderr  # the old cosine had decayed to 0 at its end
  # (Same length, another schedule: tests/train/test_resume_checks.py, in process.)


def test_a_failed_checkpoint_save_ends_the_process(data_dir, tmp_path):
  """The checkpoint directory replaced by a file mid-run: the save fails, and the process
  exits with its traceback (it used to hang at exit, waiting on Orbax's threads, so a
  restart loop never saw it end)."""
  workdir = tmp_path / 'w'
  proc = subprocess.Popen(_cmd(workdir, data_dir, '--config.total_steps=400',
                               '--config.log_every=1'),
                          cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and proc.poll() is None and not (
      workdir / 'checkpoints' / '3').exists():
    time.sleep(0.05)
  shutil.rmtree(workdir / 'checkpoints')
  (workdir / 'checkpoints').write_text('not a directory')
  start = time.monotonic()
  try:
    out = proc.communicate(timeout=240)[0]
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail('the process did not exit after its checkpoint save failed')
  assert proc.returncode == 1, out[-3000:]
  assert 'error (CheckpointSaveError): saving checkpoint step ' in out, out[-3000:]
  assert time.monotonic() - start < 200


def _limit_file_size(limit):
  def set_limit():  # writes beyond `limit` bytes fail with EFBIG, as on a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return set_limit


def test_a_save_that_fails_in_the_background_stops_the_run_at_once(reference, data_dir,
                                                                   tmp_path):
  """An asynchronous save that fails (files cannot grow, as on a full disk) stops the run
  at the next log row with one message naming the step and where the run resumes. The
  failure used to surface only at the next save, checkpoint_every steps later, all of
  them lost."""
  del reference  # the dataset is prepared (its files are larger than the limit)
  workdir = tmp_path / 'full'
  proc = subprocess.run(
      _cmd(workdir, data_dir, '--config.total_steps=400', '--config.checkpoint_every=20',
           '--config.log_every=1', '--config.model.hidden_size=64',
           '--config.model.mlp_dim=128'),
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
      preexec_fn=_limit_file_size(100_000))
  assert proc.returncode == 1, subprocess_env.failure(proc)
  assert ('error (CheckpointSaveError): saving checkpoint step 20 in '
          f'{workdir / "checkpoints"} failed (') in proc.stderr, proc.stderr[-3000:]
  assert 'File too large' in proc.stderr.split('error (CheckpointSaveError)')[1]
  assert 'no checkpoint is complete yet' in proc.stderr
  logged = [json.loads(l)['step'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert 20 <= logged[-1] < 30, logged[-5:]  # not at the next save (step 40)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
  proc = _run(tmp_path, data_dir, '--config.schedule.base_lr=1e30', '--config.total_steps=40',
              '--config.checkpoint_every=1', '--config.log_every=1')
  assert proc.returncode != 0
  assert 'non-finite loss or gradient at step' in proc.stderr
  bad_step = int(proc.stderr.split('non-finite loss or gradient at step ')[1].split()[0])
  steps = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps and steps[-1] < bad_step
  params = _final_params(tmp_path, steps[-1])
  assert all(np.all(np.isfinite(v)) for v in params.values())
  assert f'The last good checkpoint is step {steps[-1]}.' in proc.stderr
  # Before any checkpoint: said so, not 'step None'.
  proc = _run(tmp_path / 'early', data_dir, '--config.schedule.base_lr=1e30',
              '--config.total_steps=40', '--config.checkpoint_every=0', '--config.log_every=1')
  assert proc.returncode != 0 and 'No checkpoint was written before it.' in proc.stderr
  assert 'step None' not in proc.stderr


def test_nonfinite_skip_mode_finishes(data_dir, tmp_path):
  proc = _run(tmp_path, data_dir, '--config.schedule.base_lr=1e30', '--config.total_steps=8',
              '--config.nonfinite=skip', '--config.log_every=1')
  assert proc.returncode == 0, subprocess_env.failure(proc)
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert sum(r.get('skipped_nonfinite', 0) for r in rows) > 0
  params = _final_params(tmp_path, 8)
  assert all(np.all(np.isfinite(v)) for v in params.values())


@pytest.mark.parametrize('args,devices,message', [
    (['--config.batch_size=30'], 8, 'config.batch_size=30'),
    (['--config.accum_steps=3'], 1, 'config.batch_size=32 must be divisible'),
    (['--config.model.image_size=30'], 1, 'config.model.image_size=30'),
    (['--config.input.name=no_such_dataset'], 1, "config.input.name='no_such_dataset'"),
    (['--config.mesh.data=3'], 8, 'config.mesh'),
    (['--config.optimizer.name=lamb'], 1, "config.optimizer.name='lamb'"),
])
def test_config_that_cannot_work_fails_fast_naming_the_field(data_dir, tmp_path, args, devices,
                                                             message):
  proc = _run(tmp_path, data_dir, *args, devices=devices, timeout=120)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / 'checkpoints').exists() or not list((tmp_path / 'checkpoints').iterdir())


def test_unwritable_workdir_is_named(data_dir, tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  proc = _run(blocker / 'sub', data_dir, timeout=120)
  assert proc.returncode != 0
  assert f'--workdir={blocker / "sub"} is not writable' in proc.stderr


def test_init_from_a_trained_workdir_starts_from_its_weights(reference, data_dir, tmp_path):
  ref_dir, _ = reference
  proc = _run(tmp_path, data_dir, f'--config.init_from={ref_dir}', '--config.init_head=keep',
              '--config.total_steps=1', '--config.schedule.warmup_steps=0',
              '--config.schedule.base_lr=1e-12')
  assert proc.returncode == 0, subprocess_env.failure(proc)
  assert f'Initialised from {ref_dir} (orbax checkpoint, ' in proc.stderr
  assert 'loaded as they are' in proc.stderr and 'head: keep' in proc.stderr
  assert 'resampled' not in proc.stderr  # same resolution: nothing resized
  # One step at a negligible learning rate: the evaluation equals the trained model's.
  ref_eval = [json.loads(l) for l in (ref_dir / 'metrics.jsonl').read_text().splitlines()
              if 'eval_top1' in l][-1]
  new_eval = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()
              if 'eval_top1' in l][-1]
  assert abs(new_eval['eval_loss'] - ref_eval['eval_loss']) < 1e-4
  # A missing path fails before anything runs.
  proc = _run(tmp_path / 'other', data_dir, '--config.init_from=/no/such/weights.npz')
  assert proc.returncode != 0 and "config.init_from='/no/such/weights.npz'" in proc.stderr
  # Weights of another width fail when they are read, before the input pipeline and the
  # train state are built (load_pretrained, not with_pretrained), and the checkpoint
  # manager is closed on the way out (no errors from its threads after the message).
  proc = _run(tmp_path / 'wider', data_dir, f'--config.init_from={ref_dir}',
              '--config.model.hidden_size=48')
  assert proc.returncode == 3  # main.EXIT_USER_ERROR: a restart would fail again
  assert 'error (CheckpointMismatchError)' in proc.stderr and 'Traceback' not in proc.stderr
  assert 'Schedule:' not in proc.stderr  # logged once the Trainer exists: it failed before
  assert 'width (hidden_size): checkpoint 32, model 48' in proc.stderr, proc.stderr[-3000:]
  assert 'cannot schedule new futures' not in proc.stderr
  # Read before the model summary (its FLOP count compiles the model: 9-14 s here before
  # the message), and nothing is left in the workdir but its lock file.
  assert 'FLOP count time' not in proc.stdout + proc.stderr
  assert not (tmp_path / 'wider' / 'checkpoints').exists()


def test_linear_probe_at_a_new_resolution_from_a_workdir(reference, data_dir, tmp_path):
  """init_from + new resolution + new head + trainable='^head/': the body is exactly the
  pretrained one (position embedding resampled), only the head learns, and the starting
  accuracy is evaluated before the first step."""
  from vit_jax.models import posemb  # pylint: disable=import-outside-toplevel
  ref_dir, _ = reference
  size = 40  # 28 px -> 7x7 tokens; 40 px -> 10x10
  proc = _run(tmp_path, data_dir, f'--config.init_from={ref_dir}', '--config.trainable=^head/',
              '--config.eval_at_start=True', '--config.total_steps=6',
              f'--config.model.image_size={size}',
              f"--config.input.pp_train=decode|resize({size})|value_range(-1, 1)|onehot(10)",
              f"--config.input.pp_eval=decode|resize({size})|value_range(-1, 1)|onehot(10)",
              '--config.checkpoint_every=6', '--config.schedule.base_lr=0.01')
  assert proc.returncode == 0, subprocess_env.failure(proc)
  # The log names what was resampled (7x7 -> 10x10 tokens) and the reset head.
  assert re.search(r'1 resampled: Transformer/posembed_input/pos_embedding \(1, 50, (\d+)\) '
                   r'-> \(1, 101, \1\)', proc.stderr), proc.stderr[-3000:]
  assert 'head: reset' in proc.stderr
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  evals = [r for r in rows if 'eval_top1' in r]
  assert evals[0]['step'] == 0 and evals[-1]['step'] == 6
  # A new zero head predicts the same for every image: uniform probabilities, loss log 10.
  # (That the probe learns is shown on CIFAR-10 in docs/finetuning.md; this body had 24
  # tiny steps of training.)
  assert evals[0]['eval_loss'] == pytest.approx(np.log(10), rel=1e-4)
  assert evals[-1]['eval_loss'] != evals[0]['eval_loss']
  ref = _final_params(ref_dir)
  new = _final_params(tmp_path, step=6)
  assert set(ref) == set(new)
  pos = 'Transformer/posembed_input/pos_embedding'
  np.testing.assert_allclose(new[pos], posemb.resample_posemb(ref[pos], 10, 'bilinear',
                                                              num_prefix_tokens=1), atol=1e-6)
  for name in ref:
    if name.startswith('head/'):
      assert not np.array_equal(new[name], np.zeros_like(new[name])), name
    elif name != pos:
      np.testing.assert_array_equal(new[name], ref[name], err_msg=name)
