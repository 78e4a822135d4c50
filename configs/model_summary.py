"""Any registered model's summary: `--config=configs/model_summary.py:NAME --summary_only`.

Source: the model registry (`vit_jax.models.list_models()`), i.e. the original release's
model shapes (Dosovitskiy et al. 2021, Table 1; hybrids from the original repository) and
the corresponding timm names.
"""

import ml_collections

from vit_jax import models


def get_config(name: str = 'ViT-B/16') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = models.get_config(name)
  return config
