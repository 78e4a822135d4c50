"""BiT: the pre-activation ResNet (v2) of Big Transfer (Kolesnikov et al. 2020).

Weight-standardised convolutions and GroupNorm (32 groups) everywhere, widths scaled by
`width_factor`:

    root_block      StdConv 7x7/2 (padding 3), zero padding 1, max-pool 3x3/2 (VALID)
    block{s}        stage s of `num_layers[s - 1]` bottleneck units unit01, unit02, ...
      unit{u:02d}   pre-activation bottleneck, output width 256 * width_factor * 2**(s-1):
        a           GroupNorm -> ReLU -> 1x1 conv to a quarter of the output width;
          proj      1x1 conv (with the stage stride) of the same pre-activation: the
                    shortcut of the first unit of every stage (later units add the input)
        b           GroupNorm -> ReLU -> 3x3 conv (padding 1), the stage stride is here
        c           GroupNorm -> ReLU -> 1x1 conv to the output width
    group_norm      final GroupNorm -> ReLU ("pre-head"), then global average pooling
    head            1x1 conv (with bias) on the pooled features: the logits

The max-pool pads with zeros, not -inf, like the original TF/JAX code and timm's 'fixed'
stem: the root conv output is not yet activated, so this differs from 'SAME' pooling.

Parameter names are those of the original BiT `.npz` release (without its 'resnet/'
prefix), so that released files load as they are (vit_jax.checkpoints.bit_npz):

    root_block/standardized_conv2d/kernel                (7, 7, in, 64 w)
    block1/unit01/a/group_norm/{gamma,beta}              GroupNorm scale and offset
    block1/unit01/a/standardized_conv2d/kernel           (and b/..., c/...)
    block1/unit01/a/proj/standardized_conv2d/kernel
    group_norm/{gamma,beta}                              the pre-head GroupNorm
    head/conv2d/{kernel,bias}                            kernel (1, 1, features, classes)

GroupNorm parameters are called `gamma`/`beta` (not Flax's `scale`/`bias`) for that
reason. timm's `resnetv2_*_bit` models name the same tensors stem.conv, stages.{s}.blocks.
{u}.norm1/conv1 (a), norm2/conv2 (b), norm3/conv3 (c), downsample.conv (proj), norm
(group_norm) and head.fc (head); see vit_jax/checkpoints/timm_bit.py.

Numerics: convolution kernels are standardised as (w - mean) / sqrt(var + stdconv_eps)
over their (h, w, in) axes: 1e-10 in the original release (the paper names 'BiT-R50x1',
...), 1e-8 in timm (the timm names 'resnetv2_50x1_bit', ...). GroupNorm epsilon is 1e-5
in both. Stochastic depth (`drop_path_rate`, linear over all units from 0 at the first to
the rate at the last, as timm) drops the residual branch; BiT itself did not use it.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax.models import common
from vit_jax.models import resnet

FAMILY = 'bit'

FIELD_DOCS = {
    'name': 'registered name the config came from',
    'family': "model family: 'bit'",
    'image_size': 'default input resolution (pixels, square); any size works',
    'num_classes': 'classifier outputs; 0 or None returns the pooled features',
    'in_channels': 'input channels',
    'dtype': "compute dtype: 'float32' or 'bfloat16'",
    'param_dtype': "parameter dtype: 'float32' (recommended) or 'bfloat16'",
    'num_layers': 'bottleneck units per stage, e.g. (3, 4, 6, 3) for R50',
    'width_factor': 'width multiplier of every layer (1 for R50x1; 64 * it must be a '
                    'multiple of 32, the GroupNorm groups)',
    'stdconv_eps': 'weight standardisation epsilon, inside the sqrt (1e-10 original, '
                   '1e-8 timm)',
    'gn_eps': 'GroupNorm epsilon (1e-5 original and timm)',
    'drop_path_rate': 'stochastic depth of the last unit (linear from 0 at the first)',
}

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
GN_GROUPS = 32

# Paper name -> (timm name, units per stage, width factor).
MODELS = {
    'BiT-R50x1': ('resnetv2_50x1_bit', (3, 4, 6, 3), 1),
    'BiT-R50x3': ('resnetv2_50x3_bit', (3, 4, 6, 3), 3),
    'BiT-R101x1': ('resnetv2_101x1_bit', (3, 4, 23, 3), 1),
    'BiT-R101x3': ('resnetv2_101x3_bit', (3, 4, 23, 3), 3),
    'BiT-R152x2': ('resnetv2_152x2_bit', (3, 8, 36, 3), 2),
    'BiT-R152x4': ('resnetv2_152x4_bit', (3, 8, 36, 3), 4),
}


class GroupNorm(nn.GroupNorm):
  """Flax GroupNorm whose parameters are named `gamma` and `beta`, as in the release."""

  def param(self, name, *args, **kwargs):
    return super().param({'scale': 'gamma', 'bias': 'beta'}.get(name, name), *args, **kwargs)


def _group_norm(eps, dtype, param_dtype):
  """32 groups, variance as the mean squared deviation (two passes, as timm and BiT)."""
  return GroupNorm(num_groups=GN_GROUPS, epsilon=eps, use_fast_variance=False, dtype=dtype,
                   param_dtype=param_dtype, name='group_norm')


def _std_conv(features, kernel, strides, eps, dtype, param_dtype, name):
  """Bias-free weight-standardised conv with timm's symmetric padding (the original's
  fixed padding): (stride - 1 + kernel - 1) // 2 on every side."""
  p = ((strides - 1) + (kernel - 1)) // 2
  return resnet.StdConv(
      features=features, kernel_size=(kernel, kernel), strides=(strides, strides),
      padding=((p, p), (p, p)), use_bias=False, eps=eps, eps_in_sqrt=True, dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'), name=name)


class StdConvScope(nn.Module):
  """A scope holding one conv named `standardized_conv2d` (root_block and proj)."""
  features: int
  kernel: int
  strides: int = 1
  eps: float = 1e-8
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return _std_conv(self.features, self.kernel, self.strides, self.eps, self.dtype,
                     self.param_dtype, 'standardized_conv2d')(x)


class PreActConv(nn.Module):
  """GroupNorm -> ReLU -> conv (a, b or c of a unit).

  With `proj_features`, also the 1x1 projection shortcut (`proj`, stride
  `proj_strides`) of the same pre-activation. Returns (conv output, shortcut or None).
  """
  features: int
  kernel: int
  strides: int = 1
  proj_features: int = 0
  proj_strides: int = 1
  stdconv_eps: float = 1e-8
  gn_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(_group_norm(self.gn_eps, self.dtype, self.param_dtype)(x))
    shortcut = None
    if self.proj_features:
      shortcut = StdConvScope(self.proj_features, 1, self.proj_strides, self.stdconv_eps,
                              self.dtype, self.param_dtype, name='proj')(x)
    y = _std_conv(self.features, self.kernel, self.strides, self.stdconv_eps, self.dtype,
                  self.param_dtype, 'standardized_conv2d')(x)
    return y, shortcut


class PreActBottleneck(nn.Module):
  """Pre-activation bottleneck unit; the stride sits on the 3x3 conv (b)."""
  features: int  # output width; the bottleneck is a quarter of it
  strides: int = 1
  project: bool = False
  stdconv_eps: float = 1e-8
  gn_eps: float = 1e-5
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    kw = dict(stdconv_eps=self.stdconv_eps, gn_eps=self.gn_eps, dtype=self.dtype,
              param_dtype=self.param_dtype)
    mid = self.features // 4
    y, shortcut = PreActConv(mid, 1, proj_features=self.features if self.project else 0,
                             proj_strides=self.strides, name='a', **kw)(x)
    if shortcut is None:
      shortcut = x
    y, _ = PreActConv(mid, 3, strides=self.strides, name='b', **kw)(y)
    y, _ = PreActConv(self.features, 1, name='c', **kw)(y)
    if train and self.drop_path_rate > 0:
      y = common.drop_path(y, self.drop_path_rate, self.make_rng('dropout'))
    return y + shortcut


class Stage(nn.Module):
  """`len(drop_path_rates)` units; the first carries the stride and the projection."""
  features: int
  first_stride: int
  drop_path_rates: Sequence[float]
  stdconv_eps: float = 1e-8
  gn_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    for u, rate in enumerate(self.drop_path_rates):
      x = PreActBottleneck(
          features=self.features, strides=self.first_stride if u == 0 else 1,
          project=u == 0, stdconv_eps=self.stdconv_eps, gn_eps=self.gn_eps,
          drop_path_rate=rate, dtype=self.dtype, param_dtype=self.param_dtype,
          name=f'unit{u + 1:02d}')(x, train=train)
    return x


class Head(nn.Module):
  """The classifier: a 1x1 conv named `conv2d` on the (batch, 1, 1, features) pool."""
  num_classes: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.num_classes, (1, 1), kernel_init=nn.initializers.zeros,
                   dtype=self.dtype, param_dtype=self.param_dtype, name='conv2d')(x)


def drop_path_rates(num_layers: Sequence[int], rate: float) -> list[list[float]]:
  """Per-stage, per-unit stochastic depth: linear over all units from 0 to `rate` (timm)."""
  total = sum(num_layers)
  flat = [rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
  out, start = [], 0
  for n in num_layers:
    out.append(flat[start:start + n])
    start += n
  return out


class BiT(nn.Module):
  """BiT ResNetV2: NHWC images -> logits (num_classes), or pooled features if falsy."""
  num_classes: int | None
  num_layers: Sequence[int] = (3, 4, 6, 3)
  width_factor: float = 1
  stdconv_eps: float = 1e-8
  gn_eps: float = 1e-5
  drop_path_rate: float = 0.0
  in_channels: int = 3
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    """Logits (batch, num_classes) in float32, or pooled features (batch, width)."""
    common.check_nhwc(images, self.in_channels)
    common.check_train_apply(self, train, dict(drop_path_rate=self.drop_path_rate))
    x = images.astype(self.dtype)
    x = StdConvScope(int(64 * self.width_factor), 7, 2, self.stdconv_eps, self.dtype,
                     self.param_dtype, name='root_block')(x)
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # zeros, as the original and timm
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')
    rates = drop_path_rates(self.num_layers, self.drop_path_rate)
    for s in range(len(self.num_layers)):
      x = Stage(features=int(256 * self.width_factor) * 2**s, first_stride=1 if s == 0 else 2,
                drop_path_rates=tuple(rates[s]), stdconv_eps=self.stdconv_eps,
                gn_eps=self.gn_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                name=f'block{s + 1}')(x, train=train)
    x = nn.relu(_group_norm(self.gn_eps, self.dtype, self.param_dtype)(x))  # pre-head
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
    if self.num_classes:
      x = Head(self.num_classes, self.dtype, self.param_dtype, name='head')(x)
    # float32 logits (or features, without a head) in mixed precision, as the ViT's
    return x.astype(jnp.float32).reshape(x.shape[0], -1)


def _config(name, num_layers, width_factor, image_size, stdconv_eps):
  c = common.base_config(name, FAMILY, image_size)
  c.num_layers = tuple(num_layers)
  c.width_factor = float(width_factor)
  c.stdconv_eps = stdconv_eps
  c.gn_eps = 1e-5
  c.drop_path_rate = 0.0
  return c


def named_configs() -> dict[str, ml_collections.ConfigDict]:
  """Paper names ('BiT-R50x1', original numerics, 224 px) and timm names
  ('resnetv2_50x1_bit', timm's numerics, 448 px as timm's fine-tuned weights)."""
  out = {}
  for paper, (timm_name, layers, width) in MODELS.items():
    out[paper] = _config(paper, layers, width, 224, 1e-10)
    out[timm_name] = _config(timm_name, layers, width, 448, 1e-8)
  return out


def timm_name_for(config) -> str:
  """The timm model name with the architecture of `config` (depth and width)."""
  for timm_name, layers, width in MODELS.values():
    if tuple(config.num_layers) == layers and config.width_factor == width:
      return timm_name
  raise ValueError(f'no timm BiT model has num_layers={tuple(config.num_layers)} and '
                   f'width_factor={config.width_factor}')


def _check(ok, field, value, allowed):
  if not ok:
    raise ValueError(f'bit config: {field}={value!r} is invalid; allowed: {allowed}')


def _dtype(value, field):
  if isinstance(value, str) and value in _DTYPES:
    return _DTYPES[value]
  raise ValueError(f'bit config: {field}={value!r} is not one of {sorted(_DTYPES)}')


def from_config(config) -> BiT:
  """The BiT module of a config with the FIELD_DOCS fields (see named_configs())."""
  keys = set(config.keys())
  missing = sorted(set(FIELD_DOCS) - keys)
  unknown = sorted(keys - set(FIELD_DOCS))
  if missing or unknown:
    raise ValueError(f'bit config: missing fields {missing}, unknown fields {unknown}; '
                     f'the fields are {sorted(FIELD_DOCS)}')
  _check(config.family == FAMILY, 'family', config.family, repr(FAMILY))
  layers = config.num_layers
  _check(isinstance(layers, (tuple, list)) and len(layers) > 0
         and all(isinstance(n, (int, np.integer)) and n > 0 for n in layers),
         'num_layers', layers, 'a non-empty sequence of positive ints, e.g. (3, 4, 6, 3)')
  wf = config.width_factor
  _check(isinstance(wf, (int, float)) and wf > 0 and float(64 * wf).is_integer()
         and int(64 * wf) % GN_GROUPS == 0,
         'width_factor', wf, f'a positive multiple of 0.5 (64 * width_factor must be a '
         f'multiple of the {GN_GROUPS} GroupNorm groups)')
  for field in ('stdconv_eps', 'gn_eps'):
    value = config[field]
    _check(isinstance(value, (int, float)) and value > 0, field, value, 'a float > 0')
  rate = config.drop_path_rate
  _check(isinstance(rate, (int, float)) and 0 <= rate < 1, 'drop_path_rate', rate,
         'a float in [0, 1)')
  # (numpy ints as the other families take them, labels.max() + 1; a bool is no count)
  is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)  # noqa: E731
  _check(config.num_classes is None or (is_int(config.num_classes)
                                        and config.num_classes >= 0),
         'num_classes', config.num_classes, 'an int >= 0, or None for the pooled features')
  _check(is_int(config.in_channels) and config.in_channels > 0, 'in_channels',
         config.in_channels, 'an int > 0')
  return BiT(num_classes=None if config.num_classes is None else int(config.num_classes), num_layers=tuple(int(n) for n in layers),
             width_factor=wf,
             stdconv_eps=float(config.stdconv_eps), gn_eps=float(config.gn_eps),
             drop_path_rate=float(rate), in_channels=int(config.in_channels),
             dtype=_dtype(config.dtype, 'dtype'),
             param_dtype=_dtype(config.param_dtype, 'param_dtype'))
