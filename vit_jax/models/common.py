"""What every model family shares: the input check, stochastic depth and the fields
every config has."""

import jax
import jax.numpy as jnp
import ml_collections


def check_nhwc(images, in_channels: int) -> None:
  """Raises ValueError, with a hint for NCHW input, unless images is (N, H, W, C) of a
  float dtype (uint8 pixels in 0..255 gave logits without a word)."""
  if images.ndim != 4:
    raise ValueError(f'expected NHWC images of rank 4, got shape {tuple(images.shape)}')
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(
        f'expected float images (scaled as the weights expect, e.g. [-1, 1] for a ViT: '
        f'x.astype(jnp.float32) / 127.5 - 1), got {images.dtype}; '
        'vit_jax.inference.ImageClassifier preprocesses files and uint8 arrays')
  if images.shape[-1] != in_channels:
    hint = ''
    if images.shape[1] == in_channels:
      hint = ' The input looks like NCHW: transpose it with x.transpose(0, 2, 3, 1).'
    raise ValueError(f'expected {in_channels} channels in the last axis (NHWC), got '
                     f'shape {tuple(images.shape)}.{hint}')


def drop_path(x, rate, rng):
  """Stochastic depth: zeroes a residual branch per example with probability `rate` (a
  float or a traced scalar) and scales the kept ones by 1 / (1 - rate)."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


def base_config(name: str, family: str, image_size: int = 224) -> ml_collections.ConfigDict:
  """name, family, image_size, 1000 classes, 3 input channels, float32 compute and params."""
  c = ml_collections.ConfigDict()
  c.name = name
  c.family = family
  c.image_size = image_size
  c.num_classes = 1000
  c.in_channels = 3
  c.dtype = 'float32'
  c.param_dtype = 'float32'
  return c
