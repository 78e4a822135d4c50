"""Import from and export to timm `VisionTransformer` state dicts (ViT and BiT hybrids).

timm names                                   vit_jax names
patch_embed.proj                             embedding
cls_token / pos_embed                        cls / Transformer/posembed_input/pos_embedding
blocks.{i}.norm1 / norm2                     Transformer/encoderblock_{i}/LayerNorm_0 / _1
blocks.{i}.attn.qkv / attn.proj              .../MultiHeadDotProductAttention_0/{query,key,value} / out
blocks.{i}.mlp.fc1 / fc2                     .../MlpBlock_0/Dense_0 / Dense_1
norm                                         Transformer/encoder_norm
attn_pool.*                                  MAPHead_0/*
head                                         head
patch_embed.backbone.stem.conv / norm        conv_root / gn_root
patch_embed.backbone.stages.{s}.blocks.{u}   block{s+1}/unit{u+1} (convN/normN -> convN/gnN,
                                             downsample.conv/norm -> conv_proj/gn_proj)
"""

import math
import os
import re

from absl import logging
import ml_collections
import numpy as np

from vit_jax import torch_import
from vit_jax.checkpoints import architecture
from vit_jax.checkpoints import layout
from vit_jax.checkpoints import state_dict_io
from vit_jax.checkpoints import tree
from vit_jax.models import registry
from vit_jax.models import resnet as resnet_lib
from vit_jax.models import summary


def _timm_base_name(name: str) -> str:
  base = name.split('.')[0]  # drop a pretrained tag such as '.augreg_in21k'
  return re.sub(r'_(224|384)$', '', base)


def _registered_name(name: str) -> str | None:
  """The registered config a timm (or paper) name stands for, None if there is none."""
  for candidate in (f'{_timm_base_name(name)}_224', f'{_timm_base_name(name)}_384',
                    name.split('.')[0]):
    if candidate in registry.list_models():
      return candidate
  return None


# The keys every timm ViT state dict has (the structure is read from them).
VIT_KEYS = ('pos_embed', 'patch_embed.proj.weight', 'blocks.0.mlp.fc1.weight')


def _per_token_head(config) -> None:
  """A timm ViT with global_pool='' and a head applies the head to every token: the
  unpooled classifier of the same weights (pooled, they were refused)."""
  pooled = config.classifier
  config.classifier = 'token_unpooled' if pooled == 'token' else 'unpooled'
  logging.warning("the timm model has global_pool='' and a head: the config read applies "
                  'the head to every token as timm does (classifier=%r); for a pooled '
                  'classifier (to fine-tune) set classifier=%r', config.classifier, pooled)


def check_vit_keys(sd, what: str) -> None:
  """Raises ValueError naming `what` (a file) when `sd` is not a timm ViT state dict."""
  if 'blocks.0.attn.qkv.weight' in sd and 'blocks.0.attn.qkv.bias' not in sd:
    raise ValueError(f'{what} has attention without query/key/value biases (timm\'s '
                     'qkv_bias=False); vit_jax\'s attention has them, as the original ViT')
  for key, flag in (('blocks.0.attn.proj', 'proj_bias'), ('blocks.0.mlp.fc1', 'mlp bias'),
                    ('blocks.0.mlp.fc2', 'mlp bias')):
    if f'{key}.weight' in sd and f'{key}.bias' not in sd:
      raise ValueError(f'{what} has no {key}.bias (timm\'s {flag}=False); vit_jax\'s '
                       'blocks have every bias, as the original ViT')
  # Features of timm ViTs that vit_jax's ViT does not compute, named by their keys (they
  # used to be reported as a missing key or a non-square image).
  for keys, feature in (
      (('dist_token',), 'a distillation token (a distilled DeiT)'),
      (('reg_token',), "register tokens (timm's reg_tokens)"),
      (('fc_norm.weight',), "a norm after the pooling (timm's fc_norm, the default of "
                            "global_pool='avg')"),
      (('norm_pre.weight',), "a norm before the blocks (timm's pre_norm=True)"),
      (('blocks.0.ls1.gamma', 'blocks.0.ls1.weight'), "LayerScale (timm's init_values)"),
      (('blocks.0.attn.q_norm.weight',), "query/key norms (timm's qk_norm=True)"),
      (('blocks.0.attn.norm.weight',), "a norm inside the attention (timm's "
                                       'scale_attn_norm=True)'),
      (('blocks.0.mlp.norm.weight',), "a norm inside the MLP (timm's scale_mlp_norm=True)"),
      (('patch_embed.norm.weight',), "a norm after the patch embedding (timm's "
                                     'embed_norm_layer)'),
      (('blocks.0.attn.lambda_q1',), "differential attention (timm's attn_layer='diff')"),
      (('blocks.0.mlp.fc1_g.weight',), "a gated MLP (timm's mlp_layer=SwiGLU)"),
      (('blocks.0.in_proj.weight', 'blocks.0.attns.0.attn.qkv.weight'),
       "attention and MLP side by side (timm's block_fn=ParallelScalingBlock or "
       'ParallelThingsBlock)')):
    if any(k in sd for k in keys):
      raise ValueError(f'{what} has {feature}, which vit_jax\'s ViT does not compute')
  if 'pos_embed' not in sd and 'blocks.0.norm1.weight' in sd:
    raise ValueError(f"{what} has no learned position embedding (timm's pos_embed='none', "
                     "e.g. a model with rotary embeddings); vit_jax's ViT adds one")
  if 'cls_token' in sd and 'attn_pool.latent' in sd:
    raise ValueError(f"{what} has a class token and an attention-pooling head (timm's "
                     "global_pool='map' with class_token=True); vit_jax's MAP head pools "
                     'the patch tokens of a ViT without a class token (class_token=False)')
  if 'blocks.0.norm1.weight' in sd and 'blocks.0.norm1.bias' not in sd:
    raise ValueError(f'{what} has norms without a bias (e.g. timm\'s RmsNorm as '
                     "norm_layer); vit_jax's ViT uses LayerNorm with a bias")
  if 'blocks.0.norm1.weight' in sd and 'norm.weight' not in sd:
    raise ValueError(f"{what} has no final norm (timm's final_norm=False); vit_jax's ViT "
                     'normalises the encoder output')
  missing = [k for k in VIT_KEYS if k not in sd]
  if missing:
    raise ValueError(
        f'not a ViT state dict: {what} lacks {", ".join(missing)} (every timm '
        f'VisionTransformer has them); its keys start {sorted(sd)[:4]}. vit_jax reads timm '
        'ViT, Swin, ResNet/ResNeXt, Res2Net and BiT ResNetV2 state dicts and transformers '
        'ViTs (vit.embeddings.*)')


def _config_for(name: str, base=None, keep_base=False) -> ml_collections.ConfigDict:
  """The registered config of `name`, else a copy of `base` (e.g. the config being
  fine-tuned, whose name is its own; always with keep_base); raises with the closest
  names without either."""
  registered = _registered_name(name)
  if base is not None and (registered is None or keep_base):
    return ml_collections.ConfigDict(base.to_dict())
  try:
    return registry.get_config(registered or name.split('.')[0])
  except ValueError as e:
    raise ValueError(
        f'{e}\nA state dict does not show the number of heads: pass the timm model itself '
        '(from_timm(model) reads them), or a config to start from, e.g. base_config='
        "vit_jax.models.get_config('vit_tiny_patch16_224') (with num_heads=... as an "
        'override if it differs)') from None


def _count(sd, pattern):
  idx = {int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m}
  return max(idx) + 1 if idx else 0


def _infer_config(sd, name, model, overrides, base=None, keep_base=False):
  if model is not None and base is None and _registered_name(name) is None:
    # An unregistered timm ViT (e.g. DeiT): the model itself shows what the state dict
    # does not (heads, epsilons, GELU); start from any ViT config and name it as timm does.
    base = registry.get_config('ViT-B/16')
    base.name = name
    c = _config_for(name, base)
    c.gelu_approximate = False
  else:
    c = _config_for(name, base, keep_base)
  # timm's numerics, unless the numerics are the base config's (a custom model, e.g. one
  # of this project exported by vit_jax.convert, or a config the file records).
  own = base is not None and (keep_base or _registered_name(name) is None)
  stem = base.get('resnet') if own else None
  if not own:
    c.gelu_approximate = False
  if 'scan_layers' in c:
    c.scan_layers = False  # the state dict's blocks are one per layer
  c.hidden_size = int(sd['pos_embed'].shape[-1])
  c.num_layers = _count(sd, r'blocks\.(\d+)\.')
  c.mlp_dim = int(sd['blocks.0.mlp.fc1.weight'].shape[0])
  c.num_classes = int(sd['head.weight'].shape[0]) if 'head.weight' in sd else 0
  if 'cls_token' in sd:
    c.classifier = 'token'
  elif 'attn_pool.latent' in sd:
    c.classifier = 'map'
  else:
    c.classifier = 'gap'
  c.representation_size = None
  proj = sd['patch_embed.proj.weight']
  c.patch_size = (int(proj.shape[2]), int(proj.shape[3]))
  if 'patch_embed.backbone.stem.conv.weight' in sd:
    nstages = _count(sd, r'patch_embed\.backbone\.stages\.(\d+)\.')
    layers = tuple(_count(sd, rf'patch_embed\.backbone\.stages\.{s}\.blocks\.(\d+)\.')
                   for s in range(nstages))
    root = sd['patch_embed.backbone.stem.conv.weight']
  elif 'patch_embed.backbone.conv.weight' in sd:
    layers = ()
    root = sd['patch_embed.backbone.conv.weight']
  else:
    layers, root = None, None
  if layers is None:
    c.resnet = None
    c.in_channels = int(proj.shape[1])
  else:
    numerics = dict(stdconv_eps=1e-8, stdconv_eps_in_sqrt=True, gn_eps=1e-5)  # timm's
    if stem is not None:
      numerics = {k: stem.get(k, v) for k, v in numerics.items()}
    c.resnet = ml_collections.ConfigDict(dict(
        num_layers=layers, width_factor=root.shape[0] / 64, **numerics))
    c.in_channels = int(root.shape[1])
  if model is not None:
    _read_model_settings(c, model)
  for k, v in overrides.items():
    c[k] = v
  prefix = 1 if c.classifier == 'token' else 0
  tokens = int(sd['pos_embed'].shape[1]) - prefix
  stride = 1 if c.resnet is None else resnet_lib.stem_stride(c.resnet.num_layers)
  ph, pw = (int(p) * stride for p in c.patch_size)  # pixels per token
  side = math.isqrt(tokens * ph * pw)
  if side * side != tokens * ph * pw or side % ph or side % pw:
    raise ValueError(
        f'the position embedding holds {tokens} patch tokens, which no square image makes '
        f'with {ph}x{pw}-pixel tokens (patch {tuple(c.patch_size)}'
        + (f', stem stride {stride}' if stride > 1 else '') + '): vit_jax reads square '
        "images (config.image_size is one int); timm ViTs of a non-square img_size, or "
        "with a class token outside the position embedding (no_embed_class=True), are not "
        'read')
  size = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
  if size is not None and int(size[0]) != int(size[1]):
    raise ValueError(f'the timm model takes {size[0]}x{size[1]} images: vit_jax reads '
                     'square images (config.image_size is one int); timm ViTs of a '
                     'non-square img_size are not read')
  c.image_size = side
  return c


def _read_model_settings(c, model):
  """Numerics and structure that a state dict does not show, read off a timm model."""
  torch = torch_import.torch()
  unsupported = []
  if not isinstance(getattr(model, 'fc_norm', None), torch.nn.Identity):
    unsupported.append('fc_norm (LayerNorm after pooling; vit_jax normalises the tokens '
                       'before pooling: build the timm model with fc_norm=False)')
  if getattr(model, 'num_reg_tokens', 0):
    unsupported.append('register tokens')
  if getattr(model, 'no_embed_class', False):
    unsupported.append('no_embed_class')
  pooling = {'token': 'token', 'avg': 'gap', 'map': 'map'}
  pool = getattr(model, 'global_pool', None)
  if pool == '' and not c.num_classes:
    # A feature extractor (timm returns every token); the same weights serve a pooled
    # model, which fine-tuning wants, so the config pools and says how to get timm's.
    logging.warning(
        "the timm model has global_pool='' and no head (it returns every token); the "
        "config read pools (classifier=%r): set classifier=%r for timm's output",
        c.classifier, 'token_unpooled' if c.classifier == 'token' else 'unpooled')
  elif pool == '':
    pass  # a head on every token: `_per_token_head`, once the weights are read
  elif pool is not None and pooling.get(pool) != c.classifier:
    has_cls = 'with' if c.classifier == 'token' else 'without'
    unsupported.append(
        f"global_pool={pool!r} {has_cls} a class token (vit_jax pools as timm's 'token' "
        "with a class token, 'avg' without one, or 'map')")
  prefix = getattr(model, 'num_prefix_tokens', None)
  if prefix is not None and prefix != (1 if c.classifier == 'token' else 0):
    unsupported.append(f'{prefix} prefix tokens (e.g. a distillation token; vit_jax has '
                       'at most the class token)')
  if not isinstance(getattr(model, 'norm_pre', torch.nn.Identity()), torch.nn.Identity):
    unsupported.append('pre-norm (norm_pre)')
  # Layers whose weights have the standard names but compute otherwise (a ResPostBlock
  # normalises after the residual branch: its logits differed without a word).
  for part, option, expected in (('', 'block_fn', 'Block'), ('attn', 'attn_layer', 'Attention'),
                                 ('mlp', 'mlp_layer', 'Mlp')):
    kinds = sorted({type(getattr(b, part) if part else b).__name__ for b in model.blocks
                    if not part or hasattr(b, part)})
    other = [k for k in kinds if k != expected]
    if other:
      unsupported.append(f"blocks{'.' + part if part else ''} of type {', '.join(other)} "
                         f"(timm's {option}; vit_jax computes timm's {expected})")
  block = model.blocks[0]
  if not isinstance(getattr(block, 'ls1', torch.nn.Identity()), torch.nn.Identity):
    unsupported.append('layer scale')
  if not isinstance(getattr(getattr(block, 'attn', None), 'q_norm', torch.nn.Identity()),
                    torch.nn.Identity):
    unsupported.append('qk-norm')
  if unsupported:
    raise ValueError('this timm model uses features vit_jax does not implement: '
                     + '; '.join(unsupported))
  c.num_heads = int(block.attn.num_heads)
  c.layernorm_eps = float(block.norm1.eps)
  c.gelu_approximate = _gelu_is_tanh(block.mlp.act)
  if c.resnet is not None:
    backbone = model.patch_embed.backbone
    stem = getattr(backbone, 'stem', backbone)
    c.resnet.stdconv_eps = float(stem.conv.eps)
    c.resnet.gn_eps = float(stem.norm.eps)


def _gelu_is_tanh(act) -> bool:
  """True for tanh-approximate GELU, False for exact; refuses other activations."""
  torch = torch_import.torch()
  layers = torch_import.module('timm.layers')
  if isinstance(act, torch.nn.GELU):
    return act.approximate == 'tanh'
  if isinstance(act, getattr(layers, 'GELUTanh', ())):
    return True
  if isinstance(act, getattr(layers, 'GELU', ())):
    return False
  raise ValueError(f'unsupported MLP activation {type(act).__name__} (vit_jax uses GELU)')


def _block_from_timm(sd, i, num_heads):
  p, q = f'blocks.{i}.', f'Transformer/encoderblock_{i}/'
  qkv_w = np.split(sd[p + 'attn.qkv.weight'], 3, axis=0)
  qkv_b = np.split(sd[p + 'attn.qkv.bias'], 3, axis=0)
  out = layout.attention_from_linears(
      q + 'MultiHeadDotProductAttention_0', (qkv_w[0], qkv_b[0]), (qkv_w[1], qkv_b[1]),
      (qkv_w[2], qkv_b[2]), (sd[p + 'attn.proj.weight'], sd[p + 'attn.proj.bias']),
      num_heads)
  for src, dst in (('norm1', 'LayerNorm_0'), ('norm2', 'LayerNorm_1')):
    out[q + dst + '/scale'] = sd[p + src + '.weight']
    out[q + dst + '/bias'] = sd[p + src + '.bias']
  for src, dst in (('fc1', 'Dense_0'), ('fc2', 'Dense_1')):
    out.update(layout.linear_to_dense(q + 'MlpBlock_0/' + dst, sd[f'{p}mlp.{src}.weight'],
                                      sd[f'{p}mlp.{src}.bias']))
  used = [p + s for s in ('attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight',
                          'attn.proj.bias', 'norm1.weight', 'norm1.bias', 'norm2.weight',
                          'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight',
                          'mlp.fc2.bias')]
  return out, used


def _stem_pairs(c):
  """(timm prefix, vit_jax prefix) of every conv and norm of the hybrid stem."""
  if c.resnet is None:
    return []
  layers = tuple(c.resnet.num_layers)
  base = 'patch_embed.backbone.' + ('stem.' if layers else '')
  pairs = [(base + 'conv', 'conv_root', 'conv'), (base + 'norm', 'gn_root', 'norm')]
  for s, n in enumerate(layers):
    for u in range(n):
      tp = f'patch_embed.backbone.stages.{s}.blocks.{u}.'
      jp = f'block{s + 1}/unit{u + 1}/'
      for r in (1, 2, 3):
        pairs += [(f'{tp}conv{r}', f'{jp}conv{r}', 'conv'), (f'{tp}norm{r}', f'{jp}gn{r}', 'norm')]
      if u == 0:  # the first unit of a stage changes the width: projection shortcut
        pairs += [(tp + 'downsample.conv', jp + 'conv_proj', 'conv'),
                  (tp + 'downsample.norm', jp + 'gn_proj', 'norm')]
  return pairs


def _params_from_timm(sd, c):
  flat, used = {}, []
  def take(key):
    used.append(key)
    if key not in sd:
      raise tree.CheckpointMismatchError(f'timm state dict lacks {key!r}')
    return sd[key]
  flat['embedding/kernel'] = layout.conv_to_flax(take('patch_embed.proj.weight'))
  flat['embedding/bias'] = take('patch_embed.proj.bias')
  if c.classifier == 'token':
    flat['cls'] = take('cls_token')
  flat['Transformer/posembed_input/pos_embedding'] = take('pos_embed')
  for i in range(c.num_layers):
    block, block_used = _block_from_timm(sd, i, c.num_heads)
    flat.update(block)
    used += block_used
  flat['Transformer/encoder_norm/scale'] = take('norm.weight')
  flat['Transformer/encoder_norm/bias'] = take('norm.bias')
  if c.classifier == 'map':
    m = 'MAPHead_0/'
    flat[m + 'probe'] = take('attn_pool.latent')
    k_w, v_w = np.split(take('attn_pool.kv.weight'), 2, axis=0)
    k_b, v_b = np.split(take('attn_pool.kv.bias'), 2, axis=0)
    flat.update(layout.attention_from_linears(
        m + 'MultiHeadDotProductAttention_0',
        (take('attn_pool.q.weight'), take('attn_pool.q.bias')), (k_w, k_b), (v_w, v_b),
        (take('attn_pool.proj.weight'), take('attn_pool.proj.bias')), c.num_heads))
    flat[m + 'LayerNorm_0/scale'] = take('attn_pool.norm.weight')
    flat[m + 'LayerNorm_0/bias'] = take('attn_pool.norm.bias')
    for src, dst in (('fc1', 'Dense_0'), ('fc2', 'Dense_1')):
      flat.update(layout.linear_to_dense(m + 'MlpBlock_0/' + dst,
                                         take(f'attn_pool.mlp.{src}.weight'),
                                         take(f'attn_pool.mlp.{src}.bias')))
  if c.num_classes:
    flat.update(layout.linear_to_dense('head', take('head.weight'), take('head.bias')))
  for tp, jp, kind in _stem_pairs(c):
    if kind == 'conv':
      flat[jp + '/kernel'] = layout.conv_to_flax(take(tp + '.weight'))
    else:
      flat[jp + '/scale'] = take(tp + '.weight')
      flat[jp + '/bias'] = take(tp + '.bias')
  unused = sorted(set(sd) - set(used))
  if unused:
    raise tree.CheckpointMismatchError(
        f'timm state dict has keys vit_jax does not map ({len(unused)}): '
        f'{", ".join(unused[:20])}')
  return flat


# Converters of the other families: NAMES (regex on the timm name), config_from_timm,
# variables_from_timm and to_timm.
_FAMILY_CONVERTERS = ('vit_jax.checkpoints.timm_swin', 'vit_jax.checkpoints.timm_resnet',
                      'vit_jax.checkpoints.timm_bit')


_CONVERTER_OF_FAMILY = {'swin': 'vit_jax.checkpoints.timm_swin',
                        'resnet': 'vit_jax.checkpoints.timm_resnet',
                        'res2net': 'vit_jax.checkpoints.timm_resnet',
                        'bit': 'vit_jax.checkpoints.timm_bit'}


# The module types of timm's default models of each family (vit_jax computes these);
# any other (another activation, norm, pooling or attention layer) changes the outputs
# without showing in the state dict.
_FAMILY_MODULES = {
    'common': {'Conv2d', 'Linear', 'Identity', 'Sequential', 'ModuleList', 'Flatten',
               'Dropout', 'DropPath', 'SelectAdaptivePool2d', 'AdaptiveAvgPool2d',
               'FastAdaptiveAvgPool', 'ClassifierHead', 'MaxPool2d'},
    'vit_jax.checkpoints.timm_resnet': {'ResNet', 'Bottleneck', 'Bottle2neck', 'BatchNorm2d',
                                        'ReLU', 'AvgPool2d'},
    'vit_jax.checkpoints.timm_bit': {'ResNetV2', 'PreActBottleneck', 'ResNetStage',
                                     'DownsampleConv', 'StdConv2d', 'GroupNormAct', 'ReLU',
                                     'ConstantPad2d'},
    'vit_jax.checkpoints.timm_swin': {'SwinTransformer', 'SwinTransformerStage',
                                      'SwinTransformerBlock', 'WindowAttention', 'PatchEmbed',
                                      'PatchMerging', 'Mlp', 'LayerNorm', 'GELU', 'Softmax'},
}
# module type -> the config field of its epsilon
_EPS_FIELDS = {'BatchNorm2d': 'bn_eps', 'GroupNormAct': 'gn_eps', 'StdConv2d': 'stdconv_eps',
               'LayerNorm': 'layernorm_eps'}


def _swin_model_sizes(model) -> ml_collections.ConfigDict | None:
  """image_size and window_size of a timm Swin model (None where it does not show them)."""
  size = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
  try:
    windows = [tuple(int(w) for w in stage.blocks[0].window_size) for stage in model.layers]
  except (AttributeError, TypeError, IndexError):
    return None
  if size is None:
    return None
  size = tuple(int(s) for s in size)
  # timm shrinks a stage's window, axis by axis, to a grid no larger than it (a 2 x 4
  # window on a 2 x 4 grid, for window 4): the window asked for is the larger side (an
  # axis not shrunk keeps it; a shrunk one is no larger), which vit_jax shrinks the same
  # way. (A non-square one was refused, though vit_jax builds it.)
  targets = [max(w) for w in windows]
  window = targets[0] if len(set(targets)) == 1 else tuple(targets)
  return ml_collections.ConfigDict(dict(
      image_size=size[0] if size[0] == size[1] else size, window_size=window))


def _read_family_model(model, config, family) -> None:
  """What a timm model of another family shows and its state dict does not: its module
  types, pooling and GELU are refused unless vit_jax computes them (they changed the
  logits without a word); its epsilons go into `config`."""
  allowed = _FAMILY_MODULES['common'] | _FAMILY_MODULES[family.__name__]
  name = type(model).__name__
  eps = {}
  for path, module in model.named_modules():
    kind = type(module).__name__
    where = path or 'the model'
    if kind not in allowed:
      raise ValueError(
          f'{name}: {where} is a {kind}, which vit_jax\'s {config.name} does not compute '
          "(timm's default layers only: e.g. create_model(..., act_layer, norm_layer, "
          'attn_layer or aa_layer left at their defaults)')
    pool = getattr(module, 'pool_type', None)
    if kind == 'SelectAdaptivePool2d' and pool not in ('avg', '', None):
      raise ValueError(f"{name}: {where} pools with {pool!r}; vit_jax's models average "
                       "(timm's global_pool='avg')")
    if kind == 'GELU' and getattr(module, 'approximate', 'none') != 'none':
      raise ValueError(f'{name}: {where} is a tanh-approximate GELU; vit_jax\'s '
                       f'{config.name} computes the exact one')
    if kind in _EPS_FIELDS and hasattr(module, 'eps'):
      eps.setdefault(_EPS_FIELDS[kind], set()).add(float(module.eps))
  pool = getattr(model, 'global_pool', None)
  if isinstance(pool, str) and pool not in ('avg', ''):
    raise ValueError(f"{name} pools with global_pool={pool!r}; vit_jax's models average "
                     "(global_pool='avg')")
  for field, values in eps.items():
    if len(values) > 1:
      raise ValueError(f'{name} has layers of {len(values)} different epsilons for '
                       f'{field} ({sorted(values)}); vit_jax\'s models take one')
    if field in config:
      config[field] = values.pop()
    elif values != {1e-5}:
      raise ValueError(f'{name}: epsilon {sorted(values)} where vit_jax computes 1e-5')


def _family_converter(name: str):
  """The converter module for a non-ViT timm name, or None for ViTs."""
  import importlib  # pylint: disable=g-import-not-at-top
  for module_name in _FAMILY_CONVERTERS:
    lib = importlib.import_module(module_name)
    if re.match(lib.NAMES, name):
      return lib
  return None


def from_timm(model_or_state_dict, name: str | None = None, *, base_config=None,
              keep_base=False, **overrides):
  """timm model (a model, a state dict or a `.safetensors`/torch file) -> (config, params).

  ViT and hybrids return their parameter tree. The other families (Swin, ResNet/ResNeXt,
  Res2Net, BiT ResNetV2; e.g. `from_timm(sd, 'resnet50')`) return the Flax variables
  {'params': ...}, with 'batch_stats' (BatchNorm running statistics) where the model has
  them: apply them with `module.apply(variables, x, train=False)`.

  name: the timm model name (e.g. 'vit_base_patch16_224', a pretrained tag is ignored);
    taken from the model when a model is passed. It gives what a state dict does not
    show (number of heads); depth, width, classes, classifier and resolution are read
    from the weights. `overrides` set config fields (e.g. num_heads for a custom model).
  base_config: a ViT model config to start from when `name` is not registered (defaults
    to its name), e.g. the config of a custom model exported by vit_jax.convert: its
    heads, numerics and name are kept, the structure is read from the weights as above.
  keep_base: start from `base_config` and keep its numerics even when its name is
    registered (the config a vit_jax export records, or a caller's, for weights that
    timm did not train).
  The returned config reproduces timm's numerics (exact GELU and timm's epsilons), or
  the base config's when it is used.
  """
  is_model = hasattr(model_or_state_dict, 'state_dict')
  model = model_or_state_dict if hasattr(model_or_state_dict, 'blocks') else None
  if name is None and base_config is not None:
    name = base_config.get('name') or None
  if name is None:
    if not is_model:
      raise ValueError('from_timm needs the timm model name when given a state dict, '
                       "e.g. from_timm(sd, 'vit_base_patch16_224')")
    name = (getattr(model_or_state_dict, 'pretrained_cfg', None) or {}).get(
        'architecture') or type(model_or_state_dict).__name__
  sd = state_dict_io.read_state_dict(model_or_state_dict)
  family = _family_converter(name)
  if family is not None:
    if overrides:
      raise ValueError(f'from_timm overrides are for ViT models only; got {sorted(overrides)}')
    if is_model and family.__name__.endswith('timm_swin'):
      # The model's resolution and windows (the name's are timm's defaults: a model built
      # with img_size=448 took 224 before).
      config = family.config_from_timm(sd, name, prefer=_swin_model_sizes(model_or_state_dict))
    else:
      config = family.config_from_timm(sd, name)
    if is_model:
      _read_family_model(model_or_state_dict, config, family)
    return config, family.variables_from_timm(sd, config)
  if any(k not in sd for k in VIT_KEYS) and not name.startswith(('vit_', 'deit')):
    raise ValueError(
        f'{name!r} is not a timm model vit_jax converts: it reads timm ViTs and hybrids '
        '(vit_*, deit_*), Swin (swin_*), ResNet and ResNeXt with bottleneck blocks '
        '(resnet50/101/152, resnext*), Res2Net (res2net*) and BiT (resnetv2_*_bit)')
  check_vit_keys(sd, os.fspath(model_or_state_dict)
                 if isinstance(model_or_state_dict, (str, os.PathLike)) else 'the state dict')
  config = _infer_config(sd, name, model, overrides, base_config, keep_base)
  flat = _params_from_timm(sd, config)
  if model is not None and getattr(model, 'global_pool', None) == '' and config.num_classes:
    _per_token_head(config)
  module = registry.create(config)
  params = tree.merge_into(summary.abstract_params(module, config.image_size), flat,
                           what='timm state dict')
  return config, params


def to_timm(config, params) -> dict:
  """vit_jax params -> timm state dict (torch tensors) for the architecture of `config`.

  Load it with `timm.create_model(...).load_state_dict(sd)` into a model built with
  `create_timm_model(config)` (or the equivalent timm arguments). For the other families
  pass the variables returned by `from_timm` (params and batch_stats).
  """
  family = registry.family_of(config)
  if family != 'vit':  # the family's converter: any size, a registered name or not
    import importlib  # pylint: disable=g-import-not-at-top
    lib = importlib.import_module(_CONVERTER_OF_FAMILY[family])
    return state_dict_io.as_torch(lib.to_timm(config, summary.as_variables(params)))
  if config.get('representation_size'):
    raise ValueError('timm VisionTransformer has no pre_logits (representation) layer; '
                     'this model has representation_size='
                     f'{config.representation_size}. Drop it or export to .npz instead.')
  if config.classifier not in ('token', 'gap', 'map'):
    raise ValueError(f'classifier {config.classifier!r} has no timm equivalent')
  architecture.check_fits(config, params, 'timm')
  flat = tree.flatten_for_export(params)  # blocks unrolled, bfloat16 as float32
  sd = {}
  sd['patch_embed.proj.weight'] = layout.conv_from_flax(flat['embedding/kernel'])
  sd['patch_embed.proj.bias'] = flat['embedding/bias']
  if config.classifier == 'token':
    sd['cls_token'] = flat['cls']
  sd['pos_embed'] = flat['Transformer/posembed_input/pos_embedding']
  for i in range(config.num_layers):
    p, q = f'blocks.{i}.', f'Transformer/encoderblock_{i}/'
    att = layout.attention_to_linears(flat, q + 'MultiHeadDotProductAttention_0')
    sd[p + 'attn.qkv.weight'] = np.concatenate([att[s][0] for s in 'qkv'], axis=0)
    sd[p + 'attn.qkv.bias'] = np.concatenate([att[s][1] for s in 'qkv'], axis=0)
    sd[p + 'attn.proj.weight'], sd[p + 'attn.proj.bias'] = att['o']
    for dst, src in (('norm1', 'LayerNorm_0'), ('norm2', 'LayerNorm_1')):
      sd[p + dst + '.weight'] = flat[q + src + '/scale']
      sd[p + dst + '.bias'] = flat[q + src + '/bias']
    for dst, src in (('fc1', 'Dense_0'), ('fc2', 'Dense_1')):
      sd[f'{p}mlp.{dst}.weight'], sd[f'{p}mlp.{dst}.bias'] = layout.dense_to_linear(
          flat, q + 'MlpBlock_0/' + src)
  sd['norm.weight'] = flat['Transformer/encoder_norm/scale']
  sd['norm.bias'] = flat['Transformer/encoder_norm/bias']
  if config.classifier == 'map':
    m = 'MAPHead_0/'
    att = layout.attention_to_linears(flat, m + 'MultiHeadDotProductAttention_0')
    sd['attn_pool.latent'] = flat[m + 'probe']
    sd['attn_pool.q.weight'], sd['attn_pool.q.bias'] = att['q']
    sd['attn_pool.kv.weight'] = np.concatenate([att['k'][0], att['v'][0]], axis=0)
    sd['attn_pool.kv.bias'] = np.concatenate([att['k'][1], att['v'][1]], axis=0)
    sd['attn_pool.proj.weight'], sd['attn_pool.proj.bias'] = att['o']
    sd['attn_pool.norm.weight'] = flat[m + 'LayerNorm_0/scale']
    sd['attn_pool.norm.bias'] = flat[m + 'LayerNorm_0/bias']
    for dst, src in (('fc1', 'Dense_0'), ('fc2', 'Dense_1')):
      sd[f'attn_pool.mlp.{dst}.weight'], sd[f'attn_pool.mlp.{dst}.bias'] = (
          layout.dense_to_linear(flat, m + 'MlpBlock_0/' + src))
  if config.num_classes:
    sd['head.weight'], sd['head.bias'] = layout.dense_to_linear(flat, 'head')
  for tp, jp, kind in _stem_pairs(config):
    if kind == 'conv':
      sd[tp + '.weight'] = layout.conv_from_flax(flat[jp + '/kernel'])
    else:
      sd[tp + '.weight'] = flat[jp + '/scale'].reshape(-1)
      sd[tp + '.bias'] = flat[jp + '/bias'].reshape(-1)
  return state_dict_io.as_torch(sd)


def timm_name(config) -> str:
  """The timm model name for a config (a registered timm name, or its paper name's)."""
  name = config.get('name', '') or ''
  family = registry.family_of(config)
  if family != 'vit':
    return _family_timm_name(config, family)
  if name.startswith('vit_'):
    base = name.split('.')[0]
    registered = _registered_name(base)
    # A name labels a config; the fields decide (a config read from a state dict keeps
    # the default name, vit_base_patch16_224, whatever its shape). A timm name that is
    # not registered here is timm's to build, with the structure passed explicitly.
    if registered is None or _same_architecture(registry.get_config(registered), config):
      return base
  candidates = [n for n in registry.list_models() if n.startswith('vit_')]
  # Prefer the variant at the config's resolution, then 224 (timm resizes via img_size).
  candidates.sort(key=lambda n: (not n.endswith(f'_{config.image_size}'),
                                 not n.endswith('_224'), n))
  for candidate in candidates:
    if _same_architecture(registry.get_config(candidate), config):
      return candidate
  raise ValueError(f'no timm model corresponds to {name!r}' + _unmatched_fields(config))


def _unmatched_fields(config) -> str:
  """Which architecture fields set `config` apart from the registered config of its name,
  and what timm builds, for timm_name's error (it named only the config before)."""
  name = config.get('name', '') or ''
  registered = _registered_name(name) if name.startswith('vit_') else (
      name if name in registry.list_models() else None)
  hint = ''
  if registered is not None:
    diffs = _architecture_differences(registry.get_config(registered), config)
    if diffs:
      hint = f': it has {", ".join(diffs)}'
  if config.get('resnet'):
    hint += ('; timm builds hybrids only with the ResNet stems and widths of its named '
             'models (e.g. R50+ViT-B/16: resnet.num_layers=(3, 4, 9), hidden_size=768)')
  return hint


def _family_timm_name(config, family: str) -> str:
  name = (config.get('name', '') or '').split('.')[0]
  # The architecture decides, its name first; rates and epsilons do not (as for ViT paper
  # names, whose GELU differs from timm's). A config of a registered name with another
  # depth or width (a custom Swin exported by vit_jax.convert) is not that timm model.
  ignore = ('name', 'image_size', 'num_classes', 'dtype', 'param_dtype', 'in_channels',
            'drop_rate', 'proj_drop_rate', 'attn_drop_rate', 'drop_path_rate', 'dropout_rate',
            'stdconv_eps', 'gn_eps', 'bn_eps', 'bn_momentum', 'bn_frozen', 'layernorm_eps',
            'zero_init_last', 'custom_vjp', 'remat_policy', 'grouped_conv')
  mine = {k: tree.plain(v) for k, v in config.to_dict().items() if k not in ignore}
  candidates = [n for n in registry.list_models(family) if n[:1].islower()]
  candidates.sort(key=lambda n: (n != name, registry.get_config(n).get('image_size') !=
                                 config.get('image_size'), n))
  for candidate in candidates:
    other = {k: tree.plain(v) for k, v in registry.get_config(candidate).to_dict().items()
             if k not in ignore}
    if other == mine:
      return candidate
  raise ValueError(f'no timm model corresponds to {name!r} (family {family})')


def _architecture_differences(base, config) -> list[str]:
  """The fields timm's architecture depends on where `config` differs from `base`, as
  'field=value (not base value)'."""
  diffs = [f'{k}={tree.plain(config[k])} (not {tree.plain(base[k])})'
           for k in ('patch_size', 'hidden_size', 'num_heads', 'mlp_dim')
           if tuple(np.atleast_1d(config[k])) != tuple(np.atleast_1d(base[k]))]
  rc, rb = config.get('resnet'), base.get('resnet')
  if (rc is None) != (rb is None):
    diffs.append('a ResNet stem' if rc is not None else 'no ResNet stem')
  elif rc is not None and tuple(rc.num_layers) != tuple(rb.num_layers):
    diffs.append(f'resnet.num_layers={tuple(rc.num_layers)} (not {tuple(rb.num_layers)})')
  return diffs


def _same_architecture(a, b) -> bool:
  return not _architecture_differences(a, b)


def timm_create_args(config) -> tuple[str, dict]:
  """(timm model name, create_model keyword arguments) that build the architecture of a
  ViT `config` (without its numerics: `create_timm_model` adds the LayerNorm epsilon and
  the GELU). A plain ViT of no registered shape is built from vit_base_patch16_224 with
  every structural argument given."""
  try:
    name = timm_name(config)
    named = True
  except ValueError:
    if config.get('resnet'):
      raise  # a hybrid's stem comes from the named timm model
    name, named = 'vit_base_patch16_224', False
  kwargs = dict(depth=config.num_layers, num_heads=config.num_heads,
                num_classes=config.num_classes or 0, img_size=config.image_size)
  # A registered name has been checked against the fields (timm_name); a plain ViT of a
  # timm name not registered here gets every structural argument.
  if not named or (not config.get('resnet') and _registered_name(name) is None):
    kwargs.update(embed_dim=config.hidden_size, mlp_ratio=config.mlp_dim / config.hidden_size,
                  patch_size=tuple(config.patch_size),
                  in_chans=config.get('in_channels', 3))
  if config.classifier == 'gap':
    kwargs.update(global_pool='avg', class_token=False, fc_norm=False)
  elif config.classifier == 'map':
    kwargs.update(global_pool='map', class_token=False)
  return name, kwargs


def _custom_family_args(config) -> tuple[str, dict]:
  """A timm model name and the keyword arguments that give it `config`'s architecture,
  for a Swin or ResNet-family config of no registered timm name (a Swin of depths=(1, 1),
  a ResNet of layers=(1, 1, 1, 1): create_timm_model said 'no timm model corresponds to
  swin_tiny_patch4_window7_224' of a model from_timm had just read)."""
  family = registry.family_of(config)
  if family == 'swin':
    return 'swin_tiny_patch4_window7_224', dict(
        embed_dim=config.embed_dim, depths=tuple(config.depths),
        num_heads=tuple(config.num_heads), patch_size=config.patch_size,
        mlp_ratio=config.mlp_ratio, in_chans=config.in_channels)
  if family == 'resnet' and config.block in ('bottleneck', 'basic'):
    return ('resnet50' if config.block == 'bottleneck' else 'resnet18'), dict(
        layers=tuple(config.layers), cardinality=config.cardinality,
        base_width=config.base_width, in_chans=config.in_channels)
  if family == 'res2net':
    return 'res2net50_26w_4s', dict(
        layers=tuple(config.layers), cardinality=config.cardinality,
        base_width=config.base_width, block_args=dict(scale=config.scale),
        in_chans=config.in_channels)
  raise ValueError(f"no timm model corresponds to {config.get('name')!r} (family {family}): "
                   'timm builds the registered architectures of this family only '
                   f'(vit_jax.models.list_models({family!r}))')


def create_timm_model(config, params=None):
  """A timm model with the architecture and numerics of `config`, loaded with `params`.

  Plain ViTs match any config; hybrids match the stem numerics of timm
  configs (as returned by `from_timm`), since timm builds its ResNet with fixed epsilons.
  The other families (Swin, ResNet/ResNeXt, Res2Net, BiT) are the timm model of their
  architecture (`timm_name`), at the config's resolution and class count; `params` are
  their variables (params and batch_stats, as `from_timm` returns them).
  """
  import functools  # pylint: disable=g-import-not-at-top
  timm = torch_import.module('timm')
  torch = torch_import.torch()
  if registry.family_of(config) != 'vit':  # (it read ViT fields: AttributeError num_layers)
    kwargs = dict(pretrained=False, num_classes=config.get('num_classes') or 0)
    if registry.family_of(config) == 'swin':
      if not isinstance(config.window_size, int):
        raise ValueError(f'window_size={config.window_size} (one per stage): timm builds a '
                         'Swin of one window for every stage')
      kwargs.update(img_size=config.image_size, window_size=config.window_size)
    try:
      name = timm_name(config)
    except ValueError:  # an architecture of no registered name (depths=(1, 1), ...)
      name, structure = _custom_family_args(config)
      kwargs.update(structure)
    model = timm.create_model(name, **kwargs).eval()
    if params is not None:
      model.load_state_dict(to_timm(config, params))
    return model
  name, kwargs = timm_create_args(config)
  kwargs.update(
      pretrained=False, embed_dim=config.hidden_size,
      mlp_ratio=config.mlp_dim / config.hidden_size,
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=config.layernorm_eps),
      act_layer='gelu_tanh' if config.gelu_approximate else 'gelu')
  model = timm.create_model(name, **kwargs).eval()
  if params is not None:
    model.load_state_dict(to_timm(config, params))
  return model
