"""ViT-B/16 pretraining on ImageNet-21k at 224 px (the paper's recipe).

Source: Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021): Table 1 (model
shape), Table 3 (ImageNet-21k: Adam b1=0.9, b2=0.999, batch 4096, base lr 1e-3, weight
decay 0.03, 90 epochs, 224 px), Appendix B.1 (linear warmup of 10k steps then linear
decay, global-norm clipping at 1, dropout 0.1, representation layer of width 768,
sigmoid cross-entropy for ImageNet-21k).

Data: ImageNet-21k is not in the public tfds catalog; give it as an image folder,
`--config.input.folder=/data/imagenet21k` (see docs/data.md), or point
`config.input.source/name` at your own tfds build. Memory: raise accum_steps (e.g.
`--config.accum_steps=8`) to keep the global batch of 4096 where it does not fit.
"""

from vit_jax import models
from vit_jax.train import defaults


def get_config():
  c = defaults.default_config()
  c.model = models.get_config('ViT-B/16')
  c.model.num_classes = 21843  # ImageNet-21k classes (fall 2011 release)
  c.model.representation_size = 768
  c.model.dropout_rate = 0.1
  c.input.source = 'folder'
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
  c.mesh.update(data=-1, fsdp=1, model=1)
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 2_000
  return c
