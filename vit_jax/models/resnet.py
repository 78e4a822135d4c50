"""BiT ResNet (v1.5 layout, weight-standardised convs + GroupNorm) used as the hybrid stem.

The layout follows the original hybrid ViT release: a 7x7/2 root conv (`conv_root`),
GroupNorm (`gn_root`), ReLU and a 3x3/2 max-pool, all with TF "SAME" padding, then
stages `block1..blockN` of bottleneck units `unit1..unitM` (1x1, 3x3 with the stride,
1x1 to 4x width; a projection `conv_proj`/`gn_proj` in the first unit of each stage).

The two published implementations differ in the weight standardisation epsilon:
- the original: w / (std(w) + 1e-5), GroupNorm epsilon 1e-6;
- timm: w / sqrt(var(w) + 1e-8), GroupNorm epsilon 1e-5.
Both are available through `StdConv.eps`, `StdConv.eps_in_sqrt` and `gn_eps`.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp


def standardize_weight(w, eps: float, eps_in_sqrt: bool):
  """Zero-mean, unit-variance conv kernel over its (h, w, in) axes."""
  axes = tuple(range(w.ndim - 1))
  w = w - jnp.mean(w, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(w), axis=axes, keepdims=True)
  if eps_in_sqrt:
    return w / jnp.sqrt(var + eps)
  return w / (jnp.sqrt(var) + eps)


class StdConv(nn.Conv):
  """Convolution whose kernel is weight-standardised on every use."""
  eps: float = 1e-5
  eps_in_sqrt: bool = False

  def param(self, name, *args, **kwargs):
    value = super().param(name, *args, **kwargs)
    if name == 'kernel':
      value = standardize_weight(value, self.eps, self.eps_in_sqrt)
    return value


class _Norms:
  """Builds the convs and GroupNorms of one network with shared settings."""

  def __init__(self, stdconv_eps, stdconv_eps_in_sqrt, gn_eps, dtype, param_dtype):
    self.conv_kwargs = dict(eps=stdconv_eps, eps_in_sqrt=stdconv_eps_in_sqrt,
                            use_bias=False, dtype=dtype, param_dtype=param_dtype)
    self.gn_kwargs = dict(num_groups=32, epsilon=gn_eps, use_fast_variance=False,
                          dtype=dtype, param_dtype=param_dtype)

  def conv(self, features, kernel, strides=1, name=None):
    return StdConv(features=features, kernel_size=(kernel, kernel),
                   strides=(strides, strides), padding='SAME', name=name,
                   **self.conv_kwargs)

  def gn(self, name, zero_scale=False):
    scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
    return nn.GroupNorm(name=name, scale_init=scale_init, **self.gn_kwargs)


class ResidualUnit(nn.Module):
  """Bottleneck unit: the stride sits on the 3x3 conv; output width is 4x `features`."""
  features: int
  strides: int = 1
  stdconv_eps: float = 1e-5
  stdconv_eps_in_sqrt: bool = False
  gn_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n = _Norms(self.stdconv_eps, self.stdconv_eps_in_sqrt, self.gn_eps, self.dtype,
               self.param_dtype)
    residual = x
    if x.shape[-1] != self.features * 4 or self.strides != 1:
      residual = n.conv(self.features * 4, 1, self.strides, name='conv_proj')(residual)
      residual = n.gn('gn_proj')(residual)
    y = nn.relu(n.gn('gn1')(n.conv(self.features, 1, name='conv1')(x)))
    y = nn.relu(n.gn('gn2')(n.conv(self.features, 3, self.strides, name='conv2')(y)))
    y = n.gn('gn3', zero_scale=True)(n.conv(self.features * 4, 1, name='conv3')(y))
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`block_size` units; the first one carries the stride and the projection."""
  block_size: int
  features: int
  first_stride: int
  stdconv_eps: float = 1e-5
  stdconv_eps_in_sqrt: bool = False
  gn_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kwargs = dict(stdconv_eps=self.stdconv_eps, stdconv_eps_in_sqrt=self.stdconv_eps_in_sqrt,
                  gn_eps=self.gn_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.block_size):
      x = ResidualUnit(self.features, strides=self.first_stride if i == 0 else 1,
                       name=f'unit{i + 1}', **kwargs)(x)
    return x


def bit_stem(x, *, num_layers: Sequence[int], width_factor: float, stdconv_eps: float,
             stdconv_eps_in_sqrt: bool, gn_eps: float, dtype, param_dtype):
  """Root block and stages of the hybrid stem.

  Call it inside the parent's `nn.compact` method: its submodules (`conv_root`,
  `gn_root`, `block1`, ...) then live at the parent's top level, as in the original
  checkpoints.
  """
  n = _Norms(stdconv_eps, stdconv_eps_in_sqrt, gn_eps, dtype, param_dtype)
  width = int(64 * width_factor)
  x = n.conv(width, 7, 2, name='conv_root')(x)
  x = nn.relu(n.gn('gn_root')(x))
  x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='SAME')
  for i, block_size in enumerate(num_layers):
    x = ResNetStage(block_size=block_size, features=width * 2**i,
                    first_stride=1 if i == 0 else 2, stdconv_eps=stdconv_eps,
                    stdconv_eps_in_sqrt=stdconv_eps_in_sqrt, gn_eps=gn_eps, dtype=dtype,
                    param_dtype=param_dtype, name=f'block{i + 1}')(x)
  return x


def stem_stride(num_layers: Sequence[int]) -> int:
  """Total downsampling of `bit_stem`: 4 for the root, 2 for every stage after the first."""
  return 4 * 2 ** max(len(num_layers) - 1, 0)
