"""Flax (linen) vision models and the model registry.

    from vit_jax import models
    module = models.create('ViT-B/16', num_classes=10)
    params = models.init_params(module, image_size=224)
    logits = module.apply({'params': params}, images, train=False)  # NHWC in [-1, 1]

Families: ViT (and hybrids), Swin ('Swin-T', ...), ResNet/ResNeXt ('ResNet-50',
'ResNeXt-50 32x4d', ...), Res2Net ('Res2Net-50 26w4s') and BiT ResNetV2 ('BiT-R50x1', ...);
`list_models(family)` names them. Models with BatchNorm keep running statistics in the
'batch_stats' collection: use `init_variables` and apply with
`mutable=['batch_stats']` when training.
"""

from vit_jax.models.posemb import resample_posemb
from vit_jax.models.registry import (create, differs_from_its_name, families, family_of,
                                     field_docs, fixed_input_size, get_config,
                                     list_models, pixel_scaling)
from vit_jax.models.scan_layout import stack_layers, unstack_layers
from vit_jax.models.summary import (abstract_params, abstract_variables, analytic_flops,
                                    as_variables, forward_flops, init_params,
                                    init_variables, param_count)
from vit_jax.models.vit import VisionTransformer, attention_maps

__all__ = [
    'VisionTransformer', 'abstract_params', 'abstract_variables', 'analytic_flops',
    'as_variables', 'attention_maps', 'create', 'differs_from_its_name', 'families',
    'family_of', 'field_docs', 'fixed_input_size', 'forward_flops', 'get_config',
    'init_params', 'init_variables', 'list_models', 'param_count', 'pixel_scaling',
    'resample_posemb', 'stack_layers', 'unstack_layers',
]
