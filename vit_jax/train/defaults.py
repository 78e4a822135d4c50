"""Every field of a training config, with its default and meaning.

Config files (configs/*.py) start from `default_config()` and set what their recipe
needs; `validate(config)` checks a config before anything is compiled.
"""

import difflib
import math
import os
import re

from absl import logging
import jax
import ml_collections
import numpy as np

from vit_jax import models
from vit_jax.models import registry
from vit_jax.data import input_config

FIELD_DOCS = {
    'seed': 'seed of parameter init, dropout and the data order',
    'model': 'model config (vit_jax.models.get_config(name), fields overridable)',
    'input': 'data config (vit_jax/data/input_config.py)',
    'batch_size': 'global batch size (all processes and devices together)',
    'accum_steps': ('gradient accumulation: micro-batches per step (the same update as one big '
                    'batch, except with BatchNorm, which normalises each micro-batch on its own, '
                    'and dropout and stochastic depth, whose masks are drawn per micro-batch: '
                    'the same distribution, other draws)'),
    'total_steps': 'training steps; None derives it from num_epochs',
    'num_epochs': 'epochs of the training split when total_steps is None',
    'optimizer': "name ('adam'|'sgd'), b1, b2, eps, momentum, weight_decay, grad_clip_norm, mu_dtype",
    'schedule': "base_lr, base_lr_batch (0, or the global batch base_lr is for: it then scales "
                "linearly with batch_size), warmup_steps, warmup_epochs (instead of "
                "warmup_steps when > 0), decay ('linear'|'cosine'|'rsqrt'|'constant'; "
                'rsqrt: base_lr x sqrt(w / (s + w)) at s steps after a warmup of w, w = 1 '
                'without one), end_lr_fraction (linear and cosine: the rate reached at '
                'total_steps as a fraction of base_lr)',
    'loss': "'softmax_xent' or 'sigmoid_xent' (multi-label, e.g. ImageNet-21k)",
    'mesh': 'device mesh sizes: data, fsdp, model (-1: the remaining devices)',
    'min_fsdp_size': 'parameters with fewer elements stay replicated on the fsdp axis',
    'log_every': 'steps between training metric logs (the only host syncs of the loop)',
    'eval_every': 'steps between evaluations (0: only at the end)',
    'checkpoint_every': 'steps between checkpoints (0: only at the end)',
    'keep_checkpoints': 'newest checkpoints kept',
    'keep_best': 'best checkpoints kept in addition, by eval_top1 (0: none)',
    'async_checkpoint': 'save checkpoints in the background',
    'nonfinite': "on a NaN/inf loss or gradient: 'stop' (keep the last good checkpoint) or 'skip' the update",
    'init_from': 'pretrained weights to fine-tune from: .npz, timm/transformers state dict '
                 '(.safetensors/.bin/.pth), or an Orbax workdir/step dir; None: from scratch',
    'init_head': "with init_from: 'reset' (new zero-initialised head) or 'keep' (same classes)",
    'posemb_resample': "with init_from at a new resolution: 'bilinear' (original) or 'bicubic' (timm)",
    'trainable': "regex on parameter paths: train only these (linear probe: '^head/'); None: all",
    'freeze': "regex on parameter paths: keep these fixed, e.g. '^(embedding|Transformer/encoderblock_[0-5]/)'",
    'eval_at_start': 'evaluate once before the first step (the starting accuracy of a fine-tuning run)',
    'compilation_cache_dir': 'persistent XLA compilation cache directory; None disables',
    'keep_host_memory': 'CPU: keep memory XLA frees for reuse (no page faults each step; '
                        'vit_jax/host_memory.py); None: on when jax has no GPU/TPU plugin',
}


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = models.get_config('ViT-Ti/16')
  c.input = input_config.default_input_config()
  c.batch_size = 512
  c.accum_steps = 1
  # object: `--config.total_steps=None` switches a config that sets steps back to epochs.
  c.total_steps = ml_collections.FieldReference(None, field_type=object)
  c.num_epochs = 10.0
  c.optimizer = ml_collections.ConfigDict(dict(
      name='adam', b1=0.9, b2=0.999, eps=1e-8, momentum=0.9, weight_decay=0.0,
      grad_clip_norm=1.0, mu_dtype='float32'))
  c.schedule = ml_collections.ConfigDict(dict(
      base_lr=1e-3, base_lr_batch=0, warmup_steps=0, warmup_epochs=0.0, decay='cosine',
      end_lr_fraction=0.0))
  c.loss = 'softmax_xent'
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  c.min_fsdp_size = 2**18
  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.keep_best = 0
  c.async_checkpoint = True
  c.nonfinite = 'stop'
  c.init_from = ml_collections.FieldReference(None, field_type=str)
  c.init_head = 'reset'
  c.posemb_resample = 'bilinear'
  c.trainable = ml_collections.FieldReference(None, field_type=str)
  c.freeze = ml_collections.FieldReference(None, field_type=str)
  c.eval_at_start = False
  c.compilation_cache_dir = ml_collections.FieldReference(None, field_type=str)
  c.keep_host_memory = ml_collections.FieldReference(None, field_type=bool)
  return c


class ConfigError(ValueError):
  """A config that cannot work; the message names the field."""


def _batch_fixes(b, accum, data, fsdp, num_devices, process_count) -> str:
  """The ways to make batch size b fit: another batch size, or (to keep b, as a resumed
  run must) other accum_steps, or a mesh with fewer batch shards (the others on the model
  axis)."""
  unit = accum * data * fsdp  # a multiple of process_count (checked before)
  lower, upper = b // unit * unit, (b // unit + 1) * unit
  fixes = [f'--config.batch_size={n}' for n in (lower, upper) if n > 0]
  keep = []
  per_shard = b // (data * fsdp) if b % (data * fsdp) == 0 else 0
  accums = [a for a in range(1, per_shard + 1) if per_shard % a == 0]
  if accums:
    a = min(accums, key=lambda a: (abs(a - accum), -a))  # a tie: more (less memory)
    keep.append(f'--config.accum_steps={a}')
  shards = [d for d in range(data * fsdp - 1, 0, -1)
            if num_devices % d == 0 and d % process_count == 0 and b % (accum * d) == 0]
  if shards and fsdp == 1:
    d = shards[0]
    keep.append(f'--config.mesh.data={d} --config.mesh.model={num_devices // d} (fewer '
                'batch shards; the model axis takes the other devices)')
  text = 'e.g. ' + ' or '.join(fixes)
  if keep:
    text += f'; to keep batch_size={b} (as a resumed run must): ' + ' or '.join(keep)
  return text


# File names of the original release's .npz files (ViT-B_16.npz, R50+ViT-B_16.npz, the
# AugReg B_16-i21k-300ep-....npz): where a missing one can be downloaded from.
_RELEASE_NPZ = re.compile(r'^((R\d+\+)?ViT-(Ti|S|B|L|H)_\d+|R\d+_ViT|(R\d+_|R_)?(Ti|S|B|L|H)_\d+-'
                          r'|BiT-[MS]-R\d+x\d+).*\.npz$')


def validate(config, *, num_devices: int, process_count: int, check_input: bool = True,
             resuming: bool = False) -> None:
  """Checks what can be checked without data or compilation; raises ConfigError.

  resuming: the workdir has a checkpoint, which the run resumes from: config.init_from is
  not read, so a path that is gone since (a /tmp of another machine) is no error.

  check_input: also check `config.input`'s preprocessing against the model (its ops, the
  image size it gives, its onehot classes); this imports TensorFlow, and is skipped where
  TensorFlow is not installed (the pipeline then fails on its own).
  """
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top
  unknown = sorted(set(config.keys()) - set(FIELD_DOCS))
  if unknown:
    raise ConfigError(f'unknown config field(s) {unknown}; fields: {sorted(FIELD_DOCS)}')
  missing = sorted(set(FIELD_DOCS) - set(config.keys()))
  if missing:
    raise ConfigError(f'the config has no training fields {missing}: start it from '
                      'vit_jax.train.defaults.default_config(), or pass --summary_only to '
                      'print the model summary only')
  _check_sub_fields(config)
  _check_ranges(config)
  if config.model.get('classifier') in ('unpooled', 'token_unpooled'):
    # (a broadcasting error in the first train step: logits of every token, one label)
    raise ConfigError(
        f'config.model.classifier={config.model.classifier!r} gives an output per token; '
        "training on image labels needs one per image: 'token', 'gap' or 'map'")
  if config.input.get('source') == 'folder' and not config.input.get('folder'):
    raise ConfigError("config.input.source='folder' needs config.input.folder (the folder "
                      'holding <split>/<class>/<image>): --config.input.folder=PATH')
  try:
    data, fsdp, _ = sharding.mesh_shape(config.mesh, num_devices)
  except sharding.MeshError as e:
    raise ConfigError(str(e)) from e  # (it starts with 'config.mesh')
  cache = config.get('compilation_cache_dir')
  if cache and '://' not in cache and os.path.exists(cache) and not os.path.isdir(cache):
    raise ConfigError(f'config.compilation_cache_dir={cache!r} is a file: give a folder '
                      '(created if missing), or None for no persistent cache')
  if cache and '://' not in cache and not _writable_folder(os.path.expanduser(cache)):
    # (jax warned once and cached nothing: every run compiled again)
    raise ConfigError(f'config.compilation_cache_dir={cache!r} cannot be written here: give '
                      'a folder this user can create and write, or None for no persistent '
                      'cache')
  batch_devices = data * fsdp
  if batch_devices % process_count:
    # The batch is split over ('data', 'fsdp') only: a model axis spanning processes would
    # give two processes one shard to fill, each with its own examples (silently a
    # smaller batch whose "replicas" differ).
    k = process_count // math.gcd(batch_devices, process_count)
    model = num_devices // batch_devices
    fix = (f'e.g. --config.mesh.data={data * k} --config.mesh.model={model // k}'
           if model % k == 0 else 'make data x fsdp a multiple of the process count')
    raise ConfigError(
        f'config.mesh data={data} x fsdp={fsdp} = {batch_devices} batch shard(s) cannot be '
        f'split over the {process_count} processes: every process reads its own examples, '
        f'so data x fsdp must be a multiple of {process_count} (the model axis, {model}, '
        f'must not span processes); {fix}')
  b, accum = config.batch_size, config.accum_steps
  if accum < 1:
    raise ConfigError(f'config.accum_steps={accum} must be at least 1')
  if b % process_count or b % (accum * batch_devices):
    raise ConfigError(
        f'config.batch_size={b} must be divisible by the {process_count} process(es) and by '
        f'accum_steps x batch devices = {accum} x {batch_devices} (mesh data={data}, '
        f'fsdp={fsdp}); ' + _batch_fixes(b, accum, data, fsdp, num_devices, process_count))
  try:
    module = models.create(config.model)
  except ValueError as e:
    raise ConfigError(f'config.model: {e}') from e
  backend = jax.default_backend()
  if config.model.get('attention_impl') == 'cudnn' and backend != 'gpu':
    # (jax raises "cuDNN is not detected" only while tracing the model, a traceback)
    raise ConfigError(f"config.model.attention_impl='cudnn' needs an NVIDIA GPU; this run's "
                      f"backend is {backend}: use None (the default) or 'xla'")
  source = config.input.get('source', 'tfds')
  if source == 'tfds' and config.input.get('folder'):
    raise ConfigError(
        f"config.input.folder={config.input.folder!r} is set, but config.input.source="
        f"'tfds' reads the tfds dataset config.input.name={config.input.get('name')!r}: to "
        "train on the folder, add --config.input.source=folder")
  size = config.model.image_size
  if not isinstance(size, int) or size <= 0:
    raise ConfigError(f'config.model.image_size={size!r} must be a positive int (pixels of '
                      'the square input), e.g. 224')
  warn_if_name_differs(config.model)
  if isinstance(module, models.VisionTransformer):
    sh, sw = module.total_stride()
    if size % sh or size % sw:
      if (sh, sw) == registry.patch_size(config.model.patch_size):
        step = sh * sw // math.gcd(sh, sw)
        below, above = max(size // step, 1) * step, (size // step + 1) * step
        raise ConfigError(f'config.model.image_size={size} is not divisible by the patch '
                          f'size {(sh, sw)}: e.g. --config.model.image_size={below} or '
                          f'{above} (or another patch_size)')
      raise ConfigError(  # a hybrid: the ResNet stem's stride times the patch size
          f'config.model.image_size={size} is not divisible by the pixels per token '
          f'{(sh, sw)} (the ResNet stem\'s stride times patch_size '
          f'{tuple(config.model.patch_size)}), e.g. --config.model.image_size='
          f'{max(size // sh, 1) * sh}')
  else:  # other families check their input size while tracing (no compilation)
    from vit_jax.models import summary  # pylint: disable=g-import-not-at-top
    try:
      summary.abstract_variables(module, size)
    except ValueError as e:
      raise ConfigError(f'config.model.image_size={size}: {e}') from e
  from vit_jax.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from vit_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  if config.optimizer.name not in optimizer_lib.OPTIMIZERS:
    raise ConfigError(f'config.optimizer.name={config.optimizer.name!r} is not one of '
                      f'{optimizer_lib.OPTIMIZERS}')
  if config.schedule.decay not in optimizer_lib.SCHEDULES:
    raise ConfigError(f'config.schedule.decay={config.schedule.decay!r} is not one of '
                      f'{optimizer_lib.SCHEDULES}')
  if config.schedule.decay in ('constant', 'rsqrt') and config.schedule.get('end_lr_fraction'):
    raise ConfigError(  # (it was accepted and had no effect)
        f'config.schedule.end_lr_fraction={config.schedule.end_lr_fraction} has no effect '
        f"with decay={config.schedule.decay!r}, which does not end at a set rate: use "
        "decay='linear' or 'cosine' to end there, or leave end_lr_fraction at 0")
  if config.loss not in step_lib.LOSSES:
    raise ConfigError(f'config.loss={config.loss!r} is not one of {step_lib.LOSSES}')
  if config.nonfinite not in ('stop', 'skip'):
    raise ConfigError(f"config.nonfinite={config.nonfinite!r}: use 'stop' or 'skip'")
  if config.total_steps is None and not config.num_epochs:
    raise ConfigError('set config.total_steps or config.num_epochs')
  try:
    optimizer_lib.check_schedule(config.schedule)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  warmup = config.schedule.get('warmup_steps', 0)
  if config.total_steps is not None and warmup >= config.total_steps:
    raise ConfigError(f'config.schedule.warmup_steps={warmup} is not below '
                      f'config.total_steps={config.total_steps}: lower warmup_steps, e.g. '
                      f'--config.schedule.warmup_steps={config.total_steps // 10}')
  if config.init_from and not resuming:
    from etils import epath  # pylint: disable=g-import-not-at-top
    # ('--config.init_from=~/w': no shell expands it; load_checkpoint does)
    if not epath.Path(os.path.expanduser(config.init_from)).exists():
      name = os.path.basename(config.init_from)
      folder = ('gs://bit_models' if name.startswith('BiT-') else 'gs://vit_models/imagenet21k'
                if name.startswith(('ViT-', 'R50+ViT-')) else 'gs://vit_models/augreg')
      where = (f' The original release publishes {name} (e.g. gsutil cp {folder}/{name} .); '
               'timm and transformers weights are on the Hugging Face Hub.'
               if _RELEASE_NPZ.match(name) else '')
      if config.init_from.lower() in ('none', 'null', 'false'):
        where = " To start from a random initialisation: --config.init_from=''."
      raise ConfigError(f'config.init_from={config.init_from!r} does not exist: give a '
                        'local or gs:// path to an .npz, a .safetensors/.pth/.bin state '
                        'dict, a transformers directory or a vit_jax workdir.' + where)
  for field in ('trainable', 'freeze'):
    if config.get(field):
      try:
        re.compile(config[field])
      except re.error as e:
        raise ConfigError(f'config.{field}={config[field]!r} is not a valid regex: {e}') from e
  if config.get('trainable') or config.get('freeze'):
    from vit_jax.models import summary  # pylint: disable=g-import-not-at-top
    variables = summary.abstract_variables(module, size)
    try:
      labels = optimizer_lib.trainable_labels(variables['params'], config.get('trainable'),
                                              config.get('freeze'))
    except optimizer_lib.FreezeError as e:
      raise ConfigError(str(e)) from e
    if 'batch_stats' in variables and not config.model.get('bn_frozen', True):
      _warn_batch_norm_not_frozen(variables['batch_stats'], labels)
    _warn_if_a_new_zero_head_is_frozen(config, labels)
  if (accum > 1 and models.family_of(config.model) in ('resnet', 'res2net')
      and not config.model.get('bn_frozen')):
    logging.warning(
        'config.accum_steps=%d with BatchNorm (%s): each micro-batch of %d normalises with '
        'its own statistics and updates the running statistics once (%d updates a step), '
        'so the step is not the same as one batch of %d; for that, use accum_steps=1 on '
        'more devices, or --config.model.bn_frozen=True when fine-tuning.', accum,
        config.model.get('name'), b // accum, accum, b)
  if 'float16' in (str(config.model.get('dtype')), str(config.model.get('param_dtype'))):
    logging.warning(  # (the models take it for inference; training has no loss scaling)
        "config.model.dtype/param_dtype 'float16': training here has no loss scaling, so "
        "small gradients underflow to zero in float16; use 'bfloat16' (the same speed on "
        'GPUs and TPUs that have it, float32 range) for mixed precision.')
  if check_input:
    _check_preprocessing(config)
  if config.init_head not in ('reset', 'keep'):
    raise ConfigError(f"config.init_head={config.init_head!r}: use 'reset' or 'keep'")
  if config.posemb_resample not in ('bilinear', 'bicubic'):
    raise ConfigError(f"config.posemb_resample={config.posemb_resample!r}: use 'bilinear' "
                      "or 'bicubic'")


def warn_if_name_differs(model_config) -> None:
  """A warning where config.model.name is a registered model the fields do not make."""
  differences = models.differs_from_its_name(model_config)
  if differences:  # a shrunk model for a test run is fine; a name taken as a selector is not
    name = model_config.name
    logging.warning(
        'config.model.name=%r is a registered model, but config.model differs from it in '
        '%s. The name only labels the run: the fields give the architecture. To train %s '
        'itself, start from vit_jax.models.get_config(%r) (as the recipes in configs/ do).',
        name, ', '.join(f'{f}={_compact(mine)} ({name} has {_compact(theirs)})'
                        for f, mine, theirs in differences), name, name)


def _compact(value) -> str:
  """A config value on one line (a sub-config as a dict, not YAML)."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return repr(value)


def _writable_folder(path: str) -> bool:
  """Whether `path` is a folder this process can write, or could create (its nearest
  existing parent is a writable folder)."""
  path = os.path.abspath(path)
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      return False
    path = parent
  if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
    return False
  try:  # (os.access says yes to root in /proc and on read-only mounts)
    probe = os.path.join(path, f'.vit_jax_write_probe_{os.getpid()}')
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError:
    return False
  return True


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  """A finite int or float (inf and nan passed the range checks, then failed late or
  trained nothing: base_lr=inf, optimizer.eps=inf, warmup_epochs=nan)."""
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_sub_fields(config) -> None:
  """Fields of the optimizer, schedule, mesh and input blocks that none of them has: a
  config file's misspelling (c.schedule.warmup_step = ...) was ignored, and the run
  trained with the default. (Command-line overrides of unknown fields fail already.)"""
  defaults = default_config()
  known = {'optimizer': set(defaults.optimizer.keys()),
           'schedule': set(defaults.schedule.keys()), 'mesh': set(defaults.mesh.keys()),
           'input': set(input_config.FIELD_DOCS)}
  for block, fields in known.items():
    node = config.get(block)
    if not isinstance(node, ml_collections.ConfigDict):
      continue
    for field in sorted(set(node.keys()) - fields):
      close = difflib.get_close_matches(field, sorted(fields), n=1, cutoff=0.6)
      hint = f' (did you mean {block}.{close[0]}?)' if close else ''
      raise ConfigError(f'config.{block}.{field} is not a field of config.{block}{hint}; '
                        f'its fields: {", ".join(sorted(fields))}')


# (field, test, what it must be): values that run but train something else than meant
# (a negative learning rate or clipping norm ascends the loss), or fail late.
_RANGES = (
    ('batch_size', lambda v: _is_int(v) and v >= 1, 'a positive int'),
    ('accum_steps', lambda v: _is_int(v) and v >= 1, 'a positive int'),
    ('total_steps', lambda v: v is None or (_is_int(v) and v >= 1),
     'a positive int, or None (then num_epochs sets it)'),
    ('num_epochs', lambda v: _is_number(v) and v >= 0, 'a non-negative number'),
    ('log_every', lambda v: _is_int(v) and v >= 1, 'a positive int'),
    ('eval_every', lambda v: v is None or (_is_int(v) and v >= 0),
     'an int >= 0 (0: only at the end)'),
    ('checkpoint_every', lambda v: v is None or (_is_int(v) and v >= 0),
     'an int >= 0 (0: only at the end)'),
    ('keep_checkpoints', lambda v: _is_int(v) and v >= 1, 'a positive int'),
    ('keep_best', lambda v: _is_int(v) and v >= 0, 'an int >= 0'),
    ('schedule.base_lr', lambda v: _is_number(v) and v >= 0, 'a number >= 0'),
    ('schedule.warmup_steps', lambda v: _is_int(v) and v >= 0, 'an int >= 0'),
    ('schedule.warmup_epochs', lambda v: _is_number(v) and v >= 0, 'a number >= 0'),
    ('seed', lambda v: _is_int(v) and -2**63 <= v < 2**63, 'an int of 64 bits'),
    ('schedule.end_lr_fraction', lambda v: _is_number(v) and 0 <= v <= 1,
     'in [0, 1] (the rate the schedule reaches at total_steps, as a fraction of the peak)'),
    ('min_fsdp_size', lambda v: _is_int(v) and v >= 0, 'an int >= 0'),
    ('optimizer.grad_clip_norm', lambda v: v is None or (_is_number(v) and v >= 0),
     'a number >= 0 (0: no clipping)'),
    ('optimizer.weight_decay', lambda v: _is_number(v) and v >= 0, 'a number >= 0'),
    ('optimizer.b1', lambda v: _is_number(v) and 0 <= v < 1, 'in [0, 1)'),
    ('optimizer.b2', lambda v: _is_number(v) and 0 <= v < 1, 'in [0, 1)'),
    ('optimizer.eps', lambda v: _is_number(v) and v > 0, 'a positive number'),
    ('optimizer.momentum', lambda v: _is_number(v) and 0 <= v < 1, 'in [0, 1)'),
    ('optimizer.mu_dtype', lambda v: v in (None, 'float32', 'bfloat16'),
     "'float32' or 'bfloat16'"),
    ('input.mixup_alpha', lambda v: _is_number(v) and v >= 0, 'a number >= 0 (0 disables it)'),
    ('input.cutmix_alpha', lambda v: _is_number(v) and v >= 0,
     'a number >= 0 (0 disables it)'),
    ('input.mix_switch_prob', lambda v: _is_number(v) and 0 <= v <= 1, 'in [0, 1]'),
    ('input.source', lambda v: v in ('tfds', 'folder'), "'tfds' or 'folder'"),
    # (an empty split of an image folder read the folder's root: its splits as classes)
    ('input.train_split', lambda v: isinstance(v, str) and v.strip() != '',
     "a split name: 'train', a tfds slice 'train[:99%]', or an image folder's sub-folder"),
    ('input.eval_split', lambda v: isinstance(v, str) and v.strip() != '',
     "a split name: 'test', 'validation', a tfds slice 'train[99%:]', or an image "
     "folder's sub-folder"),
    ('input.shuffle_buffer', lambda v: _is_int(v) and v >= 1,
     'a positive int (examples; only the tfds source uses it)'),
    ('input.threads', lambda v: v is None or (_is_int(v) and v >= 1),
     'a positive int, or None (tf.data decides)'),
)


def _check_ranges(config) -> None:
  for field, ok, what in _RANGES:
    node, *rest = field.split('.')
    if node not in config or (rest and rest[0] not in config[node]):
      continue  # an optional field a config leaves out
    value = config[node][rest[0]] if rest else config[node]
    if not ok(value):
      raise ConfigError(f'config.{field}={value!r} must be {what}')


def _warn_if_a_new_zero_head_is_frozen(config, labels) -> None:
  """A warning where config.trainable / freeze freeze a head that starts at zero (a new
  head of a ViT, Swin or BiT): its output is its bias, no layer below gets a gradient,
  and the run trains nothing (it finished at loss ln(classes) without a word)."""
  from vit_jax.checkpoints import tree  # pylint: disable=g-import-not-at-top
  if models.family_of(config.model) not in ('vit', 'swin', 'bit'):
    return  # (a ResNet's fc starts random)
  if config.get('init_from') and config.get('init_head') == 'keep':
    return  # the head is the weights'
  head = [label for name, label in tree.flatten(labels).items() if name.startswith('head/')]
  if head and all(label == 'frozen' for label in head):
    logging.warning(
        'config.trainable / config.freeze freeze the head, which starts at zero (a new '
        'head): the logits stay at its bias, no layer below it gets a gradient, and the run '
        'trains nothing. Leave the head trainable, or keep a trained one '
        '(--config.init_head=keep with --config.init_from).')


def _warn_batch_norm_not_frozen(batch_stats, labels) -> None:
  """A warning where config.trainable / freeze freeze BatchNorm layers' scale and bias
  while config.model.bn_frozen is False: those layers still normalise with each batch's
  statistics in training and update their running statistics (the pretrained ones)."""
  from vit_jax.checkpoints import tree  # pylint: disable=g-import-not-at-top
  layers = {name.rsplit('/', 1)[0] for name in tree.flatten(batch_stats)}  # .../mean, .../var
  labels = tree.flatten(labels)
  frozen = [layer for layer in sorted(layers)
            if all(label == 'frozen' for name, label in labels.items()
                   if name.startswith(layer + '/'))]
  if frozen:
    every = len(frozen) == len(layers)
    logging.warning(
        'config.trainable / config.freeze freeze the scale and bias of %s BatchNorm layers '
        '(%s), but config.model.bn_frozen=False: in training they still normalise with each '
        "batch's statistics and update their running statistics. To keep them as loaded "
        "(a linear probe, timm's FrozenBatchNorm2d), add --config.model.bn_frozen=True.",
        'all' if every else f'{len(frozen)} of the {len(layers)}',
        ', '.join(frozen[:3]) + (', ...' if len(frozen) > 3 else ''))


def _check_preprocessing(config) -> None:
  """config.input.pp_train and pp_eval: their ops exist and take their arguments, they
  give the model's image size (where the spec fixes it, for the families whose input size
  is fixed: ViT, Swin) and, with an `onehot`, its number of classes."""
  try:
    from vit_jax.data import preprocess_ops  # pylint: disable=g-import-not-at-top
  except ImportError:  # no TensorFlow: the input pipeline cannot run, and says so itself
    return
  size, classes = config.model.image_size, config.model.get('num_classes')
  # (The convolutional families take any size: evaluation at another resolution,
  # rectangular crops.)
  fixed_size = models.fixed_input_size(models.family_of(config.model))
  if not classes:  # 0 or None: a features model, no logits
    raise ConfigError(
        f'config.model.num_classes={classes} builds a model without a classification head '
        '(it gives features), which cannot be trained on labels: set it to the number of '
        'classes, as in the onehot(...) of config.input.pp_train.')
  for field in ('pp_train', 'pp_eval'):
    spec = config.input.get(field)
    if not spec or not spec.strip():
      raise ConfigError(
          f'config.input.{field}={spec!r} is empty: give the preprocessing, e.g. '
          f"'decode|resize({size})|{models.pixel_scaling(models.family_of(config.model))}|"
          f"onehot({classes})' "
          '(docs/data.md lists the ops)')
    try:
      made, size_op, onehot_classes = preprocess_ops.output_spec(spec)
    except ValueError as e:
      raise ConfigError(f'config.input.{field}: {e}') from e
    _check_decode_and_onehot(field, spec, onehot_classes, classes, preprocess_ops)
    _check_example_keys(field, spec, preprocess_ops)
    channels, wanted = preprocess_ops.decoded_channels(spec), config.model.get('in_channels', 3)
    if channels is not None and channels != wanted:  # (a traceback at the first step)
      raise ConfigError(
          f'config.input.{field}={spec!r} decodes {channels}-channel images, but the model '
          f'takes config.model.in_channels={wanted}: set --config.model.in_channels='
          f'{channels}, or decode({wanted}) in config.input.pp_train and pp_eval.')
    random_ops = [name for name, _ in preprocess_ops.ops(spec)
                  if name in preprocess_ops.RANDOM_OPS]
    if field == 'pp_eval' and random_ops:  # (it was accepted without a word)
      logging.warning(
          'config.input.pp_eval=%r has random ops (%s): evaluation gives every example the '
          'same fixed seed, so each image is augmented the same way at every evaluation '
          '(e.g. all flipped, or none) rather than not at all. Evaluate with '
          "deterministic ops, e.g. 'decode|resize(%d)|...'.", spec, ', '.join(random_ops),
          size)
    if made is None:
      stops = ('the first image of another size stops the run '
               f'{"at that step" if field == "pp_train" else "at its first evaluation"}')
      if size_op:  # resize_small last: images of other aspect ratios get other sizes
        raise ConfigError(
            f'config.input.{field}={spec!r} does not give images of one size (its last '
            f'size op, {size_op}, keeps the aspect ratio): batches need one, and {stops}; '
            f'add central_crop({size}) or resize({size}) after it.')
      if field == 'pp_eval':  # the last batch's padding needs the size before any image
        raise ConfigError(
            f'config.input.pp_eval={spec!r} resizes nothing: evaluation pads its last batch '
            'with blank examples, whose size the spec must fix before any image is read. '
            f'Add resize({size}) (or central_crop({size})) after decode.')
      logging.warning(
          'config.input.%s=%r resizes nothing: every image must already be %dx%d (batches '
          'need one size; %s). Add resize(%d) unless the dataset is of one size.', field,
          spec, size, size, stops, size)
    elif fixed_size and made != (size, size):
      h, w = made
      raise ConfigError(
          f'config.input.{field}={spec!r} makes {h}x{w} images (its {size_op}), but '
          f'config.model.image_size={size}: change the size in {size_op}(...) to {size}, or '
          f'set --config.model.image_size={h}' + (' (a square image)' if h != w else '') +
          ' to train at that resolution (a pretrained position embedding is resampled).')
    if onehot_classes is not None and classes and onehot_classes != classes:
      raise ConfigError(
          f'config.input.{field}={spec!r} one-hot encodes {onehot_classes} classes, but '
          f'config.model.num_classes={classes}: make them the same (onehot({classes}) or '
          f'--config.model.num_classes={onehot_classes}).')
  _warn_if_pixel_scales_differ(config, preprocess_ops)


def _check_example_keys(field, spec, preprocess_ops) -> None:
  """The sources' examples hold 'image' and 'label', and a step needs both: a onehot of
  another key, or a keep/drop that loses one, was a KeyError in the first batch."""
  ops = preprocess_ops.ops(spec)
  for i, (name, args) in enumerate(ops):
    later_random = [n for n, _ in ops[i + 1:] if n in preprocess_ops.RANDOM_OPS]
    if name == 'keep' and later_random and 'rng' not in args['keys']:
      raise ConfigError(
          f"config.input.{field}={spec!r}: keep(...) drops 'rng', which the random op "
          f"{later_random[0]} after it draws from: add 'rng' to the kept keys")
    if name == 'onehot' and args['key'] != 'label':
      raise ConfigError(
          f"config.input.{field}={spec!r}: onehot(key={args['key']!r}) reads a key the "
          "examples do not have; they hold 'image' and 'label' (onehot's default key)")
    lost = {'keep': [k for k in ('image', 'label') if k not in args.get('keys', ())],
            'drop': [k for k in ('image', 'label') if k in args.get('keys', ())]}.get(name)
    if lost:
      raise ConfigError(
          f'config.input.{field}={spec!r}: {name}(...) loses {", ".join(map(repr, lost))}, '
          "which every training and evaluation step needs (keep('image', 'label', ...))")


def _check_decode_and_onehot(field, spec, onehot_classes, classes, preprocess_ops) -> None:
  """A spec must decode the (encoded) images before its other image ops, and give one-hot
  labels: the train and evaluation steps take (soft) label vectors, not class ids."""
  problem = preprocess_ops.decode_problem(spec)
  if problem:
    raise ConfigError(
        f'config.input.{field}={spec!r} {problem}: the sources give encoded images (JPEG, '
        f"PNG bytes), so start it with 'decode|'.")
  if onehot_classes is None:
    raise ConfigError(
        f'config.input.{field}={spec!r} has no onehot: the training and evaluation steps '
        f"take one-hot labels, so end it with '|onehot({classes})'.")


def _warn_if_pixel_scales_differ(config, preprocess_ops) -> None:
  """A model trained on one pixel scale and evaluated on another (or trained on raw 0..255
  pixels) loses accuracy without any error: warn. Scales are compared as the (mean, std)
  they amount to, so value_range(-1, 1) and normalize(0.5, 0.5) are the same."""
  train, evaluation = config.input.get('pp_train'), config.input.get('pp_eval')
  if not train or not evaluation:
    return
  scales = [preprocess_ops.pixel_mean_std(spec) for spec in (train, evaluation)]
  def said(spec):
    ops = [f'{n}({", ".join(f"{k}={v!r}" for k, v in a.items())})'
           for n, a in preprocess_ops.ops(spec) if n in ('value_range', 'normalize')]
    return ' then '.join(ops) or 'none (0..255)'
  same = (scales[0] is None and scales[1] is None) or (
      None not in scales and all(np.allclose(a, b, rtol=1e-4, atol=1e-6)
                                 for a, b in zip(scales[0], scales[1])))
  if not same:
    logging.warning(
        'config.input.pp_train scales pixels with %s but pp_eval with %s: the model is '
        'evaluated on values it was not trained on. Use the same value_range/normalize in '
        'both.', said(train), said(evaluation))
  elif scales[0] is None:
    logging.warning(
        'config.input.pp_train and pp_eval have no value_range(...) or normalize(...): '
        'pixels reach the model as 0..255, which trains poorly (the recipes use '
        "value_range(-1, 1)).")
