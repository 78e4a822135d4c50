r"""Entry point: `python -m vit_jax.main --config=configs/vit_b16.py --workdir=DIR`.

Any config field can be overridden on the command line, e.g.
`--config.batch_size=512 --config.model.dropout_rate=0.1`.

Prints the model summary (parameters, FLOPs per image, output shape), writes the
resolved config into the workdir, then trains and evaluates; a run started again with
the same workdir resumes from its newest complete checkpoint. Multi-host: pass
--coordinator_address, --num_processes and --process_id (or set them in the
environment that `jax.distributed.initialize()` reads, as on Cloud TPU and SLURM).

SIGTERM (a preemption notice, `kill`, the end of a SLURM time limit) saves a checkpoint
after the current step and exits with status 143; in a single-process run another
SIGTERM more than 10 s after the first stops at once (one sooner is the same notice).
"""

import ast
import contextlib
import json
import logging as std_logging
import os
import re
import signal
import sys
import time
import traceback

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from vit_jax import cli_flags
from vit_jax import host_memory
from vit_jax import models
from vit_jax import tensorflow_startup

EXIT_PREEMPTED = 143  # 128 + SIGTERM, as a shell reports a process the signal stopped
# A bad flag, config, dataset, mesh or checkpoint: an error that a restart would meet
# again, so launch/until_done.sh does not restart the job (status 1, a crash, it does).
EXIT_USER_ERROR = 3
# The user errors that a later attempt may not meet: another run holding the workdir
# (an attempt still saving), a save that failed (a full disk, a network file system).
_TRANSIENT_USER_ERRORS = ('WorkdirBusyError', 'CheckpointSaveError')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (local or gs://).')
_SUMMARY_ONLY = flags.DEFINE_bool('summary_only', False,
                                  'Print the model summary and exit without training.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() (multi-host runs).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (implies --distributed).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (0-based).')
_INIT_TIMEOUT = flags.DEFINE_integer(
    'initialization_timeout', 300, 'Seconds a multi-process run waits for all its '
    'processes to connect before it stops.')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout', 100, 'Seconds after which a multi-process run stops when one of '
    'its processes stops answering (killed, its host lost); the others wait in their '
    'collectives until then.')


def model_summary(model_config) -> dict:
  """Parameter count, FLOPs per image and output shape of the configured model."""
  module = models.create(model_config)
  size = model_config.image_size
  variables = models.abstract_variables(module, size)
  images = jax.ShapeDtypeStruct((1, size, size, module.in_channels), jnp.float32)
  out = jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, images)
  start = time.perf_counter()
  flops = models.forward_flops(module, size)
  return {
      'model': model_config.name,
      'image_size': size,
      'parameters': models.param_count(variables['params']),
      'forward_gflops_per_image': flops / 1e9,
      'analytic_transformer_gflops_per_image': (
          models.analytic_flops(module, size) / 1e9
          if isinstance(module, models.VisionTransformer) else None),
      'output_shape_per_image': list(out.shape[1:]),
      'output_dtype': str(out.dtype),
      'flop_count_seconds': time.perf_counter() - start,
      'backend': jax.default_backend(),
  }


def format_summary(s: dict) -> str:
  rows = [
      ('model', s['model']),
      ('image size', f"{s['image_size']} x {s['image_size']}"),
      ('parameters', f"{s['parameters']:,}"),
      ('forward GFLOPs / image (XLA)', f"{s['forward_gflops_per_image']:.2f}"),
      ('  of which transformer (analytic)',
       'n/a' if s['analytic_transformer_gflops_per_image'] is None
       else f"{s['analytic_transformer_gflops_per_image']:.2f}"),
      ('output shape / image', f"{tuple(s['output_shape_per_image'])} {s['output_dtype']}"),
      ('FLOP count time', f"{s['flop_count_seconds']:.1f} s on {s['backend']}"),
  ]
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of Orbax and tfds (every save, every epoch); keeps warnings."""

  def filter(self, record):
    noisy = '/orbax/' in record.pathname or '/tensorflow_datasets/' in record.pathname
    return record.levelno >= std_logging.WARNING or not noisy


def _join_processes() -> None:
  """jax.distributed.initialize, saying what it waits for: it blocks until every process
  has connected, and after --initialization_timeout ends the process from C++."""
  import threading  # pylint: disable=g-import-not-at-top
  timeout = _INIT_TIMEOUT.value
  where = _COORDINATOR.value or 'the coordinator the environment gives'
  count = _NUM_PROCESSES.value or 'all'
  logging.info('Joining %s processes at %s (as process %s); waiting up to %d s '
               '(--initialization_timeout) for every one to connect.', count, where,
               'from the environment' if _PROCESS_ID.value is None else _PROCESS_ID.value,
               timeout)
  joined = threading.Event()
  every = max(min(30, timeout // 2), 1)

  def remind():
    waited = 0
    while not joined.wait(every):
      waited += every
      logging.warning(
          'Still waiting after %d s for %s processes to connect to %s (the run stops at %d '
          's): is every process started, with the same --coordinator_address and '
          '--num_processes, and is the port reachable from every host?', waited, count,
          where, timeout)

  threading.Thread(target=remind, daemon=True).start()
  try:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value,
                               initialization_timeout=timeout,
                               heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
  finally:
    joined.set()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  tensorflow_startup.leave_keras_out()  # before the input pipeline imports TensorFlow
  # Before anything starts jax's backend (see vit_jax/host_memory.py).
  host_memory.configure(config.get('keep_host_memory'))
  from vit_jax.train import defaults  # pylint: disable=g-import-not-at-top
  if not (_DISTRIBUTED.value or _COORDINATOR.value) and (
      (_NUM_PROCESSES.value or 1) > 1 or _PROCESS_ID.value is not None):
    # (each process trained alone, on the whole data, without a word)
    raise defaults.ConfigError(
        f'--num_processes={_NUM_PROCESSES.value} --process_id={_PROCESS_ID.value} without '
        '--coordinator_address: a multi-process run needs --coordinator_address=HOST:PORT '
        "(process 0's host), or --distributed where the cluster gives it (Cloud TPU, SLURM)")
  if _DISTRIBUTED.value or _COORDINATOR.value:
    _join_processes()
  is_main = jax.process_index() == 0
  from vit_jax.train import loop  # pylint: disable=g-import-not-at-top
  workdir = loop.workdir_path(_WORKDIR.value)
  if _SUMMARY_ONLY.value:  # (validate() warns for a training run)
    defaults.warn_if_name_differs(config.model)
  else:
    # Everything that can be checked without data or compilation fails here, at once.
    problem = None
    try:
      defaults.validate(config, num_devices=jax.device_count(),
                        process_count=jax.process_count(),
                        resuming=loop.has_checkpoint(workdir))
      loop.check_workdir(workdir)
    except Exception as e:  # pylint: disable=broad-except
      problem = e
    loop.raise_on_every_process(
        problem, defaults.ConfigError, 'found the config or workdir unusable (their logs say '
        'why, e.g. a path that exists on this host only)')
  with contextlib.ExitStack() as lock:
    if not _SUMMARY_ONLY.value:
      # Before the model summary compiles anything: a second run in a busy workdir is
      # refused at once, not after the FLOP count (seconds to minutes on a CPU).
      _lock_workdir(lock, workdir, is_main)
    return _summarise_and_train(config, workdir, is_main, defaults)


def _lock_workdir(stack: contextlib.ExitStack, workdir, is_main: bool) -> None:
  """Process 0 takes the workdir's lock (onto `stack`); with several processes every one
  learns whether it got it, and all raise WorkdirBusyError if not. (Process 0 alone
  raised: the others were ended by the distributed service's fatal error, a C++ stack
  trace that did not name the lock.)"""
  from vit_jax.train import workdir_lock  # pylint: disable=g-import-not-at-top
  busy = None
  if is_main:
    try:
      stack.enter_context(workdir_lock.hold(workdir))
    except workdir_lock.WorkdirBusyError as e:
      busy = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    held_elsewhere = int(multihost_utils.broadcast_one_to_all(jnp.int32(busy is not None)))
    if held_elsewhere and busy is None:
      busy = workdir_lock.WorkdirBusyError(
          f'--workdir={workdir} is in use by another run: process 0 found its lock held '
          '(its log names that run)')
  if busy is not None:
    raise busy


def _summarise_and_train(config, workdir, is_main, defaults):
  """main() once the config and workdir are checked (and the workdir is locked)."""
  from vit_jax.train import loop  # pylint: disable=g-import-not-at-top
  loaded = {}  # (popped into the call below: the loop frees the weights once used)
  if not _SUMMARY_ONLY.value and config.init_from and not loop.has_checkpoint(workdir):
    # Before the summary's FLOP count compiles the model (seconds to minutes): weights
    # that cannot start this model (another architecture, a damaged file) fail at once.
    problem = None
    try:
      loaded['weights'] = loop.load_pretrained(config)
    except Exception as e:  # pylint: disable=broad-except
      problem = e
    loop.raise_on_every_process(problem, defaults.ConfigError,
                                'cannot use config.init_from (their logs say why)')
  try:
    summary = model_summary(config.model)
  except ValueError as e:  # --summary_only skipped validate(), which names the same error
    raise defaults.ConfigError(f'config.model: {e}') from e
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    if _SUMMARY_ONLY.value:  # a training run writes them once its checkpoint check passed
      (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
      (workdir / 'model_summary.json').write_text(json.dumps(summary, indent=2))
    print(format_summary(summary), flush=True)
  if _SUMMARY_ONLY.value:
    return
  from vit_jax.train import preemption  # pylint: disable=g-import-not-at-top
  try:
    final = loop.train_and_evaluate(
        config, workdir, forward_flops_per_image=summary['forward_gflops_per_image'] * 1e9,
        summary=summary, validate=False, lock=False,  # validated and locked in main()
        pretrained_weights=loaded.pop('weights', None))
  except preemption.Preempted as e:
    logging.warning('%s', e)
    if is_main:
      print(f'{"interrupted" if e.signal_number == signal.SIGINT else "preempted"}: {e}',
            flush=True)
    return 128 + e.signal_number  # 143 after SIGTERM (EXIT_PREEMPTED), 130 after Ctrl-C
  if is_main:
    # Counts stay counts (a finished run started again reads them back from JSON as floats).
    print('final: ' + ', '.join(
        f'{k} {int(v)}' if k in ('step', 'eval_examples') else
        f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}' for k, v in final.items()),
          flush=True)
    print(f'metrics: {workdir / "metrics.jsonl"}, TensorBoard: {workdir / "tensorboard"}, '
          f'checkpoints: {workdir / "checkpoints"}', flush=True)


# The exception types whose message is the whole story for the user, by module: only the
# modules already imported are looked at (an error raised there imported them), so that
# naming them never imports anything (TensorFlow) while an exception is on its way out.
_USER_ERRORS = {
    'vit_jax.sharding': ('MeshError',),
    'vit_jax.checkpoints.tree': ('CheckpointMismatchError',),
    'vit_jax.checkpoints.train_state': ('CheckpointSaveError',),
    'vit_jax.data.sources': ('DataError',),
    'vit_jax.train.defaults': ('ConfigError',),
    'vit_jax.train.loop': ('ResumeError', 'NonFiniteError'),
    'vit_jax.train.optimizer': ('FreezeError', 'ScheduleError'),
    'vit_jax.train.workdir_lock': ('WorkdirBusyError',),
}


def _user_errors() -> tuple[type[BaseException], ...]:
  return tuple(getattr(sys.modules[module], name) for module, names in _USER_ERRORS.items()
               if module in sys.modules for name in names) + (app.UsageError,)


def _main_then_exit(argv):
  """main(), then, after a run that finished (status 0) or saved and stopped on SIGTERM
  (143), an immediate exit with that status.

  By then every checkpoint, metric and event file is written and closed. Skipping the
  interpreter's teardown avoids a rare abort (SIGABRT) seen there when TensorFlow's and
  XLA's C++ threads are destroyed under load, which would report a finished run as
  failed. A user error (`_user_errors`) prints its message and exits with status 3
  (EXIT_USER_ERROR; 1 for the transient ones: a busy workdir, a failed save); any
  other error prints its traceback and exits with status 1, at once: the interpreter's
  normal exit would wait for Orbax's worker threads, which can wait forever after a failed
  save, and a restart loop (until_done.sh) would never see the run end.
  """
  failed = True
  try:
    status = main(argv) or 0
    failed = False
  except _user_errors() as e:
    # A config, dataset, checkpoint or workdir that cannot work: the message names the
    # value and the fix, and a traceback through absl and the loop adds nothing to it.
    sys.stderr.write(f'\nerror ({type(e).__name__}): {e}\n')
    status = 1 if type(e).__name__ in _TRANSIENT_USER_ERRORS else EXIT_USER_ERROR
  except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
    sys.stderr.write('\ninterrupted: stopped without saving (the newest complete '
                     'checkpoint is where the same command resumes)\n')
    status = 130
  except Exception as e:  # pylint: disable=broad-except
    lost = lost_process_message(e, _WORKDIR.value)
    if lost:
      sys.stderr.write(lost)
    else:
      traceback.print_exc()
    status = 1
  if jax.process_count() > 1 and not failed:
    jax.distributed.shutdown()  # the processes leave together, as at a normal exit
  std_logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


# What a collective reports when another process of the run is gone (killed, its host
# lost): gloo on CPU, NCCL and the coordination service elsewhere.
_LOST_PEER = re.compile(r'Gloo|NCCL|Connection reset|connection closed|heartbeat|'
                        r'coordination service|UNAVAILABLE|DEADLINE_EXCEEDED', re.IGNORECASE)


def lost_process_message(error: BaseException, workdir: str | None) -> str | None:
  """One paragraph for a multi-process run's collective that failed because another
  process is gone (a traceback through the train step said no more), or None."""
  if jax.process_count() <= 1 or not isinstance(error, jax.errors.JaxRuntimeError):
    return None
  text = str(error).strip()
  if not _LOST_PEER.search(text):
    return None
  first = text.splitlines()[0] if text else type(error).__name__
  return (f'\nerror (lost process): {first[:300]}\nAnother process of this run stopped or '
          'lost its connection (killed, out of memory, its host lost); this process '
          f'{jax.process_index()} stops too (status 1). Nothing saved is lost: the same '
          'command on every host resumes from the newest checkpoint in '
          f'{os.path.join(workdir or "WORKDIR", "checkpoints")} (the log of the process that '
          'stopped first says why it did).\n')


def _config_file_problem(argv) -> str | None:
  """What is wrong with --config=FILE[:ARG] or --config.model=..., as one line, for the
  mistakes whose ml_collections message is a long traceback or does not say what to do."""
  for arg in argv[1:]:
    if arg.startswith('--config.model='):
      value = arg.split('=', 1)[1]
      if not value.lstrip().startswith('{'):
        return (f'{arg}: config.model is the model config, not a name. For a registered '
                'model use a config file that takes it, e.g. '
                f'--config=configs/model_summary.py:{value} or '
                f'--config=configs/finetune_cifar10.py:{value} (names: '
                'vit_jax.models.list_models()), or set its fields: --config.model.hidden_size=...')
    if not arg.startswith('--config='):
      continue
    path, _, variant = arg.split('=', 1)[1].partition(':')
    if not os.path.isfile(path):
      return (f'--config={path}: no such file (the config files are configs/*.py, e.g. '
              '--config=configs/demo.py)')
    if os.path.basename(path) == 'from_workdir.py' and variant and '://' not in variant:
      if not os.path.isfile(os.path.join(os.path.expanduser(variant), 'config.json')):
        return (f'--config={path}:{variant}: {variant} holds no config.json (it takes the '
                '--workdir of a run of vit_jax.main)')
    try:
      with open(path) as f:
        tree = ast.parse(f.read(), path)
    except SyntaxError as e:  # (ml_collections' traceback, status 1: until_done.sh retried)
      text = f': {e.text.strip()}' if e.text and e.text.strip() else ''
      return f'--config={path}: a Python syntax error at line {e.lineno}, {e.msg}{text}'
    except (OSError, ValueError):
      return None  # ml_collections reports it
    defined = {node.name for node in tree.body
               if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    defined |= {alias.asname or alias.name for node in tree.body
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    defined |= {t.id for node in tree.body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    if 'get_config' not in defined:
      return (f'--config={path}: the file defines no get_config(), which a config file '
              'has: it returns the ml_collections.ConfigDict (see configs/demo.py)')
    if variant:
      for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == 'get_config':
          if not (node.args.args or node.args.vararg):
            return (f'--config={path}:{variant}: {path} takes no argument after ":" (its '
                    f'get_config() has no parameter); use --config={path}')
          if node.args.args and node.args.args[0].arg in ('model', 'name'):  # a model name
            try:
              models.get_config(variant)
            except ValueError as e:
              return f'--config={path}:{variant}: {e}'
    problem = _get_config_error(path, variant)
    if problem:
      return problem
  return None


def _get_config_error(path: str, variant: str) -> str | None:
  """A ValueError the config file's get_config raises itself (an unknown argument after
  ':', a from_workdir.py without its workdir) as one line; ml_collections shows it under a
  traceback of its own loader. Other errors, and a ValueError raised deeper (a damaged
  config.json), are left to ml_collections' traceback."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  try:
    spec = importlib.util.spec_from_file_location('_vit_jax_config_check', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    get_config = module.get_config
  except Exception:  # pylint: disable=broad-except
    return None
  try:
    if variant:
      get_config(variant)
    else:
      get_config()
  except ValueError as e:
    where = traceback.extract_tb(e.__traceback__)[-1]
    if os.path.realpath(where.filename) != os.path.realpath(path):
      return None  # raised deeper (a damaged config.json): the traceback says where
    return (f'--config={path}{":" + variant if variant else ""}: {e} (raised at '
            f'{os.path.relpath(where.filename)}:{where.lineno})')
  except Exception:  # pylint: disable=broad-except
    return None
  return None


# Sub-configs a model may go without. ml_collections parses an override of a ConfigDict
# field as a dict, so `--config.model.resnet=None` (a hybrid without its stem) was a
# "Failed to parse 'None' as a ConfigDict"; it is taken out of the flags and applied to
# the parsed config.
def _none_overrides(argv) -> tuple[list[str], list[str]]:
  """(argv without the `--config.FIELD=None` overrides, their fields), to be set to None
  after parsing. ml_collections parses an override by the type of the field's value, so
  'None' was refused for a number (--config.optimizer.grad_clip_norm=None: "could not
  convert string to float"), a bool or a sub-config (model.resnet), and taken as the
  string 'None' by a path or regex field (input.data_dir=None wrote the dataset to
  ./None/). The form `--config.FIELD None` too; a field of the same sub-config given as
  well (`--config.model.resnet.num_layers=...`) is refused, as it would be dropped. A
  field that cannot be None is named by the config's validation."""
  keep, nones = [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    name, eq, value = arg.partition('=')
    field = name[len('--config.'):] if name.startswith('--config.') else None
    if (not eq and field and i + 1 < len(args)
        and args[i + 1].strip() in ('None', 'none')):
      eq, value = '=', args[i + 1]
      i += 1
    if eq and field and value.strip() in ('None', 'none'):
      nones.append(field)
    else:
      keep.append(arg)
    i += 1
  for field in nones:
    inner = [a.split('=')[0] for a in keep if a.startswith(f'--config.{field}.')]
    if inner:
      sys.stderr.write(f'FATAL Flags parsing error: --config.{field}=None removes '
                       f'config.{field}, so {inner[0]} has nothing to set: give one of '
                       'them\n')
      sys.exit(EXIT_USER_ERROR)
  return keep, nones


def _refuse_unread_num_epochs(argv, config) -> None:
  """--config.num_epochs=N given where the config sets total_steps, which decides the
  run's length: the fine-tuning recipes set total_steps, and --config.num_epochs=10 on
  own data trained the recipe's 500 steps without a word."""
  names = {a.split('=')[0] for a in argv[1:]}
  if ('--config.num_epochs' in names and '--config.total_steps' not in names
      and config is not None and config.get('total_steps') is not None):
    sys.stderr.write(
        f"FATAL Flags parsing error: --config.num_epochs={config.num_epochs} is not read: "
        f'the config sets config.total_steps={config.total_steps}, which decides the run\'s '
        'length. To train for epochs add --config.total_steps=None; to train '
        f'{config.total_steps} steps drop --config.num_epochs\n')
    sys.exit(EXIT_USER_ERROR)


def _parse_flags(argv):
  """absl's flag parsing, with a --config override that names no field reported as absl
  reports other bad flags (one line, the closest field), not as an escaped traceback."""
  problem = _config_file_problem(argv)
  if problem:
    sys.stderr.write(f'FATAL Flags parsing error: {problem}\n')
    sys.exit(EXIT_USER_ERROR)
  given, nones = _none_overrides(argv)
  try:
    rest = cli_flags.parse_flags(given, bad_flag_status=EXIT_USER_ERROR)
    for field in nones:
      parent, _, name = field.rpartition('.')
      config = _CONFIG.value
      for part in parent.split('.') if parent else ():
        config = config[part] if hasattr(config, 'keys') and part in config else None
      if not hasattr(config, 'keys') or name not in config:
        raise KeyError(f"'{name}' is not a field of config.{parent}")
      config[name] = None
    _refuse_unread_num_epochs(given, _CONFIG.value)
    return rest
  except (AttributeError, KeyError) as e:  # ml_collections: an unknown field
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    field = text.split("'")[1] if text.count("'") >= 2 else None
    names = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    named = [n for n in names if field and field in n.split('.')[1:]]  # any segment
    if not named:  # raised inside the config file itself: its own traceback tells more
      raise
    sys.stderr.write(f'FATAL Flags parsing error: {named[0]} names no config field: '
                     f'{text}\nThe fields of a training config and their meaning: '
                     'vit_jax/train/defaults.py (config.model: vit_jax.models.field_docs()).\n')
    sys.exit(EXIT_USER_ERROR)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(_main_then_exit, flags_parser=_parse_flags)
