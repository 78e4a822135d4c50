"""Training recipes as functions, shared by the config files in configs/.

ViT: Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021), Table 3 and
Appendix B.1 (pretraining) and Appendix B.1.1 / Table 4 (fine-tuning).
ImageNet-1k supervised training of the comparison architectures (`imagenet1k_supervised`):
ResNet / ResNeXt / Res2Net: SGD momentum 0.9, lr 0.1 per 256 images, weight decay 1e-4,
90 epochs, 5 warmup epochs (He et al. 2016; Goyal et al. 2017), with the cosine decay and
label smoothing 0.1 of He et al. 2019 ("Bag of Tricks") instead of step decay.
BiT-S upstream (Kolesnikov et al. 2020, Sec. 3.1): SGD momentum 0.9, lr 0.03 per 256
images, weight decay 1e-4, batch 4096, 90 epochs, 5000 warmup steps (step decay there,
cosine here).
Swin (Liu et al. 2021, Sec. 4.1): AdamW, lr 1e-3 at batch 1024, weight decay 0.05, 300
epochs, 20 warmup epochs, cosine, gradient clipping at 5, RandAugment, mixup 0.8, cutmix
1.0, label smoothing 0.1, stochastic depth 0.2/0.3/0.5 for T/S/B (random erasing and
repeated augmentation of the paper are not implemented).
`bundled_mnist(config)` turns a recipe into a few-minute offline run on the bundled
MNIST digits (the `:mnist` argument of the config files that take it, e.g.
configs/resnet50.py:mnist).
"""

import re

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


# The ViT recipes train with the encoder blocks' parameters stacked (scan_layers=True):
# one nn.scan over the blocks compiles ViT-B/16's train step in 2.4 s instead of 6.5 s and
# saves re-stacking the per-block parameters at every step (2.77 s against 2.92 s per
# step at batch 8 on a 2-core CPU, BENCHMARKS.md). Checkpoints hold the blocks stacked;
# every reader (init_from, predict, convert, pretrained.load) gives the original
# unstacked layout back, and init_from a published .npz stacks it.
STACKED_BLOCKS = True


def imagenet21k_pretraining(model_name: str):
  """Adam (0.9, 0.999), batch 4096, lr 1e-3, wd 0.03, 10k warmup + linear decay, 90 epochs,
  dropout 0.1, representation layer = width, 224 px (the ViT paper); clipping 1, sigmoid
  loss with the head's bias starting at -10, inception crop + flip, a held-out `val`
  folder (this codebase's choices: see configs/vit_b16.py)."""
  c = defaults.default_config()
  c.model = models.get_config(model_name)
  c.model.num_classes = 21843
  # A reference: a shrunk model (--config.model.hidden_size=64) keeps the layer as wide.
  c.model.representation_size = c.model.get_ref('hidden_size')
  c.model.dropout_rate = 0.1
  c.model.scan_layers = STACKED_BLOCKS
  c.input.source = 'folder'  # ImageNet-21k is not in tfds: see docs/data.md
  c.input.train_split = 'train'
  c.input.eval_split = 'val'
  c.input.pp_train = 'decode|inception_crop(224)|flip_lr|value_range(-1, 1)|onehot(21843)'
  c.input.pp_eval = ('decode|resize_small(256)|central_crop(224)|value_range(-1, 1)|'
                     'onehot(21843)')
  c.loss = 'sigmoid_xent'
  # Each of the 21,843 sigmoids starts near 0 (p = 4.5e-5) rather than at 0.5: at bias 0
  # the first loss is 21,843 x ln 2 = 15,140 an image, and the first steps (clipped at
  # norm 1) go to pushing every bias down (big_vision's ImageNet-21k configs: -10).
  c.model.head_bias_init = -10.0
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
  run, leaving no decay).

  Any registered model: a ViT trains without dropout and with its blocks stacked; the
  pixels are scaled as the published weights of the model's family expect (ImageNet mean
  and std for timm's Swin, ResNet, ResNeXt and Res2Net; [-1, 1] for ViT and BiT).
  """
  if warmup_steps is None:
    warmup_steps = min(500, steps // 10)
  c = defaults.default_config()
  c.model = models.get_config(model_name)
  family = models.family_of(c.model)
  c.model.num_classes = num_classes
  c.model.image_size = resolution
  if family == 'vit':  # (the other families have no such fields)
    c.model.dropout_rate = 0.0
    c.model.scan_layers = STACKED_BLOCKS
  scaling = models.pixel_scaling(family)
  c.input.source = 'tfds'
  c.input.name = dataset
  c.input.train_split = train_split
  c.input.eval_split = eval_split
  c.input.pp_train = (f'decode|inception_crop({resolution})|flip_lr|{scaling}|'
                      f'onehot({num_classes})')
  c.input.pp_eval = f'decode|resize({resolution})|{scaling}|onehot({num_classes})'
  c.batch_size = 512
  c.total_steps = steps
  c.optimizer.update(name='sgd', momentum=0.9, weight_decay=0.0, grad_clip_norm=1.0)
  c.schedule.update(base_lr=base_lr, warmup_steps=warmup_steps, decay='cosine')
  # A placeholder file name (the original release's for ViT and BiT, a timm state dict's
  # otherwise): a run fails at once, naming this field, until it is pointed at real
  # weights (--config.init_from=PATH).
  stem = re.sub(r'[/ ]', '_', model_name)
  c.init_from = {'vit': f'{stem}.npz', 'bit': f"{stem.replace('BiT-', 'BiT-M-')}.npz"}.get(
      family, f'{stem}.safetensors')
  c.init_head = 'reset'
  c.posemb_resample = 'bilinear'
  c.eval_at_start = True  # the accuracy the pretrained weights start from
  c.log_every = 50
  c.eval_every = max(steps // 10, 100)
  c.checkpoint_every = max(steps // 10, 100)
  return c


IMAGENET_TRAIN_IMAGES = 1_281_167


def imagenet1k_supervised(model_name: str, *, batch_size: int = 1024):
  """ImageNet-1k from scratch at 224 px for the Swin, ResNet-family and BiT models.

  The optimizer follows the family (see the module docstring); the learning rate scales
  linearly with the batch size (`schedule.base_lr_batch`, also after
  `--config.batch_size=N`), and the warmup is counted in epochs (`schedule.warmup_epochs`).
  Inputs are normalised with the ImageNet mean and std, as timm's weights of these models
  expect.
  """
  c = defaults.default_config()
  c.model = models.get_config(model_name)
  family = models.family_of(c.model)
  c.input.source = 'tfds'
  c.input.name = 'imagenet2012'
  c.input.train_split = 'train[:99%]'
  c.input.eval_split = 'validation'
  size = c.model.image_size
  c.input.pp_train = f'decode|inception_crop({size})|flip_lr|normalize|onehot(1000, label_smoothing=0.1)'
  c.input.pp_eval = (f'decode|resize_small({size * 8 // 7})|central_crop({size})|normalize|'
                     'onehot(1000)')
  c.batch_size = batch_size
  if family == 'swin':
    c.num_epochs = 300
    c.optimizer.update(name='adam', b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
                       grad_clip_norm=5.0)
    c.schedule.update(base_lr=1e-3, base_lr_batch=1024, warmup_epochs=20.0, decay='cosine')
    c.input.pp_train = (f'decode|inception_crop({size})|flip_lr|randaugment(2, 9)|normalize|'
                        'onehot(1000, label_smoothing=0.1)')
    c.input.mixup_alpha = 0.8
    c.input.cutmix_alpha = 1.0
  elif family == 'bit':
    c.num_epochs = 90
    c.optimizer.update(name='sgd', momentum=0.9, weight_decay=1e-4, grad_clip_norm=0.0)
    c.schedule.update(base_lr=0.03, base_lr_batch=256, warmup_steps=5000, decay='cosine')
    c.input.pp_train = f'decode|inception_crop({size})|flip_lr|normalize|onehot(1000)'
  else:  # resnet, resnext, res2net
    c.num_epochs = 90
    c.optimizer.update(name='sgd', momentum=0.9, weight_decay=1e-4, grad_clip_norm=0.0)
    c.schedule.update(base_lr=0.1, base_lr_batch=256, warmup_epochs=5.0, decay='cosine')
  c.log_every = 100
  # Every 5 epochs, also after --config.batch_size=N (a reference: it was computed from
  # the recipe's batch, and batch 256 evaluated every 1.25 epochs).
  c.eval_every = (int(IMAGENET_TRAIN_IMAGES * 0.99) // c.get_ref('batch_size')) * 5
  c.checkpoint_every = 2_000
  return c


def bundled_mnist(c, *, image_size: int = 32, batch_size: int = 64, num_epochs: float = 2,
                  base_lr: float | None = None):
  """The same recipe on the bundled MNIST digits (offline; minutes to a quarter of an hour
  on a 2-core CPU, depending on the model).

  The model keeps its architecture, with 10 classes at `image_size` px; the optimizer keeps
  its kind with a learning rate and warmup suited to a short run.
  """
  c.model.num_classes = 10
  c.model.image_size = image_size
  c.input.source = 'tfds'
  c.input.name = 'bundled_mnist'
  c.input.train_split = 'train'
  c.input.eval_split = 'test'
  c.input.pp_train = (f'decode|random_resized_crop({image_size}, scale=(0.75, 1.0), '
                      f'ratio=(0.9, 1.1))|value_range(-1, 1)|onehot(10)')
  c.input.pp_eval = f'decode|resize({image_size})|value_range(-1, 1)|onehot(10)'
  c.input.mixup_alpha = 0.0
  c.input.cutmix_alpha = 0.0
  c.batch_size = batch_size
  c.num_epochs = num_epochs
  if base_lr is None:
    base_lr = 1e-3 if c.optimizer.name == 'adam' else 0.05
  c.schedule.update(base_lr=base_lr, base_lr_batch=0, warmup_steps=20, warmup_epochs=0.0,
                    decay='cosine')
  c.log_every = 10
  c.eval_every = 0
  c.checkpoint_every = 25  # a run stopped part-way resumes (ResNet-50 takes minutes per 25)
  return c
