"""ViT-L/16 pre-training on ImageNet-21k at 224 px, after the ViT paper.

Source: the ViT-B/16 recipe (configs/vit_b16.py, whose docstring says which settings come from
the paper and which are this codebase's choices) on Table 1's L shape. The paper's Table
3 lists 30 and 90 epochs for ViT-L on ImageNet-21k; 90 here (`--config.num_epochs=30`
for the other). Give the data with --config.input.folder=/data/imagenet21k (docs/data.md).
"""

from vit_jax.train import recipes


def get_config():
  return recipes.imagenet21k_pretraining('ViT-L/16')
