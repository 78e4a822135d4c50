"""R50+ViT-B/16 pre-training on ImageNet-21k at 224 px, after the ViT paper.

Source: the hybrid of Sec. 4.1, option (ii): the first three stages of a BiT ResNet-50 (3, 4, 9
blocks) feed ViT-B with 1x1 patches. Appendix B.1: hybrids train with the exact setup
of their ViT counterparts, here configs/vit_b16.py (whose docstring says which settings
come from the paper); Table 3 has no hybrid row. Give the data with
--config.input.folder=/data/imagenet21k (docs/data.md).
"""

from vit_jax.train import recipes


def get_config():
  return recipes.imagenet21k_pretraining('R50+ViT-B/16')
