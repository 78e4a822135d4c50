"""ResNet v1.5 and ResNeXt with BatchNorm (family 'resnet'), numerically matching timm.

Layout (NHWC, as timm's `ResNet` with its default 7x7 stem):
  conv1 7x7/2 (padding 3) -> bn1 -> ReLU -> 3x3/2 max-pool (padding 1)
  layer1..layer4: `layers[s]` blocks `block_0, block_1, ...` with `planes = 64 * 2**s`;
    the first block of every stage but the first has stride 2, and the first block of
    every stage has a projection shortcut `downsample` (1x1 conv with the stride + BN).
  global average pool -> dropout (`dropout_rate`, timm's `drop_rate`) -> fc

Bottleneck block (v1.5: the stride sits on the 3x3 conv, as torchvision and timm):
  conv1 1x1 to `width` -> bn1 -> ReLU -> conv2 3x3 (stride, `cardinality` groups) -> bn2
  -> ReLU -> conv3 1x1 to 4 * planes -> bn3 -> drop path -> + shortcut -> ReLU,
  with width = floor(planes * base_width / 64) * cardinality: ResNet has cardinality 1
  and base_width 64, ResNeXt-50 32x4d has 32 groups of 4 channels at planes=64.
All convolutions pad explicitly and symmetrically (k // 2 on each side, as torch), never
'SAME': with stride 2, 'SAME' pads only the bottom/right and shifts the output.
Stochastic depth rises linearly from 0 at the first block to `drop_path_rate` at the last.

BatchNorm (`BatchNorm` below, a drop-in for `flax.linen.BatchNorm` with the same variable
names) follows torch.nn.BatchNorm2d: in training it normalises with the biased batch
variance but updates the running variance with the unbiased one (n / (n - 1), n = batch x
height x width), running = momentum * running + (1 - momentum) * batch, so
`bn_momentum=0.9` is torch's momentum 0.1. Statistics are taken over the whole (global)
batch axis; under jax.jit with a sharded batch they are global without any axis_name.
In eval mode (`train=False`), and in training with `bn_frozen=True` (a linear probe), the
running statistics in 'batch_stats' are used, and left as they are.

Name mapping to timm (`vit_jax/checkpoints/timm_resnet.py` converts):
  timm                                    vit_jax
  conv1 / bn1 / fc                        conv1 / bn1 / fc
  layer{s}.{i}.conv{k} / bn{k}            layer{s}/block_{i}/conv{k} / bn{k}
  layer{s}.{i}.downsample.0 / .1          layer{s}/block_{i}/downsample/conv / bn
  BN weight / bias                        params .../scale / .../bias
  BN running_mean / running_var           batch_stats .../mean / .../var
The Res2Net block (`vit_jax/models/res2net.py`) plugs into the same network.
"""

import functools
import math
import numbers
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vit_jax.models import common

FAMILY = 'resnet'
STEM_WIDTH = 64
EXPANSION = 4  # bottleneck output width / planes

FIELD_DOCS = {
    'name': 'registered name the config came from',
    'family': "model family: 'resnet' (ResNet v1.5 / ResNeXt with BatchNorm)",
    'image_size': 'default input resolution (pixels, square); any size works',
    'num_classes': 'classifier outputs; 0 or None returns the pooled features',
    'in_channels': 'input channels',
    'dtype': "compute dtype: 'float32' or 'bfloat16'",
    'param_dtype': "parameter dtype: 'float32' (recommended) or 'bfloat16'",
    'layers': 'blocks in each of the 4 stages, e.g. (3, 4, 6, 3) for ResNet-50',
    'cardinality': 'groups of the 3x3 conv of each block (1 for ResNet, 32 for ResNeXt)',
    'base_width': 'channels per group of the 3x3 conv in the first stage (64 for ResNet)',
    'block': "residual block: 'bottleneck'",
    'drop_path_rate': 'stochastic depth of the last block (linear from 0 at the first)',
    'dropout_rate': 'dropout on the pooled features before fc (timm drop_rate)',
    'bn_momentum': 'BatchNorm running-average decay, flax convention (0.9 == torch 0.1)',
    'bn_eps': 'BatchNorm epsilon (1e-5 as torch)',
    'bn_frozen': 'BatchNorm normalises with its running statistics in training too and never '
                 "updates them (timm's FrozenBatchNorm2d): for a linear probe, or fine-tuning "
                 'with small batches',
    'zero_init_last': 'initialise the scale of the last BN of each block to zero',
    'grouped_conv': "grouped 3x3 convs: 'split' (one conv per group), 'native' (XLA's "
                    "feature_group_count) or 'auto' (split on CPU, native on GPU/TPU)",
}

GROUPED_CONV = ('auto', 'split', 'native')

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

# Kaiming normal with fan_out, as timm initialises its convs.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# torch.nn.Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class BatchNorm(nn.Module):
  """BatchNorm over the last axis with torch's update rule (see the module docstring).

  Variables: params `scale`, `bias`; batch_stats `mean`, `var` (float32), as
  `flax.linen.BatchNorm`. Statistics and normalisation are computed in float32 and the
  result is cast to `dtype`.
  """
  use_running_average: bool = True
  momentum: float = 0.9
  epsilon: float = 1e-5
  scale_init: Callable = nn.initializers.ones
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', self.scale_init, (c,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (c,), self.param_dtype)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    xf = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axis=axes)
      var = jnp.mean(jnp.square(xf - mean), axis=axes)  # biased: used to normalise
      if not self.is_initializing():
        n = x.size // c
        unbiased = var * (n / max(n - 1, 1))  # torch's running_var update
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
        ra_var.value = m * ra_var.value + (1.0 - m) * unbiased
    mul = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
    y = (xf - mean) * mul + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def split_grouped_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
                       rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                       **kwargs):
  """`lax.conv_general_dilated` with groups computed as one convolution per group.

  Same kernel layout and result as feature_group_count=G. XLA:CPU runs a grouped
  convolution far slower than G separate ones (measured on a ResNeXt-50 stage-2 conv,
  batch 8: 68 ms forward and 4.7 s forward+backward, against 9 ms and 27 ms split).
  """
  if feature_group_count == 1:
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, **kwargs)
  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  lhs_feature, rhs_out, out_feature = dn.lhs_spec[1], dn.rhs_spec[0], dn.out_spec[1]
  parts = [jax.lax.conv_general_dilated(x, w, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dn, **kwargs)
           for x, w in zip(jnp.split(lhs, feature_group_count, axis=lhs_feature),
                           jnp.split(rhs, feature_group_count, axis=rhs_out))]
  return jnp.concatenate(parts, axis=out_feature)


def use_split_grouped_conv(grouped_conv: str) -> bool:
  if grouped_conv == 'auto':
    return jax.default_backend() == 'cpu'
  return grouped_conv == 'split'


def conv(features: int, kernel: int, strides: int = 1, groups: int = 1, *, name: str,
         dtype, param_dtype, grouped_conv: str = 'auto') -> nn.Conv:
  """Bias-free conv with torch's symmetric padding kernel // 2."""
  p = kernel // 2
  split = groups > 1 and use_split_grouped_conv(grouped_conv)
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=((p, p), (p, p)), feature_group_count=groups, use_bias=False,
                 kernel_init=conv_init, dtype=dtype, param_dtype=param_dtype, name=name,
                 conv_general_dilated=split_grouped_conv if split else None)


def drop_path(module: nn.Module, x, rate: float, train: bool):
  """Per-sample stochastic depth: zero the branch with prob `rate`, else scale 1/(1-rate)."""
  if not train or rate <= 0.0:
    return x
  return common.drop_path(x, rate, module.make_rng('dropout'))


class Downsample(nn.Module):
  """Projection shortcut: 1x1 conv with the block's stride (`conv`) and BatchNorm (`bn`)."""
  features: int
  strides: int = 1
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  bn_frozen: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = conv(self.features, 1, self.strides, name='conv', dtype=self.dtype,
             param_dtype=self.param_dtype)(x)
    return BatchNorm(use_running_average=not train or self.bn_frozen,
                     momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=self.dtype,
                     param_dtype=self.param_dtype, name='bn')(x)


class BlockBase(nn.Module):
  """Fields and helpers shared by the bottleneck blocks (ResNet's and Res2Net's)."""
  planes: int
  strides: int = 1
  downsample: bool = False
  cardinality: int = 1
  base_width: int = 64
  drop_path_rate: float = 0.0
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  bn_frozen: bool = False
  zero_init_last: bool = True
  grouped_conv: str = 'auto'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def width(self) -> int:
    """Channels of the 3x3 conv (of each scale for Res2Net), timm's formula."""
    return int(math.floor(self.planes * (self.base_width / 64.0))) * self.cardinality

  def conv(self, features, kernel, strides=1, groups=1, *, name):
    return conv(features, kernel, strides, groups, name=name, dtype=self.dtype,
                param_dtype=self.param_dtype, grouped_conv=self.grouped_conv)

  def bn(self, train, name, last=False):
    init = nn.initializers.zeros if last and self.zero_init_last else nn.initializers.ones
    return BatchNorm(use_running_average=not train or self.bn_frozen,
                     momentum=self.bn_momentum, epsilon=self.bn_eps, scale_init=init,
                     dtype=self.dtype,
                     param_dtype=self.param_dtype, name=name)

  def finish(self, x, y, train):
    """drop path on the branch `y`, + shortcut of the block input `x`, ReLU."""
    y = drop_path(self, y, self.drop_path_rate, train)
    if self.downsample:
      x = Downsample(self.planes * EXPANSION, self.strides, bn_momentum=self.bn_momentum,
                     bn_eps=self.bn_eps, bn_frozen=self.bn_frozen, dtype=self.dtype, param_dtype=self.param_dtype,
                     name='downsample')(x, train=train)
    return nn.relu(y + x)


class Bottleneck(BlockBase):
  """ResNet v1.5 / ResNeXt bottleneck: 1x1, 3x3 (stride, groups), 1x1 to 4x planes."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    width = self.width
    y = nn.relu(self.bn(train, 'bn1')(self.conv(width, 1, name='conv1')(x)))
    y = self.conv(width, 3, self.strides, self.cardinality, name='conv2')(y)
    y = nn.relu(self.bn(train, 'bn2')(y))
    y = self.conv(self.planes * EXPANSION, 1, name='conv3')(y)
    y = self.bn(train, 'bn3', last=True)(y)
    return self.finish(x, y, train)


class Stage(nn.Module):
  """`layer{s}`: blocks `block_0..`; the first has the stride and the projection."""
  block_fn: Callable[..., nn.Module]  # block class with the shared settings bound
  num_blocks: int
  planes: int
  strides: int
  drop_path_rates: Sequence[float]

  @nn.compact
  def __call__(self, x, *, train: bool):
    for i in range(self.num_blocks):
      first = i == 0
      needs_proj = first and (self.strides != 1 or x.shape[-1] != self.planes * EXPANSION)
      x = self.block_fn(planes=self.planes, strides=self.strides if first else 1,
                        downsample=needs_proj, drop_path_rate=self.drop_path_rates[i],
                        name=f'block_{i}')(x, train=train)
    return x


class ResNet(nn.Module):
  """ResNet v1.5 / ResNeXt classifier over NHWC images (see the module docstring).

  `__call__(x, train=...)` returns float32 logits (batch, num_classes), or the pooled
  features (batch, 2048) when num_classes is 0 or None. Apply with
  `mutable=['batch_stats']` when train=True, and a 'dropout' rng when drop_path_rate or
  dropout_rate is non-zero.
  """
  num_classes: int | None = 1000
  layers: Sequence[int] = (3, 4, 6, 3)
  cardinality: int = 1
  base_width: int = 64
  drop_path_rate: float = 0.0
  dropout_rate: float = 0.0
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  bn_frozen: bool = False
  zero_init_last: bool = True
  grouped_conv: str = 'auto'
  in_channels: int = 3
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def block_fn(self) -> Callable[..., nn.Module]:
    """The residual block with the network-wide settings bound (overridden by Res2Net)."""
    return functools.partial(Bottleneck, **self.block_settings())

  def block_settings(self) -> dict:
    return dict(cardinality=self.cardinality, base_width=self.base_width,
                bn_momentum=self.bn_momentum, bn_eps=self.bn_eps, bn_frozen=self.bn_frozen,
                zero_init_last=self.zero_init_last, grouped_conv=self.grouped_conv,
                dtype=self.dtype, param_dtype=self.param_dtype)

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    common.check_nhwc(x, self.in_channels)
    common.check_train_apply(self, train, dict(drop_path_rate=self.drop_path_rate,
                                               dropout_rate=self.dropout_rate),
                             batch_stats=True, updates_batch_stats=not self.bn_frozen)
    x = x.astype(self.dtype)
    x = conv(STEM_WIDTH, 7, 2, name='conv1', dtype=self.dtype, param_dtype=self.param_dtype)(x)
    x = BatchNorm(use_running_average=not train or self.bn_frozen, momentum=self.bn_momentum,
                  epsilon=self.bn_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                  name='bn1')(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    total = sum(self.layers)
    rates = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    block_fn = self.block_fn()
    start = 0
    for s, n in enumerate(self.layers):
      x = Stage(block_fn, n, planes=STEM_WIDTH * 2**s, strides=1 if s == 0 else 2,
                drop_path_rates=tuple(rates[start:start + n]), name=f'layer{s + 1}')(
                    x, train=train)
      start += n
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
    if self.dropout_rate:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    if self.num_classes:
      x = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype,
                   param_dtype=self.param_dtype, name='fc')(x)
    return x.astype(jnp.float32)


# Configs ------------------------------------------------------------------------------------


def base_config(name: str, layers, cardinality=1, base_width=64, *, family=FAMILY,
                block='bottleneck', **extra) -> ml_collections.ConfigDict:
  """A config with every field of the family at its default."""
  c = common.base_config(name, family)
  c.layers = tuple(layers)
  c.cardinality = cardinality
  c.base_width = base_width
  c.block = block
  for k, v in extra.items():
    c[k] = v
  c.drop_path_rate = 0.0
  c.dropout_rate = 0.0
  c.bn_momentum = 0.9
  c.bn_eps = 1e-5
  c.bn_frozen = False
  c.zero_init_last = True
  c.grouped_conv = 'auto'
  return c


# (paper name, timm name, layers, cardinality, base_width)
_MODELS = [
    ('ResNet-50', 'resnet50', (3, 4, 6, 3), 1, 64),
    ('ResNet-101', 'resnet101', (3, 4, 23, 3), 1, 64),
    ('ResNet-152', 'resnet152', (3, 8, 36, 3), 1, 64),
    ('ResNeXt-50 32x4d', 'resnext50_32x4d', (3, 4, 6, 3), 32, 4),
    ('ResNeXt-101 32x8d', 'resnext101_32x8d', (3, 4, 23, 3), 32, 8),
]


def named_configs() -> dict[str, ml_collections.ConfigDict]:
  """Paper names and timm names (same architecture and numerics: timm's) -> configs."""
  out = {}
  for paper, timm_name, layers, cardinality, base_width in _MODELS:
    for name in (paper, timm_name):
      out[name] = base_config(name, layers, cardinality, base_width)
  return out


def _fail(field, value, allowed):
  raise ValueError(f'model config field {field}={value!r} is invalid: {allowed}')


def is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_config(config, field_docs, family, blocks) -> dict:
  """Validated config values (defaults filled in) as a plain dict; raises ValueError."""
  c = dict(config)
  unknown = sorted(set(c) - set(field_docs))
  if unknown:
    raise ValueError(f'unknown {family} config field(s) {unknown}; valid fields: '
                     f'{sorted(field_docs)}')
  defaults = base_config('default', (3, 4, 6, 3), family=family, block=blocks[0],
                         **({'scale': 4} if 'scale' in field_docs else {}))
  for k in field_docs:
    c.setdefault(k, defaults[k])
  if c['family'] != family:
    _fail('family', c['family'], f"this builder makes family {family!r}")
  if c['block'] not in blocks:
    _fail('block', c['block'], f'one of {list(blocks)} for family {family!r} '
          "(blocks by family: 'bottleneck' -> 'resnet', 'bottle2neck' -> 'res2net')")
  layers = c['layers']
  if (not isinstance(layers, (tuple, list)) or len(layers) != 4
      or not all(is_int(n) and n >= 1 for n in layers)):
    _fail('layers', layers, 'a sequence of 4 positive ints (blocks per stage)')
  c['layers'] = tuple(int(n) for n in layers)
  for k in ('cardinality', 'base_width', 'in_channels'):
    if not is_int(c[k]) or c[k] < 1:
      _fail(k, c[k], 'a positive int')
    c[k] = int(c[k])
  if c['num_classes'] is not None:
    if not is_int(c['num_classes']) or c['num_classes'] < 0:
      _fail('num_classes', c['num_classes'], 'a non-negative int or None')
    c['num_classes'] = int(c['num_classes'])
  if not is_int(c['image_size']) or c['image_size'] < 1:
    _fail('image_size', c['image_size'], 'a positive int')
  for k in ('drop_path_rate', 'dropout_rate', 'bn_momentum'):
    if not isinstance(c[k], numbers.Real) or not 0.0 <= c[k] < 1.0:
      _fail(k, c[k], 'a float in [0, 1)')
  if c['grouped_conv'] not in GROUPED_CONV:
    _fail('grouped_conv', c['grouped_conv'], f'one of {list(GROUPED_CONV)}')
  if not isinstance(c['bn_eps'], numbers.Real) or c['bn_eps'] <= 0:
    _fail('bn_eps', c['bn_eps'], 'a positive float')
  if not isinstance(c['bn_frozen'], bool):
    _fail('bn_frozen', c['bn_frozen'], 'True or False')
  for k in ('dtype', 'param_dtype'):
    if c[k] in DTYPES:
      c[k] = DTYPES[c[k]]
    elif c[k] not in DTYPES.values():
      _fail(k, c[k], f'one of {sorted(DTYPES)}')
  return c


def module_kwargs(c: dict) -> dict:
  """ResNet constructor arguments from `check_config`'s result."""
  return dict(num_classes=c['num_classes'], layers=c['layers'], cardinality=c['cardinality'],
              base_width=c['base_width'], drop_path_rate=float(c['drop_path_rate']),
              dropout_rate=float(c['dropout_rate']), bn_momentum=float(c['bn_momentum']),
              bn_eps=float(c['bn_eps']), bn_frozen=c['bn_frozen'], zero_init_last=bool(c['zero_init_last']),
              grouped_conv=c['grouped_conv'],
              in_channels=c['in_channels'], dtype=c['dtype'], param_dtype=c['param_dtype'])


def from_config(config) -> ResNet:
  """The ResNet / ResNeXt module of a 'resnet' family config; ValueError on a bad field."""
  c = check_config(config, FIELD_DOCS, FAMILY, ('bottleneck',))
  return ResNet(**module_kwargs(c))
