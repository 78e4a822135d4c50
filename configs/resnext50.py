"""ResNeXt-50 32x4d on ImageNet-1k at 224 px.

Source: see vit_jax/train/recipes.py (imagenet1k_supervised) for the paper and the recipe.
The argument `mnist` gives the same model and optimizer on the bundled MNIST digits, a
short CPU run that needs no download (minutes; checkpointed every 25 steps):

    python -m vit_jax.main --config=configs/resnext50.py --workdir=/tmp/resnext50
    python -m vit_jax.main --config=configs/resnext50.py:mnist --workdir=/tmp/resnext50_mnist
"""

from vit_jax.train import recipes


def get_config(arg=None):
  c = recipes.imagenet1k_supervised('ResNeXt-50 32x4d')
  if arg == 'mnist':
    c = recipes.bundled_mnist(c)
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}: use none or "mnist"')
  return c
