"""Model names -> ml_collections configs, and `create` to build a Flax module.

Every model of the original ViT release is registered under its paper name
(`ViT-B/16`, `R50+ViT-B/16`, ...) with the original numerics (tanh-approximate GELU,
the original epsilons). The corresponding timm names (`vit_base_patch16_224`, ...) are
registered too, with timm's numerics (exact GELU, timm's epsilons) and resolution, so
that weights taken from timm reproduce timm's outputs.

The other architecture families (Swin, ResNet/ResNeXt, Res2Net, BiT ResNetV2) live in
their own modules; each registers its names through `named_configs()`, documents its
fields in `FIELD_DOCS` and builds its module with `from_config(config)`. A config's
`family` field picks the builder; ViT configs have none (or family='vit').
"""

import difflib
import importlib
import math
import numbers

import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax.models import attention
from vit_jax.models import vit

# Fields of a model config; each has a default here and a one-line meaning.
_FIELD_DOCS = {
    'name': 'registered name the config came from',
    'image_size': 'default input resolution (pixels, square); sets the position grid',
    'num_classes': 'classifier outputs; 0 or None returns the pooled features',
    'patch_size': '(rows, cols) of a patch, in pixels (in stem feature pixels for hybrids)',
    'hidden_size': 'token width D',
    'num_layers': 'number of encoder blocks',
    'num_heads': 'attention heads per block',
    'mlp_dim': 'hidden width of the MLP in each block',
    'classifier': "pooling: 'token', 'gap', 'map', 'unpooled' or 'token_unpooled'",
    'representation_size': 'width of the pre_logits Dense+tanh layer; None for none',
    'head_bias_init': 'initial value of the (zero-initialised) head bias',
    'dropout_rate': 'dropout after the position embedding, attention and MLP layers',
    'attention_dropout_rate': 'dropout on the attention weights',
    'drop_path_rate': 'stochastic depth of the last block (linear from 0 at the first)',
    'layernorm_eps': 'LayerNorm epsilon (1e-6 original and timm, 1e-12 transformers)',
    'gelu_approximate': 'tanh-approximate GELU (original) or exact (timm, transformers)',
    'attention_impl': "None (heads_major on CPU, jax's choice elsewhere), 'heads_major' (two "
                      "einsums, fastest on CPU), or jax.nn.dot_product_attention's 'xla' / "
                      "'cudnn'",
    'remat_policy': "rematerialise each block in backward: 'auto' (dots_no_batch on CPU, None "
                    "elsewhere), None, 'full', 'dots', 'dots_no_batch'",
    'scan_layers': 'one nn.scan over the encoder blocks (faster compile; params stacked per layer)',
    'layer_loop': "with scan_layers=False: 'scan' runs the blocks as one lax.scan over their "
                  "parameters stacked per call (compiles once, faster on CPU) or 'unroll' "
                  '(each block compiled on its own); parameter names are the same either way',
    'custom_vjp': 'True: the Dense matmuls and the CPU attention use hand-written backward '
                  'passes (fast on CPU, low-precision gradient matmuls in bf16); False: plain '
                  'autodiff everywhere, which forward mode (jax.jvp, jacfwd, hessian) needs',
    'in_channels': 'input channels',
    'dtype': "compute dtype: 'float32' or 'bfloat16'",
    'param_dtype': "parameter dtype: 'float32' (recommended) or 'bfloat16'",
    'resnet': 'hybrid stem: None, or num_layers / width_factor / stdconv_eps / '
              'stdconv_eps_in_sqrt / gn_eps',
}

# Fields that take more than one type: an int or None, a name or None, one int or one
# per stage. ml_collections types a command-line override by the field's current value,
# so a plain None would refuse `--config.model.attention_impl=xla` and a plain int
# `--config.model.representation_size=None`. get_config() holds them as object-typed
# references, which take any Python literal there; create() checks the value.
_ANY_LITERAL_FIELDS = frozenset(
    {'representation_size', 'attention_impl', 'remat_policy', 'window_size'})

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

_SIZES = {  # hidden, mlp, heads, layers
    'Ti': (192, 768, 3, 12),
    'S': (384, 1536, 6, 12),
    'B': (768, 3072, 12, 12),
    'L': (1024, 4096, 16, 24),
    'H': (1280, 5120, 16, 32),
}
_TIMM_SIZE = {'Ti': 'tiny', 'S': 'small', 'B': 'base', 'L': 'large', 'H': 'huge'}

_REGISTRY: dict[str, ml_collections.ConfigDict] = {}

# Modules of the non-ViT families, each with FIELD_DOCS, named_configs() and from_config().
_FAMILY_MODULES = ('vit_jax.models.swin', 'vit_jax.models.resnet_v1',
                   'vit_jax.models.res2net', 'vit_jax.models.bit')
_FAMILIES: dict[str, object] = {}  # family name -> its module


# The hybrid ViT's ResNet stem fields that a config may leave out.
_RESNET_STEM_DEFAULTS = {'width_factor': 1.0, 'stdconv_eps': 1e-5,
                         'stdconv_eps_in_sqrt': False, 'gn_eps': 1e-6}


def _base(name, size, patch, resnet=None, image_size=224):
  hidden, mlp, heads, layers = _SIZES[size]
  c = ml_collections.ConfigDict()
  c.name = name
  c.image_size = image_size
  c.num_classes = 1000
  c.patch_size = (patch, patch)
  c.hidden_size = hidden
  c.num_layers = layers
  c.num_heads = heads
  c.mlp_dim = mlp
  c.classifier = 'token'
  c.representation_size = ml_collections.FieldReference(None, field_type=int)
  c.head_bias_init = 0.0
  c.dropout_rate = 0.0
  c.attention_dropout_rate = 0.0
  c.drop_path_rate = 0.0
  c.layernorm_eps = 1e-6
  c.gelu_approximate = True
  c.attention_impl = ml_collections.FieldReference(None, field_type=str)
  c.remat_policy = ml_collections.FieldReference('auto', field_type=str)
  c.scan_layers = False
  c.layer_loop = 'scan'
  c.custom_vjp = True
  c.in_channels = 3
  c.dtype = 'float32'
  c.param_dtype = 'float32'
  if resnet is None:
    c.resnet = ml_collections.FieldReference(None, field_type=ml_collections.ConfigDict)
  else:
    c.resnet = ml_collections.ConfigDict(dict(num_layers=tuple(resnet),
                                              **_RESNET_STEM_DEFAULTS))
  return c


def _timm_numerics(c, name, image_size):
  c = ml_collections.ConfigDict(c.to_dict())
  c.name = name
  c.image_size = image_size
  c.gelu_approximate = False
  if c.resnet is not None:
    c.resnet.stdconv_eps = 1e-8
    c.resnet.stdconv_eps_in_sqrt = True
    c.resnet.gn_eps = 1e-5
  return c


# timm has no 384 px variant of these.
_NO_TIMM_384 = {'vit_small_patch8', 'vit_base_patch8', 'vit_huge_patch14', 'vit_base_r26_s32'}


def _register(c, timm_base=None):
  _REGISTRY[c.name] = c
  if timm_base:
    for res in (224, 384):
      if res == 384 and timm_base in _NO_TIMM_384:
        continue
      tname = f'{timm_base}_{res}'
      _REGISTRY[tname] = _timm_numerics(c, tname, res)


for _size, _patch in [('Ti', 16), ('S', 32), ('S', 16), ('S', 8), ('B', 32), ('B', 16),
                      ('B', 8), ('L', 32), ('L', 16), ('H', 14)]:
  _register(_base(f'ViT-{_size}/{_patch}', _size, _patch),
            f'vit_{_TIMM_SIZE[_size]}_patch{_patch}')
_register(_base('R50+ViT-B/16', 'B', 1, resnet=(3, 4, 9)), 'vit_base_r50_s16')
_register(_base('R26+ViT-S/32', 'S', 1, resnet=(2, 2, 2, 2)), 'vit_small_r26_s32')
_register(_base('R26+ViT-B/32', 'B', 1, resnet=(2, 2, 2, 2)), 'vit_base_r26_s32')
_register(_base('R50+ViT-L/32', 'L', 1, resnet=(3, 4, 6, 3)), 'vit_large_r50_s32')
_register(_base('R+ViT-Ti/16', 'Ti', 8, resnet=()), 'vit_tiny_r_s16_p8')


def _register_families():
  for module_name in _FAMILY_MODULES:
    lib = importlib.import_module(module_name)
    for name, c in lib.named_configs().items():
      if name in _REGISTRY:
        raise ValueError(f'model name {name!r} of {module_name} is already registered')
      if set(c.keys()) != set(lib.FIELD_DOCS):
        raise ValueError(f'{module_name}: config {name!r} fields differ from FIELD_DOCS: '
                         f'{sorted(set(c.keys()) ^ set(lib.FIELD_DOCS))}')
      _FAMILIES[c.family] = lib
      _REGISTRY[name] = c


_register_families()


def family_of(name_or_config) -> str:
  """'vit' or the family of a registered name or config ('swin', 'resnet', 'bit', ...)."""
  if isinstance(name_or_config, str):
    name_or_config = get_config(name_or_config)
  return name_or_config.get('family', 'vit') or 'vit'


def pixel_scaling(family: str) -> str:
  """The preprocessing op that scales pixels as the published weights of `family` expect:
  the original ViT and BiT releases (and timm's copies of them) take [-1, 1]; timm's Swin,
  ResNet, ResNeXt and Res2Net weights take the ImageNet mean and std."""
  return 'normalize' if family in ('swin', 'resnet', 'res2net') else 'value_range(-1, 1)'


def fixed_input_size(family: str) -> bool:
  """Whether a model of `family` takes only its config's image size: a ViT's position
  embedding and Swin's windows fix it; the convolutional families take any size."""
  return family in ('vit', 'swin')


def families() -> list[str]:
  return ['vit'] + sorted(_FAMILIES)


def _is_timm_name(name: str) -> bool:
  return name[:1].islower()  # timm names are snake_case; paper names are capitalised


def list_models(family: str | None = None) -> list[str]:
  """All registered names (of one family): paper names first, then timm names."""
  if family is not None and family != 'vit' and family not in _FAMILIES:
    raise ValueError(f'unknown model family {family!r}; families: {families()}')
  names = [n for n in _REGISTRY if family is None or family_of(_REGISTRY[n]) == family]
  return sorted(names, key=lambda n: (_is_timm_name(n), n))


def field_docs(family: str = 'vit') -> dict[str, str]:
  """One-line meaning of every model config field of a family."""
  if family == 'vit':
    return dict(_FIELD_DOCS)
  if family not in _FAMILIES:
    raise ValueError(f'unknown model family {family!r}; families: {families()}')
  return dict(_FAMILIES[family].FIELD_DOCS)


def get_config(name: str) -> ml_collections.ConfigDict:
  """A fresh copy of the config registered under `name`.

  Raises ValueError naming the closest registered names for an unknown name.
  """
  if not isinstance(name, str):
    raise ValueError(f'a model name is a string, e.g. get_config("ViT-B/16"); got '
                     f'{name!r} (names: vit_jax.models.list_models())')
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.4)
    hint = f' Closest: {", ".join(close)}.' if close else ''
    raise ValueError(f'unknown model name {name!r}.{hint} All names: '
                     'vit_jax.models.list_models().')
  fields = _REGISTRY[name].to_dict()
  for field in _ANY_LITERAL_FIELDS.intersection(fields):
    fields[field] = ml_collections.FieldReference(fields[field], field_type=object)
  return ml_collections.ConfigDict(fields)


def patch_size(value) -> tuple[int, int]:
  """(rows, cols) from 16, (16,) (a one-value override: --config.model.patch_size=16) or
  (16, 16); ValueError for anything else."""
  if isinstance(value, np.integer):
    value = int(value)
  if not isinstance(value, (int, tuple, list)):
    raise ValueError(f'patch_size={value!r} must be one or two positive ints (pixels per '
                     'patch), e.g. 16 or (16, 16)')
  patch = (value,) if isinstance(value, int) else tuple(
      int(p) if isinstance(p, np.integer) else p for p in value)
  if len(patch) == 1:
    patch = patch * 2
  if len(patch) != 2 or not all(isinstance(p, int) and p > 0 for p in patch):
    raise ValueError(f'patch_size={value!r} must be one or two positive ints (pixels per '
                     'patch), e.g. 16 or (16, 16)')
  return patch


# The fields that give a model its shape (its parameters' shapes), in any family.
_ARCHITECTURE_FIELDS = ('family', 'hidden_size', 'num_layers', 'num_heads', 'mlp_dim',
                        'patch_size', 'resnet', 'width_factor', 'layers', 'block',
                        'base_width', 'cardinality', 'scale', 'embed_dim', 'depths',
                        'mlp_ratio', 'window_size')


def _comparable(field, value):
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, dict):
    return {k: _comparable(k, v) for k, v in value.items()}
  if field == 'patch_size' and value is not None:
    try:
      return patch_size(value)
    except ValueError:
      return value
  if isinstance(value, list | tuple):
    return tuple(_comparable('', v) for v in value)
  return value


def differs_from_its_name(config) -> list[tuple[str, object, object]]:
  """[(field, the config's value, the registered value)] where a config whose `name` is a
  registered model has another architecture than that model (a config named 'ViT-S/16'
  with hidden_size 32); [] for an unregistered name, which only labels the run."""
  name = config.get('name')
  if name not in _REGISTRY:
    return []
  registered = _REGISTRY[name]
  out = []
  for field in _ARCHITECTURE_FIELDS:
    if field in registered or field in config:
      mine = _comparable(field, config.get(field, registered.get(field)))
      theirs = _comparable(field, registered.get(field, config.get(field)))
      if mine != theirs:
        out.append((field, config.get(field), registered.get(field)))
  return out


def _dtype(value, field):
  if value in _DTYPES:
    return _DTYPES[value]
  if value in _DTYPES.values():
    return value
  raise ValueError(f'{field}={value!r} is not one of {sorted(_DTYPES)}')


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
  """A finite real number (head_bias_init=nan trained nothing, and failed late)."""
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def _field(config, dotted: str, defaults):
  """A ViT config field by its dotted name ('resnet.gn_eps'), with the defaults of
  `create` (the registry's base config, and the ResNet stem's own)."""
  if dotted.startswith('resnet.'):
    name = dotted.split('.', 1)[1]
    return config.resnet.get(name, _RESNET_STEM_DEFAULTS[name])
  return config.get(dotted, defaults[dotted])


def create(name_or_config, **overrides):
  """Builds the Flax module for a registered name or a config, with field overrides.

  Example: `create('ViT-B/16', num_classes=10, dropout_rate=0.1)`,
  `create('ResNet-50', num_classes=10)`.
  """
  if isinstance(name_or_config, str):
    config = get_config(name_or_config)
  else:
    config = ml_collections.ConfigDict(dict(name_or_config))
  family = family_of(config)
  if family != 'vit':
    return _create_family(family, config, overrides)
  unknown = sorted(set(overrides) - set(_FIELD_DOCS))
  if unknown:
    close = {k: difflib.get_close_matches(k, list(_FIELD_DOCS), n=1) for k in unknown}
    hints = ', '.join(f'{k!r} -> {c[0]!r}' for k, c in close.items() if c)
    raise ValueError(f'unknown model config field(s) {unknown}'
                     + (f' (did you mean {hints}?)' if hints else '')
                     + f'; valid fields: {sorted(_FIELD_DOCS)}')
  for k, v in overrides.items():
    if isinstance(v, np.generic):  # numpy scalars (labels.max() + 1): ml_collections
      v = v.item()                 # refused to cast them into an int field
    if k == 'resnet' and isinstance(v, dict):
      # Merged into the config's stem: the fields not given keep its numerics (a timm
      # hybrid's epsilons; replaced whole, they became the original release's).
      base = config.get('resnet')
      v = ml_collections.ConfigDict(dict(base.to_dict() if base is not None else {}, **v))
    if k == 'patch_size':
      v = patch_size(v)
    if k in ('dtype', 'param_dtype') and not isinstance(v, str):
      v = jnp.dtype(v).name
    try:
      config[k] = v
    except TypeError as e:  # ml_collections' 'Could not override field ...' named no fix
      want = type(config[k]).__name__
      article = 'an' if want[0] in 'aeiou' else 'a'
      raise ValueError(f'{k}={v!r} ({type(v).__name__}): the field takes {article} {want}, e.g. '
                       f'{k}={config[k]!r}') from e
  unknown = sorted(set(config.keys()) - set(_FIELD_DOCS) - {'family'})
  if unknown:
    raise ValueError(f'unknown model config field(s) {unknown}; valid fields: '
                     f'{sorted(_FIELD_DOCS)}')
  defaults = _base('default', 'Ti', 16)
  get = lambda k: config.get(k, defaults[k])  # noqa: E731
  if get('classifier') not in vit.CLASSIFIERS:
    raise ValueError(f"classifier={get('classifier')!r} is not one of {vit.CLASSIFIERS}")
  patch = patch_size(get('patch_size'))
  if get('attention_impl') not in attention.ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention_impl={get('attention_impl')!r} is not one of "
                     f'{attention.ATTENTION_IMPLEMENTATIONS}')
  if get('layer_loop') not in vit.LAYER_LOOPS:
    raise ValueError(f"layer_loop={get('layer_loop')!r} is not one of {vit.LAYER_LOOPS}")
  if get('remat_policy') not in vit.REMAT_POLICIES:
    raise ValueError(f"remat_policy={get('remat_policy')!r} is not one of "
                     f'{vit.REMAT_POLICIES}')
  representation = get('representation_size')
  if representation is not None and not (
      isinstance(representation, int) and not isinstance(representation, bool)
      and representation > 0):
    raise ValueError(f'representation_size={representation!r} must be a positive int (the '
                     'width of the pre_logits layer) or None (no such layer)')
  for rate in ('dropout_rate', 'attention_dropout_rate', 'drop_path_rate'):
    value = get(rate)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
      raise ValueError(f'{rate}={value!r} must be a number in [0, 1) (a probability of '
                       'dropping; 1 would drop everything)')
  for field in ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim', 'in_channels'):
    if not _is_int(get(field)) or get(field) < 1:
      raise ValueError(f'{field}={get(field)!r} must be a positive int')
  classes = get('num_classes')
  if classes is not None and (not _is_int(classes) or classes < 0):
    raise ValueError(f'num_classes={classes!r} must be a non-negative int (0 or None: no '
                     'head, the model gives features)')
  for field in ('layernorm_eps', *(('resnet.width_factor', 'resnet.stdconv_eps',
                                    'resnet.gn_eps') if config.get('resnet') else ())):
    value = _field(config, field, defaults)
    if not _is_number(value) or value <= 0:
      raise ValueError(f'{field}={value!r} must be a positive number')
  if config.get('resnet') is not None:
    root = 64 * _field(config, 'resnet.width_factor', defaults)
    if root != int(root) or int(root) % 32:
      raise ValueError(
          f'resnet.width_factor={_field(config, "resnet.width_factor", defaults)!r} gives a '
          f'root of {root:g} channels; the stem\'s GroupNorm splits channels into 32 groups, '
          'so 64 * width_factor must be a multiple of 32 (width_factor 0.5, 1, 1.5, 2, ...)')
    layers = config.resnet.get('num_layers')
    if (not isinstance(layers, (tuple, list))
        or not all(_is_int(n) and n >= 1 for n in layers)):
      raise ValueError(f'resnet.num_layers={layers!r} must be a tuple of positive ints (the '
                       'blocks of each ResNet stage, e.g. (3, 4, 9); () for the root alone)')
  if not _is_number(get('head_bias_init')):
    raise ValueError(f"head_bias_init={get('head_bias_init')!r} must be a number")
  hidden, heads = get('hidden_size'), get('num_heads')
  if hidden % heads:
    raise ValueError(f'hidden_size={hidden} is not divisible by num_heads={heads}')
  kwargs = dict(
      num_classes=get('num_classes'), patch_size=patch, hidden_size=hidden,
      num_layers=get('num_layers'), num_heads=heads, mlp_dim=get('mlp_dim'),
      classifier=get('classifier'), representation_size=get('representation_size'),
      head_bias_init=get('head_bias_init'), dropout_rate=get('dropout_rate'),
      attention_dropout_rate=get('attention_dropout_rate'),
      drop_path_rate=get('drop_path_rate'), layernorm_eps=get('layernorm_eps'),
      gelu_approximate=get('gelu_approximate'), attention_impl=get('attention_impl'),
      remat_policy=get('remat_policy'), scan_layers=get('scan_layers'),
      layer_loop=get('layer_loop'), in_channels=get('in_channels'),
      custom_vjp=bool(get('custom_vjp')),
      dtype=_dtype(get('dtype'), 'dtype'),
      param_dtype=_dtype(get('param_dtype'), 'param_dtype'))
  resnet = config.get('resnet')
  if resnet is not None:
    kwargs.update(
        resnet_layers=tuple(resnet.num_layers),
        resnet_width_factor=_field(config, 'resnet.width_factor', defaults),
        stdconv_eps=_field(config, 'resnet.stdconv_eps', defaults),
        stdconv_eps_in_sqrt=_field(config, 'resnet.stdconv_eps_in_sqrt', defaults),
        gn_eps=_field(config, 'resnet.gn_eps', defaults))
  return vit.VisionTransformer(**kwargs)


def _create_family(family, config, overrides):
  if family not in _FAMILIES:
    raise ValueError(f'unknown model family {family!r}; families: {families()}')
  lib = _FAMILIES[family]
  docs = lib.FIELD_DOCS
  values = config.to_dict()
  for k, v in overrides.items():
    if k in ('dtype', 'param_dtype') and not isinstance(v, str):
      v = jnp.dtype(v).name
    values[k] = v
  # Built again from plain values: a field may take another type than the registered
  # config's (Swin's image_size=(224, 448), an int there), which a ConfigDict refuses.
  config = ml_collections.ConfigDict(values)
  unknown = sorted(set(config.keys()) - set(docs))
  if unknown:
    raise ValueError(f'unknown {family} model config field(s) {unknown}; valid fields: '
                     f'{sorted(docs)}')
  return lib.from_config(config)
