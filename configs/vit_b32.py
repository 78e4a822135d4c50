"""ViT-B/32 pre-training on ImageNet-21k at 224 px, after the ViT paper.

Source: the ViT-B/16 recipe (configs/vit_b16.py, whose docstring says which settings come from
the paper and which are this codebase's choices) with 32x32 patches (Table 1's B shape).
Give the data with --config.input.folder=/data/imagenet21k (docs/data.md).
"""

from vit_jax.train import recipes


def get_config():
  return recipes.imagenet21k_pretraining('ViT-B/32')
