"""Import from and export to timm `SwinTransformer` state dicts.

The Flax names mirror timm's (see vit_jax/models/swin.py), so the mapping is mechanical:

timm names                                          vit_jax names
patch_embed.proj.weight / .bias                     patch_embed/proj/kernel (HWIO) / bias
patch_embed.norm.weight / .bias                     patch_embed/norm/scale / bias
layers.{i}.downsample.norm.weight / .bias           layers_{i}/downsample/norm/scale / bias
layers.{i}.downsample.reduction.weight              layers_{i}/downsample/reduction/kernel (.T)
layers.{i}.blocks.{j}.norm1 / norm2                 layers_{i}/blocks_{j}/norm1 / norm2
layers.{i}.blocks.{j}.attn.qkv / attn.proj          .../attn/qkv / attn/proj (kernel = weight.T)
layers.{i}.blocks.{j}.attn.relative_position_bias_table   .../attn/relative_position_bias_table
layers.{i}.blocks.{j}.mlp.fc1 / mlp.fc2             .../mlp/fc1 / mlp/fc2
norm.weight / .bias                                 norm/scale / bias
head.fc.weight / .bias                              head/kernel (.T) / bias

1-D `weight`s are LayerNorm scales, 2-D ones Linear weights (transposed), 4-D ones conv
weights. timm's non-persistent buffers (`relative_position_index`, `attn_mask`) are
recomputed from the shapes and skipped when a state dict carries them. State dicts of the
original Microsoft release (patch merging at the end of a stage, `head.weight`) must go
through `timm.models.swin_transformer.checkpoint_filter_fn` first.
"""

import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax.checkpoints import layout
from vit_jax.checkpoints import tree
from vit_jax.models import registry
from vit_jax.models import swin

# The six timm names (swin_tiny_patch4_window7_224, ..., swin_large_patch4_window12_384),
# optionally with a pretrained tag such as '.ms_in22k_ft_in1k'.
NAMES = (r'^(' + '|'.join(sorted(n for n in swin.named_configs() if n.startswith('swin_')))
         + r')(\.[\w-]+)?$')

_BUFFERS = ('relative_position_index', 'attn_mask')


def _count(sd, pattern):
  idx = {int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m}
  return max(idx) + 1 if idx else 0


def config_from_timm(sd, name: str, prefer=None) -> ml_collections.ConfigDict:
  """The registered config of timm model `name`, with what the state dict shows.

  Read from the shapes: in_channels, patch_size, embed_dim, depths, num_heads, mlp_ratio
  and num_classes (0 without a head). Window and resolution come from the name, unless
  the relative-position tables show another window (`native_windows`). prefer: a config
  whose image_size and window_size are taken where they fit the tables (the config
  vit_jax.convert recorded, or the caller's).
  """
  if not re.match(NAMES, name):
    raise ValueError(f'{name!r} is not a timm Swin name this converter handles ({NAMES})')
  # The registry's config: its window_size takes one window or one per stage.
  c = registry.get_config(name.split('.')[0])
  if 'patch_embed.proj.weight' not in sd:
    raise tree.CheckpointMismatchError(
        'not a timm Swin state dict: it lacks patch_embed.proj.weight')
  proj = np.shape(sd['patch_embed.proj.weight'])
  c.embed_dim, c.in_channels, c.patch_size = int(proj[0]), int(proj[1]), int(proj[2])
  nstages = _count(sd, r'layers\.(\d+)\.')
  c.depths = tuple(_count(sd, rf'layers\.{i}\.blocks\.(\d+)\.') for i in range(nstages))
  c.num_heads = tuple(
      int(np.shape(sd[f'layers.{i}.blocks.0.attn.relative_position_bias_table'])[1])
      for i in range(nstages))
  c.mlp_ratio = float(np.shape(sd['layers.0.blocks.0.mlp.fc1.weight'])[0] / c.embed_dim)
  c.num_classes = int(np.shape(sd['head.fc.weight'])[0]) if 'head.fc.weight' in sd else 0
  if prefer is not None and prefer.get('image_size') and prefer.get('window_size'):
    with c.ignore_type():  # (a non-square model's size is a pair, the name's an int)
      c.image_size, c.window_size = prefer.image_size, prefer.window_size
  return native_windows(c, sd)


def native_windows(c, sd) -> ml_collections.ConfigDict:
  """`c` with windows (and a resolution giving them) that fit the state dict's bias tables.

  The name gives a window and resolution; weights trained at another window (or a custom
  model) have tables of another size.
  """
  tables = [np.shape(sd[f'layers.{i}.blocks.0.attn.relative_position_bias_table'])[0]
            for i in range(len(c.depths))]
  try:  # the config's own windows, as the model shrinks them (non-square ones included)
    plan = swin.stage_plan(c.image_size, c.patch_size, c.depths, c.window_size)
    if [(2 * p[1][0] - 1) * (2 * p[1][1] - 1) for p in plan] == tables:
      return c
    plan_error = None
  except ValueError as e:  # (e.g. a timm model at a size whose grids its windows do not
    plan_error = e         # divide: timm pads them, vit_jax does not)
  windows = []
  for i in range(len(c.depths)):
    rows = tables[i]
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
      if plan_error is not None:
        raise tree.CheckpointMismatchError(
            f'the timm Swin model (image size {c.image_size}, window {c.window_size}) is not '
            f'one vit_jax builds: {plan_error}')
      raise tree.CheckpointMismatchError(
          f'layers.{i}.blocks.0.attn.relative_position_bias_table has {rows} rows: not the '
          '(2 w - 1)^2 of a square window w')
    windows.append((side + 1) // 2)

  def fits(size, window):
    try:
      plan = swin.stage_plan(size, c.patch_size, c.depths, window)
    except ValueError:
      return False
    return [p[1] for p in plan] == [(w, w) for w in windows]

  if fits(c.image_size, c.window_size):
    return c
  step = c.patch_size * 2 ** (len(windows) - 1)
  candidates = [windows[0]] if len(set(windows)) == 1 else []
  for size in [c.image_size] + [step * k for k in range(1, 257)]:
    for window in candidates + [tuple(windows)]:
      if fits(size, window):
        c.window_size, c.image_size = window, size
        return c
  raise tree.CheckpointMismatchError(f'no resolution gives the windows {windows} of the '
                                     'Swin state dict')


def _flax_key(key: str, ndim: int) -> str:
  k = re.sub(r'layers\.(\d+)\.', r'layers_\1/', key)
  k = re.sub(r'blocks\.(\d+)\.', r'blocks_\1/', k)
  k = k.replace('head.fc.', 'head.').replace('.', '/')
  if k.endswith('/weight'):
    k = k[:-len('weight')] + ('scale' if ndim == 1 else 'kernel')
  return k


def _timm_key(key: str) -> str:
  k = re.sub(r'layers_(\d+)/', r'layers.\1.', key)
  k = re.sub(r'blocks_(\d+)/', r'blocks.\1.', k)
  k = re.sub(r'/(scale|kernel)$', '/weight', k)
  k = k.replace('/', '.')
  return re.sub(r'^head\.', 'head.fc.', k)


def abstract_variables(config):
  """Shapes and dtypes of the module's variables at `config.image_size` (no allocation)."""
  module = swin.from_config(config)
  h, w = swin.pair(config.image_size)
  x = jax.ShapeDtypeStruct((1, h, w, config.in_channels), jnp.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)


def variables_from_timm(sd, config) -> dict:
  """{'params': nested numpy float32 params} from a timm Swin state dict.

  Raises CheckpointMismatchError (a ValueError) naming missing, unexpected and mis-shaped
  keys (in vit_jax names); a bias table of another window names the resampling helper.
  """
  flat = {}
  for key, value in sd.items():
    if key.endswith(_BUFFERS):
      continue
    value = np.asarray(value, np.float32)
    k = _flax_key(key, value.ndim)
    if value.ndim == 4:
      value = layout.conv_to_flax(value)
    elif value.ndim == 2 and k.endswith('/kernel'):
      value = value.T
    flat[k] = value
  reference = abstract_variables(config)['params']
  try:
    params = tree.merge_into(reference, flat, what='timm state dict')
  except tree.CheckpointMismatchError as e:
    if 'relative_position_bias_table:' in str(e):
      raise tree.CheckpointMismatchError(
          f'{e}\n(relative position bias tables of another window size: resample them with '
          'vit_jax.models.swin.resample_window_params, or timm\'s checkpoint_filter_fn)'
      ) from None
    raise
  return {'params': params}


def to_timm(config, variables) -> dict:
  """timm state dict (numpy float32) of Flax variables; loads with strict=True."""
  del config  # the names carry everything
  params = variables['params'] if 'params' in variables else variables
  out = {}
  for key, value in tree.flatten(params).items():
    value = np.asarray(value, np.float32)
    if key.endswith('/kernel'):
      value = layout.conv_from_flax(value) if value.ndim == 4 else value.T
    out[_timm_key(key)] = np.ascontiguousarray(value)
  return out
