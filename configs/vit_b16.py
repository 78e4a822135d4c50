"""ViT-B/16 pre-training on ImageNet-21k at 224 px, after the ViT paper.

Source: Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021): Table 1 (model shape);
Table 3 (ImageNet-21k: batch 4096, base lr 1e-3, weight decay 0.03, 90 epochs, 224 px);
Sec. 4.1 (Adam, b1=0.9, b2=0.999); Appendix B.1 (10k steps of linear warmup then linear
decay; dropout 0.1); Sec. 3.1 (a head with one hidden layer at pre-training: 768 wide
here, as in the released checkpoints).

Not from the paper, which does not state them for ImageNet-21k: the sigmoid
cross-entropy loss with the head's bias starting at -10 (big_vision's practice for
ImageNet-21k: the first loss is about 10 an image instead of 21,843 x ln 2), global-norm
clipping at 1
(the paper's Table 3 applies it to ImageNet-1k; AugReg, Steiner et al. 2021, to every
run), the inception-crop + flip preprocessing, and the held-out `val` folder (ImageNet-21k
has no official validation split: docs/data.md).

Data: ImageNet-21k is not in the public tfds catalog; give it as an image folder,
`--config.input.folder=/data/imagenet21k` (see docs/data.md), or point
`config.input.source/name` at your own tfds build. Memory: raise accum_steps (e.g.
`--config.accum_steps=8`) to keep the global batch of 4096 where it does not fit.
"""

from vit_jax.train import recipes


def get_config():
  return recipes.imagenet21k_pretraining('ViT-B/16')
