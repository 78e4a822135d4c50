"""Fine-tune ViT-B/16 (ImageNet-21k weights) on ImageNet-1k at 384 px.

Source: Dosovitskiy et al. 2021, Appendix B.1.1 and Table 4: SGD momentum 0.9, batch
512, no weight decay, global-norm clipping 1, cosine decay, 20,000 steps, 384 px, a
new zero-initialised head, position embedding resampled (the paper sweeps the learning
rate over {0.003, 0.01, 0.03, 0.06}; 0.03 here). It trains on train[:99%] and keeps 1%
for choosing settings, as the original code does; the paper's final results train on
the whole split (--config.input.train_split=train). Give the pretrained weights, e.g.

    python -m vit_jax.main --config=configs/finetune_imagenet_384.py --workdir=DIR \\
        --config.init_from=ViT-B_16.npz

(any .npz, timm/transformers state dict or Orbax workdir). Another architecture: a
registered name after the file, e.g. `--config=configs/finetune_imagenet_384.py:ViT-L/16` (names:
vit_jax.models.list_models()); the weights must be of that architecture.
"""

from vit_jax.train import recipes


def get_config(model: str = 'ViT-B/16'):
  return recipes.finetuning(model or 'ViT-B/16',
                            dataset='imagenet2012', num_classes=1000, steps=20000,
                            base_lr=0.03, train_split='train[:99%]', eval_split='validation')
