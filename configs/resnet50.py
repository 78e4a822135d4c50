"""ResNet-50 (BatchNorm) on ImageNet-1k at 224 px.

Source: see vit_jax/train/recipes.py (imagenet1k_supervised) for the paper and the recipe.
The argument `mnist` gives the same model and optimizer on the bundled MNIST digits, a
short CPU run that needs no download (minutes; checkpointed every 25 steps):

    python -m vit_jax.main --config=configs/resnet50.py --workdir=/tmp/resnet50
    python -m vit_jax.main --config=configs/resnet50.py:mnist --workdir=/tmp/resnet50_mnist
"""

from vit_jax.train import recipes


def get_config(arg=None):
  c = recipes.imagenet1k_supervised('ResNet-50')
  if arg == 'mnist':
    c = recipes.bundled_mnist(c)
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}: use none or "mnist"')
  return c
