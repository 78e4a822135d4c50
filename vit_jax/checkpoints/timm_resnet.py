"""Import from and export to timm `ResNet` state dicts: ResNet v1.5, ResNeXt and Res2Net.

Handles timm's plain-stem (7x7 conv, max-pool), conv-shortcut bottleneck models (`NAMES`),
with or without a pretrained tag ('resnet50.a1_in1k'). Everything but the resolution is
read from the state dict: stage depths, cardinality, base width, Res2Net scale, classes
(0 without `fc`) and input channels.

timm names                                vit_jax names (collection/path/leaf)
conv1 / layer{s}.{i}.conv{k}              params/conv1 / params/layer{s}/block_{i}/conv{k}
  .weight (out, in, kh, kw)                 /kernel (kh, kw, in, out)
bn1 / layer{s}.{i}.bn{k}                  params/... and batch_stats/... bn1 / .../bn{k}
  .weight / .bias                           params .../scale / .../bias
  .running_mean / .running_var              batch_stats .../mean / .../var
  .num_batches_tracked                      (not kept; exported as 0)
layer{s}.{i}.downsample.0 / .1            .../block_{i}/downsample/conv / bn
layer{s}.{i}.convs.{j} / bns.{j}          .../block_{i}/convs_{j} / bns_{j}   (Res2Net)
fc.weight (classes, features) / fc.bias   params/fc/kernel (features, classes) / bias
"""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax.checkpoints import layout
from vit_jax.checkpoints import tree
from vit_jax.models import res2net
from vit_jax.models import resnet_v1

_RESNET_NAMES = (r'resnet(26|50|101|152|200)|wide_resnet(50|101)_2|resnext50_32x4d|'
                 r'resnext101_(32x4d|32x8d|32x16d|32x32d|64x4d)')
_RES2NET_NAMES = (r'res2net50_(26w_4s|26w_6s|26w_8s|48w_2s|14w_8s)|res2net101_26w_4s|'
                  r'res2next50')
NAMES = rf'^({_RESNET_NAMES}|{_RES2NET_NAMES})(\.[\w-]+)?$'

_FAMILIES = {resnet_v1.FAMILY: resnet_v1, res2net.FAMILY: res2net}
_CHECK_SIZE = 32  # input pixels for the shape-only init; parameter shapes do not depend on it


def _family_module(config):
  family = config.get('family')
  if family not in _FAMILIES:
    raise ValueError(f'model config field family={family!r} is invalid: one of '
                     f'{sorted(_FAMILIES)}')
  return _FAMILIES[family]


def _count(sd, pattern) -> int:
  idx = {int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m}
  return max(idx) + 1 if idx else 0


def _need(sd, key, ndim=None):
  if key not in sd:
    raise tree.CheckpointMismatchError(
        f'timm state dict lacks {key!r}: not a plain-stem timm ResNet/ResNeXt/Res2Net')
  value = np.asarray(sd[key])
  if ndim is not None and value.ndim != ndim:
    raise tree.CheckpointMismatchError(f'timm state dict {key!r} has shape {value.shape}, '
                                       f'expected {ndim} dimensions')
  return value


def config_from_timm(sd, name: str) -> ml_collections.ConfigDict:
  """The vit_jax config of timm model `name` with the weights `sd` (numpy state dict)."""
  base = name.split('.')[0]
  if not re.match(NAMES, name):
    raise ValueError(f'timm model {name!r} is not handled by vit_jax.checkpoints.timm_resnet '
                     f'(names matching {NAMES})')
  family = res2net if base.startswith('res2ne') else resnet_v1
  if 'conv1.0.weight' in sd:
    raise ValueError(f'{name}: deep (3x3 conv) stems are not supported, only the 7x7 stem')
  stem = _need(sd, 'conv1.weight', ndim=4)
  if stem.shape[0] != resnet_v1.STEM_WIDTH or stem.shape[2:] != (7, 7):
    raise ValueError(f'{name}: stem conv1 has shape {stem.shape}, expected '
                     f'({resnet_v1.STEM_WIDTH}, in, 7, 7)')
  layers = tuple(_count(sd, rf'layer{s}\.(\d+)\.') for s in range(1, 5))
  if _count(sd, r'layer(\d+)\.') != 5 or not all(layers):
    raise ValueError(f'{name}: expected 4 stages layer1..layer4, found blocks {layers}')
  named = family.named_configs()
  c = named[base] if base in named else resnet_v1.base_config(
      base, layers, family=family.FAMILY, block='bottleneck' if family is resnet_v1 else
      'bottle2neck', **({'scale': 4} if family is res2net else {}))
  c.name = base
  c.layers = layers
  c.in_channels = int(stem.shape[1])
  c.num_classes = int(sd['fc.weight'].shape[0]) if 'fc.weight' in sd else 0
  # Width of the first stage's grouped 3x3 convs: planes=64, so width = base_width x groups.
  if family is res2net:
    w3 = _need(sd, 'layer1.0.convs.0.weight', ndim=4)
    width = w3.shape[0]
    c.scale = int(_need(sd, 'layer1.0.conv1.weight', ndim=4).shape[0] // width)
  else:
    w3 = _need(sd, 'layer1.0.conv2.weight', ndim=4)
    width = w3.shape[0]
  c.cardinality = int(width // w3.shape[1])
  c.base_width = int(width // c.cardinality)
  return c


def _timm_prefix(path: str) -> str:
  """'layer1/block_0/downsample/conv' -> 'layer1.0.downsample.0' (module path, no leaf)."""
  out = []
  for part in path.split('/'):
    if m := re.fullmatch(r'block_(\d+)', part):
      part = m.group(1)
    elif m := re.fullmatch(r'(convs|bns)_(\d+)', part):
      part = f'{m.group(1)}.{m.group(2)}'
    elif out and out[-1] == 'downsample':
      part = {'conv': '0', 'bn': '1'}[part]
    out.append(part)
  return '.'.join(out)


_LEAVES = {  # (collection, flax leaf) -> timm suffix
    ('params', 'kernel'): 'weight',
    ('params', 'bias'): 'bias',
    ('params', 'scale'): 'weight',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}


def _timm_key(flat_key: str) -> str:
  """'params/layer1/block_0/bn1/scale' -> 'layer1.0.bn1.weight'."""
  collection, *path, leaf = flat_key.split('/')
  return f'{_timm_prefix("/".join(path))}.{_LEAVES[(collection, leaf)]}'


def _to_flax(value, leaf):
  if leaf == 'kernel':
    return layout.conv_to_flax(value) if value.ndim == 4 else value.T
  return value


def _from_flax(value, leaf):
  if leaf == 'kernel':
    return layout.conv_from_flax(value) if value.ndim == 4 else value.T
  return value


def abstract_variables(config) -> dict:
  """Shapes of all variables ({'params', 'batch_stats'}) of the config's module."""
  module = _family_module(config).from_config(config)
  x = jax.ShapeDtypeStruct((1, _CHECK_SIZE, _CHECK_SIZE, module.in_channels), jnp.float32)
  return dict(jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False), x))


def variables_from_timm(sd, config) -> dict:
  """timm state dict (numpy) -> {'params': ..., 'batch_stats': ...} (numpy float32).

  Raises CheckpointMismatchError naming timm keys the model needs but `sd` lacks, keys of
  `sd` the model has no place for, and every mis-shaped parameter.
  """
  abstract = abstract_variables(config)
  flat, used, missing = {}, set(), []
  for key in tree.flatten(abstract):
    tkey = _timm_key(key)
    if tkey not in sd:
      missing.append(tkey)
      continue
    used.add(tkey)
    flat[key] = _to_flax(np.asarray(sd[tkey], np.float32), key.rsplit('/', 1)[-1])
  unused = sorted(k for k in set(sd) - used if not k.endswith('.num_batches_tracked'))
  problems = []
  if missing:
    problems.append(f'missing from the timm state dict ({len(missing)}): '
                    f'{", ".join(missing[:20])}')
  if unused:
    problems.append(f'unexpected in the timm state dict ({len(unused)}), not part of '
                    f'{config.get("name")!r}: {", ".join(unused[:20])}')
  if problems:
    raise tree.CheckpointMismatchError('the model cannot take the timm state dict:\n'
                                       + '\n'.join(problems))
  merged = tree.merge_into(abstract, flat, what='timm state dict')
  return jax.tree.map(lambda v: np.asarray(v, np.float32), merged)


def to_timm(config, variables) -> dict:
  """{'params', 'batch_stats'} of the config's module -> timm state dict (numpy arrays).

  Load it with `model.load_state_dict({k: torch.from_numpy(v) ...}, strict=True)` into
  `timm.create_model(config.name, num_classes=config.num_classes)`.
  """
  if 'params' not in variables or 'batch_stats' not in variables:
    raise ValueError("to_timm needs the variables {'params': ..., 'batch_stats': ...}")
  checked = tree.merge_into(abstract_variables(config),
                            {'params': variables['params'],
                             'batch_stats': variables['batch_stats']},
                            what='variables')
  sd = {}
  for key, value in tree.flatten(checked).items():
    sd[_timm_key(key)] = np.ascontiguousarray(
        _from_flax(np.asarray(value, np.float32), key.rsplit('/', 1)[-1]))
    if key.endswith('/mean'):
      sd[_timm_key(key)[:-len('running_mean')] + 'num_batches_tracked'] = np.array(0, np.int64)
  return sd
