"""Starting a model from pretrained weights of any supported kind (fine-tuning).

`load(path)` reads weights into the linen parameter tree:
  - an original-layout `.npz` (`load_npz`);
  - a timm or transformers state dict (`.safetensors`, `.bin`, `.pt`, `.pth`); a
    transformers file needs its `config.json` beside it;
  - an Orbax workdir of this project (its newest checkpoint) or one checkpoint step
    directory.
`adapt(loaded, reference)` fits them to the new model: a new zero-initialised head (the
new class count), `pre_logits` dropped when the new model has no representation layer,
the position embedding resampled to the new resolution, and a clear refusal of
structural differences (token vs pooled classifier, width, depth, hybrid stem).
"""

import json
import math
import os
import re

import numpy as np

from vit_jax.checkpoints import hf_format
from vit_jax.checkpoints import npz
from vit_jax.checkpoints import state_dict_io
from vit_jax.checkpoints import timm_format
from vit_jax.checkpoints import tree
from vit_jax.models import posemb as posemb_lib

_POSEMB = 'Transformer/posembed_input/pos_embedding'


def _orbax_params(path: str) -> dict:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  candidates = [path, os.path.join(path, 'checkpoints')]
  for directory in candidates:
    if os.path.isdir(os.path.join(directory, 'state')):  # a step directory
      return ocp.StandardCheckpointer().restore(os.path.join(directory, 'state'))['params']
    steps = [int(d) for d in (os.listdir(directory) if os.path.isdir(directory) else [])
             if d.isdigit() and os.path.isdir(os.path.join(directory, d, 'state'))]
    if steps:
      step_dir = os.path.join(directory, str(max(steps)), 'state')
      return ocp.StandardCheckpointer().restore(step_dir)['params']
  raise FileNotFoundError(f'no Orbax checkpoint under {path} (expected a workdir, its '
                          'checkpoints/ folder, or a step folder holding state/)')


def load(path: str, *, model_config=None) -> dict:
  """Pretrained params (linen names, numpy) from any supported file or directory."""
  path = os.fspath(path)
  if path.endswith('.npz'):
    return npz.load_npz(path)
  if path.endswith(('.safetensors', '.bin', '.pt', '.pth')):
    sd = state_dict_io.read_state_dict(path)
    if any(k.startswith(('vit.', 'embeddings.')) for k in sd):
      cfg_path = os.path.join(os.path.dirname(path), 'config.json')
      if not os.path.exists(cfg_path):
        raise FileNotFoundError(f'{path} is a transformers state dict; its config.json '
                                f'must be beside it ({cfg_path})')
      with open(cfg_path) as f:
        _, params = hf_format.from_hf(sd, hf_config=json.load(f))
      return params
    overrides = {}
    name = 'vit_base_patch16_224'
    if model_config is not None:
      overrides['num_heads'] = model_config.num_heads
      name = model_config.get('name') or name
    _, params = timm_format.from_timm(sd, name, **overrides)
    return params
  if os.path.isdir(path):
    return _orbax_params(path)
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
  """Fits pretrained params to the model whose (initialised) params are `reference`."""
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
