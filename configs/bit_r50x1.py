"""BiT-S R50x1 (ResNetV2, GroupNorm + weight standardisation) on ImageNet-1k at 224 px.

Source: see vit_jax/train/recipes.py (imagenet1k_supervised) for the paper and the recipe.
The argument `mnist` gives the same model and optimizer on the bundled MNIST digits, a
short CPU run that needs no download (minutes; checkpointed every 25 steps):

    python -m vit_jax.main --config=configs/bit_r50x1.py --workdir=/tmp/bit_r50x1
    python -m vit_jax.main --config=configs/bit_r50x1.py:mnist --workdir=/tmp/bit_r50x1_mnist
"""

from vit_jax.train import recipes


def get_config(arg=None):
  c = recipes.imagenet1k_supervised('BiT-R50x1')
  if arg == 'mnist':
    c = recipes.bundled_mnist(c)
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}: use none or "mnist"')
  return c
