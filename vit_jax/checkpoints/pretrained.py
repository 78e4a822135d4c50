"""Starting a model from pretrained weights of any supported kind (fine-tuning).

`load_checkpoint(path, model=...)` reads weights (`load(path)`: the params alone):
  - an original-layout `.npz` (`load_npz`; a BiT release `.npz` for a 'bit' model);
  - a timm or transformers state dict (`.safetensors`, `.bin`, `.pt`, `.pth`); a
    transformers file needs its `config.json` beside it, and a directory holding both
    (save_pretrained's layout, `vit_jax.convert --to=hf`) stands for the file. A
    `.safetensors` file vit_jax.convert wrote records the model config in its metadata
    (`state_dict_metadata`): it is read with that config. timm files of the other families
    (Swin, ResNet/ResNeXt, Res2Net, BiT ResNetV2) are read with the timm name of the
    `model` config (`timm_format.timm_name`), or of the family the keys show;
  - an Orbax workdir of this project (its newest checkpoint) or one checkpoint step
    directory: params and the model state (BatchNorm running statistics).
`adapt(loaded, reference)` fits ViT params to the new model: a new zero-initialised head
(the new class count), `pre_logits` dropped when the new model has no representation
layer, the position embedding resampled to the new resolution, and a clear refusal of
structural differences (token vs pooled classifier, width, depth, hybrid stem).
`adapt_variables(checkpoint, reference, config)` does it for the Flax variables of any
family ({'params', 'batch_stats'}): a new zero head (Swin `head`, ResNet/Res2Net `fc`, BiT
`head/conv2d`), Swin relative position bias tables resampled to the new windows
(`swin.resample_window_params`), BatchNorm statistics taken from the checkpoint, and a
refusal of weights of another family or architecture.
"""

import dataclasses
import json
import math
import os
import re

from absl import logging
import ml_collections
import numpy as np

from vit_jax import models
from vit_jax.checkpoints import architecture
from vit_jax.checkpoints import bit_npz
from vit_jax.checkpoints import hf_format
from vit_jax.checkpoints import npz
from vit_jax.checkpoints import state_dict_io
from vit_jax.checkpoints import timm_format
from vit_jax.checkpoints import tree
from vit_jax.models import posemb as posemb_lib
from vit_jax.models import registry
from vit_jax.models import scan_layout
from vit_jax.models import swin

_POSEMB = 'Transformer/posembed_input/pos_embedding'


def orbax_step_dir(path: str) -> str:
  """The step directory (holding state/) of a workdir, its checkpoints/ or a step dir.

  Local paths are made absolute (Orbax refuses relative ones); gs:// paths work too.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints import train_state  # pylint: disable=g-import-not-at-top  (Orbax)
  remote = '://' in str(path)
  root = epath.Path(path if remote else os.path.abspath(path))
  for directory in (root, root / 'checkpoints'):
    if (directory / 'state').is_dir():  # a step directory
      return str(directory)
    # On gs:// the newest step may still be being written (its run is training): the
    # newest finished one is read.
    steps = [int(d.name) for d in (directory.iterdir() if directory.is_dir() else [])
             if train_state.is_finished_step(d, remote=remote) and (d / 'state').is_dir()]
    if steps:
      return str(directory / str(max(steps)))
  raise FileNotFoundError(f'no Orbax checkpoint under {path} (expected a workdir, its '
                          'checkpoints/ folder, a step folder holding state/, or a '
                          'transformers directory holding model.safetensors or '
                          'pytorch_model.bin beside its config.json, or the .index.json of '
                          'their shards)')


# The weights file of a directory written by transformers' save_pretrained (or
# `vit_jax.convert --to=hf`), beside its config.json.
# (Or the index of its shards, when saved with max_shard_size.)
HF_DIR_WEIGHTS = hf_format.DIR_WEIGHTS
HF_MODEL_TYPES = hf_format.MODEL_TYPES


def _hf_dir_weights(path: str) -> str | None:
  """The weights file of a local transformers directory, None for any other directory."""
  if '://' in path or not os.path.isfile(os.path.join(path, 'config.json')):
    return None
  for name in HF_DIR_WEIGHTS:
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  return None


def _refuse_hf_model_type(weights: str) -> None:
  """A transformers model of another kind than ViT (its config.json's model_type) is
  named as such; its weights used to be refused as 'not a ViT state dict'."""
  cfg_path = os.path.join(os.path.dirname(weights), 'config.json')
  try:
    with open(cfg_path) as f:
      hf_config = json.load(f)
  except (OSError, ValueError):
    return
  model_type = hf_config.get('model_type') if isinstance(hf_config, dict) else None
  if model_type == 'deit':
    raise ValueError(f'{weights} ({cfg_path}): {hf_format.DEIT_REFUSAL}')
  if model_type and 'architectures' in hf_config and model_type not in HF_MODEL_TYPES:
    raise ValueError(
        f'{weights} is a transformers {model_type!r} model ({cfg_path}: model_type); '
        f'vit_jax reads transformers ViTs (model_type {", ".join(HF_MODEL_TYPES)}). Its '
        'Swin, ResNet, ResNeXt, Res2Net and BiT models come from timm weights instead')


def _orbax_variables(path: str) -> tuple[dict, dict]:
  """(params, model_state) of a train-state checkpoint, on this process's first device
  whatever the device layout the run was saved from (8 GPUs, a TPU pod, FSDP).

  model_state is e.g. {'batch_stats': ...}; empty for models without state and for
  checkpoints that hold params only (written by vit_jax.convert, or before model_state).
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  state_dir = epath.Path(orbax_step_dir(path)) / 'state'
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  try:
    metadata = ocp.PyTreeCheckpointHandler().metadata(state_dir)
    metadata = getattr(metadata, 'tree', metadata)
    # Only the weights (and BatchNorm statistics) are read: a train state's optimizer
    # moments would double or triple the memory (and a damaged one fail the read).
    target = {k: jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
        metadata[k]) for k in ('params', 'model_state') if k in metadata}
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except  (TensorStore's, Orbax's)
    if (isinstance(e, MemoryError) or 'RESOURCE_EXHAUSTED' in str(e)
        or 'out of memory' in str(e).lower()):
      raise  # not the checkpoint's fault
    raise ValueError(_damaged_step_message(path, state_dir.parent, e)) from e
  return (jax.device_get(restored['params']),
          jax.device_get(dict(restored.get('model_state') or {})))


def _damaged_step_message(path: str, step_dir, error: Exception) -> str:
  """What to say of a step that cannot be read: the error's first line, and the other
  steps of its folder to read instead (training resumes from the one before it)."""
  first = (str(error).strip().splitlines() or [''])[0].split(' [tensorstore_spec=')[0]
  if len(first) > 300:
    first = first[:300] + '...'
  others = sorted((int(d.name) for d in step_dir.parent.iterdir()
                   if d.name.isdigit() and d.name != step_dir.name and (d / 'state').is_dir()),
                  reverse=True)
  hint = (f'; read another step of it, e.g. {step_dir.parent / str(others[0])} (steps: '
          f'{", ".join(map(str, others[:10]))})' if others else '')
  return (f'the checkpoint {step_dir} of {path} cannot be read ({type(error).__name__}: '
          f'{first}): it may be damaged or incomplete{hint}')


def _orbax_meta(path: str) -> dict:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  meta_dir = epath.Path(orbax_step_dir(path)) / 'meta'
  if not meta_dir.is_dir():
    return {}
  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(meta_dir) or {}


def _is_hf(sd) -> bool:
  return any(k.startswith(('vit.', 'embeddings.')) for k in sd)


# Heads of the registered widths (ViT-H/14 has 16 heads of 80, the others heads of 64).
_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def _timm_heads(sd) -> int:
  width = int(sd['pos_embed'].shape[-1])
  return _HEADS.get(width, max(width // 64, 1))


# Keys of a `.safetensors` header's metadata (`__metadata__`, str -> str) in which
# vit_jax.convert records what a timm state dict does not show: the model config (JSON
# of config.model: heads, GELU form, epsilons, name), the class names (JSON list) and the
# evaluation preprocessing. timm and torch ignore them.
META_MODEL = 'vit_jax.model'
META_CLASS_NAMES = 'vit_jax.class_names'
META_PP_EVAL = 'vit_jax.pp_eval'


def state_dict_metadata(config, class_names=None, pp_eval=None) -> dict[str, str]:
  """The safetensors metadata recording a model config, class names and preprocessing.

  Raises TypeError for a config JSON cannot hold."""
  meta = {'format': 'pt', META_MODEL: json.dumps(config.to_dict(), sort_keys=True)}
  if class_names:
    meta[META_CLASS_NAMES] = json.dumps([str(n) for n in class_names])
  if pp_eval:
    meta[META_PP_EVAL] = str(pp_eval)
  return meta


def _recorded_config(path: str, meta: dict) -> ml_collections.ConfigDict | None:
  """The model config a state dict's metadata records (META_MODEL), None if none."""
  text = meta.get(META_MODEL)
  if text is None:
    return None
  try:
    config = json.loads(text)
    if not isinstance(config, dict):
      raise ValueError('not a JSON object')
    if (registry.family_of(ml_collections.ConfigDict(config)) == 'vit'
        and not isinstance(config.get('num_heads'), int)):
      raise ValueError('a ViT config without an integer num_heads')
  except ValueError as e:
    raise ValueError(f'{path} records a damaged model config ({META_MODEL!r} in its '
                     f'safetensors metadata: {e}); pass model= (predict: --model=NAME) to '
                     'read the weights without it') from None
  return ml_collections.ConfigDict(config)


def _recorded_names(meta: dict, num_classes) -> list[str] | None:
  try:
    names = json.loads(meta.get(META_CLASS_NAMES, 'null'))
  except ValueError:
    return None
  if isinstance(names, list) and names and num_classes:  # (fitted to the head later)
    return [str(n) for n in names]
  return None


# Fields that fix the parameter shapes of a ViT, checked between a recorded config and
# the weights (a record that does not fit its weights is refused, not half used).
_VIT_STRUCTURE = ('hidden_size', 'num_layers', 'mlp_dim', 'num_classes', 'classifier',
                  'patch_size', 'in_channels')


def unrecorded_fields(config, sd) -> list[str]:
  """What a timm ViT state dict `sd` (as to_timm writes it) of the model `config` loses
  when it records no config (a torch file): the fields load_checkpoint, given no model,
  reads differently, as 'field guessed (not true)'."""
  guess = timm_format._infer_config(  # pylint: disable=protected-access
      sd, 'vit_base_patch16_224', None, {'num_heads': _timm_heads(sd)})
  def gelu(c):
    return 'tanh' if c.get('gelu_approximate', True) else 'exact'
  pairs = [('num_heads', guess.num_heads, config.num_heads),
           ('GELU', gelu(guess), gelu(config)),
           ('layernorm_eps', guess.layernorm_eps, config.get('layernorm_eps', 1e-6))]
  if config.get('resnet') is not None and guess.get('resnet') is not None:
    pairs += [(f'stem {k}', guess.resnet.get(k), config.resnet.get(k))
              for k in ('stdconv_eps', 'stdconv_eps_in_sqrt', 'gn_eps')]
  return [f'{k} {g} (not {t})' for k, g, t in pairs if g != t]


def _check_recorded(path, recorded, config, sd) -> None:
  """Refuses a recorded config whose structure differs from what the weights show; keeps
  its image size where it gives the weights' token grid (e.g. 30 px of 16 px patches)."""
  def structure(c):
    out = {f: tree.plain(c.get(f)) for f in _VIT_STRUCTURE}
    out['patch_size'] = registry.patch_size(c.get('patch_size'))  # (16,) is (16, 16)
    out['num_classes'] = out['num_classes'] or 0
    r = c.get('resnet')
    out['resnet'] = None if r is None else (tree.plain(r.get('num_layers')),
                                            float(r.get('width_factor')))
    return out
  got, want = structure(config), structure(recorded)
  differences = [f'{k}: recorded {want[k]}, weights {got[k]}' for k in got
                 if got[k] != want[k]]
  prefix = 1 if config.classifier == 'token' else 0
  grid = math.isqrt(int(np.shape(sd['pos_embed'])[1]) - prefix)
  unit = config.image_size // grid  # pixels per token side
  if recorded.get('image_size') != config.image_size:
    if int(recorded.get('image_size') or 0) // unit == grid:
      config.image_size = int(recorded.image_size)
    else:
      differences.append(f'image_size: recorded {recorded.get("image_size")}, weights '
                         f'{config.image_size} ({grid}x{grid} tokens)')
  if differences:
    raise tree.CheckpointMismatchError(
        f'{path} records a model config ({META_MODEL!r} in its safetensors metadata) that '
        'does not fit its weights: ' + '; '.join(differences) + '. Pass model= (predict: '
        '--model=NAME) to read the weights with another config.')


def load(path: str, *, model_config=None) -> dict:
  """Pretrained params (linen names, numpy) from any supported file or directory."""
  return load_checkpoint(path, model=model_config).params


@dataclasses.dataclass
class Checkpoint:
  """Weights with what is known about them."""
  config: ml_collections.ConfigDict  # the model config the params fit
  params: dict
  kind: str  # 'npz', 'timm', 'hf' or 'orbax'
  class_names: list[str] | None = None  # from the training run or the HF config
  pp_eval: str | None = None  # the training run's evaluation preprocessing
  # Flax collections besides params, e.g. {'batch_stats': ...} of a BatchNorm model.
  model_state: dict = dataclasses.field(default_factory=dict)
  # The config is the one the file records (a state dict vit_jax.convert wrote), not
  # guessed from the weights nor given by the caller.
  config_recorded: bool = False
  # The training run's loss where known (a workdir): 'sigmoid_xent' heads (ImageNet-21k)
  # give independent per-class probabilities, 'softmax_xent' ones a distribution.
  loss: str | None = None

  def variables(self) -> dict:
    """The Flax variables {'params': ..., **model_state}."""
    return {'params': self.params, **self.model_state}


def _model_config(model, base: str = 'vit_base_patch16_224') -> ml_collections.ConfigDict | None:
  """The config `model` names: a registered name, 'NAME,field=value,...' (a registered
  model with fields changed), 'field=value,...' (`base`'s numerics with fields changed,
  for weights of no registered shape: 'num_heads=8') or a config."""
  if model is None:
    return None
  if isinstance(model, str):
    return parse_model_spec(model, base=base)
  return ml_collections.ConfigDict(dict(model))


# The fields of how a model computes that a state dict does not record.
_NUMERICS = ('gelu_approximate', 'layernorm_eps', 'dtype', 'param_dtype', 'attention_impl')


def _asked_numerics(model, given) -> dict:
  """The numerics a caller asked for: a timm state dict read as a registered model takes
  timm's numerics, except these. Of a --model spec, the fields it sets
  ('ViT-Ti/16,layernorm_eps=0.01'); of a config, those it sets to other values than the
  registered config of its name."""
  if given is None:
    return {}
  if isinstance(model, str):
    typed = {field for field, _ in _spec_parts(model)[1]}
    return {f: given[f] for f in _NUMERICS if f in typed}
  try:
    registered = registry.get_config(given.get('name') or '')
  except ValueError:  # not registered: from_timm keeps all of the given config's numerics
    return {}
  return {f: given[f] for f in _NUMERICS
          if f in given and f in registered and given[f] != registered[f]}


def _architecture_text(config) -> str:
  patch = tree.plain(config.get('patch_size'))
  patch = patch[0] if isinstance(patch, tuple) and len(set(patch)) == 1 else patch
  return (f"{config.get('num_layers')} layers x {config.get('hidden_size')} wide, MLP "
          f"{config.get('mlp_dim')}, patch {patch}")


def _heads_of_given(path, sd, model, given) -> int:
  """The number of heads to read a timm ViT state dict with, of a given model: its own,
  unless it is of another width than the weights and does not ask for them (a
  'num_heads=N' spec, a config setting other heads than its registered name's): then
  those of the registered model of the weights' width, with a warning (6 heads of
  ViT-S/16 for 192-wide weights gave other logits without a word)."""
  width = int(sd['pos_embed'].shape[-1])
  if given.get('hidden_size') == width:
    return given.num_heads
  if isinstance(model, str):
    asked = 'num_heads' in {field for field, _ in _spec_parts(model)[1]}
  else:
    try:
      asked = registry.get_config(given.get('name') or '').num_heads != given.num_heads
    except ValueError:  # not registered: a custom config's heads are its own choice
      asked = True
  if asked:
    return given.num_heads
  heads = _timm_heads(sd)
  logging.warning(
      '%s: the weights are %d wide and model %s is %d wide, so its %d heads need not be '
      "theirs: read with num_heads=%d (the registered model of width %d). If the model "
      'has another number, give it: --model=num_heads=N (predict, visualize, convert), '
      "load_checkpoint(path, model='num_heads=N'), or config.model.num_heads.",
      path, width, given.get('name'), given.get('hidden_size'), given.num_heads, heads,
      width)
  return heads


def _spec_parts(spec: str) -> tuple[str | None, list[tuple[str, str]]]:
  """A --model value's name (or None) and its (field, value text) pairs."""
  parts = [p.strip() for p in re.split(r',(?![^()\[\]]*[)\]])', spec) if p.strip()]
  names = [p for p in parts if '=' not in p]
  if len(names) > 1:
    raise ValueError(f'--model={spec!r}: one model name at most, then field=value pairs '
                     "(e.g. 'vit_base_patch16_224,num_heads=8' or 'num_heads=8')")
  pairs = [tuple(x.strip() for x in p.split('=', 1)) for p in parts if '=' in p]
  return (names[0] if names else None), pairs


def parse_model_spec(spec: str, base: str = 'vit_base_patch16_224') -> ml_collections.ConfigDict:
  """The config of a --model value: NAME, NAME,field=value,... or field=value,... (the
  fields changed in `base`: timm's ViT-B/16 for state dicts, the original release's for
  an .npz)."""
  import ast  # pylint: disable=g-import-not-at-top
  name, pairs = _spec_parts(spec)
  config = registry.get_config(name or base)
  for field, value in pairs:
    if field not in config:
      raise ValueError(f'--model={spec!r}: {field!r} is not a field of the model config '
                       f'(fields: vit_jax.models.field_docs())')
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      value = {'true': True, 'false': False, 'none': None}.get(value.lower(), value)
    if isinstance(value, list):
      value = tuple(value)
    if (isinstance(value, int) and not isinstance(value, bool)
        and isinstance(config[field], tuple) and len(config[field]) == 2):
      value = (value, value)  # patch_size=16: (16, 16)
    try:
      config[field] = value
    except TypeError as e:
      raise ValueError(f'--model={spec!r}: {field}={value!r} does not fit the field '
                       f'({config[field]!r} there): {e}') from None
  return config


def _hf_pp_eval(directory: str, image_size: int) -> str | None:
  """The evaluation preprocessing of the preprocessor_config.json in a transformers
  directory (its resize and normalisation), None without one; a processor the ops cannot
  follow is warned about."""
  path = os.path.join(directory, 'preprocessor_config.json')
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      processor = json.load(f)
    pp = hf_format.pp_eval_from_image_processor(processor, image_size)
  except (OSError, ValueError, TypeError, AttributeError) as e:
    logging.warning('%s cannot be read (%s): the default preprocessing is used.', path, e)
    return None
  if pp is None:
    logging.warning('%s describes preprocessing vit_jax cannot follow (%s): the default '
                    'preprocessing is used; give --pp to match it.', path,
                    processor.get('image_processor_type', 'unknown type'))
    return None
  try:
    from vit_jax.data import preprocess_ops  # pylint: disable=g-import-not-at-top
  except ImportError:  # no TensorFlow: the size is not checked here
    return pp
  size = preprocess_ops.output_spec(pp)[0]
  if size is not None and tuple(size) != (image_size, image_size):
    logging.warning('%s gives %s images (%s) but the model takes %dx%d: the default '
                    'preprocessing is used; give --pp to match the processor.', path,
                    'x'.join(map(str, size)), pp, image_size, image_size)
    return None
  return pp


def _hf_class_names(hf_config) -> list[str] | None:
  id2label = hf_config.get('id2label') or {}
  names = [id2label.get(str(i), id2label.get(i)) for i in range(len(id2label))]
  if not names or not all(names) or all(n == f'LABEL_{i}' for i, n in enumerate(names)):
    return None
  return names


_FAMILY_WORDS = {'vit': 'ViT', 'swin': 'Swin Transformer', 'resnet': 'ResNet/ResNeXt',
                 'res2net': 'Res2Net', 'bit': 'BiT ResNetV2'}
# The timm name a state dict of a family is read with when the model config names no timm
# model (a custom depth or width): every converter reads the structure from the weights,
# the name gives the numerics (and for Swin a window, corrected from the tables below).
_DEFAULT_TIMM_NAMES = {'swin': 'swin_tiny_patch4_window7_224', 'resnet': 'resnet50',
                       'res2net': 'res2net50_26w_4s', 'bit': 'resnetv2_50x1_bit'}


def _timm_family(sd) -> str | None:
  """The family a timm state dict's keys show, None if none does."""
  if 'pos_embed' in sd or 'cls_token' in sd:
    return 'vit'
  if 'layers.0.blocks.0.attn.relative_position_bias_table' in sd:
    return 'swin'
  if 'stem.conv.weight' in sd and any(k.startswith('stages.') for k in sd):
    return 'bit'
  if ('conv1.weight' in sd or 'conv1.0.weight' in sd) and any(
      k.startswith('layer1.') for k in sd):
    return 'res2net' if any('.convs.' in k for k in sd) else 'resnet'
  return None


def _params_family(params) -> str | None:
  """The family the top-level names of a params tree show, None if none does."""
  top = set(params)
  if 'Transformer' in top or 'embedding' in top:
    return 'vit'
  if 'patch_embed' in top and any(k.startswith('layers_') for k in top):
    return 'swin'
  if 'root_block' in top:
    return 'bit'
  if 'conv1' in top and 'layer1' in top:
    return 'res2net' if any('/convs_' in k for k in tree.flatten(params)) else 'resnet'
  return None


def _refuse_family(what: str, got: str, model_config) -> None:
  want = registry.family_of(model_config)
  if got != want:
    raise tree.CheckpointMismatchError(
        f'{what} holds {_FAMILY_WORDS.get(got, got)} weights (family {got!r}) but the model '
        f'config {model_config.get("name")!r} is family {want!r}: set config.model to a '
        f'{got} model (vit_jax.models.list_models({got!r})) or init_from to {want} weights')


def _timm_name_for(config, family: str) -> str:
  try:
    return timm_format.timm_name(config)
  except ValueError:  # a custom depth, width or window: the structure is read from the
    # weights, the numerics from the config's own registered name where it has one
    name = (config.get('name') or '').split('.')[0]
    timm_named = name[:1].islower() and name in registry.list_models(family)  # not 'Swin-T'
    return name if timm_named else _DEFAULT_TIMM_NAMES[family]


def _fitting_config(by, read, variables) -> ml_collections.ConfigDict:
  """`by` (a recorded or given config of a convolutional family) where it builds exactly
  the arrays of `variables`, else `read` (the config of the timm name the weights were
  read as). A convolutional model's weights do not fix its image size or numerics
  (epsilons, dtypes): read as the registered timm name, an export of a run at 64 px came
  back at 224 (448 for BiT) and lost its recorded StdConv epsilon."""
  by = ml_collections.ConfigDict(by.to_dict())
  by.num_classes = read.get('num_classes')  # the head is read from the weights
  try:
    shapes = models.abstract_variables(models.create(by), int(by.get('image_size') or 224))
  except (ValueError, TypeError):
    return read
  def shape_of(variables_):
    return {k: tuple(np.shape(v)) for k, v in tree.flatten(dict(variables_)).items()}
  return by if shape_of(shapes) == shape_of(variables) else read


def _structure_name(config) -> str:
  """The registered timm name of the architecture `config` describes (its own name where
  none fits): a bare state dict is read as its family's default timm name, whose
  structure the weights may not have (ResNeXt-50 read as 'resnet50')."""
  unnamed = ml_collections.ConfigDict(config.to_dict())
  unnamed.name = ''
  try:
    return timm_format.timm_name(unnamed)
  except ValueError:
    return config.get('name')


def _load_timm_family(sd, family: str, name: str, prefer=None):
  """(config, variables) of a timm state dict of a non-ViT family; prefer: a config
  whose resolution and windows a Swin takes where they fit the weights."""
  if family == 'swin':
    from vit_jax.checkpoints import timm_swin  # pylint: disable=g-import-not-at-top
    config = timm_swin.config_from_timm(sd, name, prefer=prefer)
    return config, timm_swin.variables_from_timm(sd, config)
  return timm_format.from_timm(sd, name)


def _bit_npz_config(params, given) -> ml_collections.ConfigDict:
  """The 'bit' config `given` with the depth, width and classes of BiT release params."""
  config = ml_collections.ConfigDict(given.to_dict())
  blocks = sorted({int(m.group(1)) for k in params for m in [re.match(r'block(\d+)$', k)]
                   if m})
  config.num_layers = tuple(len(params[f'block{b}']) for b in blocks)
  root = params['root_block']['standardized_conv2d']['kernel']
  config.width_factor = root.shape[-1] / 64
  config.in_channels = int(root.shape[2])
  head = params.get('head', {}).get('conv2d', {}).get('kernel')
  config.num_classes = int(head.shape[-1]) if head is not None else 0
  return config


def load_checkpoint(path, *, model=None, runnable_here: bool = True) -> Checkpoint:
  """Params, model state, model config and (where the file has them) class names.

  model: a registered name or a model config, for what a file does not record: the
    numerics of an `.npz` (default: the original release's), the number of heads of a
    timm ViT state dict (default: the registered model of that width; read as a
    registered model, it gets timm's numerics except the GELU, epsilon and dtype fields
    a spec sets ('ViT-Ti/16,layernorm_eps=0.01') or a config sets to other values than
    its registered name's;
    a model whose name is not registered, e.g. exported by vit_jax.convert, gives all
    its numerics; a
    `.safetensors` file vit_jax.convert wrote records its config, class names and
    evaluation preprocessing (META_MODEL, ...), used when `model` is None), and
    for the other families the timm model a state dict is read as
    (`timm_format.timm_name(model)`; a custom depth or width is read as the family's base
    model). Structure (width, depth, classes, resolution, ...) is always read from the
    weights. Weights of another family than `model`'s are refused
    (CheckpointMismatchError). A field a `model` spec sets that the weights decide
    otherwise is warned about ('num_heads=4' for weights of 2 heads).
  runnable_here: a config recording attention_impl='cudnn' gets the default attention
    when this process has no GPU, so that the model runs here; False keeps the record
    (vit_jax.convert: an export made on a CPU host keeps the run's choice).
  """
  path = os.path.expanduser(os.fspath(path))  # ('--checkpoint=~/w': no shell expands it)
  given = _model_config(model, base=_spec_base(path))
  ckpt = _load_checkpoint(path, model, given)
  ckpt.class_names = _names_for_the_head(ckpt.class_names, ckpt.config.get('num_classes'),
                                         path)
  if runnable_here:
    _runnable_attention(ckpt.config, path)
  if isinstance(model, str):
    for field, text in _spec_parts(model)[1]:
      wanted = given[field]
      got = ckpt.config.get(field)
      if isinstance(wanted, (list, tuple)) and got is not None and not isinstance(got, str):
        got = tuple(got)
      if field in ckpt.config and got != wanted:
        logging.warning('--model %s=%s is not used: the weights at %s have %s=%r.', field,
                        text, path, field, got)
  return ckpt


def _names_for_the_head(names, num_classes, path: str):
  """The recorded class names fitted to the head: a run may train a head wider than its
  classes (num_classes=3 on a folder of 2), whose weights predict and visualize then
  refused ('2 class names for a head of 3 classes') and an export dropped the names of:
  the outputs without a name are named 'class_<i>', with a warning."""
  if not names or not num_classes or len(names) == num_classes:
    return names
  if len(names) > num_classes:
    logging.warning('%s records %d class names for a head of %d classes: the names are '
                    'left out', path, len(names), num_classes)
    return None
  logging.warning('%s records %d class names for a head of %d classes (the run trained a '
                  'head wider than its classes): outputs %d to %d are named class_<i>',
                  path, len(names), num_classes, len(names), num_classes - 1)
  return list(names) + [f'class_{i}' for i in range(len(names), num_classes)]


def _runnable_attention(config, path: str) -> None:
  """A run trained with attention_impl='cudnn' records it; read elsewhere than on an
  NVIDIA GPU (predict on a laptop) the model failed at its first forward pass ("cuDNN is
  not detected"). The attention's implementation does not change the weights or what
  they compute (up to rounding), so such weights are read with the default instead."""
  if config.get('attention_impl') != 'cudnn':
    return
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() == 'gpu':
    return
  logging.info("%s records attention_impl='cudnn', which needs an NVIDIA GPU; reading "
               'it with the default attention for %s (same weights, same function).',
               path, jax.default_backend())
  config.attention_impl = None


def _spec_base(path: str) -> str:
  """The model whose numerics a --model of fields without a name changes: an .npz's are
  the original release's (tanh GELU), a state dict's timm's (a 'num_heads=2' used to
  switch an .npz to exact GELU)."""
  return 'ViT-B/16' if path.endswith('.npz') else 'vit_base_patch16_224'


def _load_checkpoint(path: str, model, given) -> Checkpoint:
  """load_checkpoint's reading; `given`: `model` as a config (None if none)."""
  family = registry.family_of(given) if given is not None else None
  if os.path.isdir(path) and _hf_dir_weights(path):  # a transformers save_pretrained dir
    path = _hf_dir_weights(path)
  if path.endswith('.npz'):
    if family == 'bit':
      params = bit_npz.load_bit_npz(path)
      return Checkpoint(_bit_npz_config(params, given), params, 'npz')
    params = npz.load_npz(path)
    if bit_npz.PREFIX.rstrip('/') in params and 'root_block' in params['resnet']:
      # A BiT release file (gs://bit_models/BiT-M-R50x1.npz, ...): its depth, width and
      # classes are in the weights; a model of another family is refused.
      if given is not None:
        _refuse_family(path, 'bit', given)
      params = bit_npz.params_from_flat(tree.flatten(params))
      config = _bit_npz_config(params, registry.get_config('BiT-R50x1'))
      name = f'BiT-R{3 * sum(config.num_layers) + 2}x{config.width_factor:g}'
      config.name = name if name in registry.list_models() else 'BiT (from .npz)'
      return Checkpoint(config, params, 'npz')
    config = architecture.infer_model_config(params)
    if given is not None:  # the given numerics, the file's structure
      for field in ('gelu_approximate', 'layernorm_eps', 'name', 'dtype', 'param_dtype',
                    'attention_impl'):
        if field in given:
          config[field] = given[field]
      if config.get('resnet') is not None and given.get('resnet') is not None:
        for field in ('stdconv_eps', 'stdconv_eps_in_sqrt', 'gn_eps'):  # the stem's
          if field in given.resnet:
            config.resnet[field] = given.resnet[field]
    return Checkpoint(config, params, 'npz')
  if path.endswith(('.safetensors', '.bin', '.pt', '.pth', '.index.json')):
    _refuse_hf_model_type(path)
    sd = state_dict_io.read_state_dict(path)
    if _is_hf(sd):
      cfg_path = os.path.join(os.path.dirname(path), 'config.json')
      if not os.path.exists(cfg_path):
        raise FileNotFoundError(f'{path} is a transformers state dict; its config.json '
                                f'must be beside it ({cfg_path})')
      with open(cfg_path) as f:
        hf_config = json.load(f)
      if given is not None:
        _refuse_family(path, 'vit', given)
      config, params = hf_format.from_hf(sd, hf_config=hf_config)
      return Checkpoint(config, params, 'hf', class_names=_hf_class_names(hf_config),
                        pp_eval=_hf_pp_eval(os.path.dirname(path), config.image_size))
    shown = _timm_family(sd)
    meta = state_dict_io.read_metadata(path)
    # The config vit_jax.convert recorded (heads, numerics, name); a caller's wins.
    recorded = _recorded_config(path, meta) if given is None else None
    if recorded is not None and shown is not None and registry.family_of(recorded) != shown:
      raise tree.CheckpointMismatchError(
          f'{path} records a {registry.family_of(recorded)!r} model config but holds '
          f'{_FAMILY_WORDS.get(shown, shown)} weights; pass model= (predict: --model=NAME) '
          'to read them with another config')
    if given is not None and shown is not None:
      _refuse_family(path, shown, given)
    extras = dict(pp_eval=meta.get(META_PP_EVAL), config_recorded=recorded is not None)
    family = family or (registry.family_of(recorded) if recorded is not None else None)
    family = family or shown or 'vit'
    if family != 'vit':
      by = given if given is not None else recorded
      name = _timm_name_for(by, family) if by is not None else _DEFAULT_TIMM_NAMES[family]
      config, variables = _load_timm_family(sd, family, name, prefer=by)
      if by is not None and family != 'swin':  # (a Swin takes `by`'s size and windows)
        config = _fitting_config(by, config, variables)
      elif by is None:  # named by the structure read (a ResNeXt is not 'resnet50')
        config.name = _structure_name(config)
      variables = dict(variables)
      params = variables.pop('params')
      return Checkpoint(config, params, 'timm', model_state=variables,
                        class_names=_recorded_names(meta, config.get('num_classes')),
                        **extras)
    timm_format.check_vit_keys(sd, path)  # before the name: the keys tell first
    if META_MODEL in meta:  # written by vit_jax: not weights timm trained
      base = given if given is not None else recorded
      config, params = timm_format.from_timm(
          sd, base.get('name') or 'vit_jax_model', base_config=base, keep_base=True,
          num_heads=base.num_heads)
      if recorded is not None:
        _check_recorded(path, recorded, config, sd)
      return Checkpoint(config, params, 'timm',
                        class_names=_recorded_names(meta, config.num_classes), **extras)
    name = (given.get('name') if given is not None else None) or 'vit_base_patch16_224'
    width = int(sd['pos_embed'].shape[-1])
    heads = _heads_of_given(path, sd, model, given) if given is not None else _timm_heads(sd)
    if given is None and width not in _HEADS:
      logging.warning(
          '%s: a timm state dict does not record its number of heads, and its width %d is '
          'not a registered model\'s: read with num_heads=%d (heads of %d). If the model '
          'has another number, give it: --model=num_heads=N (predict, visualize, convert), '
          "load_checkpoint(path, model='num_heads=N'), or config.model.num_heads.",
          path, width, heads, width // heads)
    # A name that is not registered (a custom model, e.g. exported by vit_jax.convert)
    # is read with the given config: its heads and numerics, the file's structure.
    config, params = timm_format.from_timm(sd, name, base_config=given, num_heads=heads)
    for field, value in _asked_numerics(model, given).items():
      config[field] = value
    if given is not None and given.get('hidden_size') != config.hidden_size:
      # Not the given model (_heads_of_given warned, or the caller set the heads): its
      # name would label these weights (convert recorded 'ViT-S/16' for 192-wide
      # weights), though only its numerics are taken. (Another depth keeps the name, as
      # timm.create_model(name, depth=2) does.)
      own = architecture.same_structure_name(config)
      config.name = own or f'ViT ({_architecture_text(config)})'
    return Checkpoint(config, params, 'timm')
  if ('://' in path and not path.endswith(('.npz', '.safetensors', '.bin', '.pt', '.pth'))
      or os.path.isdir(path)):  # an Orbax directory, local or gs://
    params, model_state = _orbax_variables(path)
    # Runs with scan_layers store the blocks stacked; readers get the unrolled layout.
    params = scan_layout.unstack_layers(params)
    meta = _orbax_meta(path)
    if meta.get('model'):
      config = ml_collections.ConfigDict(meta['model'])
      if 'scan_layers' in config:
        config.scan_layers = False
    elif _params_family(params) in ('vit', None):
      config = architecture.infer_model_config(params)
    else:
      raise ValueError(f'{path} holds {_params_family(params)} weights but its meta/ '
                       'records no model config (meta["model"]) to build them with')
    pp_eval = ((meta.get('config') or {}).get('input') or {}).get('pp_eval')
    return Checkpoint(config, params, 'orbax', class_names=meta.get('class_names'),
                      pp_eval=pp_eval, model_state=model_state,
                      loss=(meta.get('config') or {}).get('loss'))
  raise ValueError(f'cannot tell what kind of checkpoint {path!r} is: expected .npz, '
                   '.safetensors/.bin/.pt/.pth, or an Orbax workdir / step directory')


def _depth(flat) -> int:
  return len({m.group(1) for k in flat for m in [re.match(r'Transformer/encoderblock_(\d+)/', k)]
              if m})


def _structure_errors(got, ref) -> tuple[list[str], list[str]]:
  """(what differs between the checkpoint's ViT params and the model's, every difference;
  the config.model flags that give the model the checkpoint's architecture)."""
  errors, flags = [], []
  if ('cls' in got) != ('cls' in ref):
    kinds = ('a class token (token classifier)', 'no class token (gap/map classifier)')
    errors.append(f"classifier: the checkpoint has {kinds[0] if 'cls' in got else kinds[1]}, "
                  f"the model has {kinds[0] if 'cls' in ref else kinds[1]}")
    flags.append('--config.model.classifier=' + ('token' if 'cls' in got else 'gap (or map)'))
  wg, wr = got['embedding/kernel'].shape[-1], ref['embedding/kernel'].shape[-1]
  if wg != wr:
    errors.append(f'width (hidden_size): checkpoint {wg}, model {wr}')
    flags.append(f'--config.model.hidden_size={wg}')
  if _depth(got) != _depth(ref):
    errors.append(f'depth (num_layers): checkpoint {_depth(got)}, model {_depth(ref)}')
    flags.append(f'--config.model.num_layers={_depth(got)}')
  block = 'Transformer/encoderblock_0/'
  # (Their axes do not depend on the width: every difference is named at once.)
  for key, axis, what, field in (
      ('MultiHeadDotProductAttention_0/query/kernel', 1, 'heads (num_heads)', 'num_heads'),
      ('MlpBlock_0/Dense_0/kernel', -1, 'MLP width (mlp_dim)', 'mlp_dim')):
    if block + key in got and block + key in ref:
      g, r = np.shape(got[block + key])[axis], np.shape(ref[block + key])[axis]
      if g != r:
        errors.append(f'{what}: checkpoint {g}, model {r}')
        flags.append(f'--config.model.{field}={g}')
  if ('conv_root/kernel' in got) != ('conv_root/kernel' in ref):
    errors.append('hybrid ResNet stem: present in only one of checkpoint and model')
  elif got['embedding/kernel'].shape[:3] != ref['embedding/kernel'].shape[:3]:
    errors.append(f"patch embedding kernel: checkpoint {got['embedding/kernel'].shape}, "
                  f"model {ref['embedding/kernel'].shape}")
    (gh, gw, gc), (rh, rw, rc) = (got['embedding/kernel'].shape[:3],
                                  ref['embedding/kernel'].shape[:3])
    if (gh, gw) != (rh, rw):
      flags.append(f'--config.model.patch_size={gh}' if gh == gw
                   else f"--config.model.patch_size='({gh}, {gw})'")
    if gc != rc and 'conv_root/kernel' not in got:
      flags.append(f'--config.model.in_channels={gc}')
  return errors, flags


def _architecture_hint(flags, may_change: str) -> str:
  """The last line of a mismatch: the flags that fit the model to the weights."""
  return ('\nGive the model the architecture of the checkpoint'
          + (f": {' '.join(flags)} (or, in Python, those fields of the model config)"
             if flags else ' (config.model)')
          + f'; only {may_change} may change.')


def adapt(loaded, reference, *, posemb_method: str = 'bilinear',
          keep_head: bool = False) -> dict:
  """Fits pretrained params to the model whose (initialised) params are `reference`
  (either encoder layout: the result has the reference's)."""
  if scan_layout.is_stacked(reference):
    adapted = adapt(scan_layout.unstack_layers(loaded), scan_layout.unstack_layers(reference),
                    posemb_method=posemb_method, keep_head=keep_head)
    return scan_layout.stack_layers(adapted)
  loaded = scan_layout.unstack_layers(loaded)
  got = {k: np.asarray(v) for k, v in tree.flatten(loaded).items()}
  ref = tree.flatten(reference)
  errors, flags = _structure_errors(got, ref)
  if errors:
    raise tree.CheckpointMismatchError(
        'the pretrained weights do not fit this model:\n  ' + '\n  '.join(errors)
        + _architecture_hint(flags, 'the head, the representation layer and the resolution'))
  if _POSEMB in got and got[_POSEMB].shape != tuple(ref[_POSEMB].shape):
    prefix = 1 if 'cls' in ref else 0
    kh, kw = tuple(ref['embedding/kernel'].shape[:2])
    got[_POSEMB] = posemb_lib.resample_posemb(
        got[_POSEMB], _token_grid(ref[_POSEMB].shape[1] - prefix, kh, kw), posemb_method,
        num_prefix_tokens=prefix, old_grid=_token_grid(got[_POSEMB].shape[1] - prefix, kh, kw))
  return tree.merge_into(reference, got, drop_head=not keep_head, what='pretrained weights')


def _token_grid(tokens: int, kh: int, kw: int) -> tuple[int, int]:
  """(rows, cols) of the token grid of a square image cut into kh x kw patches: rows *
  kh == cols * kw (a square grid for square patches; 4 x 8 for 32 px in 8x4 patches)."""
  num = tokens * kw
  rows = math.isqrt(num // kh) if num % kh == 0 else 0
  if rows and tokens % rows == 0 and rows * kh == (tokens // rows) * kw:
    return rows, tokens // rows
  side = math.isqrt(tokens)
  return side, side


# Where each family keeps its classifier (a new class count replaces it).
_HEADS_BY_FAMILY = {'vit': ('head/',), 'swin': ('head/',), 'resnet': ('fc/',),
                    'res2net': ('fc/',), 'bit': ('head/',)}


def head_prefixes(config) -> tuple[str, ...]:
  """The parameter-path prefixes of the classifier head of `config`'s family."""
  return _HEADS_BY_FAMILY[registry.family_of(config)]


# Config fields that do not change the parameter shapes (or that adapting handles).
_NOT_STRUCTURE = ('name', 'family', 'image_size', 'num_classes', 'dtype', 'param_dtype',
                  'window_size', 'drop_rate', 'proj_drop_rate', 'attn_drop_rate',
                  'drop_path_rate', 'dropout_rate', 'layernorm_eps', 'stdconv_eps', 'gn_eps',
                  'bn_eps', 'bn_momentum', 'bn_frozen', 'zero_init_last',
                  # how a model computes, not its parameters (refused as architecture:
                  # Swin weights into a model with remat_policy='dots' or custom_vjp=False)
                  'remat_policy', 'custom_vjp', 'grouped_conv')


def _config_differences(loaded, config) -> list[tuple[str, object, object]]:
  """Architecture fields (of a non-ViT family) that differ between two configs:
  (field, the checkpoint's value, the model's)."""
  fields = sorted((set(loaded.keys()) | set(config.keys())) - set(_NOT_STRUCTURE))
  return [(k, tree.plain(loaded.get(k)), tree.plain(config.get(k))) for k in fields
          if tree.plain(loaded.get(k)) != tree.plain(config.get(k))]


def _flag(field: str, value) -> str:
  """--config.model.FIELD=VALUE as a shell takes it (a tuple quoted)."""
  return (f"--config.model.{field}='{value}'" if isinstance(value, tuple)
          else f'--config.model.{field}={value}')


_VIT_NUMERICS = ('gelu_approximate', 'layernorm_eps')


def _warn_numerics(loaded, config, timm: bool = False) -> None:
  """Logs the ViT numerics (GELU, LayerNorm epsilon) that differ between the weights' own
  config and the model's: the weights load, but compute other values than they were
  made for. (Shapes are checked from the weights themselves, in `adapt`.) timm: the
  weights are a timm state dict, whose numerics are those timm computes them with (not
  always those they were trained with: timm runs Google's tanh-GELU releases exactly)."""
  numerics = [(k, loaded.get(k), config.get(k)) for k in _VIT_NUMERICS
              if loaded.get(k) is not None and tree.plain(loaded.get(k)) != tree.plain(config.get(k))]
  if not numerics:
    return
  given = ', '.join(f'{k}={a!r}' for k, a, _ in numerics)
  flags = ' '.join(f'--config.model.{k}={a!r}' for k, a, _ in numerics)
  mine = ', '.join(f'{k}={b!r}' for k, _, b in numerics)
  if timm:
    logging.warning(
        'timm computes these pretrained weights with %s; this model uses %s. They load, '
        'but compute slightly other values than in timm: to match timm, set %s (keep '
        "this model's if the weights were trained with it, as Google's releases were).",
        given, mine, flags)
  else:
    logging.warning(
        'The pretrained weights were made with %s; this model uses %s. They load, but '
        'compute slightly other values than they were trained for: to keep them, set %s.',
        given, mine, flags)


def adapt_variables(loaded, reference: dict, config, *, posemb_method: str = 'bilinear',
                    keep_head: bool = False, warn_numerics: bool = True) -> dict:
  """Fits pretrained weights to the model of `config` (any family).

  loaded: a `Checkpoint` (from `load_checkpoint`) or Flax variables {'params', ...}.
  reference: the model's initialised variables {'params': ..., **model_state}; the
    result has their structure and dtypes.
  Returns the variables: ViT params through `adapt`; for the other families the
  checkpoint's params with a new zero head (`head` of Swin, `fc` of ResNet/Res2Net,
  `head/conv2d` of BiT) unless keep_head, Swin bias tables resampled to the windows of
  `config` at its image_size, and the checkpoint's model state (BatchNorm running
  statistics). Raises CheckpointMismatchError for weights of another family, another
  architecture (naming the fields or parameters that differ) or without the model state
  the model needs. warn_numerics: log when a ViT's GELU or LayerNorm epsilon differs from
  those the weights' own config (transformers', a workdir's) records.
  """
  # A config the weights came with (transformers' config.json, a workdir's, a recorded
  # one), not one guessed from a name: its heads and numerics are the weights' own. A
  # timm state dict's numerics are timm's (exact GELU), unless the caller asked for
  # others: a paper-name config (tanh GELU) used to change its GELU without a word.
  known = isinstance(loaded, Checkpoint) and (loaded.config_recorded
                                              or loaded.kind in ('hf', 'orbax', 'timm'))
  timm = known and loaded.kind == 'timm' and not loaded.config_recorded
  if isinstance(loaded, Checkpoint):
    loaded_config, loaded = loaded.config, loaded.variables()
  else:
    loaded_config, loaded = None, dict(loaded)
  family = registry.family_of(config)
  got_family = _params_family(loaded['params'])
  if got_family is not None:
    _refuse_family('the checkpoint', got_family, config)
  if family == 'vit' and known and loaded_config is not None and warn_numerics:
    _warn_numerics(loaded_config, config, timm=timm)
  if family == 'vit':
    return {'params': adapt(loaded['params'], reference['params'],
                            posemb_method=posemb_method, keep_head=keep_head),
            **{k: v for k, v in reference.items() if k != 'params'}}
  may_change = 'the head, the resolution' + (' and the window size' if family == 'swin'
                                              else '')
  hint = _architecture_hint([], may_change)
  if loaded_config is not None:
    differences = _config_differences(loaded_config, config)
    if differences:
      raise tree.CheckpointMismatchError(
          'the pretrained weights do not fit this model:\n  ' + '\n  '.join(
              f'{k}: checkpoint {a}, model {b}' for k, a, b in differences)
          + _architecture_hint([_flag(k, a) for k, a, _ in differences], may_change))
  params = loaded['params']
  if family == 'swin':
    params = swin.resample_window_params(params, config)
  heads = _HEADS_BY_FAMILY[family]
  out = {}
  for collection, ref in reference.items():
    if collection not in loaded:
      raise tree.CheckpointMismatchError(
          f'the pretrained weights have no {collection!r} (the model has: e.g. BatchNorm '
          'running statistics); a checkpoint of this family written with only its params '
          '(e.g. by vit_jax.convert) cannot start a model that needs them')
    got = params if collection == 'params' else loaded[collection]
    got = {k: np.asarray(v) for k, v in tree.flatten(got).items()}
    ref_flat = tree.flatten(ref)
    if not keep_head:  # a new head, zero-initialised (ResNet's own init is torch's uniform)
      got = {k: v for k, v in got.items() if not k.startswith(heads)}
      got.update({k: np.zeros(np.shape(v), v.dtype) for k, v in ref_flat.items()
                  if k.startswith(heads)})
    what = 'pretrained weights' if collection == 'params' else f'pretrained {collection}'
    try:
      out[collection] = tree.merge_into(ref, got, what=what)
    except tree.CheckpointMismatchError as e:
      raise tree.CheckpointMismatchError(f'{e}{hint}') from None
  return out
