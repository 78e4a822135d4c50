"""ViT recipes as functions, shared by the config files in configs/.

Source: Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021), Table 3 and
Appendix B.1 (pretraining) and Appendix B.1.1 / Table 4 (fine-tuning).
"""

import ml_collections

from vit_jax import models
from vit_jax.train import defaults


def small_hybrid_model(name: str, *, image_size: int, hidden_size: int, num_layers: int,
                       num_heads: int, mlp_dim: int, num_classes: int):
  """A small ViT on a BiT root block (7x7/2 StdConv + GroupNorm + 3x3/2 max-pool, 64
  channels), as in the paper's hybrids: an image of S px becomes (S/4)^2 tokens of 1x1
  "patches". The conv stem makes the most of small datasets."""
  m = models.get_config('R+ViT-Ti/16')
  m.update(name=name, image_size=image_size, patch_size=(1, 1), hidden_size=hidden_size,
           num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim,
           num_classes=num_classes, dropout_rate=0.0)
  m.resnet = ml_collections.ConfigDict(dict(
      num_layers=(), width_factor=1.0, stdconv_eps=1e-5, stdconv_eps_in_sqrt=False,
      gn_eps=1e-6))
  return m


def imagenet21k_pretraining(model_name: str):
  """Adam (0.9, 0.999), batch 4096, lr 1e-3, wd 0.03, 10k warmup + linear decay, 90 epochs,
  dropout 0.1, representation layer = width, 224 px, clipping 1, sigmoid loss."""
  c = defaults.default_config()
  c.model = models.get_config(model_name)
  c.model.num_classes = 21843
  c.model.representation_size = c.model.hidden_size
  c.model.dropout_rate = 0.1
  c.input.source = 'folder'  # ImageNet-21k is not in tfds: see docs/data.md
  c.input.train_split = 'train'
  c.input.eval_split = 'val'
  c.input.pp_train = 'decode|inception_crop(224)|flip_lr|value_range(-1, 1)|onehot(21843)'
  c.input.pp_eval = ('decode|resize_small(256)|central_crop(224)|value_range(-1, 1)|'
                     'onehot(21843)')
  c.loss = 'sigmoid_xent'
  c.batch_size = 4096
  c.num_epochs = 90
  c.optimizer.update(name='adam', b1=0.9, b2=0.999, weight_decay=0.03, grad_clip_norm=1.0)
  c.schedule.update(base_lr=1e-3, warmup_steps=10_000, decay='linear')
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 2_000
  return c


def finetuning(model_name: str, *, dataset: str, num_classes: int, steps: int,
               base_lr: float, train_split: str, eval_split: str, resolution: int = 384,
               warmup_steps: int | None = None):
  """SGD momentum 0.9, batch 512, no weight decay, clipping 1, cosine decay, new
  zero-initialised head, position embedding resampled to `resolution`. Warmup: 500
  steps, or a tenth of a run shorter than 5,000 steps (500 would be all of a 500-step
  run, leaving no decay)."""
  if warmup_steps is None:
    warmup_steps = min(500, steps // 10)
  c = defaults.default_config()
  c.model = models.get_config(model_name)
  c.model.num_classes = num_classes
  c.model.image_size = resolution
  c.model.dropout_rate = 0.0
  c.input.source = 'tfds'
  c.input.name = dataset
  c.input.train_split = train_split
  c.input.eval_split = eval_split
  c.input.pp_train = (f'decode|inception_crop({resolution})|flip_lr|value_range(-1, 1)|'
                      f'onehot({num_classes})')
  c.input.pp_eval = f'decode|resize({resolution})|value_range(-1, 1)|onehot({num_classes})'
  c.batch_size = 512
  c.total_steps = steps
  c.optimizer.update(name='sgd', momentum=0.9, weight_decay=0.0, grad_clip_norm=1.0)
  c.schedule.update(base_lr=base_lr, warmup_steps=warmup_steps, decay='cosine')
  # The original release's file name: a run fails at once, naming this field, until it is
  # pointed at real weights (--config.init_from=PATH).
  c.init_from = f"{model_name.replace('/', '_').replace('ViT-', 'ViT-')}.npz"
  c.init_head = 'reset'
  c.posemb_resample = 'bilinear'
  c.eval_at_start = True  # the accuracy the pretrained weights start from
  c.log_every = 50
  c.eval_every = max(steps // 10, 100)
  c.checkpoint_every = max(steps // 10, 100)
  return c
