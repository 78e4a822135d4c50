r"""Converts ViT weights between formats: `python -m vit_jax.convert --input=A --output=B`.

    python -m vit_jax.convert --input=ViT-B_16.npz --output=vit_b16.safetensors   # timm
    python -m vit_jax.convert --input=timm.safetensors --output=vit.npz --model=vit_tiny_patch16_224
    python -m vit_jax.convert --input=hf_dir/model.safetensors --output=ckpt --to=orbax
    python -m vit_jax.convert --input=workdir --output=hf_dir --to=hf
    python -m vit_jax.convert --input=workdir --to=hf hf_dir   # the output as an argument

Reads anything `vit_jax.checkpoints.pretrained.load_checkpoint` reads: an original-layout
`.npz`, a timm or transformers state dict (`.safetensors`, `.bin`, `.pt`, `.pth`; a
transformers file needs its `config.json` beside it, or the directory holding both), or
an Orbax workdir / checkpoint directory of this project. Writes

  npz    the original release's `.npz` layout (`--output=NAME.npz`);
  timm   a timm `VisionTransformer` state dict (`--output=NAME.safetensors|.pth|.bin|.pt`);
         a `.safetensors` file records the model config (heads, GELU form, epsilons),
         class names and evaluation preprocessing in its metadata, which vit_jax's
         loaders read back (a torch file cannot: a note says what it loses);
  hf     a directory with `model.safetensors` and `config.json` that
         `transformers.ViTForImageClassification.from_pretrained(DIR)` loads;
  orbax  a checkpoint directory in this project's layout ({step}/state with
         {'params': ...}, {step}/meta with the model config and the class names), which
         `load_checkpoint`, `config.init_from` and the prediction tools read back.

`--to` defaults from the output's name (`.npz` -> npz, a state-dict file -> timm); a
directory needs `--to=hf` or `--to=orbax`. Class names known to the input (Orbax meta,
transformers id2label) are written where the output can hold them (transformers
id2label/label2id, Orbax meta). `--model` names a registered model for what the input does
not record: the GELU form and LayerNorm epsilon of an `.npz`, the number of heads of a
timm state dict.
"""

import dataclasses
import json
import os
import re
import shutil
import sys

from absl import app
from absl import flags
from absl import logging
import numpy as np

from vit_jax import cli_flags
from vit_jax import tensorflow_startup

FORMATS = ('npz', 'timm', 'hf', 'orbax')
_STATE_DICT_EXTS = ('.safetensors', '.pth', '.bin', '.pt')
_READ_EXTS = ('.npz', '.index.json') + _STATE_DICT_EXTS
HF_WEIGHTS = 'model.safetensors'
HF_CONFIG = 'config.json'
HF_PROCESSOR = 'preprocessor_config.json'  # for AutoImageProcessor and pipeline()
ORBAX_STEP = 0

_INPUT = flags.DEFINE_string('input', None, 'Weights to read: .npz, timm/transformers '
                             'state dict (.safetensors/.bin/.pt/.pth), Orbax directory.')
_OUTPUT = flags.DEFINE_string('output', None, 'Where to write: a file (npz, timm) or a '
                              'directory (hf, orbax).')
_TO = flags.DEFINE_enum('to', None, FORMATS, 'Output format; default from the output name '
                        '(.npz -> npz, .safetensors/.pth/.bin/.pt -> timm).')
_MODEL = flags.DEFINE_string('model', None, 'Registered model name for what the input does '
                             'not record (npz numerics, timm heads), optionally with fields '
                             "changed: 'NAME,num_heads=8', or 'num_heads=8' alone.")
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing output.')


class ConversionError(ValueError):
  """A conversion that cannot be done as asked; the message says why and what to do."""


@dataclasses.dataclass
class Result:
  """What `run` read and wrote (for the command line's summary)."""
  to: str
  output: str
  kind: str          # the input's kind: npz, timm, hf or orbax
  model_name: str
  param_count: int
  config: object     # the model config (ml_collections.ConfigDict)
  class_names: list | None
  written_bytes: int | None  # None for a remote output
  notes: list = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    c = self.config
    classes = f', {len(self.class_names)} class names' if self.class_names else ''
    if _family(self) == 'vit':
      layers = f"{c.num_layers} layer{'' if c.num_layers == 1 else 's'}"
      shape = (f'{layers} x {c.hidden_size} wide, {c.num_heads} heads, '
               f'{c.image_size}px, {c.num_classes} classes{classes}')
    else:
      shape = (f'{_family(self)} family, {c.get("image_size")}px, '
               f'{c.get("num_classes")} classes{classes}')
    line = (f'read {self.kind} {self.model_name} ({self.param_count:,} params; {shape}); '
            f'wrote {self.to} to {self.output}'
            + (f' ({_human(self.written_bytes)})' if self.written_bytes is not None else ''))
    return line + ''.join(f'\nnote: {n}' for n in self.notes)


def _human(n: int) -> str:
  for unit in ('B', 'KB', 'MB', 'GB'):
    if n < 1024 or unit == 'GB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  return f'{n} B'


def _size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
             for f in files)


def _target_format(output: str, to: str | None) -> str:
  """The format to write, checked against the output's name (so it reads back)."""
  name = output.rstrip('/').lower()
  if to is not None and to not in FORMATS:
    raise ConversionError(f'unknown --to={to!r}: expected one of {", ".join(FORMATS)}')
  if to is None:
    if name.endswith('.npz'):
      return 'npz'
    if name.endswith(_STATE_DICT_EXTS):
      return 'timm'
    raise ConversionError(
        f'cannot tell the output format from {output!r}: name a .npz file (npz) or a '
        '.safetensors/.pth/.bin/.pt file (timm), or pass --to=hf or --to=orbax to write a '
        'directory')
  if to == 'npz' and not name.endswith('.npz'):
    raise ConversionError(f'--to=npz writes a .npz file; {output!r} does not end in .npz')
  if to == 'timm' and not name.endswith(_STATE_DICT_EXTS):
    raise ConversionError(f'--to=timm writes a state dict file; name it .safetensors, '
                          f'.pth, .bin or .pt (got {output!r})')
  if to in ('hf', 'orbax') and name.endswith(_READ_EXTS):
    raise ConversionError(f'--to={to} writes a directory; {output!r} is a file name '
                          f'(for transformers, {HF_WEIGHTS} and {HF_CONFIG} go in the '
                          'directory)')
  return to


def _gfile():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def _exists(path: str) -> bool:
  return _gfile().exists(path) if '://' in path else os.path.exists(path)


def _isdir(path: str) -> bool:
  return _gfile().isdir(path) if '://' in path else os.path.isdir(path)


def _listdir(path: str) -> list:
  return ([e.rstrip('/') for e in _gfile().listdir(path)] if '://' in path
          else os.listdir(path))


def _is_orbax_dir(path: str) -> bool:
  """An Orbax checkpoint directory (step folders or state/ + meta/), or an empty one."""
  entries = _listdir(path)
  if 'state' in entries:
    return True
  return all(e.isdigit() or '.orbax-checkpoint-tmp' in e for e in entries)


def _check_output(output: str, to: str, overwrite: bool) -> None:
  """Refuses to replace anything unless `overwrite`; deletes nothing (`_put_in_place`
  replaces the output once the new one is written in full)."""
  if to == 'hf':
    if _exists(output) and not _isdir(output):
      raise ConversionError(f'{output} exists and is not a directory; --to=hf writes a '
                            'directory')
    existing = [os.path.join(output, f) for f in (HF_WEIGHTS, HF_CONFIG, HF_PROCESSOR)
                if _exists(os.path.join(output, f))]
    if existing and not overwrite:
      raise ConversionError(f'{" and ".join(existing)} already exist(s); pass --overwrite '
                            'to replace')
    return  # with overwrite the three files are replaced, the folder's others kept
  if not _exists(output):
    return
  if to == 'orbax' and _isdir(output) and not _listdir(output):
    return  # an empty directory: nothing to replace
  if not overwrite:
    raise ConversionError(f'{output} already exists; pass --overwrite to replace it')
  if _isdir(output) and (to != 'orbax' or not _is_orbax_dir(output)):
    raise ConversionError(f'{output} is a directory that is not an Orbax checkpoint; '
                          'refusing to delete it even with --overwrite')


def _staging_path(output: str, name: str | None = None, kind: str = 'new') -> str:
  """A hidden sibling of `output` named after `name` (default: the output's own name),
  whose extension the writers go by: kind 'new' for writing the whole output before
  anything existing is replaced, 'old' for the existing output set aside meanwhile. The
  process and host are in the name, for clearing what a killed conversion left."""
  parent, base = os.path.split(os.path.abspath(output).rstrip('/'))
  return os.path.join(parent, f'.convert-{kind}-{os.getpid()}@{_host()}-{name or base}')


def _host() -> str:
  import socket  # pylint: disable=g-import-not-at-top
  return socket.gethostname().replace('/', '_')


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's
    return True
  return True


def _clear_leftovers(output: str, name: str) -> None:
  """Staging files of conversions to `output` killed before they cleaned up (kill -9,
  out of memory): removed, so they no longer fill the disk unseen. An old output set aside
  by one killed in the moment between its two renames is put back first. Only the files
  of this host's processes that no longer run are touched (on a shared file system,
  another host's conversion may still be writing its own)."""
  parent = os.path.dirname(output)
  pattern = re.compile(
      rf'\.convert-(new|old)-(\d+)@{re.escape(_host())}-{re.escape(name)}$')
  try:
    entries = sorted(os.listdir(parent))
  except OSError:
    return
  for entry in entries:
    found = pattern.match(entry)
    if not found or int(found.group(2)) == os.getpid() or _process_alive(int(found.group(2))):
      continue
    path = os.path.join(parent, entry)
    if found.group(1) == 'old' and not os.path.lexists(output):
      logging.warning('Putting back %s, the output a killed conversion (pid %s) had set '
                      'aside, as %s', path, found.group(2), output)
      os.replace(path, output)
      continue
    logging.warning('Removing %s, left by a conversion (pid %s) that was killed',
                    path, found.group(2))
    _remove(path)


def _put_in_place(staged: str, output: str, to: str) -> None:
  """Moves the written `staged` output to `output`, replacing what was there: the old
  output is renamed aside first and deleted last, so no moment leaves neither."""
  if to == 'hf':  # the three files into the (possibly existing) folder
    os.makedirs(output, exist_ok=True)
    for name in sorted(os.listdir(staged)):
      os.replace(os.path.join(staged, name), os.path.join(output, name))
    os.rmdir(staged)
    return
  old = None
  if os.path.isdir(output) and not os.listdir(output):
    os.rmdir(output)
  elif os.path.exists(output):
    old = _staging_path(output, kind='old')
    os.replace(output, old)
  try:
    os.replace(staged, output)
  except OSError:
    if old is not None:  # the old output back where it was
      os.replace(old, output)
    raise
  if old is not None:
    _remove(old)


def _remove(path: str) -> None:
  if os.path.isdir(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.exists(path):
    os.remove(path)


def _same_path(a: str, b: str) -> bool:
  """The same file or folder, links followed (an output linked to the input is it)."""
  if '://' in a or '://' in b:
    return a.rstrip('/') == b.rstrip('/')
  return os.path.realpath(a) == os.path.realpath(b)


def _contains(folder: str, path: str) -> bool:
  if '://' in folder or '://' in path:
    folder, path = folder.rstrip('/'), path.rstrip('/')
  else:
    folder, path = os.path.realpath(folder), os.path.realpath(path)
  return path == folder or path.startswith(folder + '/')


def _read(input_path: str, model):
  from vit_jax.checkpoints import pretrained  # pylint: disable=g-import-not-at-top
  if not os.path.exists(input_path):
    raise ConversionError(f'input {input_path} does not exist')
  if os.path.isfile(input_path) and not input_path.endswith(_READ_EXTS):
    raise ConversionError(
        f'cannot tell what kind of checkpoint {input_path} is: expected .npz, a '
        'timm/transformers state dict (.safetensors/.bin/.pt/.pth) or an Orbax directory')
  if model is not None:  # NAME, NAME,field=value,... or field=value,... (as predict's)
    try:
      pretrained.parse_model_spec(model)
    except ValueError as e:
      raise ConversionError(f'--model: {e}') from None
  if os.path.isdir(input_path):
    # Orbax refuses relative paths ('Checkpoint path should be absolute').
    input_path = os.path.abspath(input_path)
  try:
    return pretrained.load_checkpoint(input_path, model=model, runnable_here=False)
  except Exception as e:  # pylint: disable=broad-except
    # Anything a foreign or damaged file raises (safetensors, zip, pickle, Orbax, a
    # missing key) is a "cannot read" for the user, not a bug to show a traceback of.
    raise ConversionError(f'cannot read {input_path}: {type(e).__name__}: {e}') from e


def _timm_input_name(config) -> str:
  """A registered timm name with the structure of a timm checkpoint read without --model.

  `load_checkpoint` names such a checkpoint 'vit_base_patch16_224' whatever its size;
  this keeps that name only where it fits, so that outputs do not record a wrong one.
  """
  from vit_jax.models import registry  # pylint: disable=g-import-not-at-top
  fields = ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim')
  def layers(c):
    return None if c.get('resnet') is None else tuple(c.resnet.num_layers)
  def same(r):
    return (all(r[f] == config[f] for f in fields) and layers(r) == layers(config) and
            tuple(np.atleast_1d(r.patch_size)) == tuple(np.atleast_1d(config.patch_size)))
  names = [n for n in registry.list_models('vit') if n.startswith('vit_')]
  names.sort(key=lambda n: (not n.endswith(f'_{config.image_size}'), n != config.name, n))
  for name in names:
    if same(registry.get_config(name)):
      return name
  return 'timm_vit'


def _float32_tree(params):
  """Leaves as numpy; non-numpy floats (bfloat16) as float32, which torch can hold."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints import tree  # pylint: disable=g-import-not-at-top
  return jax.tree.map(tree.widened, params)


# The original release's hybrid stem: w / (std + 1e-5), GroupNorm eps 1e-6.
_RELEASE_STEM = {'stdconv_eps': 1e-5, 'stdconv_eps_in_sqrt': False, 'gn_eps': 1e-6}


def _release_numerics_note(config, output):
  """A note when an .npz will not read back with the numerics the params were made for."""
  stem = config.get('resnet')
  stem_differs = stem is not None and any(
      stem.get(k, v) != v for k, v in _RELEASE_STEM.items())
  if (config.get('gelu_approximate', True) and config.get('layernorm_eps', 1e-6) == 1e-6
      and not stem_differs):
    return None
  gelu = 'tanh' if config.get('gelu_approximate', True) else 'exact'
  hint = (f' (e.g. --model={config.name} / config.model)'
          if str(config.get('name', '')).startswith('vit_') else '')
  stem_words = (f', and a ResNet stem with stdconv_eps {stem.stdconv_eps:g} '
                f'({"inside" if stem.get("stdconv_eps_in_sqrt") else "outside"} the square '
                f'root) and GroupNorm eps {stem.gn_eps:g}' if stem_differs else '')
  return (f'.npz files do not record numerics; these weights use {gelu} GELU and '
          f'LayerNorm eps {config.layernorm_eps:g}{stem_words}, while {output} reads back '
          "with the original release's (tanh GELU, eps 1e-6"
          f'{", its stem" if stem_differs else ""}) unless given a model name{hint}')


def _preprocessing_note(ckpt, output, shown=None):
  """A note when predict and init_from, reading the written `output` back, would take
  another evaluation preprocessing than the weights' (`output` records none, and what
  they assume differs: for a convolutional model, whose weights do not fix the image
  size, the size of the timm model it is read as)."""
  if not ckpt.pp_eval:
    return None
  from vit_jax import inference  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints import pretrained  # pylint: disable=g-import-not-at-top
  from vit_jax.data import preprocess_ops  # pylint: disable=g-import-not-at-top
  label_ops = preprocess_ops.LABEL_OPS
  pp = preprocess_ops.without_ops(ckpt.pp_eval, label_ops)
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # its warnings name the hidden staging file; the
  try:                                  # note below says what they would
    back = pretrained.load_checkpoint(str(output))
  except Exception:  # pylint: disable=broad-except  (its reader names any problem itself)
    return None
  finally:
    logging.set_verbosity(verbosity)
  default = (preprocess_ops.without_ops(back.pp_eval, label_ops) if back.pp_eval
             else inference.default_pp(back.config.image_size, _family(back)))
  if pp == default:
    return None
  return (f'the evaluation preprocessing {pp!r} is not recorded in '
          f'{os.path.basename(str(shown or output))}: predict reads it back with '
          f'{default!r} unless '
          f"given --pp='{pp}' (.safetensors and Orbax directories record it)")


def _family(ckpt) -> str:
  from vit_jax.models import registry  # pylint: disable=g-import-not-at-top
  return registry.family_of(ckpt.config)


def _write_npz(ckpt, output, notes, shown=None):
  from vit_jax.checkpoints import npz  # pylint: disable=g-import-not-at-top
  shown = shown or output  # the name notes give (`output` may be a staging path)
  family = _family(ckpt)
  if ckpt.class_names:
    notes.append(f'{len(ckpt.class_names)} class names: an .npz holds arrays only, so they '
                 'are not in it; predict prints class indices unless given --labels=FILE '
                 '(or convert to .safetensors or an Orbax directory, which keep them)')
  if family == 'bit':  # the BiT release's .npz layout
    from vit_jax.checkpoints import bit_npz  # pylint: disable=g-import-not-at-top
    bit_npz.save_bit_npz(ckpt.variables(), output)
    pp_note = _preprocessing_note(ckpt, output, shown)
    if pp_note:
      notes.append(pp_note)
    return
  if family != 'vit':
    raise ConversionError(f'.npz export is for ViT and BiT models; this is a {family} '
                          'model: use --to=timm or --to=orbax')
  npz.save_npz(output, ckpt.params)
  pp_note = _preprocessing_note(ckpt, output, shown)
  if pp_note:
    notes.append(pp_note)
  note = _release_numerics_note(ckpt.config, shown)
  if note:
    notes.append(note)


def _write_timm(ckpt, output, notes, shown=None):
  """Writes the timm state dict; a .safetensors file records the model config, class
  names and evaluation preprocessing in its metadata (vit_jax's loaders read them back;
  timm and torch ignore them). A torch file cannot: a note says what a loader loses."""
  from vit_jax.checkpoints import pretrained  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints import state_dict_io  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints import timm_format  # pylint: disable=g-import-not-at-top
  shown = shown or output  # the name notes give (`output` may be a staging path)
  try:
    weights = ckpt.params if _family(ckpt) == 'vit' else ckpt.variables()
    sd = timm_format.to_timm(ckpt.config, _float32_tree(weights))
  except ValueError as e:
    raise ConversionError(f'cannot convert to timm: {e}') from None
  metadata = None
  if output.lower().endswith('.safetensors'):
    try:
      metadata = pretrained.state_dict_metadata(ckpt.config, ckpt.class_names, ckpt.pp_eval)
    except TypeError as e:
      notes.append(f'the model config is not recorded in {shown} (JSON cannot hold it: '
                   f'{e}); load it with load_checkpoint(path, model=config)')
  state_dict_io.write_state_dict(sd, output, metadata=metadata)
  try:
    name, create_args = (timm_format.timm_create_args(ckpt.config) if _family(ckpt) == 'vit'
                         else (timm_format.timm_name(ckpt.config), None))
  except ValueError:
    name = None
  pp_note = _preprocessing_note(ckpt, output, shown) if metadata is None else None
  if pp_note:
    notes.append(pp_note)
  lost = (pretrained.unrecorded_fields(ckpt.config, sd)
          if metadata is None and _family(ckpt) == 'vit' else [])
  if lost:
    model_flag = (f' (--model={ckpt.config.name})'
                  if ckpt.config.get('name') in _registered() else '')
    notes.append(f'{os.path.basename(shown)} is a torch file, which records no model '
                 f'config: read back without one it gets {", ".join(lost)}. Write '
                 '.safetensors to record it, or load it with load_checkpoint(path, '
                 f'model=config){model_flag}')
  if name and _family(ckpt) != 'vit':
    notes.append(f"load it with timm.create_model('{name}', "
                 f'num_classes={ckpt.config.num_classes or 0}).load_state_dict(...)')
  elif name:
    args = ''.join(f', {k}={v!r}' for k, v in create_args.items())
    notes.append(f'timm reads no architecture from a state dict: build the model with '
                 f"vit_jax.checkpoints.create_timm_model(config) or timm.create_model('{name}'"
                 f'{args}) (with GELU {"tanh" if ckpt.config.gelu_approximate else "exact"} '
                 f'and LayerNorm eps {ckpt.config.layernorm_eps:g})')
  elif metadata is not None and _family(ckpt) == 'vit':
    notes.append(f'timm has no model of the architecture of {ckpt.config.get("name")!r}; '
                 'its config (heads, GELU, epsilons) is recorded in the file for vit_jax '
                 '(predict, init_from, load_checkpoint)')


def _registered() -> list[str]:
  from vit_jax.models import registry  # pylint: disable=g-import-not-at-top
  return registry.list_models()


def _write_hf(ckpt, output, notes):
  from vit_jax.checkpoints import hf_format  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints import state_dict_io  # pylint: disable=g-import-not-at-top
  if _family(ckpt) != 'vit':
    raise ConversionError(f'transformers export is for ViT models; this is a {_family(ckpt)} '
                          'model: use --to=timm or --to=orbax')
  try:
    sd = hf_format.to_hf(ckpt.config, _float32_tree(ckpt.params))
  except ValueError as e:
    raise ConversionError(f'cannot convert to transformers: {e}') from None
  hf_config = hf_format.to_hf_config(ckpt.config)
  if not ckpt.config.num_classes:
    notes.append('no classification head: the transformers model has an identity '
                 'classifier (use ViTModel for features)')
  names = ckpt.class_names
  if names and len(names) == ckpt.config.num_classes:
    hf_config.id2label = {i: str(n) for i, n in enumerate(names)}
    hf_config.label2id = {str(n): i for i, n in enumerate(names)}
  elif names:
    notes.append(f'{len(names)} class names for {ckpt.config.num_classes} classes: not '
                 'written')
  hf_config.architectures = ['ViTForImageClassification']
  processor, note = hf_format.image_processor_config(ckpt.pp_eval, ckpt.config.image_size)
  if note:
    notes.append(note)
  os.makedirs(output, exist_ok=True)
  state_dict_io.write_state_dict({k: v.contiguous() for k, v in sd.items()},
                                 os.path.join(output, HF_WEIGHTS), metadata={'format': 'pt'})
  hf_config.to_json_file(os.path.join(output, HF_CONFIG))
  with open(os.path.join(output, HF_PROCESSOR), 'w') as f:
    json.dump(processor, f, indent=2)


def _write_orbax(ckpt, output, input_path):
  from vit_jax.checkpoints import train_state  # pylint: disable=g-import-not-at-top
  meta = {'model': ckpt.config.to_dict(), 'class_names': ckpt.class_names,
          'converted_from': {'path': os.path.abspath(input_path), 'kind': ckpt.kind}}
  if ckpt.pp_eval:
    meta['config'] = {'input': {'pp_eval': ckpt.pp_eval}}
  # JSON has no tuples; make the meta JSON now so that a value JSON cannot hold fails
  # before anything is written.
  meta = json.loads(json.dumps(meta))
  checkpointer = train_state.TrainCheckpointer(
      output if '://' in output else os.path.abspath(output), keep_last=1, async_save=False)
  try:
    state = {'params': ckpt.params}
    if ckpt.model_state:  # BatchNorm running statistics
      state['model_state'] = ckpt.model_state
    checkpointer.save(ORBAX_STEP, state, meta)
  finally:
    checkpointer.close()


def run(input_path, output_path, *, to=None, model=None, overwrite=False) -> Result:
  """Converts, returning what was read and written. Raises ConversionError."""
  input_path, output_path = os.fspath(input_path), os.fspath(output_path)
  to = _target_format(output_path, to)
  if _same_path(input_path, output_path):
    raise ConversionError(f'the output is the input ({input_path})')
  if to == 'hf' and _same_path(os.path.dirname(os.path.abspath(input_path)), output_path):
    raise ConversionError(f'the output directory {output_path} holds the input')
  if to == 'orbax' and (_contains(output_path, input_path) or _contains(
      os.path.join(input_path, 'checkpoints'), output_path)):
    # --input=WD/checkpoints/40 --output=WD/checkpoints, or --input=WD
    # --output=WD/checkpoints, would replace the run's own checkpoints
    raise ConversionError(f'the output {output_path} holds the input {input_path} or its '
                          'checkpoints: write the Orbax directory outside them')
  parent = os.path.dirname(os.path.abspath(output_path.rstrip('/')) if '://' not in output_path
                           else output_path.rstrip('/'))
  if parent and _isdir(parent) and _listdir(parent) and _is_orbax_dir(parent):
    # --output=WD/checkpoints/5: the run took it for its own newest step, found it
    # unreadable and set it aside (or, inside a step, it damages that checkpoint).
    raise ConversionError(f'the output {output_path} is inside the Orbax checkpoint folder '
                          f'{parent}: a training run there would take it for one of its '
                          'own steps. Write it outside (e.g. beside the workdir)')
  if '://' not in output_path:  # before the output is checked: one may be put back
    local = os.path.realpath(output_path)
    _clear_leftovers(local, os.path.basename(output_path.rstrip('/')))
    _clear_leftovers(local, os.path.basename(local))  # a set-aside old output is named so
  # Checked before reading (reading can take minutes) and again just before writing.
  if not overwrite:
    _check_output(output_path, to, overwrite=False)
  ckpt = _read(input_path, model)
  notes = []
  if (ckpt.kind == 'timm' and model is None and not ckpt.config_recorded
      and _family(ckpt) == 'vit'):
    ckpt.config.name = _timm_input_name(ckpt.config)
  if model is not None and ckpt.kind in ('hf', 'orbax'):
    notes.append(f'--model is not used for {ckpt.kind} inputs (they record their model)')
  from vit_jax.checkpoints import tree  # pylint: disable=g-import-not-at-top
  param_count = sum(int(np.size(v)) for v in tree.flatten(ckpt.params).values())
  _check_output(output_path, to, overwrite)
  if '://' in output_path:
    return _write_remote(ckpt, to, output_path, input_path, notes, param_count)
  # A link to the output is kept: the new output replaces what it points to. (The
  # staged file is named as the output, whose extension says the format, not as the
  # link's target.)
  local = os.path.realpath(output_path)
  # Written in full beside the output first: a conversion refused or failing half-way
  # leaves an existing output as it was (--overwrite used to delete it first).
  staged = _staging_path(local, os.path.basename(output_path.rstrip('/')))
  try:
    os.makedirs(os.path.dirname(local), exist_ok=True)
    _remove(staged)
    with open(staged + '.probe', 'w'):  # (a traceback naming the staged file, after the
      pass                              # whole conversion had run)
    os.remove(staged + '.probe')
  except OSError as e:
    raise ConversionError(f'--output={output_path}: cannot write in '
                          f'{os.path.dirname(local)} ({e.strerror or e})') from None
  try:
    _write(ckpt, to, staged, output_path, input_path, notes, param_count)
    written = _size(staged)
    _put_in_place(staged, local, to)
  finally:
    _remove(staged)
  return _result(ckpt, to, output_path, param_count, written, notes)


def _write_remote(ckpt, to, output, input_path, notes, param_count) -> 'Result':
  """A gs:// (or other remote) output: Orbax writes there itself; the other formats are
  written to a local temporary folder first and copied up (their writers take local
  paths), the old output replaced by the copy."""
  import tempfile  # pylint: disable=g-import-not-at-top
  gfile = _gfile()
  if to == 'orbax':
    if _exists(output) and _listdir(output):
      gfile.rmtree(output)  # an Orbax checkpoint (checked), replaced as --overwrite asks
    return _write(ckpt, to, output, output, input_path, notes, param_count)
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, os.path.basename(output.rstrip('/')))
    result = _write(ckpt, to, local, output, input_path, notes, param_count)
    result.written_bytes = _size(local)
    if os.path.isdir(local):  # hf: its files into the (possibly existing) folder
      gfile.makedirs(output)
      for name in sorted(os.listdir(local)):
        gfile.copy(os.path.join(local, name), f'{output.rstrip("/")}/{name}', overwrite=True)
    else:
      gfile.makedirs(output.rsplit('/', 1)[0])
      gfile.copy(local, output, overwrite=True)
  return result


def _write(ckpt, to, path, shown, input_path, notes, param_count) -> 'Result':
  """Writes the output at `path` directly (a remote one: no rename there)."""
  if to == 'npz':
    _write_npz(ckpt, path, notes, shown=shown)
  elif to == 'timm':
    _write_timm(ckpt, path, notes, shown=shown)
  elif to == 'hf':
    _write_hf(ckpt, path, notes)
  else:
    _write_orbax(ckpt, path, input_path)
  return _result(ckpt, to, shown, param_count, None, notes)


def _result(ckpt, to, output_path, param_count, written, notes) -> 'Result':
  return Result(to=to, output=output_path, kind=ckpt.kind,
                model_name=str(ckpt.config.get('name') or 'unnamed'),
                param_count=param_count, config=ckpt.config,
                class_names=ckpt.class_names, written_bytes=written, notes=notes)


def convert(input_path, output_path, *, to=None, model=None, overwrite=False) -> str:
  """Converts the weights at `input_path` to `output_path`; returns the format written.

  to: 'npz', 'timm', 'hf' or 'orbax' (default: from the output's name).
  model: registered model name for what the input does not record.
  overwrite: replace an existing output (else refuse).
  Raises ConversionError (a ValueError) with a message for the user.
  """
  return run(input_path, output_path, to=to, model=model, overwrite=overwrite).to


_EXAMPLE = ('e.g. python -m vit_jax.convert --input=WORKDIR --output=ft.safetensors, or '
            '--input=WORKDIR --to=hf DIR')


def _paths(args) -> tuple[str, str]:
  """(input, output) of the flags; one positional argument is the output (`--to=hf DIR`)."""
  output = _OUTPUT.value
  if len(args) > 1 or (args and output):
    raise ConversionError(f'unexpected arguments {args}: give the output once, as '
                          f'--output=PATH or one argument ({_EXAMPLE})')
  if args:
    output = args[0]
  if not _INPUT.value:
    raise ConversionError(f'--input is required: the weights to read ({_EXAMPLE})')
  if not output:
    raise ConversionError(f'--output is required: where to write ({_EXAMPLE})')
  # ('--output=~/x.npz': no shell expands it, and a folder named '~' was made here)
  return os.path.expanduser(_INPUT.value), os.path.expanduser(output)


def main(argv) -> int:
  tensorflow_startup.leave_keras_out()
  tensorflow_startup.quiet_native_logs()
  # Warnings only on stderr: not Orbax's INFO for every restore step, nor jax's about the
  # TPU backend it did not find (as predict and visualize).
  logging.set_verbosity(logging.WARNING)
  try:
    input_path, output_path = _paths(argv[1:])
    result = run(input_path, output_path, to=_TO.value, model=_MODEL.value,
                 overwrite=_OVERWRITE.value)
  except ConversionError as e:  # status 2, as predict's and visualize's usage errors
    print(f'vit_jax.convert: error: {e}', file=sys.stderr, flush=True)
    return 2
  print(result.summary(), flush=True)
  return 0


if __name__ == '__main__':
  app.run(main, flags_parser=lambda argv: cli_flags.parse_flags(argv, bad_flag_status=2))
