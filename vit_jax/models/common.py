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
        f'expected float images (scaled as the weights expect: [-1, 1] for ViT and BiT, '
        'x.astype(jnp.float32) / 127.5 - 1; ImageNet mean and std for the timm weights of '
        f'Swin, ResNet, ResNeXt and Res2Net), got {images.dtype}; '
        'vit_jax.inference.ImageClassifier preprocesses files and uint8 arrays')
  if images.shape[-1] != in_channels:
    hint = ''
    if images.shape[1] == in_channels:
      hint = ' The input looks like NCHW: transpose it with x.transpose(0, 2, 3, 1).'
    raise ValueError(f'expected {in_channels} channels in the last axis (NHWC), got '
                     f'shape {tuple(images.shape)}.{hint}')


def check_train_apply(module, train: bool, rates: dict, batch_stats: bool = False,
                      updates_batch_stats: bool = False) -> None:
  """A ValueError naming the fix where flax's would name a submodule: an apply with
  train=True and a non-zero rate in `rates` (field -> value) but no 'dropout' key; for
  models with BatchNorm statistics (`batch_stats`), variables without them, and (where
  training updates them) a training apply that cannot."""
  if module.is_initializing():
    return
  if batch_stats and 'batch_stats' not in module.variables:
    raise ValueError(  # (flax's: 'Collection batch_stats not found' in a BatchNorm)
        "the variables have no 'batch_stats' (the BatchNorm running statistics): apply "
        "{'params': params, 'batch_stats': stats}, e.g. vit_jax.models.init_variables(...)")
  if not train:
    return
  if updates_batch_stats and not module.is_mutable_collection('batch_stats'):
    raise ValueError(  # (flax's: "Cannot update variable 'mean' in '/bn1'")
        "train=True updates the BatchNorm statistics: apply(..., train=True, "
        "mutable=['batch_stats']) returns (logits, {'batch_stats': ...}), or train=False")
  if any(value > 0 for value in rates.values()) and not module.has_rng('dropout'):
    named = ', '.join(f'{field}={value}' for field, value in rates.items())
    raise ValueError(  # (flax's: '<submodule> needs PRNG for "dropout"')
        f"train=True with {named} needs a dropout key: apply(..., train=True, "
        "rngs={'dropout': key}), or train=False")


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
