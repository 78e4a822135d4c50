"""A timm state dict exported by vit_jax (`to_timm`, as `vit_jax.convert` writes it) of a
model whose name is not registered loads back as fine-tuning init; a state dict of
another kind is refused naming the file."""

import numpy as np
import pytest

from vit_jax import checkpoints
from vit_jax import models
from vit_jax.checkpoints import pretrained
from vit_jax.checkpoints import state_dict_io
from vit_jax.checkpoints import timm_format
from vit_jax.models import scan_layout
from vit_jax.train import recipes


def _custom_hybrid():
  """The demo's shape (BiT root stem, 1x1 patches) under a name nobody registered."""
  return recipes.small_hybrid_model('my-own-hybrid', image_size=28, hidden_size=32,
                                    num_layers=2, num_heads=2, mlp_dim=64, num_classes=10)


def _custom_plain():
  c = models.get_config('ViT-Ti/16')
  c.update(name='my-own-gap-vit', image_size=32, patch_size=(8, 8), hidden_size=32,
           num_layers=2, num_heads=4, mlp_dim=48, num_classes=7, classifier='gap',
           layernorm_eps=1e-5)
  return c


def _export(config, path):
  """Exported with the project's own export: params -> timm state dict -> file."""
  params = models.init_params(models.create(config), config.image_size)
  state_dict_io.write_state_dict(timm_format.to_timm(config, params), path)
  return params


@pytest.mark.parametrize('make_config', [_custom_hybrid, _custom_plain])
def test_own_export_of_an_unregistered_model_starts_the_same_shaped_model(tmp_path,
                                                                          make_config):
  config = make_config()
  assert config.name not in models.list_models()
  path = str(tmp_path / 'export.safetensors')
  exported = _export(config, path)

  # Fine-tuning: the same shape, another class count, blocks stacked (as the recipes).
  target = make_config()
  target.num_classes = 3
  target.scan_layers = True
  ckpt = pretrained.load_checkpoint(path, model=target)
  assert ckpt.kind == 'timm' and ckpt.config.name == config.name
  assert ckpt.config.num_heads == config.num_heads
  assert ckpt.config.classifier == config.classifier
  assert ckpt.config.num_classes == config.num_classes  # read from the weights
  reference = {'params': models.init_params(models.create(target), target.image_size)}
  variables = pretrained.adapt_variables(ckpt, reference, target)
  got = checkpoints.flatten(scan_layout.unstack_layers(variables['params']))
  want = checkpoints.flatten(exported)
  for k, v in want.items():
    if k.startswith('head/'):
      continue
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v), err_msg=k)
  assert np.shape(got['head/kernel']) == (config.hidden_size, 3)
  assert not np.any(np.asarray(got['head/kernel']))


@pytest.mark.parametrize('make_config', [_custom_hybrid, _custom_plain])
def test_own_export_keeps_the_given_models_numerics(tmp_path, make_config):
  """The config read back is the given one (GELU form, epsilons of the LayerNorm and the
  stem): the loaded model computes what the exported one did."""
  config = make_config()
  path = str(tmp_path / 'export.safetensors')
  exported = _export(config, path)
  ckpt = pretrained.load_checkpoint(path, model=config)
  assert ckpt.config.gelu_approximate == config.gelu_approximate
  assert ckpt.config.layernorm_eps == config.layernorm_eps
  if config.resnet is not None:
    assert ckpt.config.resnet.to_dict() == config.resnet.to_dict()
  images = np.random.RandomState(0).uniform(
      -1, 1, (2, config.image_size, config.image_size, 3)).astype(np.float32)
  want = models.create(config).apply({'params': exported}, images, train=False)
  got = models.create(ckpt.config).apply({'params': ckpt.params}, images, train=False)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_registered_names_still_read_with_timm_numerics(tmp_path):
  """A registered name gives timm's numerics (exact GELU), as before."""
  config = models.get_config('ViT-Ti/16')
  config.update(num_layers=1, num_classes=5, image_size=32, gelu_approximate=True)
  path = str(tmp_path / 'export.safetensors')
  _export(config, path)
  ckpt = pretrained.load_checkpoint(path, model=config)
  assert ckpt.config.name == 'ViT-Ti/16' and ckpt.config.gelu_approximate is False


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
@pytest.mark.parametrize('model', [_custom_hybrid, None])
def test_a_state_dict_that_is_not_a_vit_is_refused_naming_the_file(tmp_path, suffix, model):
  resnet_like = {'conv1.weight': np.zeros((8, 3, 3, 3), np.float32),
                 'bn1.weight': np.ones((8,), np.float32),
                 'fc.weight': np.zeros((10, 8), np.float32)}
  path = str(tmp_path / f'resnet_like{suffix}')
  state_dict_io.write_state_dict(resnet_like, path)
  with pytest.raises(ValueError, match='not a ViT state dict') as info:
    pretrained.load_checkpoint(path, model=model() if model else None)
  message = str(info.value)
  assert path in message and 'pos_embed' in message and 'conv1.weight' in message
  assert 'unknown model name' not in message
