"""The launch scripts: syntax, shellcheck, and their command lines, run against stub
`gcloud`, `srun`, `sbatch`, `ssh`, `python` and `sleep` executables that record their
arguments (no cloud account or cluster is reachable here)."""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = ROOT / 'launch'
SCRIPTS = sorted([*LAUNCH.glob('*.sh'), LAUNCH / 'slurm.sbatch'])

# A recording stub: appends {'argv', 'env'} to $STUB_LOG; its exit status and output come
# from $STUB_RULES, a JSON list of [substring of the joined arguments, [[status, stdout],
# ...]]: the first rule that matches answers with its next pair (the last one repeats).
# With STUB_EXEC set, a `--command=...` (gcloud ssh) containing that text is run by bash.
STUB = r'''
import json, os, sys, tarfile
argv = sys.argv[1:]
joined = ' '.join(argv)
record = {'name': os.path.basename(sys.argv[0]), 'argv': argv,
          'env': {k: os.environ.get(k) for k in ('CONFIG', 'WORKDIR', 'RESTARTS',
                                                 'JAX_LOCAL_DEVICE_IDS', 'REPO_DIR')}}
if 'scp' in argv:  # what would be copied to the workers
  record['tar'] = sorted(tarfile.open(argv[argv.index('scp') + 1]).getnames())
with open(os.environ['STUB_LOG'], 'a') as f:
  f.write(json.dumps(record) + '\n')
status, out = 0, ''
rules = json.loads(os.environ.get('STUB_RULES', '[]'))
for i, (needle, answers) in enumerate(rules):
  if needle in joined:
    counter = os.environ['STUB_LOG'] + f'.rule{i}'
    n = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, 'w').write(str(n + 1))
    status, out = answers[min(n, len(answers) - 1)]
    break
if out:
  print(out)
command = [a for a in argv if a.startswith('--command=')]
if command and os.environ.get('STUB_EXEC') and os.environ['STUB_EXEC'] in command[0]:
  os.setsid()  # as sshd runs a command: in a session (and process group) of its own
  os.execvp('bash', ['bash', '-c', command[0][len('--command='):]])
sys.exit(status)
'''


@pytest.fixture
def stubs(tmp_path):
  """PATH with recording stubs; returns (env, calls()) where calls() reads the records."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name in ('gcloud', 'srun', 'sbatch', 'nvidia-smi', 'sleep'):
    (bin_dir / name).write_text(f'#!{sys.executable}\n{STUB}')
    (bin_dir / name).chmod(0o755)
  log = tmp_path / 'calls.jsonl'
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', STUB_LOG=str(log))
  for var in ('PROJECT', 'ZONE', 'CONFIG', 'WORKDIR', 'EXTRA_ARGS', 'DRY_RUN', 'SPOT',
              'TPU_NAME', 'ACCELERATOR_TYPE', 'RUNTIME_VERSION', 'REPO_URL', 'DONE_CMD',
              'JAX_LOCAL_DEVICE_IDS', 'RESTARTS', 'PYTHON', 'HOSTS', 'COORDINATOR',
              'NUM_PROCESSES', 'PROCESS_ID', 'SSH', 'REMOTE_ENV'):
    env.pop(var, None)
  for var in [k for k in env if k.startswith('SLURM_')]:  # when the tests run under SLURM
    env.pop(var)

  def calls(name=None):
    if not log.exists():
      return []
    rows = [json.loads(l) for l in log.read_text().splitlines()]
    return [r for r in rows if name is None or r['name'] == name]

  return env, calls


def _sh(args, env, timeout=60, **kwargs):
  return subprocess.run(['bash', *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, **kwargs)


def _flag(argv, name):
  values = [a.split('=', 1)[1] for a in argv if a.startswith(f'{name}=')]
  assert len(values) == 1, (name, argv)
  return values[0]


# ------------------------------------------------------------------- syntax, shellcheck


def test_scripts_are_executable_and_parse():
  assert {p.name for p in SCRIPTS} >= {'tpu_vm.sh', 'slurm.sbatch', 'slurm_submit.sh',
                                       'multinode.sh', 'until_done.sh'}
  for script in SCRIPTS:
    assert os.access(script, os.X_OK), script
    proc = subprocess.run(['bash', '-n', str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, (script, proc.stderr)
    assert 'set -euo pipefail' in script.read_text(), script


@pytest.mark.skipif(shutil.which('shellcheck') is None,
                    reason='shellcheck is not installed on this machine (apt-get install '
                           'shellcheck); the bash -n check above still ran')
def test_scripts_pass_shellcheck():
  proc = subprocess.run(['shellcheck', '--shell=bash', *map(str, SCRIPTS)],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize('script', [s.name for s in SCRIPTS if s.suffix == '.sh'])
def test_usage_text(script):
  proc = _sh([LAUNCH / script, '--help'] if script != 'tpu_vm.sh' else [LAUNCH / script,
                                                                         'help'], os.environ)
  assert proc.returncode == 0 and proc.stdout.startswith('usage: launch/'), proc.stderr


def test_sbatch_script_usage_text():
  env = {k: v for k, v in os.environ.items() if k not in ('CONFIG', 'WORKDIR')}
  proc = _sh([LAUNCH / 'slurm.sbatch', '--help'], env)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith('SLURM batch script for GPU clusters')
  assert 'CONFIG=configs/vit_b16.py WORKDIR=' in proc.stdout and '#SBATCH' not in proc.stdout


# ---------------------------------------------------------------------------- Cloud TPU

TPU = ['--project=my-proj', '--zone=europe-west4-a', '--type=v3-32', '--name=vit-pod',
       '--config=configs/vit_b16.py', '--workdir=gs://my-bucket/b16']
TRICKY = '--config.input.pp_train=decode|inception_crop(224)|value_range(-1, 1)'


def _gcloud_location(argv):
  assert argv[:3] == ['compute', 'tpus', 'tpu-vm'], argv
  assert argv[4] == 'vit-pod' or argv[3] == 'scp', argv
  assert _flag(argv, '--zone') == 'europe-west4-a' and _flag(argv, '--project') == 'my-proj'


def test_tpu_up_creates_copies_installs_and_starts_on_every_worker(stubs):
  env, calls = stubs
  proc = _sh([LAUNCH / 'tpu_vm.sh', 'up', *TPU, '--', '--config.batch_size=4096', TRICKY],
             env)
  assert proc.returncode == 0, proc.stderr
  gcloud = [c['argv'] for c in calls('gcloud')]
  assert [a[3] for a in gcloud] == ['create', 'scp', 'ssh', 'ssh', 'ssh', 'ssh']
  for argv in gcloud:
    _gcloud_location(argv)
  create, scp, extract, install, train, logs = gcloud
  assert _flag(create, '--accelerator-type') == 'v3-32'
  assert _flag(create, '--version') == 'tpu-ubuntu2204-base'
  assert '--spot' not in create
  assert _flag(scp, '--worker') == 'all' and 'vit-pod:vit_jax.tar.gz' in scp
  tar = calls('gcloud')[1]['tar']
  assert {'launch/tpu_vm.sh', 'vit_jax/main.py', 'pyproject.toml'} <= set(tar)
  assert not any(n.startswith('.git/') for n in tar)
  for argv in (extract, install, train):
    assert _flag(argv, '--worker') == 'all'
  assert 'tar -xzf' in _flag(extract, '--command')
  assert '[tpu]' in _flag(install, '--command') and '3.11' in _flag(install, '--command')
  command = _flag(train, '--command')
  words = shlex.split(command.split('setsid nohup ', 1)[1].split(' >', 1)[0])
  assert words == ['$HOME/vit_env/bin/python', '-u', '-m', 'vit_jax.main', '--distributed',
                   '--config=configs/vit_b16.py', '--workdir=gs://my-bucket/b16',
                   '--config.batch_size=4096', TRICKY]
  assert _flag(logs, '--worker') == '0' and 'tail' in _flag(logs, '--command')


def _worker_home(tmp_path):
  """A fake TPU worker's home: the code's directory and the path of its venv's python
  (for the test to write); the remote commands run locally with HOME set to it."""
  home = tmp_path / 'worker_home'
  (home / 'vit_jax').mkdir(parents=True)
  (home / 'vit_env' / 'bin').mkdir(parents=True)
  return home, home / 'vit_env' / 'bin' / 'python'


def test_tpu_train_command_runs_as_given_on_a_worker_and_stop_ends_it(stubs, tmp_path):
  """The remote commands of `train` and `stop` run for real by bash, in a fake worker
  home whose vit_env Python records its arguments and waits."""
  env, calls = stubs
  home, fake = _worker_home(tmp_path)
  # Like vit_jax.main, it takes SIGTERM as "save, then exit", which takes a moment.
  fake.write_text(f'#!{sys.executable}\nimport json, signal, sys, time\n'
                  'def save(*_):\n'
                  '  time.sleep(1.5)\n'
                  f'  open({str(home / "saved")!r}, "w").write("ok")\n'
                  '  sys.exit(143)\n'
                  'signal.signal(signal.SIGTERM, save)\n'
                  f'open({str(home / "argv.json")!r}, "w").write(json.dumps(sys.argv[1:]))\n'
                  'time.sleep(120)\n')
  fake.chmod(0o755)
  env = dict(env, HOME=str(home), STUB_EXEC='vit_jax')
  proc = _sh([LAUNCH / 'tpu_vm.sh', 'train', *TPU, '--', TRICKY], env)
  assert proc.returncode == 0, proc.stderr
  deadline = time.monotonic() + 30
  while not (home / 'argv.json').exists() and time.monotonic() < deadline:
    time.sleep(0.1)
  assert json.loads((home / 'argv.json').read_text()) == [
      '-u', '-m', 'vit_jax.main', '--distributed', '--config=configs/vit_b16.py',
      '--workdir=gs://my-bucket/b16', TRICKY]
  pid = int((home / 'vit_jax.pid').read_text())
  os.kill(pid, 0)  # running
  # A second `train` refuses while the first runs.
  again = _sh([LAUNCH / 'tpu_vm.sh', 'train', *TPU], env)
  assert again.returncode != 0 and 'a run is going' in again.stderr
  stop = _sh([LAUNCH / 'tpu_vm.sh', 'stop', *TPU], env)
  assert stop.returncode == 0, stop.stderr
  assert _flag(calls('gcloud')[-1]['argv'], '--worker') == 'all'
  # `stop` returned once the run had saved and exited, not before.
  assert (home / 'saved').exists()
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline:
    try:
      os.kill(pid, 0)
      time.sleep(0.1)
    except ProcessLookupError:
      break
  else:
    os.kill(pid, 9)
    pytest.fail('stop did not end the training process')
  assert not (home / 'vit_jax.pid').exists()


def test_tpu_run_logs_on_the_worker_passes_worker_env_and_stop_spares_other_pids(
    stubs, tmp_path):
  """`run` (what `attempt` and `resilient` start) used to write no log on the workers;
  WORKER_ENV reaches vit_jax.main with its quoted value whole; `stop` signals the PID file's
  process only if it is vit_jax.main (after a VM restart the PID may be another's)."""
  env, _ = stubs
  home, fake = _worker_home(tmp_path)
  fake.write_text(f'#!{sys.executable}\nimport json, os, sys\n'
                  'print("training output", flush=True)\n'
                  f'open({str(home / "seen.json")!r}, "w").write(json.dumps('
                  '[sys.argv[1:], os.environ.get("LIBTPU_INIT_ARGS")]))\n')
  fake.chmod(0o755)
  env = dict(env, HOME=str(home), STUB_EXEC='vit_jax',
             WORKER_ENV='LIBTPU_INIT_ARGS="--xla_a=1 --xla_b=2"',
             EXTRA_ARGS="--config.seed=3 '--config.input.pp_eval=resize(224)|value_range(-1, 1)'")
  for _ in range(2):
    proc = _sh([LAUNCH / 'tpu_vm.sh', 'run', *TPU], env)
    assert proc.returncode == 0, proc.stderr
  argv, libtpu = json.loads((home / 'seen.json').read_text())
  assert libtpu == '--xla_a=1 --xla_b=2'
  assert argv[-2:] == ['--config.seed=3', '--config.input.pp_eval=resize(224)|value_range(-1, 1)']
  log = (home / 'vit_jax.log').read_text()
  assert log.count('=== launch/tpu_vm.sh run: ') == 2 and log.count('training output') == 2
  other = subprocess.Popen(['sleep', '30'])  # not vit_jax.main
  try:
    (home / 'vit_jax.pid').write_text(str(other.pid))
    stop = _sh([LAUNCH / 'tpu_vm.sh', 'stop', *TPU], env)
    assert stop.returncode == 0, stop.stderr
    assert other.poll() is None  # spared
    assert not (home / 'vit_jax.pid').exists()
  finally:
    other.kill()
  bad = _sh([LAUNCH / 'tpu_vm.sh', 'run', *TPU], dict(env, WORKER_ENV='--oops'))
  assert bad.returncode == 2 and "WORKER_ENV: '--oops' is not NAME=value" in bad.stderr


def test_tpu_run_stops_the_workers_on_a_signal_and_waits_for_their_save(stubs, tmp_path):
  """SIGTERM to `tpu_vm.sh run` (until_done.sh's, in `resilient`) used to end the local
  script only: gcloud ssh does not stop a remote command, the workers trained on."""
  env, _ = stubs
  home, fake = _worker_home(tmp_path)
  fake.write_text(f'#!{sys.executable}\nimport signal, sys, time\n'
                  'def save(*_):\n'
                  '  time.sleep(1)\n'
                  # Output after the signal: `stop` used to kill the run's tee with it
                  # (one process group), and this line then ended the run (broken pipe).
                  '  print("saved step 5", flush=True)\n'
                  f'  open({str(home / "saved")!r}, "w").write("ok")\n'
                  '  sys.exit(143)\n'
                  'signal.signal(signal.SIGTERM, save)\n'
                  f'open({str(home / "ready")!r}, "w").write("")\n'
                  'time.sleep(120)\n')
  fake.chmod(0o755)
  proc = subprocess.Popen(['bash', LAUNCH / 'tpu_vm.sh', 'run', *TPU], cwd=ROOT,
                          env=dict(env, HOME=str(home), STUB_EXEC='vit_jax'),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 30
  while not (home / 'ready').exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.terminate()
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 143, err
  assert (home / 'saved').read_text() == 'ok'  # the worker saved before the script ended
  assert 'every worker saves a checkpoint and stops' in err
  assert not (home / 'vit_jax.pid').exists()


def test_tpu_spot_and_runtime_version_from_type(stubs):
  env, calls = stubs
  proc = _sh([LAUNCH / 'tpu_vm.sh', 'create', '--zone=us-central1-a', '--type=v5litepod-16',
              '--spot'], env)
  assert proc.returncode == 0, proc.stderr
  (argv,) = [c['argv'] for c in calls('gcloud')]
  assert argv[3:5] == ['create', 'vit-jax'] and '--spot' in argv
  assert _flag(argv, '--version') == 'v2-alpha-tpuv5-lite'
  assert not any(a.startswith('--project=') for a in argv)  # gcloud's default project
  proc = _sh([LAUNCH / 'tpu_vm.sh', 'create', '--type=v3-8'], env)
  assert proc.returncode == 2 and '--zone' in proc.stderr
  # A type without a default version: refused where a TPU VM is made, not by the
  # commands that do not make one (help, logs, stop, delete failed on it).
  proc = _sh([LAUNCH / 'tpu_vm.sh', 'create', '--zone=z', '--type=v7-8'], env)
  assert proc.returncode == 2 and 'no default runtime version for --type=v7-8' in proc.stderr
  proc = _sh([LAUNCH / 'tpu_vm.sh', 'help', '--type=v7-8'], env)
  assert proc.returncode == 0 and proc.stdout.startswith('usage:'), proc.stderr
  proc = _sh([LAUNCH / 'tpu_vm.sh', 'delete', '--zone=z', '--type=v7-8'], env)
  assert proc.returncode == 0, proc.stderr
  assert [c['argv'][3] for c in calls('gcloud')][-1] == 'delete'


def test_tpu_attempt_recreates_a_preempted_tpu(stubs):
  env, calls = stubs
  env = dict(env, STUB_RULES=json.dumps([['describe', [[0, 'PREEMPTED']]]]))
  proc = _sh([LAUNCH / 'tpu_vm.sh', 'attempt', *TPU], env)
  assert proc.returncode == 0, proc.stderr
  gcloud = [c['argv'] for c in calls('gcloud')]
  assert [a[3] for a in gcloud] == ['describe', 'delete', 'create', 'scp', 'ssh', 'ssh', 'ssh',
                                    'ssh']
  assert '--quiet' in gcloud[1]
  stop, run = gcloud[-2:]
  assert 'kill' in _flag(stop, '--command')
  assert _flag(run, '--worker') == 'all'
  bash, dash_c, inner = shlex.split(_flag(run, '--command'))
  assert (bash, dash_c) == ('bash', '-c')
  assert ('-m vit_jax.main --distributed --config=configs/vit_b16.py '
          '--workdir=gs://my-bucket/b16') in inner
  # A READY TPU: not created again, but this checkout is copied and installed again (it
  # used to run whatever code the TPU had, local edits and configs ignored).
  log = pathlib.Path(env['STUB_LOG'])
  log.unlink()
  env['STUB_RULES'] = json.dumps([['describe', [[0, 'READY']]]])
  proc = _sh([LAUNCH / 'tpu_vm.sh', 'attempt', *TPU], env)
  assert proc.returncode == 0, proc.stderr
  gcloud = [c['argv'] for c in calls('gcloud')]
  # (A run left training by a lost connection is stopped before the code changes.)
  assert [a[3] for a in gcloud] == ['describe', 'ssh', 'scp', 'ssh', 'ssh', 'ssh', 'ssh']
  assert 'kill' in _flag(gcloud[1], '--command')
  assert 'launch/tpu_vm.sh' in calls('gcloud')[2]['tar']
  # `ssh` runs the command after -- only (EXTRA_ARGS, vit_jax.main's flags, used to be
  # put in front of it).
  log.unlink()
  proc = _sh([LAUNCH / 'tpu_vm.sh', 'ssh', *TPU, '--', 'ls', '~'],
             dict(env, EXTRA_ARGS='--config.seed=3'))
  assert proc.returncode == 0, proc.stderr
  assert _flag(calls('gcloud')[-1]['argv'], '--command') == 'ls ~'


def test_tpu_resilient_restarts_until_the_workdir_is_done(stubs):
  env, calls = stubs
  env = dict(env, BACKOFF='0', STUB_RULES=json.dumps([
      ['describe', [[0, 'READY']]],
      ['run_status.py', [[1, 'step 0 of 10'], [1, 'step 5 of 10'], [0, 'step 10 of 10']]],
      ['vit_jax.main', [[255, ''], [0, '']]],  # the first run: the TPU was preempted
  ]))
  proc = _sh([LAUNCH / 'tpu_vm.sh', 'resilient', *TPU, '--spot', '--', '--config.seed=1'], env)
  assert proc.returncode == 0, proc.stderr
  runs = [c['argv'] for c in calls('gcloud') if 'vit_jax.main' in ' '.join(c['argv'])]
  assert len(runs) == 2 and all('--config.seed=1' in _flag(a, '--command') for a in runs)
  status = [c['argv'] for c in calls('gcloud') if 'run_status.py' in ' '.join(c['argv'])]
  assert len(status) == 3 and all(_flag(a, '--worker') == '0' for a in status)
  assert 'gs://my-bucket/b16' in _flag(status[0], '--command')
  assert 'the run is done (attempt 2)' in proc.stderr


def test_tpu_resilient_pins_the_ref_to_its_commit_for_every_attempt(stubs, tmp_path):
  """`resilient --repo --ref=main` used to clone the branch again at each attempt: a push
  between two preemptions changed the code in the middle of a run."""
  env, calls = stubs
  repo = tmp_path / 'repo'
  git = lambda *a: subprocess.run(['git', '-C', str(repo), *a], check=True,
                                  capture_output=True, text=True).stdout.strip()
  repo.mkdir()
  git('init', '-q', '-b', 'main')
  git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-q', '--allow-empty', '-m', 'a')
  first = git('rev-parse', 'HEAD')
  git('tag', '-a', 'v1', '-m', 'release')  # annotated: its own object, pointing at `first`
  git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-q', '--allow-empty', '-m', 'b')
  head = git('rev-parse', 'HEAD')
  env = dict(env, BACKOFF='0', STUB_RULES=json.dumps([
      ['describe', [[0, 'READY']]],
      ['run_status.py', [[1, 'step 0 of 10'], [1, 'step 5 of 10'], [0, 'step 10 of 10']]],
      ['vit_jax.main', [[255, ''], [0, '']]],
  ]))
  for ref, sha in (('main', head), ('v1', first), (first, first)):
    pathlib.Path(env['STUB_LOG']).unlink(missing_ok=True)
    for counter in tmp_path.glob('calls.jsonl.rule*'):
      counter.unlink()
    proc = _sh([LAUNCH / 'tpu_vm.sh', 'resilient', *TPU, f'--repo={repo}', f'--ref={ref}'],
               env)
    assert proc.returncode == 0, proc.stderr
    clones = [_flag(c['argv'], '--command') for c in calls('gcloud')
              if 'git clone' in ' '.join(c['argv'])]
    assert len(clones) == 2 and all(f'git checkout {sha}' in c for c in clones), clones
  # A name that is both a branch and a tag of other commits is refused, naming both.
  git('branch', 'v1', first)
  git('tag', '-f', 'v1', head)
  proc = _sh([LAUNCH / 'tpu_vm.sh', 'resilient', *TPU, f'--repo={repo}', '--ref=v1'], env)
  assert proc.returncode == 2
  assert 'refs/heads/v1' in proc.stderr and 'refs/tags/v1' in proc.stderr
  # A repository that cannot be read from here: a warning, the ref as given.
  pathlib.Path(env['STUB_LOG']).unlink(missing_ok=True)
  proc = _sh([LAUNCH / 'tpu_vm.sh', 'resilient', *TPU, f'--repo={tmp_path}/missing',
              '--ref=main'], dict(env, DRY_RUN='1'))
  assert proc.returncode == 0, proc.stderr
  assert 'could not resolve --ref=main' in proc.stderr


# -------------------------------------------------------------------------------- SLURM


def _slurm_env(env, tmp_path, **extra):
  return dict(env, CONFIG='configs/vit_b16.py', WORKDIR=str(tmp_path / 'run'),
              SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID='123', SLURM_NTASKS='16',
              SLURM_JOB_NUM_NODES='2', **extra)


def test_sbatch_script_runs_one_process_per_gpu_through_srun(stubs, tmp_path):
  env, calls = stubs
  env = _slurm_env(env, tmp_path, SLURM_NTASKS_PER_NODE='8', PYTHON='python',
                   SLURM_CPUS_PER_TASK='12',
                   EXTRA_ARGS='--config.total_steps=10 --config.log_every=5 '
                              '"--config.input.pp_eval=resize(224)|value_range(-1, 1)"')
  proc = _sh([LAUNCH / 'slurm.sbatch', '--config.batch_size=512'], env)
  assert proc.returncode == 0, proc.stderr
  (srun,) = calls('srun')
  assert srun['argv'] == [
      '--kill-on-bad-exit=1', '--cpu-bind=none', '--label', '--cpus-per-task=12', 'python',
      '-u', '-m', 'vit_jax.main',
      '--distributed', '--config=configs/vit_b16.py', f'--workdir={tmp_path / "run"}',
      '--config.total_steps=10', '--config.log_every=5',
      '--config.input.pp_eval=resize(224)|value_range(-1, 1)', '--config.batch_size=512']
  assert srun['env']['JAX_LOCAL_DEVICE_IDS'] is None  # jax gives task i GPU i itself
  text = (LAUNCH / 'slurm.sbatch').read_text()
  assert '#SBATCH --gpus-per-node=8' in text and '#SBATCH --ntasks-per-node=8' in text
  assert '#SBATCH --requeue' in text
  assert '#SBATCH --signal=TERM@300' in text  # a checkpoint before the time limit


def test_sbatch_script_one_process_per_node_sees_all_gpus(stubs, tmp_path):
  env, calls = stubs
  proc = _sh([LAUNCH / 'slurm.sbatch'],
             _slurm_env(env, tmp_path, SLURM_NTASKS_PER_NODE='1', SLURM_GPUS_ON_NODE='4'))
  assert proc.returncode == 0, proc.stderr
  assert calls('srun')[0]['env']['JAX_LOCAL_DEVICE_IDS'] == '0,1,2,3'


def test_sbatch_script_restarts_inside_the_allocation(stubs, tmp_path):
  env, calls = stubs
  done = tmp_path / 'done'
  env = _slurm_env(env, tmp_path, SLURM_NTASKS_PER_NODE='8', RESTARTS='3', BACKOFF='0',
                   DONE_CMD=f'test -f {done}',
                   STUB_RULES=json.dumps([['vit_jax.main', [[1, ''], [0, '']]]]))
  # The second srun "finishes the run".
  (pathlib.Path(env['PATH'].split(':')[0]) / 'srun').write_text(
      f'#!{sys.executable}\n{STUB}'.replace(
          'sys.exit(status)',
          f'if status == 0: open({str(done)!r}, "w").close()\nsys.exit(status)'))
  proc = _sh([LAUNCH / 'slurm.sbatch'], env)
  assert proc.returncode == 0, proc.stderr
  assert len(calls('srun')) == 2 and 'the run is done (attempt 2)' in proc.stderr


def test_sbatch_script_does_not_restart_after_the_time_limit_save(stubs, tmp_path):
  """Status 143: the tasks saved on --signal=TERM@300; the allocation is ending, so no
  attempt follows (one would be killed by the limit a few minutes later)."""
  env, calls = stubs
  env = _slurm_env(env, tmp_path, SLURM_NTASKS_PER_NODE='8', RESTARTS='3', BACKOFF='0',
                   DONE_CMD=f'test -f {tmp_path}/done',
                   STUB_RULES=json.dumps([['vit_jax.main', [[143, '']]]]))
  proc = _sh([LAUNCH / 'slurm.sbatch'], env)
  assert proc.returncode == 143, proc.stderr
  assert len(calls('srun')) == 1
  assert "not restarting: status 143 is --stop_on's" in proc.stderr


def test_sbatch_script_needs_config_and_workdir(stubs):
  env, calls = stubs
  proc = _sh([LAUNCH / 'slurm.sbatch'], env)
  assert proc.returncode != 0 and 'CONFIG' in proc.stderr and not calls('srun')


def test_slurm_submit_command_line(stubs, tmp_path):
  env, calls = stubs
  proc = _sh([LAUNCH / 'slurm_submit.sh', '--config=configs/vit_b16.py',
              f'--workdir={tmp_path}', '--nodes=4', '--partition=h100', '--account=vision',
              '--time=12:00:00', '--', '--config.batch_size=4096'], env)
  assert proc.returncode == 0, proc.stderr
  (sbatch,) = calls('sbatch')
  argv = sbatch['argv']
  assert _flag(argv, '--nodes') == '4' and _flag(argv, '--ntasks-per-node') == '8'
  assert _flag(argv, '--gpus-per-node') == '8' and _flag(argv, '--cpus-per-task') == '12'
  assert _flag(argv, '--partition') == 'h100' and _flag(argv, '--account') == 'vision'
  assert _flag(argv, '--time') == '12:00:00' and '--requeue' in argv
  assert argv[-2:] == [str(LAUNCH / 'slurm.sbatch'), '--config.batch_size=4096']
  assert sbatch['env']['CONFIG'] == 'configs/vit_b16.py'
  assert sbatch['env']['WORKDIR'] == str(tmp_path) and sbatch['env']['REPO_DIR'] == str(ROOT)
  proc = _sh([LAUNCH / 'slurm_submit.sh', '--config=c.py', f'--workdir={tmp_path}',
              '--per=node', '--gpus_per_node=8', '--no_requeue'], env)
  assert proc.returncode == 0, proc.stderr
  argv = calls('sbatch')[-1]['argv']
  assert _flag(argv, '--ntasks-per-node') == '1' and _flag(argv, '--cpus-per-task') == '96'
  assert '--no-requeue' in argv and '--requeue' not in argv
  # SBATCH_ARGS as a shell would split it (a quoted value with a space used to be cut in
  # two, and sbatch took its second half for the script).
  proc = _sh([LAUNCH / 'slurm_submit.sh', '--config=c.py', f'--workdir={tmp_path}'],
             dict(env, SBATCH_ARGS='--job-name="vit b16" --mail-type=END'))
  assert proc.returncode == 0, proc.stderr
  argv = calls('sbatch')[-1]['argv']
  assert _flag(argv, '--job-name') == 'vit b16' and '--mail-type=END' in argv
  assert argv[-1] == str(LAUNCH / 'slurm.sbatch')
  proc = _sh([LAUNCH / 'slurm_submit.sh', '--config=c.py', f'--workdir={tmp_path}'],
             dict(env, SBATCH_ARGS='--job-name="vit'))
  assert proc.returncode == 2 and 'SBATCH_ARGS: an unmatched quote' in proc.stderr


# ------------------------------------------------------------------- plain multi-node


def _recording_python(tmp_path, body=''):
  fake = tmp_path / 'python'
  # Written under another name, then renamed: a process killed at any moment leaves a
  # whole argv file or none.
  fake.write_text(f'#!{sys.executable}\nimport glob, json, os, sys, time\n'
                  f'd = {str(tmp_path)!r}\n'
                  'open(f"{d}/partial_{os.getpid()}", "w").write(json.dumps(sys.argv[1:]))\n'
                  'os.replace(f"{d}/partial_{os.getpid()}", f"{d}/argv_{os.getpid()}")\n' + body)
  fake.chmod(0o755)
  return fake


def test_multinode_starts_process_i_of_n(stubs, tmp_path):
  env, _ = stubs
  fake = _recording_python(tmp_path)
  proc = _sh([LAUNCH / 'multinode.sh', '--coordinator=node0:1234', '--num_processes=2',
              '--process_id=1', f'--python={fake}', '--config=configs/vit_b16.py',
              '--workdir=/shared/run', '--', TRICKY], env)
  assert proc.returncode == 0, proc.stderr
  (argv_file,) = tmp_path.glob('argv_*')
  assert json.loads(argv_file.read_text()) == [
      '-m', 'vit_jax.main', '--coordinator_address=node0:1234', '--num_processes=2',
      '--process_id=1', '--config=configs/vit_b16.py', '--workdir=/shared/run', TRICKY]
  bad = _sh([LAUNCH / 'multinode.sh', '--coordinator=node0:1234', '--num_processes=2',
             '--process_id=2'], env)
  assert bad.returncode == 2 and 'must be in 0..1' in bad.stderr


def test_multinode_over_ssh_stops_the_others_when_one_fails(stubs, tmp_path):
  env, _ = stubs
  ssh = tmp_path / 'ssh'
  ssh.write_text(f'#!/usr/bin/env bash\necho "$@" >> {tmp_path}/ssh_calls\nexec bash -c "$2"\n')
  ssh.chmod(0o755)
  # Process 1 fails as soon as both have started (so that both record their arguments);
  # process 0 would wait (as in a collective) for two minutes.
  fake = _recording_python(
      tmp_path, 'if "--process_id=1" in sys.argv:\n'
      '  deadline = time.time() + 20\n'
      '  while len(glob.glob(f"{d}/argv_*")) < 2 and time.time() < deadline:\n'
      '    time.sleep(0.01)\n'
      '  sys.exit(3)\n'
      'time.sleep(120)\n')
  start = time.monotonic()
  # (alice@: ssh's user, not part of the coordinator's address.)
  proc = _sh([LAUNCH / 'multinode.sh', '--hosts=alice@gpu-a,gpu-b', '--port=7777',
              f'--python={fake}', f'--log_dir={tmp_path}/logs', '--config=c.py',
              '--workdir=/w'], dict(env, SSH=str(ssh)), timeout=60)
  assert proc.returncode == 3, proc.stderr
  assert time.monotonic() - start < 30
  assert 'stopping the others' in proc.stderr
  calls = (tmp_path / 'ssh_calls').read_text().splitlines()
  # The remote processes are killed by their PID files (a local kill of ssh reaches none).
  kills = [c for c in calls if 'kill -KILL' in c]
  assert sorted(c.split()[0] for c in kills) == ['alice@gpu-a', 'gpu-b']
  calls = [c for c in calls if c not in kills]
  # Both start in the background: their ssh calls may be logged in either order.
  assert sorted(c.split()[0] for c in calls) == ['alice@gpu-a', 'gpu-b']
  for c in calls:
    i = ['alice@gpu-a', 'gpu-b'].index(c.split()[0])
    # `bash -c INNER; rc=$?; rm -f PID_FILE; exit $rc`: the PID file goes with the process
    host, remote = c.split(' ', 1)
    words = shlex.split(remote.split('; rc=$?; rm -f ')[0])
    assert words[:2] == ['bash', '-c'] and remote.endswith('; exit $rc'), remote
    inner = words[2]
    assert '--coordinator=gpu-a:7777' in inner and f'--process_id={i}' in inner
    assert '--num_processes=2' in inner and f'cd {ROOT}' in inner
  argvs = [json.loads(p.read_text()) for p in tmp_path.glob('argv_*')]
  assert sorted(a[4] for a in argvs) == ['--process_id=0', '--process_id=1']


def _hosts_that_save(tmp_path, save_seconds):
  """(ssh, python) stubs: the ssh logs its arguments to ssh_calls and runs the command in
  a session of its own (as a remote host would: only a forwarded signal reaches it),
  relaying its output through a pipe that closes when the client ends (as sshd closes
  the channel); the python writes ready_<process id>, and on SIGTERM takes save_seconds
  to write saved_<process id> (the checkpoint), after a line of output, then exits 143."""
  ssh = tmp_path / 'ssh'
  ssh.write_text('#!/usr/bin/env bash\n'
                 f'echo "$@" >> {tmp_path}/ssh_calls\n'
                 'setsid bash -c "$2" 2>&1 | cat\n'
                 'exit "${PIPESTATUS[0]}"\n')
  ssh.chmod(0o755)
  fake = _recording_python(
      tmp_path, 'import signal\n'
      'pid = sys.argv[5]\n'
      'def on_term(*_):\n'
      f'  time.sleep({save_seconds})  # the checkpoint being written\n'
      '  print("saved", flush=True)  # a broken pipe (a killed ssh client) ends it here\n'
      '  open(f"{d}/saved_{pid}", "w").write("")\n'
      '  sys.exit(143)\n'
      'signal.signal(signal.SIGTERM, on_term)\n'
      'open(f"{d}/ready_{pid}", "w").write("")\n'
      'time.sleep(60)\n')
  return ssh, fake


def test_multinode_forwards_sigterm_to_the_remote_processes_and_waits_for_their_save(
    stubs, tmp_path):
  """Killing the local ssh clients does not stop remote commands (they would train on
  beside the next attempt): the script signals each remote process by its PID file and
  waits while they save. The stub ssh runs the command on a process of its own, in a
  new session, so that only the forwarded signal can reach it."""
  env, _ = stubs
  ssh, fake = _hosts_that_save(tmp_path, save_seconds=1)
  # COLUMNS=80: the check that the PID is still a vit_jax.main process must read the
  # whole command line (ps truncated it to the terminal width, and nothing was signalled).
  proc = subprocess.Popen(
      ['bash', LAUNCH / 'multinode.sh', '--hosts=gpu-a,gpu-b', f'--python={fake}',
       '--config=c.py', '--workdir=/w'], cwd=ROOT, env=dict(env, SSH=str(ssh), COLUMNS='80'),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 60
  while len(list(tmp_path.glob('ready_*'))) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.terminate()
  start = time.monotonic()
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 143, err
  assert time.monotonic() - start >= 0.9  # it waited for the saves
  assert sorted(p.name for p in tmp_path.glob('saved_*')) == [
      'saved_--process_id=0', 'saved_--process_id=1'], err
  assert 'every process saves a checkpoint and stops' in err
  kills = [c for c in (tmp_path / 'ssh_calls').read_text().splitlines() if 'kill -TERM' in c]
  assert sorted(c.split()[0] for c in kills) == ['gpu-a', 'gpu-b']


def test_multinode_over_an_ssh_that_forwards_no_environment(stubs, tmp_path):
  """As real ssh does, the stub gives the remote command a bare environment: the device
  list still reaches every process; started from another directory, the remote side
  still runs this checkout; a second start appends to the logs instead of erasing the
  first attempt's."""
  env, _ = stubs
  ssh = tmp_path / 'ssh'
  ssh.write_text('#!/usr/bin/env bash\n'
                 'exec env -i PATH="$PATH" HOME="$HOME" bash -c "$2"\n')
  ssh.chmod(0o755)
  fake = _recording_python(
      tmp_path, 'open(f"{d}/devices_{sys.argv[5]}", "w").write('
      'os.environ.get("JAX_LOCAL_DEVICE_IDS", "unset"))\n'
      'print("attempt output", flush=True)\n')
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  args = [LAUNCH / 'multinode.sh', '--hosts=a,b', '--local_devices=0,1', f'--python={fake}',
          f'--log_dir={tmp_path}/logs', '--config=c.py', '--workdir=/w']
  for _ in range(2):
    proc = subprocess.run(['bash', *map(str, args)], cwd=elsewhere, env=dict(env, SSH=str(ssh)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
  for i in (0, 1):
    assert (tmp_path / f'devices_--process_id={i}').read_text() == '0,1'
    log = (tmp_path / 'logs' / f'process_{i}.log').read_text()
    assert log.count(f'=== launch/multinode.sh: process {i} of 2 on ') == 2, log
    assert log.count('attempt output') == 2


# ---------------------------------------------------------------------- until_done.sh


def _job(tmp_path, fail_times, status=143):
  """A job that fails `fail_times` times (as if preempted), then finishes the run."""
  job = tmp_path / 'job.sh'
  job.write_text(f'''#!/usr/bin/env bash
n=$(( $(cat {tmp_path}/count 2>/dev/null || echo 0) + 1 ))
echo "$n" > {tmp_path}/count
if (( n <= {fail_times} )); then exit {status}; fi
touch {tmp_path}/done
''')
  job.chmod(0o755)
  return job


def _count(tmp_path):
  return int((tmp_path / 'count').read_text()) if (tmp_path / 'count').exists() else 0


def _until_done(tmp_path, env, *args):
  return _sh([LAUNCH / 'until_done.sh', f'--done_cmd=test -f {tmp_path}/done', *args], env)


def test_until_done_restarts_a_preempted_job_until_it_finishes(stubs, tmp_path):
  env, calls = stubs
  proc = _until_done(tmp_path, env, '--backoff=5', '--max_backoff=12', '--max_attempts=10',
                     '--', _job(tmp_path, fail_times=4))
  assert proc.returncode == 0, proc.stderr
  assert _count(tmp_path) == 5 and 'the run is done (attempt 5)' in proc.stderr
  assert proc.stderr.count('ended with status 143 before the final step') == 4
  # Exponential backoff, capped (`sleep` is a recording stub).
  assert [c['argv'] for c in calls('sleep')] == [['5'], ['10'], ['12'], ['12']]


def test_until_done_refuses_an_unknown_option_and_a_command_that_cannot_run(stubs, tmp_path):
  """A misspelled option used to become the command, and its "command not found" (127)
  was restarted --max_attempts times, with the backoff (hours by default)."""
  env, calls = stubs
  proc = _until_done(tmp_path, env, '--max-attempts=2', '--', _job(tmp_path, fail_times=0))
  assert proc.returncode == 2 and 'unknown option --max-attempts=2' in proc.stderr
  assert _count(tmp_path) == 0
  for missing in (tmp_path / 'no_such_job.sh', tmp_path):  # not found; not executable
    proc = _until_done(tmp_path, env, '--backoff=5', '--', missing)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count('attempt 1 of 20') == 1 and 'attempt 2' not in proc.stderr
    assert 'not restarting: status 12' in proc.stderr and str(missing) in proc.stderr
  assert calls('sleep') == []


def test_until_done_stops_on_the_status_it_is_told(stubs, tmp_path):
  env, _ = stubs
  proc = _until_done(tmp_path, env, '--backoff=0', '--stop_on=143', '--',
                     _job(tmp_path, fail_times=2))
  assert proc.returncode == 143 and _count(tmp_path) == 1, proc.stderr
  proc = _until_done(tmp_path, env, '--backoff=0', '--stop_on=143', '--',
                     _job(tmp_path, fail_times=2, status=1))  # another status: restarted
  assert proc.returncode == 0 and _count(tmp_path) == 3, proc.stderr
  proc = _until_done(tmp_path, env, '--stop_on=TERM', '--', 'true')
  assert proc.returncode == 2 and '--stop_on=TERM is not an exit status' in proc.stderr


def test_until_done_gives_up_after_max_attempts(stubs, tmp_path):
  env, _ = stubs
  proc = _until_done(tmp_path, env, '--backoff=0', '--max_attempts=3', '--',
                     _job(tmp_path, fail_times=100))
  assert proc.returncode == 1 and _count(tmp_path) == 3
  assert 'giving up after 3 attempts' in proc.stderr


def test_until_done_decides_from_the_workdir_not_the_exit_status(stubs, tmp_path):
  env, _ = stubs
  # Exits 0 twice without finishing (e.g. a job step ended by the scheduler).
  proc = _until_done(tmp_path, env, '--backoff=0', '--', _job(tmp_path, 2, status=0))
  assert proc.returncode == 0 and _count(tmp_path) == 3
  # Already done: the job is not started again.
  proc = _until_done(tmp_path, env, '--', _job(tmp_path, 0))
  assert proc.returncode == 0 and _count(tmp_path) == 3
  assert 'already done' in proc.stderr


def test_until_done_reads_a_fresh_workdir_as_not_done(stubs, tmp_path):
  env, _ = stubs
  env = dict(env, PYTHON=sys.executable)
  proc = _sh([LAUNCH / 'until_done.sh', f'--workdir={tmp_path}/w', '--backoff=0',
              '--max_attempts=1', '--', 'mkdir', f'{tmp_path}/w'], env)
  assert proc.returncode == 2, proc.stderr  # status 0 and nothing saved: not restarted
  assert 'no complete checkpoint yet' in proc.stdout
  assert 'without a new checkpoint (newest step: none)' in proc.stderr
  # A job that never creates the workdir (another --workdir, a typo): not restarted for
  # hours as "not done".
  proc = _sh([LAUNCH / 'until_done.sh', f'--workdir={tmp_path}/typo', '--backoff=0',
              '--max_attempts=5', '--', 'true'], env)
  assert proc.returncode == 2, proc.stderr
  assert (f'attempt 1 ended with status 0 and --workdir={tmp_path}/typo does not exist'
          in proc.stderr)
  assert '(the workdir does not exist)' in proc.stdout


# ------------------------------------------------- run_status.py, and until_done.sh's Python

# meta as vit_jax.train.loop stores it; the final step is ceil(1.7 epochs x 3 steps) = 6.
META = {'seed': 0, 'steps_per_epoch': 3, 'config': {'total_steps': 0, 'num_epochs': 1.7}}


@pytest.fixture(scope='module')
def finished_workdir(tmp_path_factory):
  """A workdir as vit_jax.main leaves it at the end: Orbax checkpoints of steps 3 and 6
  (written by the project's own checkpointer), the final step being 6."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from vit_jax.checkpoints import train_state  # pylint: disable=import-outside-toplevel
  workdir = tmp_path_factory.mktemp('finished')
  ckpt = train_state.TrainCheckpointer(workdir / 'checkpoints', async_save=False)
  for step in (3, 6):
    ckpt.save(step, {'w': jnp.full((2,), float(step))}, META)
  ckpt.close()
  return workdir


def _copy(workdir, tmp_path):
  return pathlib.Path(shutil.copytree(workdir, tmp_path / 'w'))


def _bare_python(tmp_path, name='bare_python'):
  """Python with the standard library only (no site-packages: no absl, etils, orbax),
  like a system python3 next to the project's .venv; it leaves a mark when it runs."""
  fake = tmp_path / name
  fake.write_text(f'#!/bin/sh\ntouch {tmp_path}/{name}.ran\nexec {sys.executable} -I -S "$@"\n')
  fake.chmod(0o755)
  assert subprocess.run([fake, '-c', 'import absl'], capture_output=True).returncode == 1
  return fake


def _orbax_latest_step(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  manager = ocp.CheckpointManager(
      workdir / 'checkpoints', item_names=('state', 'meta'),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           cleanup_tmp_directories=False))
  return manager.latest_step()


def _status(python, workdir, *args):
  return subprocess.run([str(python), str(LAUNCH / 'run_status.py'), str(workdir), *args],
                        capture_output=True, text=True, timeout=60)


def test_run_status_reads_orbax_checkpoints_with_the_standard_library_only(
    finished_workdir, tmp_path):
  python = _bare_python(tmp_path)
  proc = _status(python, finished_workdir)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == f'{finished_workdir}: step 6 of 6 (newest complete checkpoint): done\n'
  proc = _status(python, finished_workdir, '--json')
  assert json.loads(proc.stdout) == {'step': 6, 'total_steps': 6, 'done': True,
                                     'damaged': {}, 'workdir_exists': True}
  proc = _status(python, finished_workdir, '--total_steps=10')  # a raised total_steps
  assert proc.returncode == 1 and 'step 6 of 10 (newest complete checkpoint)\n' in proc.stdout
  # Step 6 still being written (Orbax's temporary name), next to things that are no
  # checkpoint: the newest complete step is 3, for Orbax as for run_status.py.
  workdir = _copy(finished_workdir, tmp_path)
  (workdir / 'checkpoints' / '6').rename(workdir / 'checkpoints' / '6.orbax-checkpoint-tmp-17')
  (workdir / 'checkpoints' / '9').write_text('a file, not a step folder')
  (workdir / 'checkpoints' / 'step_12').mkdir()
  assert _orbax_latest_step(workdir) == 3
  proc = _status(python, workdir)
  assert proc.returncode == 1 and proc.stdout == f'{workdir}: step 3 of 6 (newest complete checkpoint)\n'


def test_run_status_reads_a_final_step_whose_evaluation_was_put_off_as_not_done(
    finished_workdir, tmp_path):
  """A stop during the final evaluation saves the final step with eval_pending: the run
  is not done (the resumed run evaluates it). It used to read as done, so until_done.sh
  started nothing and the run never had its final evaluation."""
  workdir = _copy(finished_workdir, tmp_path)
  meta_file = workdir / 'checkpoints' / '6' / 'meta' / 'metadata'
  meta_file.write_text(json.dumps(dict(json.loads(meta_file.read_text()), eval_pending=True)))
  metrics = workdir / 'metrics.jsonl'
  rows = [json.dumps(r) for r in ({'step': 3, 'eval_loss': 2.0, 'eval_top1': 0.1},
                                  {'step': 6, 'loss': 1.5}, {'step': 6, 'eval_loss': 1.0})]
  metrics.write_text(''.join(r + '\n' for r in rows[:2]))  # the stop: no evaluation at 6
  python = _bare_python(tmp_path)
  for args in ((), ('--total_steps=6',)):
    proc = _status(python, workdir, *args)
    assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
    assert 'step 6 of 6 (newest complete checkpoint): its evaluation was put off' in (
        proc.stdout), proc.stdout
  metrics.write_text(''.join(r + '\n' for r in rows))  # made up by a resumed run since
  assert _status(python, workdir).returncode == 0


def test_run_status_reads_past_a_damaged_step_as_the_loop_resumes(finished_workdir, tmp_path):
  """A damaged newest step (its meta not JSON) used to stop until_done.sh with status 2,
  though the training loop of a single process with a local workdir resumes from the
  step before it: it now reads as that step. After a multi-process run, or a meta that
  reads but does not give the final step, it is an error as before."""
  workdir = _copy(finished_workdir, tmp_path)
  meta = workdir / 'checkpoints' / '6' / 'meta' / 'metadata'
  meta.write_text('{"trunc')
  proc = _status(sys.executable, workdir)
  assert proc.returncode == 1, proc.stderr
  assert proc.stdout == f'{workdir}: step 3 of 6 (newest complete checkpoint)\n'
  assert f'step 6 is damaged, the run resumes before it ({meta}: JSONDecodeError' in proc.stderr
  proc = _status(sys.executable, workdir, '--total_steps=6')  # no meta read
  assert proc.returncode == 0 and 'step 6 of 6' in proc.stdout, proc.stderr
  old_meta = workdir / 'checkpoints' / '3' / 'meta' / 'metadata'
  old_meta.write_text(json.dumps(dict(META, process_count=2)))
  proc = _status(sys.executable, workdir)
  assert proc.returncode == 2 and 'the newest checkpoint cannot be resumed' in proc.stderr
  meta.write_text('{"config": {}}')  # reads, but no total_steps, no num_epochs
  proc = _status(sys.executable, workdir)
  assert proc.returncode == 2 and not proc.stdout
  assert f'cannot find the final step in {meta}' in proc.stderr
  assert "KeyError: 'num_epochs'" in proc.stderr and '--total_steps=N' in proc.stderr
  proc = _status(sys.executable, workdir, '--total_steps=6')  # the fix it names
  assert proc.returncode == 0, proc.stderr


def test_run_status_is_executable_and_prints_its_usage(tmp_path):
  script = LAUNCH / 'run_status.py'
  assert os.access(script, os.X_OK)
  assert script.read_text().startswith('#!/usr/bin/env python3\n')
  proc = subprocess.run([script, '--help'], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith('usage: launch/run_status.py ')
  for text in ('workdir', '--total_steps', '--json', '--check', 'exits 0 when'):
    assert text in proc.stdout, text
  # Without arguments: the usage and status 2 (an error), as until_done.sh expects.
  proc = subprocess.run([script], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and 'usage: launch/run_status.py' in proc.stderr


def test_until_done_does_not_restart_a_finished_run_under_a_bare_python(
    stubs, finished_workdir, tmp_path):
  env, calls = stubs
  # No PYTHON: the active virtualenv's python is the one used (here: a bare one).
  venv = tmp_path / 'venv'
  (venv / 'bin').mkdir(parents=True)
  python = _bare_python(venv / 'bin', 'python')
  proc = _sh([LAUNCH / 'until_done.sh', f'--workdir={finished_workdir}', '--backoff=5',
              '--', _job(tmp_path, 0)], dict(env, VIRTUAL_ENV=str(venv)))
  assert proc.returncode == 0, proc.stderr
  assert 'the run is already done; nothing to start' in proc.stderr
  assert 'step 6 of 6' in proc.stdout
  assert _count(tmp_path) == 0 and not calls('sleep')
  assert (python.parent / 'python.ran').exists()


def test_until_done_resumes_an_unfinished_run_under_a_bare_python(
    stubs, finished_workdir, tmp_path):
  env, calls = stubs
  workdir = _copy(finished_workdir, tmp_path)
  final = workdir / 'checkpoints' / '6'
  shutil.move(final, tmp_path / 'final')
  job = tmp_path / 'job.sh'  # the "resumed run" writes its final checkpoint
  job.write_text(f'#!/usr/bin/env bash\necho 1 >> {tmp_path}/count\nmv {tmp_path}/final {final}\n')
  job.chmod(0o755)
  proc = _sh([LAUNCH / 'until_done.sh', f'--workdir={workdir}', '--backoff=5', '--', job],
             dict(env, PYTHON=str(_bare_python(tmp_path))))
  assert proc.returncode == 0, proc.stderr
  assert 'step 3 of 6 (newest complete checkpoint)\n' in proc.stdout
  assert 'the run is done (attempt 1)' in proc.stderr
  assert _count(tmp_path) == 1 and not calls('sleep')


@pytest.mark.parametrize('python', ['/bin/false', 'missing', 'bare_gs'])
def test_until_done_stops_at_once_when_python_cannot_run_the_status_check(
    stubs, finished_workdir, tmp_path, python):
  env, calls = stubs
  workdir = str(finished_workdir)
  if python == 'missing':
    python = str(tmp_path / 'no_such_python')
  elif python == 'bare_gs':  # gs:// needs etils, which a bare Python lacks
    python, workdir = str(_bare_python(tmp_path)), 'gs://my-bucket/b16'
  proc = _sh([LAUNCH / 'until_done.sh', f'--workdir={workdir}', '--backoff=5',
              '--max_attempts=20', '--', _job(tmp_path, 0)], dict(env, PYTHON=python))
  assert proc.returncode == 2, proc.stderr
  assert f'the workdir status check cannot run under PYTHON={python} (' in proc.stderr
  assert f'`{python} launch/run_status.py --check {workdir}` exited with status' in proc.stderr
  assert 'Nothing was started. Set PYTHON to ' in proc.stderr
  assert 'PYTHON=/path/to/venv/bin/python' in proc.stderr
  if python.endswith('no_such_python'):
    assert '(not found)' in proc.stderr and 'status 127' in proc.stderr
  if workdir.startswith('gs://'):
    assert 'needs etils.epath' in proc.stderr
    assert 'Set PYTHON to the Python vit_jax is installed in' in proc.stderr
  # Nothing started, no wait, no "not done" reading.
  assert _count(tmp_path) == 0 and not calls('sleep')
  assert 'attempt' not in proc.stderr and 'restarting' not in proc.stderr


def test_until_done_stops_when_the_status_check_fails_after_an_attempt(stubs, tmp_path):
  env, calls = stubs
  workdir = tmp_path / 'w'
  job = tmp_path / 'job.sh'  # leaves a checkpoint whose meta cannot be read
  job.write_text(f'''#!/usr/bin/env bash
echo 1 >> {tmp_path}/count
mkdir -p {workdir}/checkpoints/4/meta && echo 'not json' > {workdir}/checkpoints/4/meta/metadata
''')
  job.chmod(0o755)
  proc = _sh([LAUNCH / 'until_done.sh', f'--workdir={workdir}', '--backoff=5',
              '--max_attempts=20', '--', job], dict(env, PYTHON=sys.executable))
  assert proc.returncode == 2, proc.stderr
  assert 'no complete checkpoint yet' in proc.stdout  # before the attempt: not done
  assert f'the newest checkpoint cannot be resumed ({workdir}/checkpoints/4/meta/metadata' in proc.stderr
  assert 'cannot tell whether the run is done' in proc.stderr
  assert 'exited with status 2' in proc.stderr
  assert 'not restarting after attempt 1 (status 0)' in proc.stderr
  assert _count(tmp_path) == 1 and not calls('sleep')
  assert 'restarting in' not in proc.stderr and 'before the final step' not in proc.stderr


def test_experiment_scripts_find_the_readme_venv(tmp_path):
  """experiments/*.sh run the checkout's .venv (the README's set-up) when no PYTHON or
  virtualenv is given: `python` on PATH lacked vit_jax's dependencies."""
  import shutil  # pylint: disable=import-outside-toplevel
  (tmp_path / 'experiments').mkdir()
  shutil.copy(ROOT / 'experiments' / 'python.sh', tmp_path / 'experiments')
  venv_python = tmp_path / '.venv' / 'bin' / 'python'
  venv_python.parent.mkdir(parents=True)
  venv_python.write_text('#!/bin/sh\n')
  venv_python.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHON', 'VIRTUAL_ENV')}

  def found(**extra):
    return subprocess.run(['bash', '-c', f'source {tmp_path}/experiments/python.sh; echo $py'],
                          env=dict(env, **extra), capture_output=True, text=True,
                          timeout=30).stdout.strip()

  assert found() == str(venv_python)
  assert found(PYTHON='/opt/py') == '/opt/py'
  for script in ('benchmarks_cpu.sh', 'benchmarks_families.sh', 'bf16_vs_fp32_mnist.sh',
                 'cifar10_finetune.sh'):
    assert 'experiments/python.sh' in (ROOT / 'experiments' / script).read_text(), script


def test_multinode_takes_a_second_signal_soon_after_the_first_as_the_same_notice(
    stubs, tmp_path):
  """A shutdown signals every process, and until_done.sh passes its own SIGTERM on: the
  second one, milliseconds later, used to kill every remote process before it saved."""
  env, _ = stubs
  ssh, fake = _hosts_that_save(tmp_path, save_seconds=1)
  proc = subprocess.Popen(
      ['bash', LAUNCH / 'multinode.sh', '--hosts=gpu-a,gpu-b', f'--python={fake}',
       '--config=c.py', '--workdir=/w'], cwd=ROOT, env=dict(env, SSH=str(ssh)),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 60
  while len(list(tmp_path.glob('ready_*'))) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.terminate()
  time.sleep(0.2)
  proc.terminate()
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 143, err
  assert 'the same notice' in err and 'stopping every process now' not in err
  assert sorted(p.name for p in tmp_path.glob('saved_*')) == [
      'saved_--process_id=0', 'saved_--process_id=1'], err


def test_multinode_waits_for_the_remote_saves_when_the_whole_group_is_signalled(
    stubs, tmp_path):
  """SIGTERM to the launcher's whole process group (a scheduler, a terminal's Ctrl-C on a
  shell that forwards it) also ended the sleep of its polling loop and the ssh clients:
  the script exited at once while the remote processes were still saving, and the next
  attempt of until_done.sh met them. It now waits until no remote process runs. The
  stub ssh runs the command in a session of its own, as a remote host would. The ssh
  clients used to be in the launcher's group: the signal ended them, and the remote
  processes died of a broken pipe at their next line of output, before saving."""
  env, _ = stubs
  ssh, fake = _hosts_that_save(tmp_path, save_seconds=3)
  proc = subprocess.Popen(
      ['bash', LAUNCH / 'multinode.sh', '--hosts=gpu-a,gpu-b', f'--python={fake}',
       '--config=c.py', '--workdir=/w'], cwd=ROOT, env=dict(env, SSH=str(ssh)),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
  deadline = time.monotonic() + 60
  while len(list(tmp_path.glob('ready_*'))) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
  os.killpg(proc.pid, 15)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 143, err
  # When the launcher returns, both saves are complete and no PID file is left behind.
  assert sorted(p.name for p in tmp_path.glob('saved_*')) == [
      'saved_--process_id=0', 'saved_--process_id=1'], err
  assert not list(pathlib.Path('/tmp').glob(f'vit_jax_multinode.*.{proc.pid}.*.pid'))


def test_multinode_remote_env_keeps_quoted_values_together(stubs, tmp_path):
  env, _ = stubs
  fake = _recording_python(
      tmp_path, 'open(f"{d}/env", "w").write(json.dumps('
      '[os.environ.get("XLA_FLAGS"), os.environ.get("NCCL_DEBUG")]))\n')
  args = [LAUNCH / 'multinode.sh', '--coordinator=n0:1', '--num_processes=1',
          '--process_id=0', f'--python={fake}', '--config=c.py', '--workdir=/w']
  proc = _sh(args, dict(env, REMOTE_ENV='NCCL_DEBUG=WARN XLA_FLAGS="--xla_a=1 --xla_b=\'x y\'"'))
  assert proc.returncode == 0, proc.stderr
  assert json.loads((tmp_path / 'env').read_text()) == ["--xla_a=1 --xla_b='x y'", 'WARN']
  proc = _sh(args, dict(env, REMOTE_ENV='NCCL_DEBUG=WARN --oops'))
  assert proc.returncode == 2 and "REMOTE_ENV: '--oops' is not NAME=value" in proc.stderr
  proc = _sh(args, dict(env, REMOTE_ENV='  '))  # blank: nothing set
  assert proc.returncode == 0, proc.stderr
  # An unmatched quote stopped xargs, and the words after it were dropped without a word.
  proc = _sh(args, dict(env, REMOTE_ENV="NOTE=don't A=1"))
  assert proc.returncode == 2 and 'REMOTE_ENV: an unmatched quote in: NOTE=don' in proc.stderr
  sbatch = _sh([LAUNCH / 'slurm.sbatch'], _slurm_env(env, tmp_path, EXTRA_ARGS="--config.a=don't"))
  assert sbatch.returncode == 2 and 'EXTRA_ARGS: an unmatched quote' in sbatch.stderr
  tpu = _sh([LAUNCH / 'tpu_vm.sh', 'run', *TPU], dict(env, EXTRA_ARGS='  ', DRY_RUN='1'))
  assert tpu.returncode == 0 and "''" not in tpu.stdout, tpu.stdout  # no empty argument


def test_until_done_does_not_restart_an_error_a_restart_would_meet_again(stubs, tmp_path):
  """vit_jax.main exits 3 for a bad config, dataset, mesh or checkpoint: it used to be
  restarted --max_attempts times (hours of backoff on a billed TPU)."""
  env, _ = stubs
  proc = _until_done(tmp_path, env, '--backoff=0', '--', _job(tmp_path, 5, status=3))
  assert proc.returncode == 3 and _count(tmp_path) == 1, proc.stderr
  assert 'not restarting: status 3' in proc.stderr
  # With --workdir: vit_jax.main refuses a config before it creates the workdir.
  (tmp_path / 'count').unlink()
  proc = _sh([LAUNCH / 'until_done.sh', f'--workdir={tmp_path}/fresh', '--backoff=0', '--',
              _job(tmp_path, 5, status=3)], dict(env, PYTHON=sys.executable))
  assert proc.returncode == 3 and _count(tmp_path) == 1, proc.stderr
  assert 'not restarting: status 3' in proc.stderr


# Runs argv[1:] with SIGINT at its default disposition (exec keeps it).
_WITH_SIGINT = ('import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); '
                'os.execvp(sys.argv[1], sys.argv[1:])')


def test_until_done_passes_a_stop_signal_on_and_starts_no_further_attempt(stubs, tmp_path):
  """Ctrl-C in a terminal signals the whole foreground process group. The job, like
  vit_jax.main, saves on its first signal and stops at once on a second one: it must get
  one (until_done.sh's SIGTERM), not the terminal's SIGINT as well."""
  env, _ = stubs
  job = tmp_path / 'job.sh'
  job.write_text(f'''#!/usr/bin/env bash
stopping=0
on_signal() {{
  if ((stopping)); then echo 'second signal: not saved' >> {tmp_path}/saved; exit 1; fi
  stopping=1
}}
trap on_signal INT TERM
echo started >> {tmp_path}/starts
while ((!stopping)); do /bin/sleep 0.1; done
/bin/sleep 1
((stopping == 1)) && echo saved >> {tmp_path}/saved
exit 143
''')
  job.chmod(0o755)
  for signal_number, status in ((2, 130), (15, 143)):
    for f in ('starts', 'saved'):
      (tmp_path / f).unlink(missing_ok=True)
    # Started with SIGINT at its default: a shell cannot trap a signal that was ignored
    # when it started, as it is under `nohup ... &` (how a CI may run this suite).
    proc = subprocess.Popen([sys.executable, '-c', _WITH_SIGINT, 'bash',
                             LAUNCH / 'until_done.sh', '--done_cmd=false', '--backoff=0', '--',
                             job], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / 'starts').exists() and time.monotonic() < deadline:
      time.sleep(0.05)
    time.sleep(0.2)
    os.killpg(proc.pid, signal_number)  # as a terminal does: the whole foreground group
    try:
      _, err = proc.communicate(timeout=120)
    finally:
      if proc.poll() is None:
        os.killpg(proc.pid, 9)
    assert proc.returncode == status, err
    assert (tmp_path / 'saved').read_text() == 'saved\n', err  # told once, waited for
    assert (tmp_path / 'starts').read_text() == 'started\n'  # and not started again
    assert 'no further attempt' in err


def test_until_done_passes_a_stop_on_to_a_job_stopped_by_the_terminal(stubs, tmp_path):
  """The job runs in a background process group: reading the terminal (ssh or gcloud
  asking for a passphrase) stops it (SIGTTIN), and the forwarded SIGTERM stayed pending
  until someone continued it by hand, while until_done.sh waited forever."""
  env, _ = stubs
  job = tmp_path / 'job.sh'
  job.write_text(f'''#!/usr/bin/env bash
trap 'echo saved > {tmp_path}/saved; exit 143' TERM
touch {tmp_path}/ready
kill -STOP $$   # as the terminal stops a background read
/bin/sleep 60 & wait
''')
  job.chmod(0o755)
  proc = subprocess.Popen(['bash', LAUNCH / 'until_done.sh', '--done_cmd=false', '--', job],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)
  deadline = time.monotonic() + 30
  while not (tmp_path / 'ready').exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  time.sleep(0.3)
  proc.terminate()
  try:
    _, err = proc.communicate(timeout=20)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, 9)
  assert proc.returncode == 143, err
  assert (tmp_path / 'saved').read_text() == 'saved\n'


def test_until_done_stops_during_the_backoff_at_once(stubs, tmp_path):
  env, _ = stubs
  env = dict(env, PATH=env['PATH'].split(':', 1)[1])  # the real sleep
  proc = subprocess.Popen(['bash', LAUNCH / 'until_done.sh', '--done_cmd=false',
                           '--backoff=600', '--', 'false'], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  time.sleep(3)  # the attempt (`false`) is over at once; the 600 s backoff has begun
  start = time.monotonic()
  proc.terminate()
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 143, err
  assert 'restarting in 600 s' in err and 'stopped by TERM after attempt 1' in err
  assert time.monotonic() - start < 10  # not the rest of the backoff


def test_until_done_does_not_restart_a_finished_job_that_saves_nothing_new(
    stubs, finished_workdir, tmp_path):
  """--total_steps=10 given here, the job's run ends at 6: each attempt resumed, found its
  run finished and exited 0, and was restarted --max_attempts times (20, with hours of
  backoff), to end with 'start the same command again to continue'."""
  env, calls = stubs
  env = dict(env, PYTHON=sys.executable)
  workdir = _copy(finished_workdir, tmp_path)
  proc = _sh([LAUNCH / 'until_done.sh', f'--workdir={workdir}', '--total_steps=10',
              '--backoff=5', '--max_attempts=4', '--', 'true'], env)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.count('attempt 1 of 4') == 1 and 'attempt 2' not in proc.stderr
  assert ('attempt 1 ended with status 0 (as a job whose run is finished) without a new '
          'checkpoint (newest step: 6)') in proc.stderr
  assert f'--workdir={workdir} and --total_steps=10 must be the job' in proc.stderr
  assert calls('sleep') == []
  # A job that saves a new step and exits 0 before the end is restarted, as before.
  job = tmp_path / 'saves.sh'
  job.write_text(f'#!/usr/bin/env bash\nn=$(ls {workdir}/checkpoints | sort -n | tail -1)\n'
                 f'cp -r {workdir}/checkpoints/$n {workdir}/checkpoints/$((n + 1))\n')
  job.chmod(0o755)
  proc = _sh([LAUNCH / 'until_done.sh', f'--workdir={workdir}', '--total_steps=8',
              '--backoff=0', '--max_attempts=4', '--', job], env)
  assert proc.returncode == 0, proc.stderr
  assert 'the run is done (attempt 2)' in proc.stderr
  proc = _sh([LAUNCH / 'until_done.sh', f'--workdir={workdir}', '--max_attempts=0', '--',
              'true'], env)
  assert proc.returncode == 2 and '--max_attempts=0: give 1 or more' in proc.stderr


def test_slurm_submit_refuses_dashed_and_split_options_before_submitting(stubs, tmp_path):
  """--dry-run (not --dry_run) went to vit_jax.main, so the 'dry run' submitted the job,
  which failed in the queue on an unknown flag; --nodes 2 sent '2' to vit_jax.main."""
  env, calls = stubs
  base = [LAUNCH / 'slurm_submit.sh', '--config=c.py', f'--workdir={tmp_path}']
  proc = _sh([*base, '--dry-run'], env)
  assert proc.returncode == 2 and calls('sbatch') == [], proc.stderr
  assert "unknown option --dry-run: this script's options and vit_jax.main's flags are " \
         "spelled with '_' (--dry_run)" in proc.stderr
  proc = _sh([*base, '--dry_run', '--gpus-per-node=4'], env)
  assert proc.returncode == 2 and '(--gpus_per_node)' in proc.stderr
  proc = _sh([*base, '--dry_run', '--nodes', '2'], env)
  assert proc.returncode == 2 and 'write --nodes=VALUE (one word)' in proc.stderr
  # A dash in a value is no dashed option.
  proc = _sh([*base, "--config.input.pp_eval=value_range(-1, 1)"], env)
  assert proc.returncode == 0, proc.stderr
  assert calls('sbatch')[-1]['argv'][-1] == '--config.input.pp_eval=value_range(-1, 1)'
