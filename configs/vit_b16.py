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

from vit_jax.train import recipes


def get_config():
  return recipes.imagenet21k_pretraining('ViT-B/16')
