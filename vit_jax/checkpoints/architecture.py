"""The model config of a parameter tree, read off its shapes (for `.npz` files and
checkpoints that carry no config).

Shapes give everything structural: width, depth, heads (the attention kernels are
(width, heads, head_dim)), MLP width, patch size, classifier (a `cls` token, a MAP
head or neither), representation layer, classes, the hybrid stem's units per stage and
width, and the resolution (the position-embedding grid). They do not give the numerics
(GELU form, epsilons): those are the original release's (tanh GELU, LayerNorm 1e-6), the
right ones for the published `.npz` files. A registered name with the same structure
names the result; pass the name yourself where the numerics differ (timm's).
"""

import math
import re

import ml_collections

from vit_jax.checkpoints import tree
from vit_jax.models import registry
from vit_jax.models import resnet as resnet_lib

_ATTN = 'Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel'
_MLP = 'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'
_POSEMB = 'Transformer/posembed_input/pos_embedding'
_STRUCTURE = ('image_size', 'num_classes', 'patch_size', 'hidden_size', 'num_layers',
              'num_heads', 'mlp_dim', 'classifier', 'representation_size', 'in_channels')


def _count(flat, pattern) -> int:
  found = {int(m.group(1)) for k in flat for m in [re.match(pattern, k)] if m}
  return max(found) + 1 if found else 0


def infer_model_config(params, *, name: str | None = None) -> ml_collections.ConfigDict:
  """A model config whose parameters have exactly the shapes of `params`.

  name: a registered model name to take the numerics from (structure still comes from
    the shapes); None picks a registered paper name of the same structure if there is
    one, else the original release's numerics under the name 'inferred'.
  Raises ValueError if `params` is not a ViT parameter tree.
  """
  flat = tree.flatten(params)
  missing = [k for k in ('embedding/kernel', _POSEMB, _ATTN, _MLP) if k not in flat]
  if missing:
    raise ValueError(f'not a vit_jax ViT parameter tree: no {missing} (found '
                     f'{sorted(flat)[:5]} ...)')
  hybrid = 'conv_root/kernel' in flat
  c = registry.get_config(name or ('R50+ViT-B/16' if hybrid else 'ViT-B/16'))
  emb = flat['embedding/kernel'].shape
  c.patch_size = (int(emb[0]), int(emb[1]))
  c.hidden_size = int(emb[3])
  c.num_layers = _count(flat, r'Transformer/encoderblock_(\d+)/')
  c.num_heads = int(flat[_ATTN].shape[1])
  c.mlp_dim = int(flat[_MLP].shape[1])
  if 'cls' in flat:
    c.classifier = 'token'
  elif any(k.startswith('MAPHead_0/') for k in flat):
    c.classifier = 'map'
  else:
    c.classifier = 'gap'
  c.representation_size = (int(flat['pre_logits/kernel'].shape[1])
                           if 'pre_logits/kernel' in flat else None)
  c.num_classes = int(flat['head/kernel'].shape[1]) if 'head/kernel' in flat else 0
  if hybrid:
    root = flat['conv_root/kernel'].shape
    stages = _count(flat, r'block(\d+)/') - 1 if any(k.startswith('block') for k in flat) else 0
    layers = tuple(_count(flat, rf'block{s}/unit(\d+)/') - 1 for s in range(1, stages + 1))
    c.resnet = ml_collections.ConfigDict(dict(c.resnet.to_dict() if c.resnet else {}))
    c.resnet.num_layers = layers
    c.resnet.width_factor = root[3] / 64
    c.in_channels = int(root[2])
    stride = resnet_lib.stem_stride(layers)
  else:
    c.resnet = None
    c.in_channels = int(emb[2])
    stride = 1
  tokens = flat[_POSEMB].shape[1] - (1 if c.classifier == 'token' else 0)
  # The square image whose grid of (ph x pw)-pixel tokens has `tokens` cells (with
  # non-square patches the grid is not square: 32 px in 8x4 patches is 4 x 8).
  ph, pw = (int(p) * stride for p in c.patch_size)
  side = math.isqrt(tokens * ph * pw)
  if side * side != tokens * ph * pw or side % ph or side % pw:
    raise ValueError(f'the position embedding has {tokens} patch tokens, which no square '
                     f'image makes with {ph}x{pw}-pixel tokens')
  c.image_size = side
  if name is None:
    c.name = same_structure_name(c) or 'inferred'
  return c


def same_structure_name(c) -> str | None:
  """The registered paper name with the same architecture, if any."""
  for name in registry.list_models('vit'):
    if name.startswith('vit_'):
      continue  # timm names: other numerics
    r = registry.get_config(name)
    same = all(tuple(r[f]) == tuple(c[f]) if f == 'patch_size' else r[f] == c[f]
               for f in ('patch_size', 'hidden_size', 'num_layers', 'num_heads', 'mlp_dim'))
    r_layers = None if r.resnet is None else tuple(r.resnet.num_layers)
    c_layers = None if c.resnet is None else tuple(c.resnet.num_layers)
    if same and r_layers == c_layers:
      return name
  return None


def check_fits(config, params, target: str) -> None:
  """Raises tree.CheckpointMismatchError unless `params` (stacked or not) have exactly
  the arrays a ViT of `config` has. The exporters (to_timm, to_hf) read the blocks and the
  head `config` names: params of a deeper model lost their extra blocks, and a head the
  config lacked was dropped, without a word (timm then loaded the export strictly)."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  ref_config = ml_collections.ConfigDict(config.to_dict() if hasattr(config, 'to_dict')
                                         else dict(config))
  if 'scan_layers' in ref_config:
    ref_config.scan_layers = False  # compared with the blocks unrolled
  ref = {k: tuple(v.shape) for k, v in tree.flatten(models.abstract_params(
      models.create(ref_config), ref_config.image_size)).items()}
  got = {k: tuple(v.shape) for k, v in tree.flatten_for_export(params).items()}
  if got == ref:
    return
  problems = [f'{k} {got[k]} in the params, {ref[k]} in the config'
              for k in sorted(got.keys() & ref.keys()) if got[k] != ref[k]]
  missing, extra = sorted(ref.keys() - got.keys()), sorted(got.keys() - ref.keys())
  if missing:
    problems.append(f'{len(missing)} arrays the config has and the params lack (e.g. '
                    f'{", ".join(missing[:2])})')
  if extra:
    problems.append(f'{len(extra)} arrays of the params the config lacks (e.g. '
                    f'{", ".join(extra[:2])})')
  inferred = infer_model_config(params)
  raise tree.CheckpointMismatchError(
      f'the params do not fit the config given for the {target} export: '
      + '; '.join(problems[:4]) + '. The params are of a model with '
      + ', '.join(f'{f}={inferred.get(f)!r}' for f in ('num_layers', 'hidden_size',
                                                       'num_classes', 'image_size'))
      + ': pass the config the model was built with (vit_jax.checkpoints.infer_model_config'
      '(params) reads it off the params, with the release\'s numerics)')
