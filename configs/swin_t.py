"""Swin-T on ImageNet-1k at 224 px.

Source: see vit_jax/train/recipes.py (imagenet1k_supervised) for the paper and the recipe.
The argument `mnist` gives the same model and optimizer on the bundled MNIST digits, a
short CPU run that needs no download (minutes; checkpointed every 25 steps):

    python -m vit_jax.main --config=configs/swin_t.py --workdir=/tmp/swin_t
    python -m vit_jax.main --config=configs/swin_t.py:mnist --workdir=/tmp/swin_t_mnist
"""

from vit_jax.train import recipes


def get_config(arg=None):
  c = recipes.imagenet1k_supervised('Swin-T')
  if arg == 'mnist':
    c = recipes.bundled_mnist(c, image_size=32)
    # 32 px: patches of 2 and windows of 4 give stages of 16, 8, 4 and 2 tokens a side
    # (the last stage is smaller than the window: one unshifted 2x2 window).
    c.model.patch_size = 2
    c.model.window_size = 4
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}: use none or "mnist"')
  return c
