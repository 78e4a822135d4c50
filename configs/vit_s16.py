"""ViT-S/16 pretraining on ImageNet-21k at 224 px (the paper's recipe).

Source: Dosovitskiy et al. 2021, Table 1 (model), Table 3 and Appendix B.1 (Adam,
batch 4096, lr 1e-3, weight decay 0.03, 10k warmup + linear decay, 90 epochs, dropout
0.1, representation layer, sigmoid loss); see vit_jax/train/recipes.py. Give the data
with --config.input.folder=/data/imagenet21k (docs/data.md).
"""

from vit_jax.train import recipes


def get_config():
  return recipes.imagenet21k_pretraining('ViT-S/16')
