"""Flax (linen) Vision Transformer modules and the model registry.

    from vit_jax import models
    module = models.create('ViT-B/16', num_classes=10)
    params = models.init_params(module, image_size=224)
    logits = module.apply({'params': params}, images, train=False)  # NHWC in [-1, 1]
"""

from vit_jax.models.posemb import resample_posemb
from vit_jax.models.registry import create, field_docs, get_config, list_models
from vit_jax.models.scan_layout import stack_layers, unstack_layers
from vit_jax.models.summary import (abstract_params, analytic_flops, forward_flops,
                                    init_params, param_count)
from vit_jax.models.vit import VisionTransformer, attention_maps

__all__ = [
    'VisionTransformer', 'abstract_params', 'analytic_flops', 'attention_maps', 'create',
    'field_docs', 'forward_flops', 'get_config', 'init_params', 'list_models',
    'param_count', 'resample_posemb', 'stack_layers', 'unstack_layers',
]
