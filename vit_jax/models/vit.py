"""Vision Transformer (Dosovitskiy et al., 2020) and its hybrid ResNet-stem variant.

Parameter names follow the original linen release so that checkpoints load unchanged:

    embedding/{kernel,bias}               patch embedding (conv, stride = patch)
    cls                                   class token (token classifiers only)
    Transformer/posembed_input/pos_embedding
    Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0,
                                  LayerNorm_1, MlpBlock_0/Dense_{0,1}}
    Transformer/encoder_norm
    MAPHead_0/...                         attention-pooling head (classifier='map')
    pre_logits                            optional Dense + tanh (representation_size)
    head                                  zero-initialised classifier
    conv_root, gn_root, block{s}/unit{u}  hybrid ResNet stem
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import attention as attention_lib
from vit_jax.models import common
from vit_jax.models import dense_matmul
from vit_jax.models import remat as remat_lib
from vit_jax.models import resnet
from vit_jax.models import scan_layout

CLASSIFIERS = ('token', 'gap', 'map', 'unpooled', 'token_unpooled')
# Logical axes of the token activations. Outside a mesh and `nn.logical_axis_rules`
# context the constraints do nothing; the train step maps them to mesh axes
# (vit_jax/sharding.py LOGICAL_RULES).
TOKENS_AXES = ('batch', 'length', 'embed')
REMAT_POLICIES = remat_lib.POLICIES
LAYER_LOOPS = ('scan', 'unroll')


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example.

  `rate` is a float, or a traced scalar when the blocks are scanned (one rate per layer).
  """
  rate: Any

  @nn.compact
  def __call__(self, x, deterministic: bool, rng=None):
    """`rng` defaults to a key drawn from the 'dropout' stream."""
    static = isinstance(self.rate, (int, float))
    if deterministic or (static and self.rate == 0.0):
      return x
    if static and self.rate >= 1.0:
      return jnp.zeros_like(x)
    return common.drop_path(x, self.rate, self.make_rng('dropout') if rng is None else rng)


class AddPositionEmbs(nn.Module):
  """Adds a learned position embedding of shape (1, tokens, width)."""
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = (1, x.shape[1], x.shape[2])
    if self.has_variable('params', 'pos_embedding'):
      stored = self.get_variable('params', 'pos_embedding').shape
      if tuple(stored) != shape:
        raise ValueError(
            f'position embedding in the parameters has shape {tuple(stored)} but the input '
            f'gives {shape[1]} tokens, i.e. shape {shape}: the images are not the size the '
            'parameters were made for. In training, make config.model.image_size and the '
            "size of config.input's preprocessing the same; to use weights made for another "
            'resolution, resample them with vit_jax.models.resample_posemb(posemb, new_grid) '
            '(config.init_from does this when it loads them).')
    pe = self.param('pos_embedding', nn.initializers.normal(stddev=0.02), shape,
                    self.param_dtype)
    return x + pe.astype(x.dtype)


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout."""
  mlp_dim: int
  dropout_rate: float = 0.0
  gelu_approximate: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  custom_vjp: bool = True

  @nn.compact
  def __call__(self, x, *, deterministic: bool, rng=None):
    """`rng`, if given, is split into the two dropout layers' keys; without it they draw
    from the 'dropout' stream."""
    rngs = (None, None) if rng is None or deterministic else tuple(jax.random.split(rng))
    dense = lambda features, name: nn.Dense(  # noqa: E731
        features, dtype=self.dtype, param_dtype=self.param_dtype,
        dot_general=dense_matmul.dot_general_fn(self.dtype, custom_vjp=self.custom_vjp),
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    out_dim = x.shape[-1]
    x = dense(self.mlp_dim, 'Dense_0')(x)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'mlp'))
    x = nn.gelu(x, approximate=self.gelu_approximate)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic, rng=rngs[0])
    x = dense(out_dim, 'Dense_1')(x)
    return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic, rng=rngs[1])


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  layernorm_eps: float = 1e-6
  gelu_approximate: bool = True
  attention_impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  custom_vjp: bool = True

  @nn.compact
  def __call__(self, x, deterministic: bool, capture_attention: bool = False, rng=None):
    """`rng` is the block's dropout key; without it, one is drawn from the 'dropout'
    stream (the encoder passes one per layer, the same in every layer layout)."""
    return self._forward(x, deterministic, capture_attention, self.drop_path_rate, rng)

  def _forward(self, x, deterministic, capture_attention, drop_path_rate, rng):
    keys = [None] * 5
    if not deterministic:
      drops_paths = not isinstance(drop_path_rate, (int, float)) or drop_path_rate > 0
      if rng is None and (self.dropout_rate > 0 or self.attention_dropout_rate > 0 or
                          drops_paths):
        rng = self.make_rng('dropout')
      if rng is not None:  # one key per dropout site, whichever way the layers run
        keys = list(jax.random.split(rng, 5))
    ln = lambda name: nn.LayerNorm(  # noqa: E731
        epsilon=self.layernorm_eps, use_fast_variance=False, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    y = ln('LayerNorm_0')(x)
    y = attention_lib.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate,
        implementation=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
        custom_vjp=self.custom_vjp, name='MultiHeadDotProductAttention_0')(
            y, deterministic=deterministic, return_weights=capture_attention,
            dropout_rng=keys[0])
    if capture_attention:
      y, weights = y
      self.sow('intermediates', 'attention_weights', weights)
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic, rng=keys[1])
    x = x + DropPath(drop_path_rate)(y, deterministic, keys[2])
    y = ln('LayerNorm_1')(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                 gelu_approximate=self.gelu_approximate, dtype=self.dtype,
                 param_dtype=self.param_dtype, custom_vjp=self.custom_vjp, name='MlpBlock_0')(
                     y, deterministic=deterministic, rng=keys[3])
    return nn.with_logical_constraint(x + DropPath(drop_path_rate)(y, deterministic, keys[4]),
                                      TOKENS_AXES)


class ScannedEncoderBlock(Encoder1DBlock):
  """The block as one step of `nn.scan` over layers: (tokens, (this layer's drop-path
  rate or None for none, dropout key or None), deterministic) -> (tokens, None). Its
  parameters gain a leading layer axis."""

  @nn.compact
  def __call__(self, x, layer, deterministic: bool):  # pylint: disable=arguments-renamed
    drop_path_rate, rng = layer
    if drop_path_rate is None:  # a static zero keeps DropPath out of the graph
      drop_path_rate = 0.0
    return self._forward(x, deterministic, False, drop_path_rate, rng), None


class Encoder(nn.Module):
  """Position embedding, `num_layers` blocks and the final LayerNorm."""
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  layernorm_eps: float = 1e-6
  gelu_approximate: bool = True
  attention_impl: str | None = None
  remat_policy: str | None = 'auto'
  scan_layers: bool = False
  layer_loop: str = 'scan'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  custom_vjp: bool = True

  def _block_kwargs(self):
    return dict(
        mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        layernorm_eps=self.layernorm_eps, gelu_approximate=self.gelu_approximate,
        attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
        custom_vjp=self.custom_vjp)

  def _drop_path_rates(self):
    """Stochastic depth grows linearly from 0 (first block) to drop_path_rate (last).

    None when drop_path_rate is 0: a scanned block then takes a static zero rate, which
    keeps DropPath out of the graph (no random bits drawn)."""
    if self.drop_path_rate <= 0:
      return None
    return self.drop_path_rate * jnp.arange(self.num_layers) / max(self.num_layers - 1, 1)

  def _encoder_norm(self, x):
    return nn.LayerNorm(epsilon=self.layernorm_eps, use_fast_variance=False,
                        dtype=self.dtype, param_dtype=self.param_dtype, name='encoder_norm')(x)

  @staticmethod
  def _float32_carry(x):
    """Under mixed precision the blocks return float32 tokens (their residual adds take
    the float32 matmul outputs): a scan carries float32 from the start, with the same
    values the first block would see in bf16."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))

  def _scanned(self, x, train):
    """All blocks as one `nn.scan` (parameters 'encoderblock/...' with a leading layer
    axis): the same computation, compiled once instead of num_layers times."""
    step = ScannedEncoderBlock
    if remat_lib.resolve(self.remat_policy) is not None:
      step = nn.remat(step, policy=remat_lib.policy(self.remat_policy, self.dtype),
                      static_argnums=(3,))
    layers = nn.scan(step, variable_axes={'params': 0},
                     split_rngs={'params': True, 'dropout': True},
                     in_axes=(0, nn.broadcast), length=self.num_layers)
    x, _ = layers(**self._block_kwargs(), name='encoderblock')(
        self._float32_carry(x), (self._drop_path_rates(), self._layer_rngs(train)), not train)
    return x

  def _stochastic(self, train):
    return train and (self.dropout_rate > 0 or self.attention_dropout_rate > 0 or
                      self.drop_path_rate > 0)

  def _layer_rngs(self, train):
    """One dropout key per block (None when nothing is random): the scanned, looped and
    unrolled layouts hand block i the same key, so they draw the same masks."""
    if not self._stochastic(train):
      return None
    return jax.random.split(self.make_rng('dropout'), self.num_layers)

  def _scan_over_blocks(self, x, train):
    """The unrolled layout's blocks run as one `lax.scan`: the same computation as the
    Python loop, compiled once instead of num_layers times.

    The parameters stay `encoderblock_{i}` (the original checkpoints' layout); at each
    call they are stacked along a new leading axis (a copy of the encoder's weights, and
    of their gradients back: ViT-B/16's train step takes 9% longer on a CPU than with
    the blocks stored stacked, scan_layers=True) and each step of the scan applies the
    block to its slice. Gradients flow back through the stacking to each block.
    """
    params = self.variables['params']
    self._check_block_count()
    stacked = scan_layout.stack_layers({'Transformer': {
        f'encoderblock_{i}': params[f'encoderblock_{i}'] for i in range(self.num_layers)}})
    stacked = stacked['Transformer']['encoderblock']
    # Named as the stacked layout's block, so that profiles and traces say 'encoderblock'.
    block = ScannedEncoderBlock(**self._block_kwargs(), name='encoderblock')
    stochastic = self._stochastic(train)

    def body(x, layer):
      layer_params, rate, rng = layer
      y, _ = block.apply({'params': layer_params}, x, (rate, rng), not stochastic)
      return y, None

    if remat_lib.resolve(self.remat_policy) is not None:
      body = jax.checkpoint(body, policy=remat_lib.policy(self.remat_policy, self.dtype),
                            prevent_cse=False)
    x, _ = jax.lax.scan(body, self._float32_carry(x),
                        (stacked, self._drop_path_rates(), self._layer_rngs(train)))
    return x

  def _check_block_count(self) -> None:
    """Parameters of another depth than num_layers are refused (in every layout: with
    fewer layers than the weights the unrolled loop ran their first blocks silently)."""
    params = self.variables.get('params', {})
    have = sorted(int(k.rsplit('_', 1)[1]) for k in params if k.startswith('encoderblock_')
                  and k.rsplit('_', 1)[1].isdigit())
    if have != list(range(self.num_layers)):
      raise ValueError(
          f'the parameters hold {len(have)} encoder blocks (encoderblock_0 .. '
          f'encoderblock_{max(have, default=-1)}), but the model has num_layers='
          f'{self.num_layers}: create the model with num_layers={len(have)}, or read the '
          "weights' own config (vit_jax.checkpoints.architecture.infer_model_config)")

  @nn.compact
  def __call__(self, x, *, train: bool, capture_attention: bool = False):
    x = AddPositionEmbs(param_dtype=self.param_dtype, name='posembed_input')(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    if self.scan_layers:
      if capture_attention:
        raise ValueError('capture_attention needs scan_layers=False: load the weights into '
                         'the unscanned model (vit_jax.models.unstack_layers)')
      return self._encoder_norm(self._scanned(x, train))
    if self.layer_loop not in LAYER_LOOPS:
      raise ValueError(f'layer_loop={self.layer_loop!r} is not one of {LAYER_LOOPS}')
    if (self.layer_loop == 'scan' and not capture_attention and not self.is_initializing()
        and self.num_layers > 1):
      return self._encoder_norm(self._scan_over_blocks(x, train))
    if not self.is_initializing():
      self._check_block_count()
    block_cls = Encoder1DBlock
    if remat_lib.resolve(self.remat_policy) is not None:  # same names, recomputed in backward
      block_cls = nn.remat(Encoder1DBlock, policy=remat_lib.policy(self.remat_policy, self.dtype),
                           static_argnums=(2, 3))
    rngs = self._layer_rngs(train)
    for i in range(self.num_layers):
      rate = self.drop_path_rate * i / max(self.num_layers - 1, 1)  # a static float
      x = block_cls(**self._block_kwargs(), drop_path_rate=rate, name=f'encoderblock_{i}')(
          x, not train, capture_attention, None if rngs is None else rngs[i])
    return self._encoder_norm(x)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens."""
  num_heads: int
  mlp_dim: int
  layernorm_eps: float = 1e-6
  gelu_approximate: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  custom_vjp: bool = True

  @nn.compact
  def __call__(self, x):
    probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]),
                       self.param_dtype)
    probe = jnp.broadcast_to(probe.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = attention_lib.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        custom_vjp=self.custom_vjp, name='MultiHeadDotProductAttention_0')(probe, x)
    y = nn.LayerNorm(epsilon=self.layernorm_eps, use_fast_variance=False, dtype=self.dtype,
                     param_dtype=self.param_dtype, name='LayerNorm_0')(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim, gelu_approximate=self.gelu_approximate,
                     dtype=self.dtype, param_dtype=self.param_dtype,
                     custom_vjp=self.custom_vjp, name='MlpBlock_0')(y, deterministic=True)
    return x[:, 0]


class VisionTransformer(nn.Module):
  """ViT classifier over NHWC images with values in [-1, 1].

  Build it with `vit_jax.models.create(name_or_config)`; the fields mirror the model
  config (see `vit_jax/models/registry.py` for what each one means).
  """
  num_classes: int | None
  patch_size: tuple[int, int] | int  # an int is a square patch
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  classifier: str = 'token'
  representation_size: int | None = None
  head_bias_init: float = 0.0
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  layernorm_eps: float = 1e-6
  gelu_approximate: bool = True
  attention_impl: str | None = None
  remat_policy: str | None = 'auto'
  scan_layers: bool = False
  layer_loop: str = 'scan'
  in_channels: int = 3
  # Hybrid stem; resnet_layers=None means a plain ViT, () means the root block only.
  resnet_layers: Sequence[int] | None = None
  resnet_width_factor: float = 1.0
  stdconv_eps: float = 1e-5
  stdconv_eps_in_sqrt: bool = False
  gn_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # The Dense matmuls' and CPU attention's hand-written backward passes (fast on CPU,
  # low-precision gradient matmuls); False: plain autodiff, which forward mode needs.
  custom_vjp: bool = True

  def patch(self) -> tuple[int, int]:
    """The patch size as (height, width)."""
    p = self.patch_size
    return (int(p), int(p)) if isinstance(p, (int, np.integer)) else tuple(p)

  def total_stride(self) -> tuple[int, int]:
    """Input pixels per token along (height, width)."""
    stem = 1 if self.resnet_layers is None else resnet.stem_stride(self.resnet_layers)
    return (stem * self.patch()[0], stem * self.patch()[1])

  def _check_input(self, images):
    common.check_nhwc(images, self.in_channels)
    _, h, w, _ = images.shape
    sh, sw = self.total_stride()
    if h % sh or w % sw:
      what = (f'patch size {self.patch()}' if self.resnet_layers is None else
              f'ResNet stem stride x patch size = {(sh, sw)}')
      raise ValueError(
          f'image size {(h, w)} is not divisible by the {what}; resize or crop to a multiple '
          f'(e.g. {(max(h // sh, 1) * sh, max(w // sw, 1) * sw)}).')
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'classifier {self.classifier!r} is not one of {CLASSIFIERS}')

  def _check_layout(self):
    """A ValueError naming the fix when the params do not fit the module's layout: the
    block layout (stacked blocks for scan_layers=False or the reverse, which flax reports
    as a missing 'encoderblock_0' or an empty collection), or a class token the
    classifier does not use (reported as a position embedding of another size)."""
    if self.is_initializing():
      return
    params = self.variables.get('params', {})
    uses_cls = self.classifier in ('token', 'token_unpooled')
    if 'cls' in params and not uses_cls:
      hint = (" (for every token of a class-token model, use classifier='token_unpooled')"
              if self.classifier == 'unpooled' else '')
      raise ValueError(f"the params have a class token ('cls') but classifier="
                       f"{self.classifier!r} uses none{hint}")
    if params and self.num_classes and 'head' not in params:
      raise ValueError(  # (flax's: 'Could not find parameter named "kernel" in scope /head')
          f"the params have no head ('head'), and this model has num_classes="
          f'{self.num_classes}: create it with num_classes=0 for the features, or fit the '
          'params to the model (vit_jax.checkpoints.merge_into(init, params, '
          'drop_head=True) starts a new head)')
    encoder = params.get('Transformer', {})
    if not encoder:
      return
    stacked = 'encoderblock' in encoder
    if stacked != bool(self.scan_layers):
      have, want = (('stacked', 'unrolled') if stacked else ('unrolled', 'stacked'))
      fix = 'vit_jax.models.unstack_layers' if stacked else 'vit_jax.models.stack_layers'
      raise ValueError(
          f'the params hold the encoder blocks {have} (Transformer/encoderblock'
          f'{"" if stacked else "_N"}) but this model (scan_layers={self.scan_layers}) '
          f'expects them {want}: convert them with {fix}(variables), or create the model '
          f'with scan_layers={stacked}')

  @nn.compact
  def __call__(self, images, *, train: bool = False, capture_attention: bool = False):
    """Logits (batch, num_classes) in float32; features if num_classes is falsy.

    With capture_attention=True each block sows its attention weights into the
    'intermediates' collection (apply with mutable=['intermediates']); see
    `vit_jax.models.attention_maps`.
    """
    self._check_input(images)
    self._check_layout()
    common.check_train_apply(self, train, dict(
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        drop_path_rate=self.drop_path_rate))
    x = images.astype(self.dtype)
    if self.resnet_layers is not None:
      x = resnet.bit_stem(
          x, num_layers=tuple(self.resnet_layers), width_factor=self.resnet_width_factor,
          stdconv_eps=self.stdconv_eps, stdconv_eps_in_sqrt=self.stdconv_eps_in_sqrt,
          gn_eps=self.gn_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Conv(self.hidden_size, kernel_size=self.patch(),
                strides=self.patch(), padding='VALID', dtype=self.dtype,
                param_dtype=self.param_dtype, name='embedding')(x)
    n, h, w, c = x.shape
    x = jnp.reshape(x, (n, h * w, c))

    if self.classifier in ('token', 'token_unpooled'):
      cls = self.param('cls', nn.initializers.zeros, (1, 1, c), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, c)), x], axis=1)

    x = nn.with_logical_constraint(x, TOKENS_AXES)
    x = Encoder(
        num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        drop_path_rate=self.drop_path_rate, layernorm_eps=self.layernorm_eps,
        gelu_approximate=self.gelu_approximate, attention_impl=self.attention_impl,
        remat_policy=self.remat_policy, scan_layers=self.scan_layers,
        layer_loop=self.layer_loop, dtype=self.dtype, param_dtype=self.param_dtype,
        custom_vjp=self.custom_vjp, name='Transformer')(
            x, train=train, capture_attention=capture_attention)

    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = jnp.mean(x, axis=1)
    elif self.classifier == 'map':
      x = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                  layernorm_eps=self.layernorm_eps, gelu_approximate=self.gelu_approximate,
                  dtype=self.dtype, param_dtype=self.param_dtype, custom_vjp=self.custom_vjp,
                  name='MAPHead_0')(x)
    # 'unpooled', 'token_unpooled': every token, and the pre-logits layer and head (if
    # any) on each, as the original release (per-token logits; features: num_classes=0).

    if self.representation_size:
      x = nn.Dense(self.representation_size, dtype=self.dtype, param_dtype=self.param_dtype,
                   dot_general=dense_matmul.dot_general_fn(self.dtype, custom_vjp=self.custom_vjp),
                   name='pre_logits')(x)
      x = jnp.tanh(x)
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   dot_general=dense_matmul.dot_general_fn(self.dtype, custom_vjp=self.custom_vjp),
                   kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.constant(self.head_bias_init), name='head')(x)
    return x.astype(jnp.float32)


def attention_maps(module: VisionTransformer, params, images) -> list[jax.Array]:
  """Attention weights of every block, each (batch, heads, tokens, tokens), in order.

  params: the model's params, in either block layout (a scan_layers=True model's are read
  by the same model unrolled: a scan does not keep each block's weights).
  """
  if not isinstance(module, VisionTransformer):
    raise TypeError(f'attention_maps takes a VisionTransformer (ViT or hybrid), got a '
                    f'{type(module).__name__}: other families (Swin, ResNet) have no '
                    'class-token attention over the whole image to show')
  if module.scan_layers or scan_layout.is_stacked(params):
    module = module.clone(scan_layers=False)
    params = scan_layout.unstack_layers(params)
  _, state = module.apply({'params': params}, images, train=False, capture_attention=True,
                          mutable=['intermediates'])
  blocks = state['intermediates']['Transformer']
  return [blocks[f'encoderblock_{i}']['attention_weights'][0]
          for i in range(module.num_layers)]
