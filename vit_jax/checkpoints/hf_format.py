"""Import from and export to transformers' `ViTForImageClassification` (and `ViTModel`).

transformers v5 names                          vit_jax names
vit.embeddings.patch_embeddings.projection     embedding
vit.embeddings.cls_token / position_embeddings cls / Transformer/posembed_input/pos_embedding
vit.layers.{i}.layernorm_before / _after       Transformer/encoderblock_{i}/LayerNorm_0 / _1
vit.layers.{i}.attention.{q,k,v,o}_proj        .../MultiHeadDotProductAttention_0/{query,key,value,out}
vit.layers.{i}.mlp.fc1 / fc2                   .../MlpBlock_0/Dense_0 / Dense_1
vit.layernorm                                  Transformer/encoder_norm
classifier                                     head

State dicts with the v4 names (`vit.encoder.layer.{i}.attention.attention.query`, ...)
are read too. transformers' ViT is a class-token model with no representation layer;
its LayerNorm epsilon (1e-12 by default) and GELU flavour come from its config.
"""

import json
import math
import os
import re

from absl import logging

from vit_jax import torch_import
from vit_jax.checkpoints import architecture
from vit_jax.checkpoints import layout
from vit_jax.checkpoints import state_dict_io
from vit_jax.checkpoints import tree
from vit_jax.models import registry
from vit_jax.models import summary

_V4_TO_V5 = (
    ('vit.encoder.layer.', 'vit.layers.'),
    ('.attention.attention.query.', '.attention.q_proj.'),
    ('.attention.attention.key.', '.attention.k_proj.'),
    ('.attention.attention.value.', '.attention.v_proj.'),
    ('.attention.output.dense.', '.attention.o_proj.'),
    ('.intermediate.dense.', '.mlp.fc1.'),
    ('.output.dense.', '.mlp.fc2.'),
)
# The weights of a save_pretrained directory: one file, or the index of its shards.
DIR_WEIGHTS = ('model.safetensors', 'pytorch_model.bin', 'model.safetensors.index.json',
               'pytorch_model.bin.index.json')
# Why a transformers DeiT (model_type 'deit') is refused.
DEIT_REFUSAL = ("a transformers DeiT (model_type 'deit') has a distillation token, which "
                "vit_jax's ViT does not compute; timm's DeiT models without one "
                '(deit_tiny/small/base_patch16_224) are read from timm weights')
# The model types whose weights have ViT's layout.
MODEL_TYPES = ('vit', 'vit_msn', 'vit_mae')
# transformers' activation names -> whether vit_jax computes them with the tanh form (each
# within 5e-7 of torch's exact or tanh GELU; 'gelu_10' clips, 'quick_gelu' is a sigmoid).
_GELU = {'gelu': False, 'gelu_python': False, 'gelu_pytorch_tanh': True, 'gelu_new': True,
         'gelu_fast': True, 'gelu_accurate': True, 'gelu_python_tanh': True}


def _v5_names(sd):
  out = {}
  for k, v in sd.items():
    if not k.startswith(('vit.', 'classifier.')):
      k = 'vit.' + k  # a bare ViTModel state dict (before the renames, which expect 'vit.')
    for old, new in _V4_TO_V5:
      k = k.replace(old, new)
    out[k] = v
  return out


def _hf_config_dict(hf_config):
  if hf_config is None:
    return {}
  if hasattr(hf_config, 'to_dict'):
    return hf_config.to_dict()
  return dict(hf_config)


def from_hf(model_or_state_dict, hf_config=None):
  """transformers ViT (a model, a state dict or a file) -> (config, params).

  model_or_state_dict: a model, a state dict, a weights file, or a `save_pretrained`
    directory (its model.safetensors or pytorch_model.bin).
  hf_config: the model's `ViTConfig` (or its dict); taken from the model when a model
    is passed, and from the config.json beside a file or in a directory. Needed for the
    number of heads, the LayerNorm epsilon and the GELU.
  """
  if isinstance(model_or_state_dict, (str, os.PathLike)):
    path = os.fspath(model_or_state_dict)
    if os.path.isdir(path):
      found = [f for f in DIR_WEIGHTS if os.path.exists(os.path.join(path, f))]
      if not found:
        raise FileNotFoundError(f'{path} holds no model.safetensors or pytorch_model.bin '
                                '(a transformers save_pretrained directory has one, or '
                                'the .index.json of its shards)')
      model_or_state_dict = os.path.join(path, found[0])
    beside = os.path.join(os.path.dirname(os.fspath(model_or_state_dict)), 'config.json')
    if hf_config is None and os.path.exists(beside):
      with open(beside) as f:
        hf_config = json.load(f)
  if hf_config is None and hasattr(model_or_state_dict, 'config'):
    hf_config = model_or_state_dict.config
  hc = _hf_config_dict(hf_config)
  if hc.get('model_type') == 'deit':
    raise ValueError(DEIT_REFUSAL)
  if hc.get('model_type') and hc['model_type'] not in MODEL_TYPES:
    raise ValueError(f"a transformers {hc['model_type']!r} model (model_type); from_hf "
                     f'reads transformers ViTs (model_type {", ".join(MODEL_TYPES)})')
  if 'num_attention_heads' not in hc:
    raise ValueError('from_hf needs the transformers ViTConfig (for the number of heads, '
                     'epsilon and activation): pass hf_config=model.config or its dict')
  if hc.get('hidden_act', 'gelu') not in _GELU:
    raise ValueError(f"unsupported hidden_act {hc['hidden_act']!r}; "
                     f'vit_jax supports {sorted(_GELU)}')
  if not hc.get('qkv_bias', True):
    raise ValueError('qkv_bias=False is not supported: vit_jax attention has biases')
  given = state_dict_io.read_state_dict(model_or_state_dict)
  sd = _v5_names(given)
  if any(k.startswith('vit.pooler.') for k in sd):
    logging.warning('the transformers pooler (a Dense + tanh on the class token, which '
                    'ViTModel adds and ViTForImageClassification does not) is left out: '
                    'the features are the final LayerNorm of the class token')
  sd = {k: v for k, v in sd.items() if not k.startswith('vit.pooler.')}
  if any(k.startswith('vit.decoder.') for k in sd):  # ViTMAEForPreTraining
    logging.warning('the MAE decoder (which reconstructs masked patches in pre-training) '
                    'is left out: the model is the encoder, as fine-tuning uses it')
    sd = {k: v for k, v in sd.items() if not k.startswith('vit.decoder.')}
  needed = ('vit.embeddings.position_embeddings', 'vit.embeddings.cls_token',
            'vit.embeddings.patch_embeddings.projection.weight')
  if any(k not in sd for k in needed):
    raise ValueError(
        'not a transformers ViT state dict: it lacks '
        f'{", ".join(k for k in needed if k not in sd)} (ViTModel / '
        f'ViTForImageClassification have them); its keys start {sorted(given)[:4]}. For a timm '
        'state dict use from_timm, or load_checkpoint for any kind')
  c = registry.get_config('ViT-B/16')
  c.name = hc.get('_name_or_path') or 'hf_vit'
  c.hidden_size = int(hc['hidden_size'])
  c.num_heads = int(hc['num_attention_heads'])
  c.num_layers = sum(1 for k in sd
                     if re.fullmatch(r'vit\.layers\.\d+\.layernorm_before\.weight', k))
  c.mlp_dim = int(hc['intermediate_size'])
  patch = hc['patch_size']
  ph, pw = (patch, patch) if isinstance(patch, int) else (int(p) for p in patch)
  c.patch_size = (ph, pw)
  c.in_channels = int(hc.get('num_channels', 3))
  tokens = int(sd['vit.embeddings.position_embeddings'].shape[1]) - 1
  size = hc.get('image_size')
  if isinstance(size, (list, tuple)) and len(set(int(v) for v in size)) > 1:
    raise ValueError(f'the transformers model reads images of {list(size)} pixels; vit_jax '
                     'reads square images (config.image_size is one int)')
  side = math.isqrt(tokens * ph * pw)
  if side * side != tokens * ph * pw or side % ph or side % pw:
    raise ValueError(f'the position embedding holds {tokens} patch tokens, which no square '
                     f'image makes with {ph}x{pw}-pixel patches; vit_jax reads square images')
  c.image_size = side
  c.num_classes = int(sd['classifier.weight'].shape[0]) if 'classifier.weight' in sd else 0
  c.layernorm_eps = float(hc.get('layer_norm_eps', 1e-12))
  c.gelu_approximate = _GELU[hc.get('hidden_act', 'gelu')]
  c.dropout_rate = 0.0
  c.attention_dropout_rate = 0.0

  flat, used = {}, []
  def take(key):
    used.append(key)
    return sd[key]
  e = 'vit.embeddings.'
  flat['embedding/kernel'] = layout.conv_to_flax(take(e + 'patch_embeddings.projection.weight'))
  flat['embedding/bias'] = take(e + 'patch_embeddings.projection.bias')
  flat['cls'] = take(e + 'cls_token')
  flat['Transformer/posembed_input/pos_embedding'] = take(e + 'position_embeddings')
  for i in range(c.num_layers):
    p, q = f'vit.layers.{i}.', f'Transformer/encoderblock_{i}/'
    lin = lambda n: (take(f'{p}{n}.weight'), take(f'{p}{n}.bias'))  # noqa: E731
    flat.update(layout.attention_from_linears(
        q + 'MultiHeadDotProductAttention_0', lin('attention.q_proj'), lin('attention.k_proj'),
        lin('attention.v_proj'), lin('attention.o_proj'), c.num_heads))
    for src, dst in (('layernorm_before', 'LayerNorm_0'), ('layernorm_after', 'LayerNorm_1')):
      flat[q + dst + '/scale'], flat[q + dst + '/bias'] = lin(src)
    for src, dst in (('mlp.fc1', 'Dense_0'), ('mlp.fc2', 'Dense_1')):
      flat.update(layout.linear_to_dense(q + 'MlpBlock_0/' + dst, *lin(src)))
  flat['Transformer/encoder_norm/scale'] = take('vit.layernorm.weight')
  flat['Transformer/encoder_norm/bias'] = take('vit.layernorm.bias')
  if c.num_classes:
    flat.update(layout.linear_to_dense('head', take('classifier.weight'),
                                       take('classifier.bias')))
  unused = sorted(set(sd) - set(used))
  if unused:
    raise tree.CheckpointMismatchError(
        f'transformers state dict has keys vit_jax does not map ({len(unused)}): '
        f'{", ".join(unused[:20])}')
  module = registry.create(c)
  params = tree.merge_into(summary.abstract_params(module, c.image_size), flat,
                           what='transformers state dict')
  return c, params


def to_hf(config, params) -> dict:
  """vit_jax params -> `ViTForImageClassification` state dict (v5 names, torch tensors)."""
  if config.classifier != 'token':
    raise ValueError(f'transformers ViT pools the class token; classifier '
                     f'{config.classifier!r} has no equivalent there')
  if config.get('representation_size'):
    raise ValueError('transformers ViTForImageClassification has no pre_logits layer; this '
                     f'model has representation_size={config.representation_size}')
  if config.get('resnet') is not None:
    raise ValueError('transformers ViT has no hybrid (ResNet stem) variant; export to timm')
  architecture.check_fits(config, params, 'transformers')
  flat = tree.flatten_for_export(params)  # blocks unrolled, bfloat16 as float32
  e = 'vit.embeddings.'
  sd = {
      e + 'cls_token': flat['cls'],
      e + 'position_embeddings': flat['Transformer/posembed_input/pos_embedding'],
      e + 'patch_embeddings.projection.weight': layout.conv_from_flax(flat['embedding/kernel']),
      e + 'patch_embeddings.projection.bias': flat['embedding/bias'],
  }
  for i in range(config.num_layers):
    p, q = f'vit.layers.{i}.', f'Transformer/encoderblock_{i}/'
    att = layout.attention_to_linears(flat, q + 'MultiHeadDotProductAttention_0')
    for short in 'qkvo':
      sd[f'{p}attention.{short}_proj.weight'], sd[f'{p}attention.{short}_proj.bias'] = att[short]
    for dst, src in (('layernorm_before', 'LayerNorm_0'), ('layernorm_after', 'LayerNorm_1')):
      sd[p + dst + '.weight'] = flat[q + src + '/scale']
      sd[p + dst + '.bias'] = flat[q + src + '/bias']
    for dst, src in (('mlp.fc1', 'Dense_0'), ('mlp.fc2', 'Dense_1')):
      sd[p + dst + '.weight'], sd[p + dst + '.bias'] = layout.dense_to_linear(
          flat, q + 'MlpBlock_0/' + src)
  sd['vit.layernorm.weight'] = flat['Transformer/encoder_norm/scale']
  sd['vit.layernorm.bias'] = flat['Transformer/encoder_norm/bias']
  if config.num_classes:
    sd['classifier.weight'], sd['classifier.bias'] = layout.dense_to_linear(flat, 'head')
  return state_dict_io.as_torch(sd)


def to_hf_config(config):
  """The transformers `ViTConfig` with the architecture and numerics of `config`."""
  ViTConfig = torch_import.module('transformers').ViTConfig
  return ViTConfig(
      hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, intermediate_size=config.mlp_dim,
      hidden_act='gelu_pytorch_tanh' if config.gelu_approximate else 'gelu',
      layer_norm_eps=config.layernorm_eps, image_size=config.image_size,
      # (A list for non-square patches, which transformers' ViT takes too.)
      patch_size=(int(config.patch_size[0]) if config.patch_size[0] == config.patch_size[1]
                  else [int(p) for p in config.patch_size]), num_channels=config.in_channels,
      # 0 for a features model: ViTForImageClassification's classifier is then Identity,
      # as to_hf writes none.
      num_labels=config.num_classes or 0, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, qkv_bias=True)



def image_processor_config(pp_eval: str | None, image_size: int) -> tuple[dict, str | None]:
  """(the `preprocessor_config.json` of a transformers ViTImageProcessor, a note or None)
  that preprocesses as `pp_eval` does: a resize to the model's size, then
  (x / 255 - mean) / std. Exact for `decode|resize(S)|<value op>`; for other evaluation
  ops (e.g. a resize then a central crop) the note says what the processor does instead.
  Without pp_eval, the original release's [-1, 1] (mean = std = 0.5)."""
  from vit_jax.data import preprocess_ops  # pylint: disable=g-import-not-at-top
  mean, std, note = (0.5,) * 3, (0.5,) * 3, None
  if not pp_eval:
    note = ('no evaluation preprocessing is recorded with these weights: '
            'preprocessor_config.json normalises to [-1, 1] (mean = std = 0.5) as the '
            'original release does; weights trained with other statistics (e.g. ImageNet '
            "mean/std, as timm's DeiT) need its image_mean and image_std edited")
  else:
    spec = preprocess_ops.without_ops(pp_eval, ('onehot', 'keep', 'drop'))
    scaling = preprocess_ops.pixel_mean_std(spec)
    if scaling is not None:
      mean, std = scaling
    geometry = [n for n, _ in preprocess_ops.ops(spec)
                if n not in ('decode', 'value_range', 'normalize')]
    size_args = [a for n, a in preprocess_ops.ops(spec) if n == 'resize']
    exact = (geometry == ['resize'] and size_args[0]['size'] in (
        image_size, (image_size, image_size), [image_size, image_size]))
    if not exact or scaling is None:
      note = (f'preprocessor_config.json resizes to {image_size}x{image_size} and '
              f'normalises with mean {_fmt(mean)}, std {_fmt(std)}; the evaluation '
              f'preprocessing was {spec!r}')
  return {
      'image_processor_type': 'ViTImageProcessor', 'do_resize': True,
      'size': {'height': image_size, 'width': image_size}, 'resample': 2,  # bilinear
      'do_rescale': True, 'rescale_factor': 1 / 255, 'do_normalize': True,
      'image_mean': [float(m) for m in mean], 'image_std': [float(x) for x in std],
  }, note


def _hw_of(size) -> tuple[int, int] | int | None:
  """(h, w) of a processor's {'height', 'width'} or int size; the int of a
  {'shortest_edge'} size (an aspect-preserving resize); None if neither."""
  if isinstance(size, int):
    return (size, size)
  if isinstance(size, dict) and 'height' in size and 'width' in size:
    return (int(size['height']), int(size['width']))
  if isinstance(size, dict) and 'shortest_edge' in size:
    return int(size['shortest_edge'])
  return None


def pp_eval_from_image_processor(processor: dict, image_size: int) -> str | None:
  """The evaluation preprocessing (vit_jax ops) a transformers `preprocessor_config.json`
  describes: a resize (PIL's bilinear or bicubic), a central crop if it has one (DeiT's
  processors: 256 then 224), then (x * rescale_factor - mean) / std. None for one these
  ops cannot follow (no resize, another rescale factor, an unknown size)."""
  if not processor.get('do_resize', True):
    return None  # images of any size: the model needs its own
  method = {2: 'bilinear', 3: 'bicubic'}.get(processor.get('resample', 2))
  size = _hw_of(processor.get('size'))
  if method is None or size is None:
    return None
  how = '' if method == 'bilinear' else f", method='{method}'"
  if isinstance(size, int):
    ops = ['decode', f'resize_small({size}{how})']
  else:
    ops = ['decode', f'resize({size[0] if size[0] == size[1] else size}{how})']
  if processor.get('do_center_crop'):
    crop = _hw_of(processor.get('crop_size'))
    if not isinstance(crop, tuple):
      return None
    ops.append(f'central_crop({crop[0] if crop[0] == crop[1] else crop})')
  elif isinstance(size, int):
    return None  # an aspect-preserving resize with no crop: not a fixed size
  rescale = processor.get('do_rescale', True)
  if rescale and not math.isclose(float(processor.get('rescale_factor', 1 / 255)), 1 / 255):
    return None
  if processor.get('do_normalize', True):
    mean = tuple(float(m) for m in processor.get('image_mean', (0.5,) * 3))
    std = tuple(float(x) for x in processor.get('image_std', (0.5,) * 3))
    if not rescale:
      return None
    if all(math.isclose(v, 0.5) for v in mean + std):
      ops.append('value_range(-1, 1)')
    else:
      ops.append(f'normalize(mean={mean}, std={std})')
  elif rescale:
    ops.append('value_range(0, 1)')
  else:
    ops.append('value_range(0, 255)')
  return '|'.join(ops)


def _fmt(values) -> str:
  return '(' + ', '.join(f'{v:.4g}' for v in values) + ')'
