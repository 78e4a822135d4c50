"""CIFAR-10 from scratch from an image folder (`../shared/data/cifar10` layout).

Source: the project's small-data recipe, after the ViT paper's hybrid design (a BiT root
block as stem: Dosovitskiy et al. 2021, Sec. 3.1 "Hybrid Architecture") and the usual
small-dataset ViT training (AdamW, linear warmup + cosine decay, label smoothing 0.1,
random-resized crops and flips; cf. Touvron et al. 2021, DeiT, Table 9). 32 px input,
8x8 tokens. The defaults are the full run (100 epochs); on a CPU lower num_epochs
(the schedule follows it), e.g. `--config.num_epochs=6`.

    python -m vit_jax.main --config=configs/cifar10_scratch.py --workdir=/tmp/cifar10 \\
        --config.input.folder=../shared/data/cifar10
"""

from vit_jax.train import defaults
from vit_jax.train import recipes


def get_config():
  c = defaults.default_config()
  c.model = recipes.small_hybrid_model('R+ViT-cifar', image_size=32, hidden_size=128,
                                       num_layers=6, num_heads=4, mlp_dim=256,
                                       num_classes=10)
  c.model.drop_path_rate = 0.1
  c.input.source = 'folder'
  c.input.folder = '../shared/data/cifar10'
  c.input.train_split = 'train'
  c.input.eval_split = 'test'
  c.input.pp_train = ('decode|random_resized_crop(32, scale=(0.5, 1.0))|flip_lr|'
                      'value_range(-1, 1)|onehot(10, label_smoothing=0.1)')
  c.input.pp_eval = 'decode|resize(32)|value_range(-1, 1)|onehot(10)'
  c.batch_size = 128
  c.num_epochs = 100
  c.optimizer.update(name='adam', b1=0.9, b2=0.999, weight_decay=0.05, grad_clip_norm=1.0)
  c.schedule.update(base_lr=1e-3, warmup_steps=390, decay='cosine')
  c.log_every = 100
  c.eval_every = 390
  c.checkpoint_every = 390
  c.keep_best = 1
  return c
