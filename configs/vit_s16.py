"""ViT-S/16 pre-training on ImageNet-21k at 224 px: the ViT-B/16 recipe on the S shape.

Source: ViT-S is not in the ViT paper: its shape (width 384, 6 heads, 12 layers) comes from DeiT
(Touvron et al. 2021). This is the recipe of configs/vit_b16.py (Adam, batch 4096, lr
1e-3, weight decay 0.03, 10k warmup + linear decay, 90 epochs, dropout 0.1, a
representation layer, sigmoid loss) on that shape, not AugReg's ImageNet-21k recipe for
S/16 (Steiner et al. 2021: no representation layer, cosine decay, 30 or 300 epochs,
weight decay 0.1 or 0.03, RandAugment and mixup). Give the data with
--config.input.folder=/data/imagenet21k (docs/data.md).
"""

from vit_jax.train import recipes


def get_config():
  return recipes.imagenet21k_pretraining('ViT-S/16')
