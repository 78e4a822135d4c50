"""Weight import and export: the original `.npz` layout, timm and transformers.

    from vit_jax import checkpoints, models
    params = checkpoints.load_npz('ViT-B_16.npz')                  # linen names
    config, params = checkpoints.from_timm(timm_model)             # or a state dict + name
    config, params = checkpoints.from_hf(hf_model)                 # ViTForImageClassification
    params = checkpoints.merge_into(init_params, params, drop_head=True)  # checked load

Any of them in one call, fitted to a model with a new head and resolution:

    ckpt = checkpoints.load_checkpoint(path)   # .npz, timm/HF files, an HF dir, a workdir
    config = ckpt.config.copy_and_resolve_references()
    config.update(num_classes=10, image_size=384)
    init = {'params': models.init_params(models.create(config), 384)}
    variables = checkpoints.adapt_variables(ckpt, init, config)
"""

from vit_jax.checkpoints.architecture import infer_model_config
from vit_jax.checkpoints.hf_format import from_hf, to_hf, to_hf_config
from vit_jax.checkpoints.npz import load_npz, save_npz
from vit_jax.checkpoints.pretrained import Checkpoint, adapt_variables, load_checkpoint
from vit_jax.checkpoints.state_dict_io import read_state_dict, write_state_dict
from vit_jax.checkpoints.timm_format import create_timm_model, from_timm, timm_name, to_timm
from vit_jax.checkpoints.tree import CheckpointMismatchError, flatten, merge_into, unflatten

__all__ = [
    'Checkpoint', 'CheckpointMismatchError', 'adapt_variables', 'create_timm_model',
    'flatten', 'from_hf', 'from_timm', 'infer_model_config', 'load_checkpoint', 'load_npz', 'merge_into', 'read_state_dict', 'save_npz', 'timm_name', 'to_hf',
    'to_hf_config', 'to_timm', 'unflatten', 'write_state_dict',
]
