"""ViT-B/16 pretraining on ImageNet-21k at 224 px.

Source: Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021), Table 1 (model
shape) and Table 3 / Appendix B.1 (ImageNet-21k: representation layer of width 768,
dropout 0.1). The training recipe fields arrive with the training loop.
"""

import ml_collections

from vit_jax import models


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = models.get_config('ViT-B/16')
  config.model.num_classes = 21843  # ImageNet-21k classes (fall 2011 release)
  config.model.representation_size = 768  # pre-logits layer used for 21k pretraining
  config.model.dropout_rate = 0.1
  return config
