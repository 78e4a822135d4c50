"""Import from and export to timm's BiT ResNetV2 (`resnetv2_{50x1,...,152x4}_bit`).

timm names                                  vit_jax names (vit_jax/models/bit.py)
stem.conv.weight                            root_block/standardized_conv2d/kernel
stages.{s}.blocks.{u}.norm1.{weight,bias}   block{s+1}/unit{u+1:02d}/a/group_norm/{gamma,beta}
stages.{s}.blocks.{u}.conv1.weight          block{s+1}/unit{u+1:02d}/a/standardized_conv2d/kernel
  norm2 / conv2, norm3 / conv3              .../b/..., .../c/... (the same way)
stages.{s}.blocks.0.downsample.conv.weight  block{s+1}/unit01/a/proj/standardized_conv2d/kernel
norm.{weight,bias}                          group_norm/{gamma,beta}
head.fc.{weight,bias}                       head/conv2d/{kernel,bias} (a 1x1 conv in both)

Conv weights are (out, in, kh, kw) in timm and (kh, kw, in, out) here. timm builds these
models with StdConv2d(eps=1e-8) and GroupNorm(32 groups, eps=1e-5); the configs returned
here (the timm names of vit_jax.models.bit) use the same epsilons.
"""

import copy
import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import torch_import
from vit_jax.checkpoints import layout
from vit_jax.checkpoints import state_dict_io
from vit_jax.checkpoints import tree
from vit_jax.models import bit

# The timm names this file handles, with an optional pretrained tag ('.goog_in21k').
NAMES = r'^resnetv2_\d+x\d+_bit(\.[\w.-]+)?$'


def _key_pairs(num_layers, num_classes):
  """(timm key, vit_jax '/'-joined key) of every parameter."""
  pairs = [('stem.conv.weight', 'root_block/standardized_conv2d/kernel')]
  for s, units in enumerate(num_layers):
    for u in range(units):
      tp, jp = f'stages.{s}.blocks.{u}.', f'block{s + 1}/unit{u + 1:02d}/'
      for i, part in ((1, 'a'), (2, 'b'), (3, 'c')):
        pairs += [(f'{tp}conv{i}.weight', f'{jp}{part}/standardized_conv2d/kernel'),
                  (f'{tp}norm{i}.weight', f'{jp}{part}/group_norm/gamma'),
                  (f'{tp}norm{i}.bias', f'{jp}{part}/group_norm/beta')]
      if u == 0:
        pairs.append((tp + 'downsample.conv.weight', jp + 'a/proj/standardized_conv2d/kernel'))
  pairs += [('norm.weight', 'group_norm/gamma'), ('norm.bias', 'group_norm/beta')]
  if num_classes:
    pairs += [('head.fc.weight', 'head/conv2d/kernel'), ('head.fc.bias', 'head/conv2d/bias')]
  return pairs


def _count(sd, pattern):
  idx = {int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m}
  return max(idx) + 1 if idx else 0


def config_from_timm(sd, name: str) -> ml_collections.ConfigDict:
  """The config of a timm BiT state dict: timm's numerics (from the name, a pretrained tag
  is ignored); depth, width, input channels and classes (0 without a head) read off the
  weights, so custom depths and widths work too."""
  if not re.match(NAMES, name):
    raise ValueError(f'{name!r} is not a timm BiT name (resnetv2_<depth>x<width>_bit, '
                     'e.g. resnetv2_50x1_bit.goog_in21k)')
  configs = bit.named_configs()
  base = name.split('.')[0]
  if base not in configs:
    raise ValueError(f'unknown timm BiT model {base!r}; known: '
                     f'{sorted(n for n in configs if n.startswith("resnetv2_"))}')
  if 'stem.conv.weight' not in sd or 'stem.norm.weight' in sd:
    raise ValueError('not a timm pre-activation BiT state dict: expected stem.conv.weight '
                     'and no stem.norm')
  c = copy.deepcopy(configs[base])
  stem = np.shape(sd['stem.conv.weight'])
  c.in_channels = int(stem[1])
  c.width_factor = stem[0] / 64
  nstages = _count(sd, r'stages\.(\d+)\.')
  c.num_layers = tuple(_count(sd, rf'stages\.{s}\.blocks\.(\d+)\.') for s in range(nstages))
  c.num_classes = int(np.shape(sd['head.fc.weight'])[0]) if 'head.fc.weight' in sd else 0
  return c


def _abstract_params(config):
  module = bit.from_config(config)
  x = jax.ShapeDtypeStruct((1, 32, 32, config.in_channels), jnp.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False),
                        x)['params']


def variables_from_timm(sd, config) -> dict:
  """timm state dict (numpy or torch values) -> {'params': ...} for bit.from_config(config).

  Raises CheckpointMismatchError naming keys the model lacks, keys it does not map, and
  shapes that differ.
  """
  pairs = _key_pairs(config.num_layers, config.num_classes)
  unused = sorted(set(sd) - {t for t, _ in pairs})
  if unused:
    raise tree.CheckpointMismatchError(
        f'the timm state dict has keys this BiT config does not map ({len(unused)}): '
        f'{", ".join(unused[:20])} (config num_layers={tuple(config.num_layers)}, '
        f'num_classes={config.num_classes})')
  absent = [f'{t} (-> {j})' for t, j in pairs if t not in sd]
  if absent:
    raise tree.CheckpointMismatchError(
        f'the timm state dict lacks keys this BiT config needs ({len(absent)}): '
        f'{", ".join(absent[:20])}')
  flat = {}
  for tkey, jkey in pairs:
    v = np.asarray(state_dict_io.to_numpy(sd[tkey]), np.float32)
    flat[jkey] = layout.conv_to_flax(v) if v.ndim == 4 else v
  params = tree.merge_into(_abstract_params(config), flat, what='timm state dict')
  return {'params': params}


def to_timm(config, variables) -> dict[str, np.ndarray]:
  """{'params': ...} (or the params alone) -> timm state dict of float32 numpy arrays.

  It loads with `load_state_dict(strict=True)` (after torch.from_numpy) into the timm
  model of the same architecture, e.g. `create_timm_model(config)`.
  """
  params = variables.get('params', variables)
  flat = {k: np.asarray(v, np.float32) for k, v in tree.flatten(params).items()}
  pairs = _key_pairs(config.num_layers, config.num_classes)
  missing = sorted(j for _, j in pairs if j not in flat)
  unexpected = sorted(set(flat) - {j for _, j in pairs})
  if missing or unexpected:
    raise tree.CheckpointMismatchError(
        f'the parameters do not fit the BiT config: missing {missing[:20]}, unexpected '
        f'{unexpected[:20]}')
  return {t: np.ascontiguousarray(layout.conv_from_flax(flat[j]) if flat[j].ndim == 4
                                  else flat[j]) for t, j in pairs}


def create_timm_model(config, variables=None):
  """The timm ResNetV2 with the architecture and numerics of `config` (eval mode), loaded
  with `variables` when given."""
  torch = torch_import.torch()
  resnetv2 = torch_import.module('timm.models.resnetv2')
  layers = torch_import.module('timm.layers')
  model = resnetv2.ResNetV2(
      layers=list(config.num_layers), width_factor=config.width_factor,
      num_classes=config.num_classes or 0, in_chans=config.in_channels, stem_type='fixed',
      conv_layer=functools.partial(layers.StdConv2d, eps=config.stdconv_eps),
      norm_layer=functools.partial(layers.GroupNormAct, num_groups=bit.GN_GROUPS,
                                   eps=config.gn_eps),
      drop_path_rate=config.drop_path_rate).eval()
  if variables is not None:
    model.load_state_dict({k: torch.from_numpy(v) for k, v in
                           to_timm(config, variables).items()}, strict=True)
  return model
