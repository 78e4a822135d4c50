"""A real 2-process run on localhost, started by launch/multinode.sh, against one process.

Two processes (jax.distributed with a local coordinator, gloo CPU collectives, 4 CPU
devices each, parameters FSDP-sharded over all 8 devices so that both processes hold and
write parts of every large array) train the demo's small ViT through
`python -m vit_jax.main`. The reference is vit_jax.main in one process with 8 CPU
devices, fed the same global batches (reference_run.py). Both start from the same
pretrained weights (config.init_from: an Orbax workdir written here with another seed;
the fine-tuning path, which gathers the initialised parameters across processes). Then:
  - losses, gradient norms, evaluation and the final train state (parameters and
    optimizer state) equal the reference's within float tolerance (rtol 1e-5,
    atol 1e-6; observed differences are ~1e-7 relative: collectives sum in another order);
  - each process reads a disjoint part of the training split and the parts cover it;
  - the checkpoint both processes wrote restores in a new 2-process run (resuming at step
    3 through launch/until_done.sh gives the same final state) and in a 1-process run
    (the full train state onto one device, as vit_jax.main restores it).
"""

import collections
import hashlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
TOTAL_STEPS = 6
BATCH = 32
TIMEOUT = 400


def _main_flags(data_dir, workdir, init_from):
  return [
      '--config=configs/demo.py', f'--config.total_steps={TOTAL_STEPS}',
      '--config.model.hidden_size=32', '--config.model.num_layers=1',
      '--config.model.num_heads=2', '--config.model.mlp_dim=64',
      '--config.model.dropout_rate=0.1', f'--config.batch_size={BATCH}',
      # SGD: Adam turns float noise in gradients that are zero in theory (the key bias)
      # into full-size updates, which no tolerance could tell from a real difference.
      '--config.optimizer.name=sgd', '--config.schedule.base_lr=0.1',
      '--config.schedule.warmup_steps=0',
      # FSDP over all 8 devices: every large array is split across both processes.
      '--config.mesh.data=1', '--config.mesh.fsdp=8', '--config.min_fsdp_size=64',
      '--config.log_every=1', '--config.eval_every=0', '--config.checkpoint_every=3',
      '--config.keep_checkpoints=3', f'--config.input.data_dir={data_dir}',
      '--config.input.eval_split=test[:64]', f'--config.init_from={init_from}',
      '--config.init_head=keep', f'--workdir={workdir}',
  ]


def _pretrained_workdir(directory, data_dir):
  """An Orbax workdir (checkpoint at step 0) of the run's model, initialised with
  another seed, written by this process: the weights both runs fine-tune from."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  from vit_jax import sharding  # pylint: disable=import-outside-toplevel
  from vit_jax.checkpoints import train_state  # pylint: disable=import-outside-toplevel
  from vit_jax.train import loop  # pylint: disable=import-outside-toplevel
  # The runs' config, from the same flags (config_flags reads overrides from argv).
  argv = ['pretrain', *[a.replace('configs/demo.py', str(ROOT / 'configs' / 'demo.py'))
                        for a in _main_flags(data_dir, directory, 'unused')
                        if a.startswith('--config')],
          '--config.seed=1', '--config.mesh.fsdp=1']
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=values, sys_argv=argv)
  values(argv)
  config = values.config
  mesh = sharding.create_mesh(config.mesh, jax.local_devices()[:1])
  state = loop.Trainer(config, mesh, TOTAL_STEPS).init_state()
  checkpointer = train_state.TrainCheckpointer(directory / 'checkpoints')
  checkpointer.save(0, state, {'model': config.model.to_dict()})
  checkpointer.close()
  return directory


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(devices, **extra):
  env = subprocess_env.cpu_env(devices, JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
                               PYTHON=sys.executable, **extra)
  env.pop('JAX_COORDINATOR_ADDRESS', None)
  return env


def _run(cmd, env, log_dir=None):
  """Runs cmd in its own process group; on a timeout the whole group is killed."""
  start = time.monotonic()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    out = proc.communicate(timeout=TIMEOUT)[0]
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out = proc.communicate()[0]
    pytest.fail(f'{cmd[:3]} timed out after {TIMEOUT} s\n{out[-3000:]}{_tails(log_dir)}')
  if proc.returncode != 0:
    pytest.fail(f'{cmd[:3]} exited with {proc.returncode}\n{out[-3000:]}{_tails(log_dir)}')
  return out, time.monotonic() - start


def _tails(log_dir):
  if log_dir is None:
    return ''
  return ''.join(f'\n--- {p.name} (last 3000 characters) ---\n{p.read_text()[-3000:]}'
                 for p in sorted(pathlib.Path(log_dir).glob('process_*.log')))


def _two_processes(tmp, data_dir, workdir, name, init):
  """launch/multinode.sh --hosts=localhost,localhost, with an `ssh` that runs locally."""
  stub = tmp / 'local_ssh'
  if not stub.exists():
    stub.write_text('#!/usr/bin/env bash\n# ssh HOST COMMAND, run on this machine\n'
                    f'echo "$1" >> {tmp}/ssh_hosts\nexec bash -c "$2"\n')
    stub.chmod(0o755)
  log_dir = tmp / f'{name}_logs'
  cmd = ['bash', 'launch/multinode.sh', '--hosts=localhost,localhost',
         f'--port={_free_port()}', f'--log_dir={log_dir}',
         *_main_flags(data_dir, workdir, init)]
  return cmd, _env(4, SSH=str(stub)), log_dir


def _metrics(workdir):
  return [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('multiprocess')
  data_dir = tmp / 'tfds'
  timings = {}
  init = _pretrained_workdir(tmp / 'pretrained', data_dir)
  # 1. The reference: one process, 8 devices (prepares the bundled dataset first).
  ref = tmp / 'reference'
  out, timings['reference (1 process x 8 devices)'] = _run(
      [sys.executable, str(HERE / 'reference_run.py'), *_main_flags(data_dir, ref, init)],
      _env(8))
  assert 'final:' in out
  # 2. The same run in two processes.
  two = tmp / 'two_processes'
  cmd, env, logs = _two_processes(tmp, data_dir, two, 'first', init)
  out, timings['2 processes x 4 devices'] = _run(cmd, env, logs)
  first_logs = {i: (logs / f'process_{i}.log').read_text() for i in (0, 1)}
  # 3. Preemption after the step-3 checkpoint: a copy of the workdir without step 6,
  # resumed by a new 2-process run under launch/until_done.sh.
  resumed = tmp / 'resumed'
  shutil.copytree(two, resumed)
  shutil.rmtree(resumed / 'checkpoints' / str(TOTAL_STEPS))
  status_before = subprocess.run([sys.executable, 'launch/run_status.py', str(resumed)],
                                 cwd=ROOT, env=_env(1), capture_output=True, text=True,
                                 timeout=120)
  cmd, env, logs = _two_processes(tmp, data_dir, resumed, 'resumed', init)
  until_out, timings['2 processes, resumed'] = _run(
      ['bash', 'launch/until_done.sh', f'--workdir={resumed}', '--max_attempts=2',
       '--backoff=0', '--', *cmd], env, logs)
  resumed_logs = {i: (logs / f'process_{i}.log').read_text() for i in (0, 1)}
  print('timings (s):', {k: round(v, 1) for k, v in timings.items()})
  return dict(tmp=tmp, data_dir=data_dir, init=init, ref=ref, two=two, resumed=resumed,
              first_logs=first_logs, resumed_logs=resumed_logs, until_out=until_out,
              status_before=status_before)


def test_losses_and_evaluation_equal_one_process(runs):
  ref = {r['step']: r for r in _metrics(runs['ref']) if 'loss' in r}
  two_rows = _metrics(runs['two'])
  two = {r['step']: r for r in two_rows if 'loss' in r}
  # Only process 0 writes metrics: one row per step.
  assert [r['step'] for r in two_rows if 'loss' in r] == list(range(1, TOTAL_STEPS + 1))
  for step in range(1, TOTAL_STEPS + 1):
    for key in ('loss', 'grad_norm', 'param_norm'):
      assert two[step][key] == pytest.approx(ref[step][key], rel=1e-5), (step, key)
  assert len({round(r['loss'], 4) for r in two.values()}) > 3  # the model is learning
  ref_eval = [r for r in _metrics(runs['ref']) if 'eval_top1' in r][-1]
  two_eval = [r for r in two_rows if 'eval_top1' in r][-1]
  assert two_eval['eval_examples'] == ref_eval['eval_examples'] == 64
  assert two_eval['eval_top1'] == ref_eval['eval_top1']
  assert two_eval['eval_loss'] == pytest.approx(ref_eval['eval_loss'], rel=1e-5)


def test_both_processes_ran_and_only_process_0_reports(runs):
  logs = runs['first_logs']
  for i in (0, 1):
    assert 'Connecting to JAX distributed service on localhost:' in logs[i]
    assert f'Training demo-ViT for {TOTAL_STEPS} steps' in logs[i]
    assert f'Initialised from {runs["init"]}' in logs[i]
  assert 'final: ' in logs[0] and f'step {TOTAL_STEPS}/{TOTAL_STEPS}' in logs[0]
  assert 'final: ' not in logs[1] and 'step 1/' not in logs[1]
  assert (runs['tmp'] / 'ssh_hosts').read_text().split() == ['localhost'] * 4
  # Both processes wrote their shards of the FSDP-sharded state into the checkpoint.
  state_dir = runs['two'] / 'checkpoints' / str(TOTAL_STEPS) / 'state'
  assert (state_dir / 'ocdbt.process_0').is_dir() and (state_dir / 'ocdbt.process_1').is_dir()


def test_each_process_reads_a_disjoint_part_of_the_data(runs):
  from vit_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from vit_jax.data import sources  # pylint: disable=import-outside-toplevel
  source = sources.TfdsSource(name='bundled_mnist', split='train',
                              data_dir=str(runs['data_dir']))

  def images(index, count):
    ds = source.epoch_dataset(epoch=0, seed=0, shuffle=True, process_index=index,
                              process_count=count)
    return collections.Counter(hashlib.sha1(ex['image']).hexdigest()
                               for ex in ds.as_numpy_iterator())

  parts = [images(i, 2) for i in (0, 1)]
  whole = images(0, 1)
  assert sum(parts[0].values()) == sum(parts[1].values()) == 2000
  assert sum(whole.values()) == 4000
  assert parts[0] + parts[1] == whole  # together: every example exactly once
  assert not set(parts[0]) & set(parts[1])  # no image in both parts
  # The run's steps per epoch: each process takes 2000 // 16 batches.
  assert pipeline.steps_per_epoch(source, BATCH, process_count=2) == 2000 // (BATCH // 2)


def _restore_on_one_device(workdir):
  """The full train state of the newest checkpoint, restored the way vit_jax.main
  resumes (Trainer.abstract_state + TrainCheckpointer.restore), in this process on one
  device."""
  import jax  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from vit_jax import sharding  # pylint: disable=import-outside-toplevel
  from vit_jax.checkpoints import train_state  # pylint: disable=import-outside-toplevel
  from vit_jax.train import loop  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(json.loads((workdir / 'config.json').read_text()))
  config.mesh.update(data=1, fsdp=1, model=1)
  device = jax.local_devices()[0]
  trainer = loop.Trainer(config, sharding.create_mesh(config.mesh, [device]), TOTAL_STEPS)
  checkpointer = train_state.TrainCheckpointer(workdir / 'checkpoints')
  try:
    state, meta = checkpointer.restore(trainer.abstract_state())
  finally:
    checkpointer.close()
  assert {s.device for s in jax.tree.leaves(state.params)[0].addressable_shards} == {device}
  flat = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state))}
  return flat, meta


def test_checkpoint_of_two_processes_restores_in_one_process_and_equals_reference(runs):
  two, meta = _restore_on_one_device(runs['two'])
  ref, _ = _restore_on_one_device(runs['ref'])
  assert meta['step'] == TOTAL_STEPS and meta['global_batch_size'] == BATCH
  assert two.keys() == ref.keys() and any('opt_state' in k for k in two)
  for k in two:
    if k in ('.step', '.rng') or k.endswith('.count'):
      np.testing.assert_array_equal(two[k], ref[k], err_msg=k)
    else:
      np.testing.assert_allclose(two[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_checkpoint_of_two_processes_restores_in_a_new_two_process_run(runs):
  status = runs['status_before']
  assert status.returncode == 1 and f'step 3 of {TOTAL_STEPS}' in status.stdout
  assert 'the run is done (attempt 1)' in runs['until_out']
  for i in (0, 1):
    assert 'Restoring checkpoint 3' in runs['resumed_logs'][i]
    assert 'from step 3;' in runs['resumed_logs'][i]
  resumed, _ = _restore_on_one_device(runs['resumed'])
  two, _ = _restore_on_one_device(runs['two'])
  for k in two:  # the same computation on the same 2 x 4 devices: bit-exact
    np.testing.assert_array_equal(resumed[k], two[k], err_msg=k)
  # The resumed run first dropped what the copied run had logged after step 3 (the
  # checkpoint it resumed from), then logged steps 4-6 again: each step once, and the
  # same values as the uninterrupted run.
  first = _metrics(runs['two'])
  after = sum(r['step'] > 3 for r in first)
  assert after >= TOTAL_STEPS - 3
  assert (f'Starting at step 3: dropped {after} metrics.jsonl row(s)'
          in runs['resumed_logs'][0])
  rows = _metrics(runs['resumed'])
  assert [r['step'] for r in rows] == [r['step'] for r in first]
  assert [r['step'] for r in rows if 'loss' in r] == list(range(1, TOTAL_STEPS + 1))
  assert [r.get('loss') for r in rows] == [r.get('loss') for r in first]
  done = subprocess.run([sys.executable, 'launch/run_status.py', str(runs['resumed'])],
                        cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=120)
  assert done.returncode == 0 and f'step {TOTAL_STEPS} of {TOTAL_STEPS}' in done.stdout


def test_workdir_check_leaves_other_processes_probe_files_alone(tmp_path):
  """Every process checks the shared workdir at start-up at the same moment; a probe
  file with one shared name let process A delete the file process B was about to
  delete (B then failed with `--workdir=... is not writable`)."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  from vit_jax.train import loop  # pylint: disable=import-outside-toplevel
  other = tmp_path / '.write_test'  # another process's probe, between write and unlink
  other.write_text('ok')
  loop.check_workdir(epath.Path(tmp_path))
  assert other.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['.write_test']


def _start_pair(flags, port):
  """Processes 0 and 1 of a 2-process vit_jax.main run, each in a session of its own."""
  return [subprocess.Popen(
      [sys.executable, '-m', 'vit_jax.main', *flags, f'--coordinator_address=localhost:{port}',
       '--num_processes=2', f'--process_id={i}'], cwd=ROOT, env=_env(4),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
          for i in (0, 1)]


def _wait_for_log_rows(procs, workdir, rows):
  """Until metrics.jsonl has `rows` training rows; both processes must still run."""
  deadline = time.monotonic() + TIMEOUT
  metrics = workdir / 'metrics.jsonl'
  while time.monotonic() < deadline and all(p.poll() is None for p in procs) and not (
      metrics.exists() and metrics.read_text().count('"loss"') >= rows):
    time.sleep(0.05)
  assert all(p.poll() is None for p in procs)


def test_sigterm_to_one_process_saves_one_agreed_step_in_both(runs, tmp_path):
  """A preemption notice reaches one host only: JAX's preemption service tells the other,
  both save the same step and exit with 143, and that checkpoint is complete."""
  workdir = tmp_path / 'preempted'
  port = _free_port()
  flags = [*_main_flags(runs['data_dir'], workdir, runs['init']),
           '--config.total_steps=500', '--config.checkpoint_every=1000']
  procs = _start_pair(flags, port)
  try:
    _wait_for_log_rows(procs, workdir, 2)
    procs[1].send_signal(signal.SIGTERM)  # the process that does not write metrics
    outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
  for p, out in zip(procs, outs):
    assert p.returncode == 143, out[-3000:]
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert len(steps) == 1 and 2 <= steps[0] < 500
  for out in outs:
    assert f'stopped by SIGTERM at step {steps[0]} of 500' in out
  state_dir = workdir / 'checkpoints' / str(steps[0]) / 'state'
  assert (state_dir / 'ocdbt.process_0').is_dir() and (state_dir / 'ocdbt.process_1').is_dir()
  _, meta = _restore_on_one_device(workdir)
  assert meta['step'] == steps[0]


def test_a_process_left_waiting_for_the_others_says_so_and_stops(tmp_path):
  """One of two processes started: it says what it waits for, reminds while it waits,
  and stops at --initialization_timeout (was 5 silent minutes, then a C++ abort)."""
  proc = subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', '--config=configs/demo.py',
       f'--workdir={tmp_path / "w"}', f'--coordinator_address=localhost:{_free_port()}',
       '--num_processes=2', '--process_id=0', '--initialization_timeout=8'],
      cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert 'Joining 2 processes at localhost:' in proc.stderr
  assert '(--initialization_timeout)' in proc.stderr
  assert 'Still waiting after 4 s for 2 processes' in proc.stderr, proc.stderr[-2000:]


def test_a_lost_process_stops_the_others_after_the_heartbeat_timeout(runs, tmp_path):
  """kill -9 of one process (a lost host): the other waits in its collectives until JAX's
  heartbeat timeout, 100 s by default; --heartbeat_timeout shortens it."""
  workdir = tmp_path / 'lost'
  port = _free_port()
  flags = [*_main_flags(runs['data_dir'], workdir, runs['init']),
           '--config.total_steps=5000', '--config.checkpoint_every=10000',
           '--heartbeat_timeout=10']
  procs = _start_pair(flags, port)
  try:
    _wait_for_log_rows(procs, workdir, 1)
    os.killpg(procs[1].pid, signal.SIGKILL)
    start = time.monotonic()
    out = procs[0].communicate(timeout=90)[0]
    waited = time.monotonic() - start
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
  assert procs[0].returncode != 0, out[-3000:]
  assert waited < 45, (waited, out[-3000:])  # 86 s with the default, measured
  # Where its collective fails first (gloo: the connection reset), one paragraph says so.
  if 'Gloo' in out or 'Connection reset' in out:
    assert 'error (lost process)' in out and 'Traceback' not in out, out[-3000:]


def test_a_busy_workdir_is_refused_by_every_process(tmp_path):
  """Process 0 alone found the workdir locked and exited; process 1 was then ended by the
  distributed service's fatal error (a C++ stack trace, exit 139) that never named the
  lock. Every process now says the workdir is in use, with exit status 1."""
  import fcntl  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / 'busy'
  workdir.mkdir()
  fd = os.open(workdir / '.vit_jax.lock', os.O_RDWR | os.O_CREAT)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds it
  try:
    procs = _start_pair(['--config=configs/demo.py', f'--workdir={workdir}',
                         f'--config.input.data_dir={tmp_path / "tfds"}'], _free_port())
    outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  finally:
    os.close(fd)
  for i, (proc, out) in enumerate(zip(procs, outs)):
    assert proc.returncode == 1, f'process {i}: {proc.returncode}\n{out[-3000:]}'
    assert f'error (WorkdirBusyError): --workdir={workdir} is in use by another run' in out, (
        f'process {i}:\n{out[-3000:]}')
  assert 'process 0 found its lock held' in outs[1]


def test_a_config_one_process_cannot_use_stops_every_process(tmp_path):
  """config.init_from on one host's disk only: that process stopped at once (status 3),
  the other waited in its first collective until the heartbeat timeout, then a C++ abort
  (status 134). Both now stop at once, each saying why."""
  weights = tmp_path / 'weights.npz'
  weights.write_bytes(b'only on host 0')
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'vit_jax.main', '--config=configs/demo.py',
       f'--workdir={tmp_path / "w"}', f'--config.input.data_dir={tmp_path / "tfds"}',
       f'--config.init_from={init}', f'--coordinator_address=localhost:{port}',
       '--num_processes=2', f'--process_id={i}'], cwd=ROOT, env=_env(4),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
           for i, init in enumerate((weights, tmp_path / 'missing.npz'))]
  try:
    outs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
  assert [p.returncode for p in procs] == [3, 3], [o[-2000:] for o in outs]
  assert 'process(es) [1] of this run found the config or workdir unusable' in outs[0]
  assert 'missing.npz' in outs[1] and 'does not exist' in outs[1], outs[1][-2000:]


def test_an_eval_preprocessing_one_process_cannot_run_stops_every_process(tmp_path):
  """The first evaluation example is preprocessed before compiling; where it fails on one
  process only (its part of the data), the other stops too, at once, saying which."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for split in ('train', 'test'):
    for c in ('a', 'b'):
      (tmp_path / 'data' / split / c).mkdir(parents=True)
      for j in range(4):
        Image.fromarray(np.full((28, 28, 3), 60 * j, np.uint8)).save(
            tmp_path / 'data' / split / c / f'{j}.png')
  port = _free_port()
  common = ['--config=configs/demo.py', f'--workdir={tmp_path / "w"}',
            '--config.input.source=folder', f'--config.input.folder={tmp_path / "data"}',
            '--config.input.train_split=train', '--config.input.eval_split=test',
            '--config.model.num_classes=2', '--config.model.image_size=32',
            '--config.input.pp_train=decode|resize(32)|value_range(-1, 1)|onehot(2)',
            '--config.total_steps=2', '--config.schedule.warmup_steps=1',
            f'--coordinator_address=localhost:{port}', '--num_processes=2']
  # (One preprocessing per process stands for one host whose images are smaller.)
  pp_eval = ('decode|resize(32)|value_range(-1, 1)|onehot(2)',
             'decode|central_crop(32)|value_range(-1, 1)|onehot(2)')
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'vit_jax.main', *common, f'--config.input.pp_eval={pp}',
       f'--process_id={i}'], cwd=ROOT, env=dict(_env(4), HOME=str(tmp_path)),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
           for i, pp in enumerate(pp_eval)]
  try:
    outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
  assert [p.returncode for p in procs] == [3, 3], [o[-2000:] for o in outs]
  assert ('process(es) [1] of this run cannot preprocess its first evaluation example'
          in outs[0]), outs[0][-2000:]
  assert 'central_crop(32): image height is smaller than 32 (got 28)' in outs[1], outs[1][-2000:]
  assert 'First step' not in outs[0] + outs[1]  # nothing compiled
