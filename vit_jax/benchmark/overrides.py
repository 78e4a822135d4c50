"""FIELD=VALUE overrides of the benchmark's config (`--set`, `--variant`): what a FIELD
names in the training config, which fields an override may set, and how timm's model
follows them in a comparison.

A FIELD is a model config field (`remat_policy`, `resnet.width_factor`), a field of a
training config group (`mesh.fsdp`, `optimizer.grad_clip_norm`, `model.dtype`), or any
training config path after `config.` (`config.min_fsdp_size`).
"""

import ast
import re

from absl import app

from vit_jax import models
from vit_jax.train import defaults

NUM_CLASSES = 1000  # the benchmark's classes (model_speed), as the timm model compared


def parse(items, flag: str = 'set', name: str | None = None) -> dict:
  """FIELD=VALUE strings as a dict; a VALUE that is not a Python literal stays a string.
  FIELD is a model config field or a training config path (`config_path`). Errors quote
  each item as `--flag=[name:]item`."""
  out, paths = {}, {}
  shown = lambda item: f'--{flag}=' + repr(f'{name}:{item}' if name else item)
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or not key:
      raise app.UsageError(f'{shown(item)}: write FIELD=VALUE, e.g. '
                           f"--{flag}=remat_policy=\"'dots'\"")
    path = config_path(key)
    if path in paths:
      raise app.UsageError(f'{shown(item)}: config.{path} is already set by '
                           f'{shown(paths[path])}')
    paths[path] = item
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


VARIANT = 'variant'  # the name of the variant made of the --variant items without a NAME
_NAME = re.compile(r'[A-Za-z][A-Za-z0-9_\-]*')


def parse_variants(items) -> dict[str, dict]:
  """`--variant=[NAME:]FIELD=VALUE` strings as {NAME: overrides}, in the order the names
  first appear. The items without a NAME form one more variant of their own, named
  `VARIANT` (they are not shared by the named ones: `--set` is what all steps share).

  A FIELD holds no ':', so the NAME is what precedes the first ':' before the '='.
  """
  groups: dict[str, list[str]] = {}
  for item in items:
    key, sep, value = item.partition('=')
    name, colon, field = key.partition(':')
    if not colon:
      name, field = VARIANT, key
    elif not _NAME.fullmatch(name) or name == VARIANT:
      raise app.UsageError(
          f'--variant={item!r}: a variant NAME starts with an ASCII letter and holds letters, '
          f"digits, '_' and '-', and is not {VARIANT!r} (the name of the items without one), "
          'e.g. --variant=bf16:dtype="\'bfloat16\'"')
    groups.setdefault(name, []).append(f'{field}{sep}{value}')
  return {name: parse(fields, 'variant', None if name == VARIANT else name)
          for name, fields in groups.items()}


def merge(base: dict, variant: dict) -> dict:
  """base with variant's fields over it; a field named two ways (`num_layers` and
  `model.num_layers`) counts once, with variant's value."""
  replaced = {config_path(k) for k in variant}
  return {**{k: v for k, v in base.items() if config_path(k) not in replaced},
          **variant}


# What an override may set: the parts of the training config that shape the timed step.
_SETTABLE = ('model', 'optimizer', 'schedule', 'mesh', 'min_fsdp_size', 'loss', 'nonfinite',
             'trainable', 'freeze', 'seed')
# Fields of other groups that the train step reads: mixup and cutmix run inside it.
_SETTABLE_PATHS = ('input.mixup_alpha', 'input.cutmix_alpha', 'input.mix_switch_prob')
# Set by the benchmark's own flags, or fixed so that timm runs the same model.
_FIXED = {'batch_size': 'set by --batch', 'accum_steps': 'set by --accum_steps',
          'keep_host_memory': 'set by --keep_host_memory',
          'compilation_cache_dir': 'set by --compilation_cache_dir',
          'model.image_size': 'set by --resolution', 'model.name': 'set by --model',
          'model.num_classes': f'fixed at {NUM_CLASSES}, as in the timm model compared'}


def config_path(key: str) -> str:
  """The training-config path an override's FIELD names: a model config field as it is
  (`remat_policy`, `resnet.width_factor`); a path from a training config field
  (`mesh.fsdp`, `optimizer.grad_clip_norm`, `model.dtype`); or any path after `config.`
  (`config.min_fsdp_size`)."""
  if key.startswith('config.'):
    return key[len('config.'):]
  if '.' in key and key.split('.')[0] in defaults.FIELD_DOCS:
    return key
  return 'model.' + key


def _check_settable(path: str) -> None:
  if path in _FIXED:
    raise defaults.ConfigError(f'config.{path} is {_FIXED[path]}, not by an override')
  head = path.split('.')[0]
  if head in defaults.FIELD_DOCS and head not in _SETTABLE and path not in _SETTABLE_PATHS:
    raise defaults.ConfigError(
        f'config.{path} is not part of the step the benchmark times; an override may set '
        f'{", ".join(_SETTABLE + _SETTABLE_PATHS)}')


# What the inference step reads: the model and how it is laid out over the devices.
_INFER_SETTABLE = ('model', 'mesh', 'min_fsdp_size', 'seed')


def check_for_mode(overrides: dict | None, mode: str) -> None:
  """A `defaults.ConfigError` for an override the timed step of `mode` does not read:
  in 'infer', an optimizer, schedule, loss or mixup field (an inference A/B of
  --variant=optimizer.name=... timed two identical steps and printed their noise as a
  ratio)."""
  if mode != 'infer':
    return
  for key, value in (overrides or {}).items():
    path = config_path(key)
    if path.split('.')[0] not in _INFER_SETTABLE:
      raise defaults.ConfigError(
          f'config.{path}={value!r} is not read by the inference step --mode=infer times '
          f'(only {", ".join(_INFER_SETTABLE)} fields are): drop it, or time it with '
          '--mode=train')


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def set_path(config, path: str, value) -> None:
  """config's field at a dotted path set to value; a path that names no field is an
  error (a typo would otherwise add a field nothing reads), as is a whole group. One int
  given for a field that holds a pair of ints is both (patch_size=8 is (8, 8), as the
  model registry reads it)."""
  *parents, leaf = path.split('.')
  node = config
  for i, part in enumerate(parents):
    child = node.get(part) if hasattr(node, 'get') else None
    if not hasattr(child, 'keys'):
      raise defaults.ConfigError(
          f"config.{path}: config.{'.'.join(parents[:i + 1])} is not a group of fields")
    node = child
  where = 'config' + ''.join(f'.{p}' for p in parents)
  if leaf not in node:
    hint = (f'; a training config field is config.{leaf}'
            if parents == ['model'] and leaf in defaults.FIELD_DOCS else '')
    raise defaults.ConfigError(f'config.{path}: {where} has no field {leaf!r}; its fields: '
                               f'{sorted(node.keys())}{hint}')
  if hasattr(node[leaf], 'keys'):
    raise defaults.ConfigError(f'config.{path} is a group of fields: set them one by one, '
                               f'e.g. config.{path}.{sorted(node[leaf].keys())[0]}=...')
  current = node[leaf]
  if (_is_int(value) and isinstance(current, tuple) and len(current) == 2
      and all(_is_int(v) for v in current)):
    value = (value, value)  # one int for a pair of ints (rows, cols): patch_size=8
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise defaults.ConfigError(f'config.{path}={value!r}: {e}') from e


def apply(config, overrides: dict | None) -> None:
  """Sets `overrides` in `config`; a field that names nothing, that the benchmark sets from
  its own flags, or that is not part of the timed step is a `defaults.ConfigError`."""
  for key, value in (overrides or {}).items():
    path = config_path(key)
    _check_settable(path)
    set_path(config, path, value)


# Model fields that change how vit_jax computes, not what: a timm comparison may set them.
_HOW = ('remat_policy', 'scan_layers', 'layer_loop', 'attention_impl', 'gelu_approximate',
        'layernorm_eps', 'custom_vjp')
# ViT fields that timm's VisionTransformer takes as keyword arguments (and mlp_dim, as
# mlp_ratio); training config groups that leave the model and optimizer as timm runs them.
_TIMM_VIT = {'num_layers': 'depth', 'hidden_size': 'embed_dim', 'num_heads': 'num_heads',
             'dropout_rate': 'drop_rate', 'attention_dropout_rate': 'attn_drop_rate',
             'drop_path_rate': 'drop_path_rate'}
_TIMM_SAME_STEP = ('mesh', 'min_fsdp_size', 'seed')


def timm_kwargs(model: str, overrides: dict | None) -> dict:
  """timm.create_model's keyword arguments for the model vit_jax runs with `overrides`
  (a ViT's depth, width, heads, MLP ratio and dropout rates), so that a comparison times
  the same model; a `defaults.ConfigError` for an override timm's side cannot follow."""
  config = models.get_config(model)
  is_vit = models.family_of(config) == 'vit'
  out, shape = {}, {}
  for key, value in (overrides or {}).items():
    path = config_path(key)
    head, _, field = path.partition('.')
    if head in _TIMM_SAME_STEP or (head == 'model' and field in _HOW):
      continue
    if head == 'model' and is_vit and (field in _TIMM_VIT or field == 'mlp_dim'):
      if field in _TIMM_VIT:
        out[_TIMM_VIT[field]] = value
      if field in ('hidden_size', 'mlp_dim'):
        shape[field] = value
      continue
    raise defaults.ConfigError(
        f'config.{path}={value!r}: the timm model compared cannot follow it (timm runs '
        f'{model} as registered, with AdamW and clipping at 1, autocast from --dtype); set '
        f'it without --compare, or compare with --variant')
  if shape:  # timm's MLP width is int(embed_dim x mlp_ratio): a hair over, not under
    out['mlp_ratio'] = (shape.get('mlp_dim', config.mlp_dim)
                        / shape.get('hidden_size', config.hidden_size)) * (1 + 1e-9)
  return out
