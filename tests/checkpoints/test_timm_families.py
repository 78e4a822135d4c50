"""The public entry points `checkpoints.from_timm` / `to_timm` for the non-ViT families.

tests/models/test_{swin,resnet_v1,bit}.py test each converter in depth; here the same
weights go through the package-level API a user calls: a timm model object (name read from
it), a state-dict file with a pretrained tag in the name, and export from a paper-name
config. Weights are random with perturbed norm weights/biases and random BatchNorm running
statistics; tolerance 1e-4 on logits (fp32, eval mode).
"""

import functools

import jax
import numpy as np
import pytest

from vit_jax import checkpoints
from vit_jax import models

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

TOL = 1e-4


def _perturb(model, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm)):
        m.weight.add_(torch.randn(m.weight.shape, generator=g) * 0.2)
        m.bias.add_(torch.randn(m.bias.shape, generator=g) * 0.05)
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
  return model.eval()


def _calibrate_head(model, x):
  """A random head scaled so that the mean |logit| is about 1 on these images."""
  head = model.get_classifier()
  with torch.no_grad():
    head.weight.normal_(0, 0.02)
    scale = float(np.mean(np.abs(_timm_logits(model, x) - head.bias.numpy().reshape(-1))))
    head.weight.mul_(1.0 / scale)
  return model


def _images(size, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)


def _timm_logits(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()


def _ours(config, variables, x):
  module = models.create(config)
  return np.asarray(jax.jit(lambda v, y: module.apply(v, y, train=False))(variables, x))


def _check(config, variables, model, x, what):
  theirs = _timm_logits(model, x)
  ours = _ours(config, variables, x)
  diff = float(np.max(np.abs(ours - theirs)))
  print(f'[tolerance] {what}: max|diff|={diff:.2e}, mean|logit|={np.mean(np.abs(theirs)):.2f}')
  assert np.mean(np.abs(theirs)) > 0.3  # logits of order one: the tolerance means something
  assert diff < TOL


def test_resnet_state_dict_file_with_pretrained_tag(tmp_path):
  x = _images(64)
  model = _calibrate_head(_perturb(timm.create_model('resnet50', pretrained=False,
                                                     num_classes=7)), x)
  path = tmp_path / 'model.safetensors'
  checkpoints.write_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, path)
  config, variables = checkpoints.from_timm(str(path), 'resnet50.a1_in1k')
  assert models.family_of(config) == 'resnet' and config.num_classes == 7
  assert set(variables) == {'params', 'batch_stats'}
  _check(config, variables, model, x, 'from_timm(file, resnet50.a1_in1k)')
  # Export from the paper-name config of the same architecture, loaded strictly.
  paper = models.get_config('ResNet-50')
  paper.num_classes = 7
  sd = checkpoints.to_timm(paper, variables)
  fresh = timm.create_model(checkpoints.timm_name(paper), pretrained=False, num_classes=7)
  fresh.load_state_dict(sd, strict=True)
  np.testing.assert_array_equal(_timm_logits(fresh.eval(), x), _timm_logits(model, x))


# Swin and Res2Net are slow here: tests/models compares their converters with timm; the
# dispatch by model object is the same code for every family.
@pytest.mark.parametrize('name,size', [
    pytest.param('swin_tiny_patch4_window7_224', 224, marks=pytest.mark.slow),
    ('resnetv2_50x1_bit', 64),
    pytest.param('res2net50_26w_4s', 64, marks=pytest.mark.slow)])
def test_model_object_name_is_read_from_the_model(name, size):
  x = _images(size)
  model = _calibrate_head(_perturb(timm.create_model(name, pretrained=False, num_classes=5)),
                          x)
  config, variables = checkpoints.from_timm(model)
  assert config.name.split('.')[0] == name and config.num_classes == 5
  _check(config, variables, model, x, f'from_timm({name} model)')
  back = checkpoints.to_timm(config, variables)
  assert set(back) == set(model.state_dict())


def test_family_overrides_are_refused():
  with pytest.raises(ValueError, match='ViT models only'):
    checkpoints.from_timm({}, 'resnet50', num_heads=3)


def test_swin_of_another_window_than_its_name_from_the_model_and_its_state_dict():
  """The relative-position tables give the window: from_timm read it from the name and
  refused the model; load_checkpoint already read it from the tables."""
  torch.manual_seed(0)
  model = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, img_size=64,
                            window_size=2, depths=(1, 1, 1, 1), num_classes=5)
  x = _images(64)
  _calibrate_head(_perturb(model), x)
  for source in (model, model.state_dict()):
    config, variables = checkpoints.from_timm(source, 'swin_tiny_patch4_window7_224')
    assert config.window_size == 2 and config.image_size == 64
    _check(config, variables, model, x, 'Swin window 2 (named window 7)')


def test_swin_model_object_keeps_its_resolution_where_the_windows_fit_the_name_s_size():
  """A model built with img_size=448 (window 7, as its name) read as the name's 224 before:
  its tables fit both sizes. A model object shows its own; a state dict only the name's."""
  torch.manual_seed(0)
  model = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, img_size=448,
                            embed_dim=8, num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 1),
                            num_classes=5)
  x = _images(448)
  _calibrate_head(_perturb(model), x)
  config, variables = checkpoints.from_timm(model)
  assert config.window_size == 7 and config.image_size == 448
  _check(config, variables, model, x, 'Swin at 448 (named 224)')
  config, _ = checkpoints.from_timm(model.state_dict(), 'swin_tiny_patch4_window7_224')
  assert config.image_size == 224  # a state dict does not show it: the name's


def test_a_non_square_swin_whose_last_stage_shrinks_its_window_is_read():
  """64 x 128 with window 4: the last stage's grid is 2 x 4, which timm (and vit_jax)
  give a 2 x 4 window, a bias table of 21 rows; from_timm refused it ('not the
  (2 w - 1)^2 of a square window'), though vit_jax builds the model. A size whose grids
  the windows do not divide (timm pads them) is named as such."""
  torch.manual_seed(0)
  kw = dict(window_size=4, depths=(1, 1, 2, 1), embed_dim=16, num_heads=(1, 1, 2, 2),
            num_classes=5)
  model = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False,
                            img_size=(64, 128), **kw)
  x = np.random.RandomState(0).uniform(-1, 1, (2, 64, 128, 3)).astype(np.float32)
  _calibrate_head(_perturb(model), x)
  config, variables = checkpoints.from_timm(model)
  assert tuple(config.image_size) == (64, 128) and config.window_size == 4
  _check(config, variables, model, x, 'Swin at 64 x 128, last window 2 x 4')
  padded = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False,
                             img_size=(64, 96), **kw)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r'the timm Swin model \(image size \(64, 96\), window .*\) is not '
                           r'one vit_jax builds: .*not a multiple of its window 4'):
    checkpoints.from_timm(padded)


SMALL_SWIN = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 1), img_size=32, patch_size=2,
                  window_size=4)


@pytest.mark.parametrize('name,kw,match', [
    ('resnet50', dict(global_pool='max'), "global_pool pools with 'max'"),
    ('resnet50', dict(act_layer='silu'), 'act1 is a SiLU'),
    ('resnetv2_50x1_bit', dict(global_pool='avgmax'), "pools with 'avgmax'"),
    ('resnetv2_50x1_bit', dict(act_layer='silu'), 'is a SiLU'),
    ('swin_tiny_patch4_window7_224', dict(SMALL_SWIN, global_pool='max'), "pools with 'max'"),
])
def test_a_model_object_with_layers_vit_jax_does_not_compute_is_refused(name, kw, match):
  """The state dict does not show the pooling or the activations: from_timm(model) used
  to convert these with the defaults' numerics (logits off by 0.3 to 2.3)."""
  model = timm.create_model(name, pretrained=False, num_classes=3, **kw)
  with pytest.raises(ValueError, match=match):
    checkpoints.from_timm(model)


def test_a_swin_with_a_tanh_gelu_is_refused():
  model = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, num_classes=3,
                            **SMALL_SWIN)
  model.layers[0].blocks[0].mlp.act = torch.nn.GELU(approximate='tanh')
  with pytest.raises(ValueError, match='tanh-approximate GELU'):
    checkpoints.from_timm(model)


def test_a_model_object_s_epsilons_are_read_from_it():
  model = _perturb(timm.create_model('resnet50', pretrained=False, num_classes=3,
                                     norm_layer=functools.partial(torch.nn.BatchNorm2d,
                                                                  eps=1e-3)))
  x = _images(64)
  config, variables = checkpoints.from_timm(model)
  assert config.bn_eps == 1e-3
  np.testing.assert_allclose(_ours(config, variables, x), _timm_logits(model, x), atol=TOL)


def test_a_registered_name_with_another_architecture_is_not_that_timm_model():
  """convert's note told timm users to load a custom Swin (depths (1, 1)) into the model
  of its config's name, which refused the weights (missing keys)."""
  from vit_jax.checkpoints import timm_format  # pylint: disable=g-import-not-at-top
  config = models.get_config('swin_tiny_patch4_window7_224')
  assert timm_format.timm_name(config) == 'swin_tiny_patch4_window7_224'
  config.update(depths=(1, 1), num_heads=(1, 1), embed_dim=16)
  with pytest.raises(ValueError, match='no timm model corresponds'):
    timm_format.timm_name(config)
  # Fields that do not change timm's model are not compared (a run's remat policy).
  tuned = models.get_config('swin_tiny_patch4_window7_224')
  tuned.remat_policy = 'full'
  assert timm_format.timm_name(tuned) == 'swin_tiny_patch4_window7_224'
  resnext = models.get_config('resnet50')
  resnext.update(cardinality=32, base_width=4)  # ResNeXt-50's, under resnet50's name
  assert timm_format.timm_name(resnext) == 'resnext50_32x4d'


def test_weights_read_by_a_config_of_another_window_keep_its_registered_name():
  """A Swin-S fine-tuned at window 12 matches no registered timm model: its weights were
  read as the family's default (swin_tiny_...) rather than by its own registered name."""
  from vit_jax.checkpoints import pretrained  # pylint: disable=g-import-not-at-top
  config = models.get_config('swin_small_patch4_window7_224')
  config.update(window_size=12, image_size=384)
  assert pretrained._timm_name_for(config, 'swin') == 'swin_small_patch4_window7_224'  # pylint: disable=protected-access
  config.name = 'my_swin'
  assert pretrained._timm_name_for(config, 'swin') == 'swin_tiny_patch4_window7_224'  # pylint: disable=protected-access


def test_create_timm_model_builds_the_other_families_too():
  """create_timm_model(ResNet-50's config) failed with AttributeError 'num_layers' (it
  read ViT fields); it builds the timm model of the architecture, loaded with the
  variables, which computes the same logits."""
  torch.manual_seed(0)
  source = timm.create_model('resnet50', pretrained=False, num_classes=5)
  x = _images(64)
  _calibrate_head(_perturb(source), x)
  config, variables = checkpoints.from_timm(source)
  model = checkpoints.create_timm_model(config, variables)
  assert type(model).__name__ == 'ResNet' and model.num_classes == 5
  np.testing.assert_allclose(_timm_logits(model, x), _timm_logits(source, x), atol=1e-5)
  _check(config, variables, model, x, 'create_timm_model(ResNet-50)')


@pytest.mark.parametrize('timm_name, kwargs, changes', [
    ('swin_tiny_patch4_window7_224',
     dict(img_size=32, patch_size=2, window_size=4, depths=(1, 1), num_heads=(1, 2),
          embed_dim=16), dict(remat_policy='dots', custom_vjp=False)),
    ('resnext50_32x4d', dict(layers=(1, 1, 1, 1)), dict(grouped_conv='native')),
])
def test_weights_load_into_a_model_that_only_computes_otherwise(timm_name, kwargs, changes):
  """adapt_variables (and init_from) refused Swin weights for a model with
  remat_policy='dots' or custom_vjp=False, and ResNeXt weights for grouped_conv='native',
  as if they were other architectures: these fields change how, not what, it computes."""
  from vit_jax.checkpoints import pretrained  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  source = timm.create_model(timm_name, pretrained=False, num_classes=5, **kwargs)
  x = _images(32)
  _calibrate_head(_perturb(source), x)
  config, variables = checkpoints.from_timm(source)
  ckpt = pretrained.Checkpoint(config, variables['params'], 'timm',
                               model_state={k: v for k, v in variables.items()
                                            if k != 'params'})
  target = config.copy_and_resolve_references()
  target.update(**changes)
  init = models.init_variables(models.create(target), 32)
  adapted = checkpoints.adapt_variables(ckpt, init, target, keep_head=True)
  _check(target, adapted, source, x, f'{timm_name} with {changes}')


@pytest.mark.parametrize('timm_name, kwargs', [
    ('swin_tiny_patch4_window7_224', dict(img_size=32, patch_size=2, window_size=4,
                                          depths=(1, 1), num_heads=(1, 2), embed_dim=16)),
    ('resnet50', dict(layers=(1, 1, 1, 1))),
    ('resnext50_32x4d', dict(layers=(1, 1, 1, 1))),
    ('res2net50_26w_4s', dict(layers=(1, 1, 1, 1))),
])
def test_create_timm_model_builds_architectures_of_no_registered_name(timm_name, kwargs):
  """from_timm read these, but create_timm_model said 'no timm model corresponds to
  swin_tiny_patch4_window7_224': it builds them, with the same logits."""
  torch.manual_seed(0)
  source = timm.create_model(timm_name, pretrained=False, num_classes=5, **kwargs)
  x = _images(32)
  _calibrate_head(_perturb(source), x)
  config, variables = checkpoints.from_timm(source)
  model = checkpoints.create_timm_model(config, variables)
  assert sum(p.numel() for p in model.parameters()) == sum(
      p.numel() for p in source.parameters())
  np.testing.assert_allclose(_timm_logits(model, x), _timm_logits(source, x), atol=1e-5)
