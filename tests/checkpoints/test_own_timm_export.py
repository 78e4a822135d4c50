"""A timm state dict exported by vit_jax (`to_timm`, as `vit_jax.convert` writes it) of a
model whose name is not registered loads back as fine-tuning init; a state dict of
another kind is refused naming the file. A `.safetensors` export records its model config
in its metadata and reads back with it when no model is given (logits equal to the
exported model's); a caller's config wins; a record that does not fit is refused."""

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


# ------------------------------------------- a .safetensors export records its config


def _demo_like(name='demo-like-ViT'):
  """The demo's model (BiT root stem, tanh GELU, the stem's own epsilons, 3 heads of 32),
  2 layers, under a name nobody registered."""
  return recipes.small_hybrid_model(name, image_size=28, hidden_size=96, num_layers=2,
                                    num_heads=3, mlp_dim=192, num_classes=10)


def _demo_like_export(ck, tmp_path, name, *, metadata=True):
  """(config, params, images, logits, path): random perturbed params exported as
  convert writes them (to_timm; .safetensors with the recorded config)."""
  config = _demo_like()
  params = ck.perturb_jax_params(models.init_params(models.create(config), 28), seed=3,
                                 head_std=96 ** -0.5)
  images = ck.random_images(28, seed=4)
  logits = ck.jax_logits(models.create(config), params, images)
  path = str(tmp_path / name)
  meta = (pretrained.state_dict_metadata(config, [f'digit {i}' for i in range(10)],
                                         'decode|resize(28)|value_range(-1, 1)')
          if metadata else None)
  state_dict_io.write_state_dict(timm_format.to_timm(config, params), path, metadata=meta)
  return config, params, images, logits, path


def test_safetensors_export_records_its_config_and_reads_back_without_a_model(ck, tmp_path):
  config, _, images, logits, path = _demo_like_export(ck, tmp_path, 'demo.safetensors')
  assert 0.2 < np.abs(logits).mean() < 5
  ckpt = pretrained.load_checkpoint(path)  # no model: as predict reads it
  c = ckpt.config
  assert ckpt.config_recorded and c.name == config.name
  assert (c.num_heads, c.gelu_approximate, c.layernorm_eps) == (3, True, 1e-6)
  assert c.resnet.to_dict() == dict(config.resnet.to_dict(), num_layers=())
  assert ckpt.class_names == [f'digit {i}' for i in range(10)]
  assert ckpt.pp_eval == 'decode|resize(28)|value_range(-1, 1)'
  got = ck.jax_logits(models.create(c), ckpt.params, images)
  assert ck.max_diff(got, logits, 'recorded config vs the exported model') < 1e-5

  # The same weights in a torch file record nothing: read back as a guess, which differs
  # (the bug: 1 head, exact GELU, timm's stem epsilons), and convert names what it loses.
  pth = str(tmp_path / 'demo.pth')
  state_dict_io.write_state_dict(timm_format.to_timm(config, ckpt.params), pth)
  guess = pretrained.load_checkpoint(pth)
  assert not guess.config_recorded and guess.config.num_heads == 1
  wrong = ck.jax_logits(models.create(guess.config), guess.params, images)
  assert ck.max_diff(wrong, logits, 'guessed config (must differ)') > 1e-3
  lost = pretrained.unrecorded_fields(config, state_dict_io.read_state_dict(pth))
  assert lost[:2] == ['num_heads 1 (not 3)', 'GELU exact (not tanh)'], lost
  with pytest.raises(ValueError, match='torch file has no header'):
    state_dict_io.write_state_dict({'x': np.zeros(1)}, pth, metadata={'a': 'b'})


def test_a_given_model_wins_over_the_recorded_config(ck, tmp_path):
  _, _, images, logits, path = _demo_like_export(ck, tmp_path, 'demo.safetensors')
  given = _demo_like('my-name')
  given.gelu_approximate = False
  ckpt = pretrained.load_checkpoint(path, model=given)
  assert not ckpt.config_recorded
  assert ckpt.config.name == 'my-name' and ckpt.config.gelu_approximate is False
  exact = ck.jax_logits(models.create(ckpt.config), ckpt.params, images)
  assert ck.max_diff(exact, logits, 'the given exact GELU (must differ)') > 1e-4


def test_a_record_that_does_not_fit_the_weights_is_refused(ck, tmp_path):
  config, params, _, _, _ = _demo_like_export(ck, tmp_path, 'ok.safetensors')
  sd = timm_format.to_timm(config, params)
  wrong = _demo_like()
  wrong.update(hidden_size=64, num_heads=2)
  path = str(tmp_path / 'wrong.safetensors')
  state_dict_io.write_state_dict(sd, path, metadata=pretrained.state_dict_metadata(wrong))
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r'does not fit its weights: hidden_size: recorded 64, weights 96'):
    pretrained.load_checkpoint(path)
  damaged = str(tmp_path / 'damaged.safetensors')
  state_dict_io.write_state_dict(sd, damaged, metadata={pretrained.META_MODEL: '{"num_'})
  with pytest.raises(ValueError, match='records a damaged model config.*--model=NAME'):
    pretrained.load_checkpoint(damaged)
  # Either reads with the caller's config.
  assert pretrained.load_checkpoint(damaged, model=config).config.num_heads == 3


def test_a_record_with_a_one_value_patch_size_reads_back(ck, tmp_path):
  """--config.model.patch_size=7 trains with (7,): the record keeps it as given, and
  reading it back takes (7,) as (7, 7)."""
  config = _demo_like()
  params = models.init_params(models.create(config), 28)
  recorded = _demo_like()
  recorded.patch_size = (config.patch_size[0],)
  path = str(tmp_path / 'one_value.safetensors')
  state_dict_io.write_state_dict(timm_format.to_timm(config, params), path,
                                 metadata=pretrained.state_dict_metadata(recorded))
  ckpt = pretrained.load_checkpoint(path)
  assert ckpt.config_recorded
  assert models.create(ckpt.config).patch_size == tuple(config.patch_size)


def test_a_head_wider_than_its_class_names_names_the_rest(tmp_path, caplog):
  """A run may train num_classes=3 on a folder of 2 classes; predict and visualize then
  refused its weights ('2 class names for a head of 3 classes') and an export dropped
  both names. The outputs without a name are named class_<i>, with a warning."""
  from vit_jax import inference  # pylint: disable=g-import-not-at-top
  config = _custom_plain()
  config.num_classes = 3
  params = models.init_params(models.create(config), config.image_size)
  path = str(tmp_path / 'wide.safetensors')
  state_dict_io.write_state_dict(
      timm_format.to_timm(config, params), path,
      metadata=pretrained.state_dict_metadata(config, ['cat', 'dog']))
  with caplog.at_level('WARNING'):
    ckpt = pretrained.load_checkpoint(path)
  assert ckpt.class_names == ['cat', 'dog', 'class_2']
  assert '2 class names for a head of 3 classes' in caplog.text
  assert inference.ImageClassifier.from_pretrained(path).class_names == ['cat', 'dog', 'class_2']
  state_dict_io.write_state_dict(
      timm_format.to_timm(config, params), path,
      metadata=pretrained.state_dict_metadata(config, ['a', 'b', 'c', 'd']))
  assert pretrained.load_checkpoint(path).class_names is None  # more names than outputs
