r"""Benchmarks: `python -m vit_jax.benchmark --mode=train|infer|input ...`.

    python -m vit_jax.benchmark --model=ViT-B/16 --mode=train --batch=8 --resolution=224 \
        --dtype=float32 --compare=timm --json=/tmp/b16.json
    python -m vit_jax.benchmark --mode=input --compare=torchvision

Modes:
  train: the real train step of `vit_jax.main` (optimizer, clipping, accumulation):
    warm-up, timed steps (median and spread), images/s, compile time, FLOPs per image
    (XLA cost analysis, checked against the analytic count), achieved FLOP/s, MFU against
    the device peak (datasheet on GPU/TPU; on CPU a matmul probed next to each step), peak
    device memory where the backend reports it. `--compare=timm` runs the same model,
    batch, dtype and optimizer in timm (PyTorch eager and torch.compile) in this process,
    one step of each framework in turn (a shared machine's speed drifts).
  infer: the same for the inference forward pass.
  --profile (train/infer, CPU): then where a step's time goes, by kind of operation
    (matmul, attention, elementwise, copies), for vit_jax and timm eager side by side,
    and for vit_jax by part of the model and pass (forward, recomputed, backward)
    (`step_profile`).
  --variant=[NAME:]FIELD=VALUE (train/infer, repeatable): one more vit_jax step per
    variant, with these config overrides (as --set: a model field, or a dotted path such
    as mesh.fsdp) on top of --set, timed in turn with the default; prints the paired ratio
    of each variant's step times to the default's (one per round), the way to measure a
    fast path's effect on a machine whose speed drifts more than the effect. Items with a
    NAME form one variant per NAME (e.g. --variant=bf16:dtype="'bfloat16'"
    --variant=dots:remat_policy="'dots'"); the items without one form one more variant,
    named 'variant'. Each variant holds its own train state in memory.
  Every step's record gives the memory XLA's buffer assignment gives it per device
    (`compiled_memory`: arguments, temporaries, outputs), on any backend.
  input: the ImageNet training preprocessing on real photographs, images/s per CPU
    core, optionally next to torchvision's DataLoader pipeline.
"""

import json
import os
import re
import sys

from absl import app
from absl import flags

from vit_jax import cli_flags

_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'infer', 'input'], 'What to measure.')
_COMPARE = flags.DEFINE_string(
    'compare', None, "Baseline run in the same process: 'timm' (train/infer; eager and "
    "torch.compile), 'timm_eager', 'timm_compile', or 'torchvision' (input).")
_MODEL = flags.DEFINE_string('model', 'ViT-B/16', 'Registered model name (train/infer).')
_RESOLUTION = flags.DEFINE_integer('resolution', 224, 'Input resolution (train/infer).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           'Compute dtype; parameters stay float32 (train/infer).')
_ACCUM = flags.DEFINE_integer('accum_steps', 1, 'Gradient accumulation micro-batches (train).')
_WARMUP = flags.DEFINE_integer(
    'warmup', None, 'Untimed steps after compilation (train/infer), untimed batches (input) '
    '(default: 2 train/infer, 3 input).')
_CACHE = flags.DEFINE_string('compilation_cache_dir', None,
                             'Persistent XLA compilation cache (a second run compiles from it).')
_SET = flags.DEFINE_multi_string(
    'set', [], 'Config override FIELD=VALUE (a Python literal): a model config field, e.g. '
    """--set=remat_policy="'dots'"; a field of a training config group, e.g. """
    '--set=mesh.fsdp=8; or a top-level one after config., e.g. --set=config.min_fsdp_size=0.')
_VARIANT = flags.DEFINE_multi_string(
    'variant', [], 'Also time vit_jax with these config overrides [NAME:]FIELD=VALUE (as --set, '
    'on top of --set), one step of each in turn, and print the paired ratio of their step '
    """times, e.g. --variant=remat_policy="'dots'" (train/infer). Items with a NAME make """
    "one variant per NAME; those without one make one more, named 'variant'.")
_PROFILE = flags.DEFINE_bool(
    'profile', False, "After the timed steps, profile 2 more of each framework's steps and "
    'print where their time goes: matmul, attention, elementwise, copies (CPU; train/infer).')
_JSON = flags.DEFINE_string('json', None, 'Write the record to this JSON file.')
_KEEP_HOST_MEMORY = flags.DEFINE_enum(
    'keep_host_memory', 'auto', ['auto', 'true', 'false'],
    'Keep memory freed by XLA for reuse, as vit_jax.main does (vit_jax/host_memory.py). '
    'auto: on without a GPU/TPU plugin, except with --compare: the setting is process-wide '
    'and slows PyTorch (one malloc arena for all its threads), so comparisons run both '
    'frameworks with the system default.')
_WORKERS = flags.DEFINE_integer(
    'workers', None, 'Threads / worker processes (input; default: the cores).')
_BATCH = flags.DEFINE_integer('batch', None, 'Batch size (default: 8 train/infer, 64 input).')
_STEPS = flags.DEFINE_integer('steps', None, 'Timed steps (default: 10 train/infer, 20 input).')
_FILES = flags.DEFINE_integer(
    'files', 2048, 'JPEG files written for the run (input); keep (warmup + steps) x batch '
    'within one epoch')

DEFAULT_WARMUP = {'train': 2, 'infer': 2, 'input': 3}
COMPARE_MODEL = ('timm', 'timm_eager', 'timm_compile')  # --compare of train/infer
PROGRAM = 'vit_jax.benchmark'


def _fmt(r: dict) -> str:
  t = r['step_time']
  return (f"  {r['framework']:<22} {r['images_per_sec']:9.2f} images/s   step "
          f"{t['median_s'] * 1e3:8.1f} ms (p10 {t['p10_s'] * 1e3:.1f}, p90 "
          f"{t['p90_s'] * 1e3:.1f}, {t['steps']} steps)")


def _fmt_memory(r: dict) -> str:
  m = r['compiled_memory']
  if not m:
    return '  memory: no analysis from this backend'
  from vit_jax.benchmark import model_speed  # pylint: disable=g-import-not-at-top
  size = model_speed.format_bytes
  return (f"  memory (XLA's buffer assignment, per device): the step needs "
          f"{size(m['step_bytes'])}: arguments {size(m['argument_bytes'])}, temporaries "
          f"{size(m['temp_bytes'])}, outputs {size(m['output_bytes'] - m['alias_bytes'])} "
          'beyond the donated arguments')


def check_profile_backend(backend: str) -> None:
  """--profile maps XLA:CPU's per-operation trace events to the compiled HLO; other
  backends' traces name kernels instead, so it stops before anything compiles."""
  if backend != 'cpu':
    raise app.UsageError(
        f'--profile reads XLA:CPU per-operation events, and jax runs on {backend!r}: drop '
        '--profile, and for a breakdown there open a jax.profiler trace in XProf '
        '(TensorBoard\'s profile plugin)')


# The training config's command-line flags (`vit_jax.main`) that validation hints name,
# as this command's flags: its own, or a --set of the config path.
_CONFIG_FLAG = re.compile(r'--config\.([A-Za-z_][\w.]*)=')
_OWN_FLAGS = {'batch_size': '--batch=', 'accum_steps': '--accum_steps=',
              'model.image_size': '--resolution='}


def benchmark_flags(text: str) -> str:
  """`text` with each `--config.PATH=` that `vit_jax.main` takes written as this command
  takes it: --batch=, --accum_steps=, --resolution=, or --set=FIELD= (`overrides`)."""
  def flag(m):
    path = m.group(1)
    if path in _OWN_FLAGS:
      return _OWN_FLAGS[path]
    if path.startswith('model.'):
      return f'--set={path[len("model."):]}='
    return f'--set={path}=' if '.' in path else f'--set=config.{path}='
  return _CONFIG_FLAG.sub(flag, text)


def check_json_path(path: str) -> None:
  """A usage error, before anything runs, where the record could not be written."""
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise app.UsageError(f'--json={path} is a folder: give a file path, e.g. '
                         f'--json={os.path.join(path, "record.json")}')
  if not os.path.isdir(parent):
    raise app.UsageError(f'--json={path}: the folder {parent} does not exist: create it, '
                         'or give a file in an existing folder')
  if not os.access(parent, os.W_OK | os.X_OK) or (
      os.path.exists(path) and not os.access(path, os.W_OK)):
    raise app.UsageError(f'--json={path}: cannot write there (permission denied): give a '
                         'file in a folder you can write')


def _set_is_the_cause(kwargs, error) -> bool:
  """Whether --set is what makes the default step's config fail with `error`: there is a
  --set, and the config without it passes or fails otherwise (a --batch that does not
  divide over --accum_steps is no --set's fault)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from vit_jax.benchmark import model_speed  # pylint: disable=g-import-not-at-top
  if not _SET.value:
    return False
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # its warnings were given with --set
  try:
    model_speed.check_config(**kwargs, accum_steps=_ACCUM.value, overrides={})
  except ValueError as e:  # (defaults.ConfigError is one)
    return str(e) != str(error)
  finally:
    logging.set_verbosity(verbosity)
  return True


def model_main(warmup: int):
  from vit_jax.benchmark import model_speed  # pylint: disable=g-import-not-at-top
  from vit_jax.benchmark import overrides as overrides_lib  # pylint: disable=g-import-not-at-top
  from vit_jax.benchmark import step_profile  # pylint: disable=g-import-not-at-top
  if _CACHE.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_compilation_cache_dir', _CACHE.value)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  try:
    models.get_config(_MODEL.value)
  except ValueError as e:
    raise app.UsageError(f'--model={_MODEL.value}: {e}') from None
  kwargs = dict(model=_MODEL.value, mode=_MODE.value,
                batch=8 if _BATCH.value is None else _BATCH.value,
                resolution=_RESOLUTION.value, dtype=_DTYPE.value)
  steps = 10 if _STEPS.value is None else _STEPS.value
  compare = _COMPARE.value
  if compare and compare not in COMPARE_MODEL:
    raise app.UsageError(f"--compare={compare!r}: use 'timm', 'timm_eager' or 'timm_compile' "
                         "with --mode=train/infer ('torchvision' with --mode=input)")
  if _PROFILE.value:
    import jax  # pylint: disable=g-import-not-at-top
    check_profile_backend(jax.default_backend())
  overrides = overrides_lib.parse(_SET.value)
  for key, value in overrides.items():
    if overrides_lib.config_path(key) == 'model.dtype':
      # (it ran, and its MFU was 'not measured': the peak was probed in --dtype)
      raise app.UsageError(
          f'--set={key}={value!r}: the compute dtype is set by --dtype (--dtype=float32 or '
          '--dtype=bfloat16, the dtypes whose peak FLOP/s the benchmark measures); a '
          '--variant may change it, to time both dtypes in one run')
  variants = overrides_lib.parse_variants(_VARIANT.value)
  configs = [overrides] + [overrides_lib.merge(overrides, v) for v in variants.values()]
  flag_of = ['--set'] + [f'--variant {n!r}' for n in variants]
  from vit_jax.train import defaults  # pylint: disable=g-import-not-at-top
  checked = []
  for flag, o in zip(flag_of, configs):  # fails here, before any compile
    try:
      checked.append(model_speed.check_config(**kwargs, accum_steps=_ACCUM.value,
                                              overrides=o))
    except (defaults.ConfigError, ValueError) as e:
      # The hints name vit_jax.main's --config.* flags: this command's are others.
      text = benchmark_flags(str(e))
      if flag == '--set' and not _set_is_the_cause(kwargs, e):
        raise app.UsageError(text) from None
      raise app.UsageError(f'{flag}: {text}') from None
  if compare:  # timm runs the same model: --set may only change what timm can follow
    try:
      model_speed.timm_model_name(_MODEL.value, _RESOLUTION.value)
    except ValueError as e:
      raise app.UsageError(f'--compare={compare} with --model={_MODEL.value}: {e}: compare '
                           'a model that timm has, or drop --compare') from None
    try:
      overrides_lib.timm_kwargs(_MODEL.value, overrides)
    except defaults.ConfigError as e:
      raise app.UsageError(f'--set with --compare={compare}: {e}') from e
  as_dicts = [c.to_dict() for c in checked]
  for i, (name, v) in enumerate(variants.items(), 1):
    same = [flag_of[j] for j in range(i) if as_dicts[j] == as_dicts[i]]
    if same:
      what = ('changes nothing in the config that --set gives' if same[0] == '--set'
              else f'gives the same config as {same[0]}')
      raise app.UsageError(f'{flag_of[i]} ({v}) {what}: the two steps would be the same')
  # torch first: it must be imported before TensorFlow (vit_jax.torch_import).
  prepared = []
  if compare in ('timm', 'timm_eager'):
    prepared.append(model_speed.prepare_timm(**kwargs, overrides=overrides,
                                             accum_steps=_ACCUM.value))
  if compare in ('timm', 'timm_compile'):
    try:
      prepared.append(model_speed.prepare_timm(**kwargs, compile_model=True,
                                               overrides=overrides, accum_steps=_ACCUM.value))
    except Exception as e:  # pylint: disable=broad-except
      print(f'torch.compile failed: {type(e).__name__}: {e}', flush=True)
  prepared = [model_speed.prepare_vit_jax(**kwargs, accum_steps=_ACCUM.value, overrides=o,
                                          config=c)
              for o, c in zip(configs, checked)] + prepared
  try:  # every state is allocated now: a step that cannot run fails here, not midway
    model_speed.check_step_memory(
        prepared, ['vit_jax'] + [f'vit_jax {n}' for n in variants])
  except MemoryError as e:
    raise app.UsageError(str(e)) from e
  # One step of each framework per round: all see the machine's speed of the moment.
  r, *baselines = model_speed.run_interleaved(prepared, steps=steps, warmup=warmup,
                                              dtype=_DTYPE.value)
  timed_variants, baselines = baselines[:len(variants)], baselines[len(variants):]
  for v, (name, changes) in zip(timed_variants, variants.items()):
    v['framework'] = f'vit_jax {name}'
    v['name'], v['variant'] = name, changes
  lines = [
      f"{r['model']} {r['mode']}, batch {r['batch']}, {r['resolution']} px, {r['dtype']}"
      f"{', ' + str(r['overrides']) if r['overrides'] else ''} on {r['device_count']} x "
      f"{r['device']} ({r['backend']}; host {r['host_cpu']}):",
      _fmt(r),
      f"  compile {r['compile_s']:.1f} s; forward {r['forward_flops_per_image_xla'] / 1e9:.2f}"
      f" GFLOPs/image (XLA)"
      + (f", analytic/XLA {r['analytic_vs_xla']:.4f}" if r['analytic_vs_xla'] else '')
      + '; '
      f"{r['achieved_flops_per_sec'] / 1e9:.1f} GFLOP/s achieved",
      (f"  MFU {r['mfu']:.3f} of {r['peak_flops_per_sec'] / 1e9:.1f} GFLOP/s "
       f"({r['peak_source']})" if r['mfu'] is not None
       else f"  MFU not measured ({r['peak_source']})")
      + model_speed.mfu_spread(r)
      + (f"; {r['mfu_of_best_peak']:.3f} of the best step's peak"
         if r['mfu_of_best_peak'] is not None and r['peak_flops_per_sec_per_step'] else '')
      + ("; the device's peak memory in this process "
         f"{model_speed.format_bytes(r['peak_memory_bytes'])}" if r['peak_memory_bytes'] else ''),
      _fmt_memory(r)]
  for k, v in enumerate(timed_variants, 1):  # step k of each round's len(prepared)
    ratio = v['step_time_vs_vit_jax'] = model_speed.paired_ratio(
        r['step_times_s'], v['step_times_s'], offset=k / len(prepared))
    mfu = (f"{v['mfu']:.3f}" if v['mfu'] is not None
           else f"not measured ({v['peak_source']})")
    lines += [
        f"  {v['name']}: {v['variant']}",
        _fmt(v),
        '  ' + _fmt_memory(v),
        f"    MFU {mfu}; {v['name']} / vit_jax step time: {ratio['median']:.3f}x "
        f"(paired median of {ratio['rounds']} rounds, {ratio['min']:.3f} to "
        f"{ratio['max']:.3f})"]
  for b in baselines:
    # The baseline's MFU against its own library's matmul peak: with the vit_jax MFU
    # above, it splits the ratio into model code and matmul library (None, with a
    # warning, where that matmul turns out to be no peak).
    b['mfu_of_library_peak'], warning = model_speed.library_mfu(
        r['model_flops_per_image'], b['images_per_sec'], b['library_peak_flops_per_sec'])
    b['library_peak_warning'] = warning
    n = b['library_peak_matmul_size']
    matmul = (f"PyTorch's {_DTYPE.value} {n}^3 matmul "
              f"({b['library_peak_flops_per_sec'] / 1e9:.1f} GFLOP/s"
              + (f", {b['library_peak_flops_per_sec'] / r['peak_flops_per_sec']:.2f}x "
                 "vit_jax's peak)" if r['peak_flops_per_sec'] else ')'))
    lines.append(_fmt(b))
    lines.append(
        f"    vit_jax / {b['framework']}: {r['images_per_sec'] / b['images_per_sec']:.2f}x; "
        + (f"its MFU {b['mfu_of_library_peak']:.3f} of {matmul}" if warning is None
           else f'warning: {warning}; {matmul}'))
  print('\n'.join(lines), flush=True)  # before profiling: the timings are not lost to it
  if _PROFILE.value:
    profiled = {}
    for p, record in zip(prepared, [r, *timed_variants, *baselines]):
      if p.profile:
        record['profile'] = profiled[record['framework']] = p.profile()
    print('\n'.join(step_profile.format_table(profiled)), flush=True)
  r['baselines'] = baselines
  r['variants'] = timed_variants
  for b in baselines:
    name = b['framework'].replace(' ', '_').replace('.', '_')
    r[f'ratio_vs_{name}'] = r['images_per_sec'] / b['images_per_sec']
  return r


def run_info(warmup: int) -> dict:
  """What reproduces a record: when, the command line, the code (git commit, and whether
  the tree had uncommitted changes) and the XLA flags."""
  import datetime  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  here = os.path.dirname(os.path.abspath(__file__))

  def git(*args):
    try:
      return subprocess.run(['git', *args], cwd=here, capture_output=True, text=True,
                            timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return None

  commit = git('rev-parse', 'HEAD')
  status = git('status', '--porcelain', '--untracked-files=no') if commit else None
  return {'time_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec='seconds'),
          'argv': ['python', '-m', 'vit_jax.benchmark', *sys.argv[1:]],
          'git_commit': commit, 'git_uncommitted_changes': bool(status) if commit else None,
          'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'warmup': warmup}  # the warm-up used (the flag's, or the mode's default)


# Flags that only one kind of mode reads (the others are checked below with their own
# messages: --variant, --profile, --accum_steps, --compare).
_MODEL_ONLY = ('model', 'resolution', 'dtype', 'compilation_cache_dir', 'set')
_INPUT_ONLY = ('workers', 'files')


def check_mode_flags(mode: str) -> None:
  """A usage error for a flag given on the command line that `mode` does not read (they
  were ignored without a word, though the record's argv shows them)."""
  unread = _INPUT_ONLY if mode != 'input' else _MODEL_ONLY
  given = [f'--{name}' for name in unread if flags.FLAGS[name].present]
  if given:
    modes = '--mode=input' if mode != 'input' else '--mode=train/infer'
    raise app.UsageError(f'{", ".join(given)} {"is" if len(given) == 1 else "are"} for '
                         f'{modes}; --mode={mode} does not read '
                         f'{"it" if len(given) == 1 else "them"}: drop '
                         f'{"it" if len(given) == 1 else "them"}')


def main(argv):
  if len(argv) > 1:  # (they were dropped without a word)
    raise app.UsageError(f'unexpected argument {argv[1]!r}: every setting is a --flag '
                         '(python -m vit_jax.benchmark --help)')
  check_mode_flags(_MODE.value)
  if _JSON.value:  # before the run, not after it
    check_json_path(_JSON.value)
  from vit_jax import host_memory  # pylint: disable=g-import-not-at-top
  from vit_jax import tensorflow_startup  # pylint: disable=g-import-not-at-top
  tensorflow_startup.leave_keras_out()
  # First, before jax or torch allocate (applies to both, so the comparison stays fair).
  setting = {'auto': None, 'true': True, 'false': False}[_KEEP_HOST_MEMORY.value]
  if setting is None and _COMPARE.value:
    setting = False
  kept = host_memory.configure(setting)
  if _VARIANT.value and _MODE.value == 'input':
    raise app.UsageError('--variant changes the model or train step: use it with --mode=train/infer')
  if _PROFILE.value and _MODE.value == 'input':
    raise app.UsageError('--profile breaks down a model step: use it with --mode=train/infer')
  for flag in (_BATCH, _STEPS, _WARMUP, _ACCUM, _RESOLUTION, _WORKERS):
    if flag.value is not None and flag.value < (0 if flag is _WARMUP else 1):
      # (--batch=0, --steps=0 and --workers=0 used to mean the defaults, without a word)
      raise app.UsageError(f'--{flag.name}={flag.value} must be '
                           f'{"an int >= 0" if flag is _WARMUP else "a positive int"}')
  if _ACCUM.value != 1 and _MODE.value != 'train':
    raise app.UsageError(f'--accum_steps={_ACCUM.value} accumulates gradients: use it with '
                         '--mode=train')
  warmup = DEFAULT_WARMUP[_MODE.value] if _WARMUP.value is None else _WARMUP.value
  if _MODE.value in ('train', 'infer'):
    record = model_main(warmup)
    record['host_memory_kept'] = kept
    record['run'] = run_info(warmup)
    print(f'  host memory kept for reuse: {kept}', flush=True)
    if _JSON.value:
      with open(_JSON.value, 'w') as f:
        json.dump(record, f, indent=2)
    return
  from vit_jax.benchmark import input_speed  # pylint: disable=g-import-not-at-top
  settings = dict(batch_size=64 if _BATCH.value is None else _BATCH.value,
                  steps=20 if _STEPS.value is None else _STEPS.value, warmup=warmup,
                  num_files=_FILES.value, compare=_COMPARE.value)
  try:  # before any photo is written
    input_speed.check(**settings)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  record = input_speed.run(workers=_WORKERS.value, **settings)
  record['run'] = run_info(warmup)
  lines = [f"input pipeline ({record['pipeline']}), {record['workers']} worker(s), "
           f"{record['files']} JPEGs of {record['mean_file_kb']:.0f} KB on average:",
           f"  vit_jax:     {record['images_per_sec']:8.1f} images/s = "
           f"{record['images_per_sec_per_core']:7.1f} per core"]
  if 'baseline_images_per_sec' in record:
    lines.append(f"  torchvision: {record['baseline_images_per_sec']:8.1f} images/s = "
                 f"{record['baseline_images_per_sec_per_core']:7.1f} per core")
    lines.append(f"  ratio:       {record['ratio']:.2f}x")
  print('\n'.join(lines), flush=True)
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(record, f, indent=2)


def main_or_usage_error(argv):
  """main; a usage error is one line on stderr and exit status 2 (as predict's and
  convert's), not absl's usage text with the message at its end."""
  try:
    main(argv)
  except app.UsageError as e:
    print(f'{PROGRAM}: {e}', file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main_or_usage_error,
          flags_parser=lambda argv: cli_flags.parse_flags(argv, bad_flag_status=2))
