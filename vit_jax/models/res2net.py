"""Res2Net (family 'res2net'): ResNet v1.5 with the multi-scale Bottle2neck block.

The network (stem, stages `layer1..4` of blocks `block_0..`, pooling, fc) is
`resnet_v1.ResNet`; only the block differs, matching timm's `Bottle2neck`:

  conv1 1x1 to width * scale -> bn1 -> ReLU -> split into `scale` groups x_1..x_s of
  `width` channels (width = floor(planes * base_width / 64) * cardinality) ->
    for i = 1..max(1, scale - 1): y_i = ReLU(bns_{i-1}(convs_{i-1}(x_i + y_{i-1}))), the
      3x3 convs carrying the block stride and `cardinality` groups; in the first block of
      a stage (stride > 1 or a projection shortcut) every x_i is convolved on its own,
      without the + y_{i-1};
    the last split x_s is passed on unchanged, or in the first block of a stage through a
      3x3 average pool with the stride and padding 1 whose zero padding is counted in the
      mean (torch's count_include_pad=True, which timm keeps for the original weights;
      applied even at stride 1, i.e. in layer1's first block);
  concat -> conv3 1x1 to 4 * planes -> bn3 -> drop path -> + shortcut -> ReLU.

Name mapping to timm, in addition to resnet_v1's:
  layer{s}.{i}.convs.{j} / bns.{j}        layer{s}/block_{i}/convs_{j} / bns_{j}
"""

import functools

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from vit_jax.models import resnet_v1

FAMILY = 'res2net'

FIELD_DOCS = dict(resnet_v1.FIELD_DOCS)
FIELD_DOCS.update({
    'family': "model family: 'res2net' (ResNet v1.5 with Res2Net blocks, BatchNorm)",
    'cardinality': 'groups of each 3x3 conv of a block (1 for Res2Net, 8 for Res2NeXt)',
    'base_width': 'channels per group of each scale in the first stage (26 in 26w4s)',
    'block': "residual block: 'bottle2neck'",
    'scale': 'splits of each block (4 in 26w4s); scale - 1 of them get a 3x3 conv',
})


class Bottle2neck(resnet_v1.BlockBase):
  """Res2Net block (see the module docstring)."""
  scale: int = 4

  @nn.compact
  def __call__(self, x, *, train: bool):
    width = self.width
    is_first = self.strides > 1 or self.downsample
    y = self.conv(width * self.scale, 1, name='conv1')(x)
    y = nn.relu(self.bn(train, 'bn1')(y))
    splits = jnp.split(y, self.scale, axis=-1)
    outs = []
    sp = None
    for i in range(max(1, self.scale - 1)):
      sp = splits[i] if i == 0 or is_first else sp + splits[i]
      sp = self.conv(width, 3, self.strides, self.cardinality, name=f'convs_{i}')(sp)
      sp = nn.relu(self.bn(train, f'bns_{i}')(sp))
      outs.append(sp)
    if self.scale > 1:
      last = splits[-1]
      if is_first:
        last = nn.avg_pool(last, (3, 3), strides=(self.strides, self.strides),
                           padding=((1, 1), (1, 1)), count_include_pad=True)
      outs.append(last)
    y = jnp.concatenate(outs, axis=-1)
    y = self.conv(self.planes * resnet_v1.EXPANSION, 1, name='conv3')(y)
    y = self.bn(train, 'bn3', last=True)(y)
    return self.finish(x, y, train)


class Res2Net(resnet_v1.ResNet):
  """`resnet_v1.ResNet` with Bottle2neck blocks of `scale` splits."""
  base_width: int = 26
  scale: int = 4

  def block_fn(self):
    return functools.partial(Bottle2neck, scale=self.scale, **self.block_settings())


# (paper name, timm name, layers, cardinality, base_width, scale)
_MODELS = [
    ('Res2Net-50 26w4s', 'res2net50_26w_4s', (3, 4, 6, 3), 1, 26, 4),
]


def named_configs() -> dict[str, ml_collections.ConfigDict]:
  """Paper names and timm names (same architecture and numerics: timm's) -> configs."""
  out = {}
  for paper, timm_name, layers, cardinality, base_width, scale in _MODELS:
    for name in (paper, timm_name):
      out[name] = resnet_v1.base_config(name, layers, cardinality, base_width, family=FAMILY,
                                        block='bottle2neck', scale=scale)
  return out


def from_config(config) -> Res2Net:
  """The Res2Net module of a 'res2net' family config; ValueError on a bad field."""
  c = resnet_v1.check_config(config, FIELD_DOCS, FAMILY, ('bottle2neck',))
  scale = c['scale']
  if not resnet_v1.is_int(scale) or scale < 1:
    raise ValueError(f'model config field scale={scale!r} is invalid: a positive int '
                     '(splits per block)')
  return Res2Net(scale=int(scale), **resnet_v1.module_kwargs(c))
