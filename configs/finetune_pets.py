"""Fine-tune ViT-B/16 (ImageNet-21k weights) on Oxford-IIIT Pets at 384 px.

Source: Dosovitskiy et al. 2021, Appendix B.1.1 and Table 4: SGD momentum 0.9, batch
512, no weight decay, global-norm clipping 1, cosine decay, 500 steps (50 of warmup), 384 px, a
new zero-initialised head, position embedding resampled (the paper sweeps the learning
rate over {0.001, 0.003, 0.01, 0.03}; 0.003 here). Give the pretrained weights, e.g.

    python -m vit_jax.main --config=configs/finetune_pets.py --workdir=DIR \\
        --config.init_from=ViT-B_16.npz

(any .npz, timm/transformers state dict or Orbax workdir). Another architecture: a
registered name after the file, e.g. `--config=configs/finetune_pets.py:ViT-L/16` (names:
vit_jax.models.list_models()); the weights must be of that architecture.
"""

from vit_jax.train import recipes


def get_config(model: str = 'ViT-B/16'):
  return recipes.finetuning(model or 'ViT-B/16',
                            dataset='oxford_iiit_pet', num_classes=37, steps=500,
                            base_lr=0.003, train_split='train', eval_split='test')
