"""Starting a model from pretrained weights of any supported kind (fine-tuning).

`load_checkpoint(path, model=...)` reads weights (`load(path)`: the params alone):
  - an original-layout `.npz` (`load_npz`; a BiT release `.npz` for a 'bit' model);
  - a timm or transformers state dict (`.safetensors`, `.bin`, `.pt`, `.pth`); a
    transformers file needs its `config.json` beside it. timm files of the other families
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

import ml_collections
import numpy as np

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
  root = epath.Path(path if '://' in str(path) else os.path.abspath(path))
  for directory in (root, root / 'checkpoints'):
    if (directory / 'state').is_dir():  # a step directory
      return str(directory)
    steps = [int(d.name) for d in (directory.iterdir() if directory.is_dir() else [])
             if d.name.isdigit() and (d / 'state').is_dir()]
    if steps:
      return str(directory / str(max(steps)))
  raise FileNotFoundError(f'no Orbax checkpoint under {path} (expected a workdir, its '
                          'checkpoints/ folder, or a step folder holding state/)')


def _orbax_params(path: str) -> dict:
  """The params of a train-state checkpoint, on this process's first device whatever the
  device layout the run was saved from (8 GPUs, a TPU pod, FSDP)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  state_dir = epath.Path(orbax_step_dir(path)) / 'state'
  checkpointer = ocp.StandardCheckpointer()
  metadata = ocp.PyTreeCheckpointHandler().metadata(state_dir)
  metadata = getattr(metadata, 'tree', metadata)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), metadata)
  return jax.device_get(checkpointer.restore(state_dir, target)['params'])


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
  if 'pos_embed' not in sd:
    raise ValueError('not a ViT state dict of timm or transformers: no pos_embed (timm) or '
                     f'vit.embeddings.* (transformers) key; it starts {sorted(sd)[:4]}')
  width = int(sd['pos_embed'].shape[-1])
  return _HEADS.get(width, max(width // 64, 1))


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


def _model_config(model) -> ml_collections.ConfigDict | None:
  if model is None:
    return None
  if isinstance(model, str):
    return registry.get_config(model)
  return ml_collections.ConfigDict(dict(model))


def _hf_class_names(hf_config) -> list[str] | None:
  id2label = hf_config.get('id2label') or {}
  names = [id2label.get(str(i), id2label.get(i)) for i in range(len(id2label))]
  if not names or not all(names) or all(n == f'LABEL_{i}' for i, n in enumerate(names)):
    return None
  return names


def load_checkpoint(path, *, model=None) -> Checkpoint:
  """Params, model config and (where the file has them) class names of a checkpoint.

  model: a registered name or a model config, for what a file does not record: the
    numerics of an `.npz` (default: the original release's) and the number of heads of a
    timm state dict (default: the registered model of that width). Structure (width,
    depth, classes, resolution, ...) is always read from the weights.
  """
  path = os.fspath(path)
  given = _model_config(model)
  if path.endswith('.npz'):
    params = npz.load_npz(path)
    config = architecture.infer_model_config(params)
    if given is not None:  # the given numerics, the file's structure
      for field in ('gelu_approximate', 'layernorm_eps', 'name', 'dtype', 'param_dtype',
                    'attention_impl'):
        if field in given:
          config[field] = given[field]
    return Checkpoint(config, params, 'npz')
  if path.endswith(('.safetensors', '.bin', '.pt', '.pth')):
    sd = state_dict_io.read_state_dict(path)
    if _is_hf(sd):
      cfg_path = os.path.join(os.path.dirname(path), 'config.json')
      if not os.path.exists(cfg_path):
        raise FileNotFoundError(f'{path} is a transformers state dict; its config.json '
                                f'must be beside it ({cfg_path})')
      with open(cfg_path) as f:
        hf_config = json.load(f)
      config, params = hf_format.from_hf(sd, hf_config=hf_config)
      return Checkpoint(config, params, 'hf', class_names=_hf_class_names(hf_config))
    name = (given.get('name') if given is not None else None) or 'vit_base_patch16_224'
    heads = given.num_heads if given is not None else _timm_heads(sd)
    config, params = timm_format.from_timm(sd, name, num_heads=heads)
    return Checkpoint(config, params, 'timm')
  if ('://' in path and not path.endswith(('.npz', '.safetensors', '.bin', '.pt', '.pth'))
      or os.path.isdir(path)):  # an Orbax directory, local or gs://
    # Runs with scan_layers store the blocks stacked; readers get the unrolled layout.
    params = scan_layout.unstack_layers(_orbax_params(path))
    meta = _orbax_meta(path)
    if meta.get('model'):
      config = ml_collections.ConfigDict(meta['model'])
      if 'scan_layers' in config:
        config.scan_layers = False
    else:
      config = architecture.infer_model_config(params)
    pp_eval = ((meta.get('config') or {}).get('input') or {}).get('pp_eval')
    return Checkpoint(config, params, 'orbax', class_names=meta.get('class_names'),
                      pp_eval=pp_eval)
  raise ValueError(f'cannot tell what kind of checkpoint {path!r} is: expected .npz, '
                   '.safetensors/.bin/.pt/.pth, or an Orbax workdir / step directory')


def _depth(flat) -> int:
  return len({m.group(1) for k in flat for m in [re.match(r'Transformer/encoderblock_(\d+)/', k)]
              if m})


def _structure_errors(got, ref) -> list[str]:
  errors = []
  if ('cls' in got) != ('cls' in ref):
    kinds = ('a class token (token classifier)', 'no class token (gap/map classifier)')
    errors.append(f"classifier: the checkpoint has {kinds[0] if 'cls' in got else kinds[1]}, "
                  f"the model has {kinds[0] if 'cls' in ref else kinds[1]}")
  wg, wr = got['embedding/kernel'].shape[-1], ref['embedding/kernel'].shape[-1]
  if wg != wr:
    errors.append(f'width (hidden_size): checkpoint {wg}, model {wr}')
  if _depth(got) != _depth(ref):
    errors.append(f'depth (num_layers): checkpoint {_depth(got)}, model {_depth(ref)}')
  if ('conv_root/kernel' in got) != ('conv_root/kernel' in ref):
    errors.append('hybrid ResNet stem: present in only one of checkpoint and model')
  elif got['embedding/kernel'].shape[:3] != ref['embedding/kernel'].shape[:3]:
    errors.append(f"patch embedding kernel: checkpoint {got['embedding/kernel'].shape}, "
                  f"model {ref['embedding/kernel'].shape}")
  return errors


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
  errors = _structure_errors(got, ref)
  if errors:
    raise tree.CheckpointMismatchError(
        'the pretrained weights do not fit this model:\n  ' + '\n  '.join(errors) +
        '\nSet config.model to the architecture of the checkpoint (only the head, the '
        'representation layer and the resolution may change).')
  if _POSEMB in got and got[_POSEMB].shape != tuple(ref[_POSEMB].shape):
    prefix = 1 if 'cls' in ref else 0
    side = math.isqrt(ref[_POSEMB].shape[1] - prefix)
    got[_POSEMB] = posemb_lib.resample_posemb(got[_POSEMB], side, posemb_method,
                                              num_prefix_tokens=prefix)
  return tree.merge_into(reference, got, drop_head=not keep_head, what='pretrained weights')
