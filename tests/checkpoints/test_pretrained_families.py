"""init_from for the non-ViT families: timm state dicts and Orbax workdirs of BN runs.

A Trainer is initialised from the weights as `config.init_from` does (`with_pretrained`):
the params (but a new zero head) and the BatchNorm running statistics must be the
checkpoint's, Swin relative position bias tables resampled to the new windows as timm
resamples them, and weights of another family or architecture refused by name.
Weights are random with perturbed norms and random BatchNorm statistics; features are
compared with timm's in fp32 eval mode within 1e-4.
"""

import jax
import ml_collections
import numpy as np
import pytest

from vit_jax import checkpoints
from vit_jax import inference
from vit_jax import models
from vit_jax import sharding
from vit_jax.checkpoints import bit_npz
from vit_jax.checkpoints import pretrained
from vit_jax.checkpoints import timm_swin
from vit_jax.checkpoints import train_state
from vit_jax.models import swin
from vit_jax.train import loop
from vit_jax.train import recipes

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

TOL = 1e-4
SWIN = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), mlp_ratio=2.0)


def _perturb(model, seed=0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
        m.weight.add_(torch.randn(m.weight.shape, generator=g) * 0.2)
        m.bias.add_(torch.randn(m.bias.shape, generator=g) * 0.05)
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
  return model.eval()


def _images(size, seed=0, batch=2):
  return np.random.RandomState(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def _timm_pooled(model, x):
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return model.forward_head(model.forward_features(x), pre_logits=True).numpy()


def _pooled(config, variables, x):
  """Our pooled features: the same weights in the num_classes=0 variant of the model."""
  module = models.create(config, num_classes=0)
  return np.asarray(jax.jit(lambda v, y: module.apply(v, y, train=False))(variables, x))


def _logits(module, variables, x):
  """Eval-mode logits, compiled (op by op, these models took several times longer)."""
  return np.asarray(jax.jit(lambda v, y: module.apply(v, y, train=False))(variables, x))


def _config(model, **fields):
  c = recipes.bundled_mnist(recipes.imagenet1k_supervised(model))
  c.model.update(fields)
  c.schedule.warmup_steps = 1
  return c


def _trainer(config):
  return loop.Trainer(config, sharding.create_mesh(config.mesh, jax.devices()[:1]), 2)


def _zeros_state(t):
  """A train state of zeros in the trainer's layout. with_pretrained replaces every value
  of these models (the head by zeros), and ResNet-50's random init compiles for ~15 s on
  a CPU; the Orbax test below starts from a real init_state."""
  return jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding),
                      t.abstract_state())


def _init_from(config, path, state=None):
  t = _trainer(config)
  return t, t.with_pretrained(t.init_state() if state is None else state(t), str(path))


def _zero_variables(config, size):
  return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                      models.abstract_variables(models.create(config), size))


def _flat(tree):
  return {k: np.asarray(v) for k, v in checkpoints.flatten(jax.device_get(tree)).items()}


def _no_head(flat, head):
  return {k: v for k, v in flat.items() if not k.startswith(head)}


@pytest.fixture(scope='module')
def resnet50_file(tmp_path_factory):
  torch.manual_seed(0)
  model = _perturb(timm.create_model('resnet50', pretrained=False, num_classes=7))
  path = tmp_path_factory.mktemp('timm') / 'resnet50.safetensors'
  checkpoints.write_state_dict(model.state_dict(), path)
  return model, path


def test_timm_resnet50_file(resnet50_file):
  model, path = resnet50_file
  config = _config('ResNet-50', num_classes=10, image_size=64)
  _, state = _init_from(config, path, _zeros_state)
  _, expected = checkpoints.from_timm(str(path), 'resnet50')
  params, stats = _flat(state.params), _flat(state.model_state['batch_stats'])
  want = _flat(expected['params'])
  assert params['fc/kernel'].shape == (2048, 10) and not params['fc/kernel'].any()
  assert not params['fc/bias'].any()
  assert set(params) == set(want)
  for k, v in _no_head(want, 'fc/').items():
    np.testing.assert_array_equal(params[k], v, err_msg=k)
  want_stats = _flat(expected['batch_stats'])
  assert set(stats) == set(want_stats) and len(stats) == 2 * 53
  for k, v in want_stats.items():
    np.testing.assert_array_equal(stats[k], v, err_msg=k)
  # The fine-tuned model starts from timm's features.
  x = _images(64)
  ours = _pooled(config.model, {'params': _no_head(state.params, 'fc'),
                                'batch_stats': state.model_state['batch_stats']}, x)
  theirs = _timm_pooled(model, x)
  diff = float(np.max(np.abs(ours - theirs)))
  print(f'[tolerance] resnet50 init_from pooled features: max|diff|={diff:.2e}, '
        f'mean={np.mean(np.abs(theirs)):.2f}')
  assert diff < TOL and np.mean(np.abs(theirs)) > 0.05


def test_orbax_workdir_of_a_batchnorm_run(tmp_path):
  config = _config('ResNet-50', layers=(1, 1, 1, 1))  # 10 classes at 32 px
  t = _trainer(config)
  rng = np.random.RandomState(0)
  batch = {'image': _images(32, batch=8),
           'label': np.eye(10, dtype=np.float32)[rng.randint(0, 10, 8)]}
  state, _ = t.train_step(t.init_state(), batch)  # BN statistics of a real step
  saved = train_state.TrainCheckpointer(tmp_path / 'checkpoints', async_save=False)
  names = [str(i) for i in range(10)]
  saved.save(1, state, {'model': config.model.to_dict(), 'class_names': names,
                        'config': {'input': {'pp_eval': config.input.pp_eval}}})
  saved.close()
  params, stats = _flat(state.params), _flat(state.model_state['batch_stats'])
  assert not np.allclose(stats['bn1/mean'], 0)  # updated by the step

  ckpt = pretrained.load_checkpoint(str(tmp_path))
  assert ckpt.kind == 'orbax' and ckpt.class_names == names
  for k, v in stats.items():
    np.testing.assert_array_equal(_flat(ckpt.model_state['batch_stats'])[k], v, err_msg=k)

  # init_head='reset': a new zero fc (the model's own init is not zero), everything else
  # (the statistics too) from the run.
  fresh = t.init_state()
  assert _flat(fresh.params)['fc/kernel'].any()
  tuned = t.with_pretrained(fresh, str(tmp_path))
  got, got_stats = _flat(tuned.params), _flat(tuned.model_state['batch_stats'])
  assert not got['fc/kernel'].any() and not got['fc/bias'].any()
  for k, v in _no_head(params, 'fc/').items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  assert set(got_stats) == set(stats)
  for k, v in stats.items():
    np.testing.assert_array_equal(got_stats[k], v, err_msg=k)
  assert jax.tree.structure(tuned) == jax.tree.structure(state)
  assert int(tuned.step) == 0
  tuned, metrics = t.train_step(tuned, batch)  # the state trains (same layout)
  assert np.isfinite(float(metrics['loss']))

  # keep_head keeps the trained fc; a new class count needs a new one.
  reference = jax.device_get(state.variables())
  kept = pretrained.adapt_variables(ckpt, reference, config.model, keep_head=True)
  np.testing.assert_array_equal(_flat(kept['params'])['fc/kernel'], params['fc/kernel'])
  other = models.get_config('ResNet-50')
  other.update(layers=(1, 1, 1, 1), num_classes=4)
  reference = _zero_variables(other, 32)
  with pytest.raises(checkpoints.CheckpointMismatchError, match='fc/kernel'):
    pretrained.adapt_variables(ckpt, reference, other, keep_head=True)
  new_head = pretrained.adapt_variables(ckpt, reference, other)
  assert _flat(new_head['params'])['fc/kernel'].shape == (2048, 4)

  # Prediction from the workdir applies the statistics.
  clf = inference.ImageClassifier.from_pretrained(str(tmp_path))
  module = models.create(config.model)
  x = _images(32, seed=1)
  np.testing.assert_allclose(clf.logits(x), _logits(module, state.variables(), x),
                             atol=1e-5)


def test_timm_swin_at_a_new_window(tmp_path):
  """A small timm Swin trained at window 4 / 32 px, fine-tuned at window 8 / 64 px: the
  bias tables are resampled as timm's checkpoint_filter_fn resamples them."""
  torch.manual_seed(0)
  kw = dict(SWIN, pretrained=False, patch_size=4)
  small = _perturb(timm.create_model('swin_tiny_patch4_window7_224', window_size=4,
                                     img_size=32, num_classes=3, **kw))
  path = tmp_path / 'swin.pth'
  torch.save(small.state_dict(), path)

  config = _config('Swin-T', **SWIN, window_size=8, image_size=64, num_classes=5)
  _, state = _init_from(config, path)
  params = _flat(state.params)
  sd = checkpoints.read_state_dict(str(path))
  native = timm_swin.config_from_timm(sd, 'swin_tiny_patch4_window7_224')
  native.update(window_size=4, image_size=32)
  loaded = timm_swin.variables_from_timm(sd, native)['params']
  expected = _flat(swin.resample_window_params(loaded, config.model))
  table = 'layers_0/blocks_1/attn/relative_position_bias_table'
  assert _flat(loaded)[table].shape == (49, 1) and params[table].shape == (225, 1)
  assert params['head/kernel'].shape == (32, 5) and not params['head/kernel'].any()
  assert set(params) == set(expected)
  for k, v in _no_head(expected, 'head/').items():
    np.testing.assert_allclose(params[k], v, atol=0, rtol=1e-6, err_msg=k)

  big = timm.create_model('swin_tiny_patch4_window7_224', window_size=8, img_size=64,
                          num_classes=0, **kw).eval()
  filtered = timm.models.swin_transformer.checkpoint_filter_fn(small.state_dict(), big)
  big.load_state_dict({k: v for k, v in filtered.items() if not k.startswith('head.')},
                      strict=True)
  x = _images(64)
  ours = _pooled(config.model, {'params': _no_head(state.params, 'head')}, x)
  theirs = _timm_pooled(big, x)
  diff = float(np.max(np.abs(ours - theirs)))
  print(f'[tolerance] swin window 4 -> 8 pooled features: max|diff|={diff:.2e}')
  assert diff < TOL


def test_other_family_or_architecture_is_refused(resnet50_file, tmp_path):
  _, path = resnet50_file
  swin_config = models.get_config('Swin-T')
  swin_config.update(SWIN, image_size=32, window_size=4)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match="ResNet/ResNeXt weights \\(family 'resnet'\\) but the model config "
                           "'Swin-T' is family 'swin'"):
    pretrained.load_checkpoint(str(path), model=swin_config)
  ckpt = pretrained.load_checkpoint(str(path), model='ResNet-50')
  assert ckpt.kind == 'timm' and set(ckpt.model_state) == {'batch_stats'}
  reference = _zero_variables(swin_config, 32)
  with pytest.raises(checkpoints.CheckpointMismatchError, match="family 'resnet'"):
    pretrained.adapt_variables(ckpt, reference, swin_config)
  # The same family, another depth: the differing field is named.
  tiny = models.get_config('ResNet-50')
  tiny.update(layers=(1, 1, 1, 1), num_classes=10)
  reference = _zero_variables(tiny, 32)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r'layers: checkpoint \(3, 4, 6, 3\), model \(1, 1, 1, 1\)'):
    pretrained.adapt_variables(ckpt, reference, tiny)
  # Without the config (plain variables), the parameters that differ are named.
  with pytest.raises(checkpoints.CheckpointMismatchError, match='unexpected in the pretrained'):
    pretrained.adapt_variables(ckpt.variables(), reference, tiny)
  # A ResNet-50 file read without a model config: the family comes from the keys.
  assert models.family_of(pretrained.load_checkpoint(str(path)).config) == 'resnet'


def _tiny_bit_npz(path):
  """(config, params, rng) of a small BiT model saved in the release layout at path."""
  source = models.get_config('BiT-R50x1')
  source.update(num_layers=(1, 2, 1, 1), width_factor=0.5, num_classes=3)
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(a.dtype),
                        models.abstract_variables(models.create(source), 32)['params'])
  bit_npz.save_bit_npz(params, path)
  return source, params, rng


def test_bit_release_npz_with_a_bit_model_config(tmp_path):
  """A BiT `.npz` (the original release layout) read for a 'bit' config: depth, width and
  classes from the file, a new zero head/conv2d (GroupNorm: no model state)."""
  source, params, rng = _tiny_bit_npz(tmp_path / 'BiT-M-tiny.npz')
  target = models.get_config('BiT-R50x1')
  target.update(num_layers=(1, 2, 1, 1), width_factor=0.5, num_classes=10)
  ckpt = pretrained.load_checkpoint(str(tmp_path / 'BiT-M-tiny.npz'), model=target)
  assert ckpt.kind == 'npz' and ckpt.model_state == {}
  assert tuple(ckpt.config.num_layers) == (1, 2, 1, 1) and ckpt.config.num_classes == 3
  assert ckpt.config.width_factor == 0.5
  out = _flat(pretrained.adapt_variables(ckpt, _zero_variables(target, 32), target)['params'])
  assert out['head/conv2d/kernel'].shape == (1, 1, 1024, 10)
  assert not out['head/conv2d/kernel'].any()
  for k, v in _no_head(_flat(params), 'head/').items():
    np.testing.assert_array_equal(out[k], v, err_msg=k)
  target.width_factor = 1.0
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match='width_factor: checkpoint 0.5, model 1.0'):
    pretrained.adapt_variables(ckpt, _zero_variables(target, 32), target)
  # A --model spec with a field of this family (not a ViT's): taken, not an error.
  spec = pretrained.load_checkpoint(str(tmp_path / 'BiT-M-tiny.npz'),
                                    model='BiT-R50x1,gn_eps=1e-5')
  assert spec.config.gn_eps == 1e-5


def test_bit_release_npz_without_a_model_is_recognised(tmp_path):
  """A BiT `.npz` read with no model given (predict, convert and init_from without
  --model): recognised by its 'resnet/root_block' names, structure from the file, the
  same outputs as the model it was saved from. It used to fail as 'not a ViT tree'."""
  source, params, rng = _tiny_bit_npz(tmp_path / 'BiT-M-tiny.npz')
  ckpt = pretrained.load_checkpoint(str(tmp_path / 'BiT-M-tiny.npz'))
  assert models.family_of(ckpt.config) == 'bit'
  assert tuple(ckpt.config.num_layers) == (1, 2, 1, 1) and ckpt.config.num_classes == 3
  assert ckpt.config.width_factor == 0.5 and ckpt.config.name == 'BiT (from .npz)'
  images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  want = _logits(models.create(source), {'params': params}, images)
  got = _logits(models.create(ckpt.config), {'params': ckpt.params}, images)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # A registered depth and width is named as such (shapes are all it reads).
  r50 = models.get_config('BiT-R50x1')
  shapes = models.abstract_variables(models.create(r50), 32)['params']
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, np.float16), shapes)
  np.savez_compressed(tmp_path / 'r50x1.npz',
                      **{f'resnet/{k}': v for k, v in _flat(zeros).items()})
  assert pretrained.load_checkpoint(str(tmp_path / 'r50x1.npz')).config.name == 'BiT-R50x1'
  with pytest.raises(checkpoints.CheckpointMismatchError, match="family 'bit'"):
    pretrained.load_checkpoint(str(tmp_path / 'BiT-M-tiny.npz'), model='ViT-B/16')


def test_a_swin_whose_last_stage_is_smaller_than_its_window(tmp_path):
  """Swin at 32 px with patch 2 and window 4 over 4 stages: the last stage (2 x 2 tokens)
  has windows of 2, so the tables show windows (4, 4, 4, 2). timm's state dict of it, and
  vit_jax's own .safetensors export (which records 32 px and window 4), used to fail with
  a TypeError (a tuple in an int field); the export now reads back as itself."""
  torch.manual_seed(0)
  kw = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), mlp_ratio=2.0)
  model = _perturb(timm.create_model('swin_tiny_patch4_window7_224', pretrained=False,
                                     patch_size=2, window_size=4, img_size=32, num_classes=3,
                                     **kw))
  torch.save(model.state_dict(), tmp_path / 'swin.pth')
  ckpt = pretrained.load_checkpoint(str(tmp_path / 'swin.pth'))
  # No config recorded: the windows come from the tables, at a resolution they fit.
  assert ckpt.config.window_size == (4, 4, 4, 2), ckpt.config.window_size
  x = _images(32)
  with torch.no_grad():
    want = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()

  def logits(c, size=32):  # at 32 px, windows (4, 4, 4, 2) are window 4
    config = ml_collections.ConfigDict(c.config.to_dict())
    config.image_size = size
    return _logits(models.create(config), c.variables(), x)
  np.testing.assert_allclose(logits(ckpt), want, atol=1e-4)
  config = models.get_config('Swin-T')
  config.update(patch_size=2, window_size=4, image_size=32, num_classes=3, **kw)
  export = tmp_path / 'swin.safetensors'
  checkpoints.write_state_dict(
      timm_swin.to_timm(config, ckpt.variables()), str(export),
      metadata=pretrained.state_dict_metadata(config))
  back = pretrained.load_checkpoint(str(export))
  assert back.config.image_size == 32 and back.config.window_size == 4
  np.testing.assert_allclose(logits(back), want, atol=1e-4)


def test_a_bare_resnext_state_dict_is_named_by_its_structure(tmp_path):
  """It was read correctly but named 'resnet50' (its family's default timm name), which
  convert printed as the timm model to load it into (a size mismatch in timm)."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  model = timm.create_model('resnext50_32x4d', pretrained=False, num_classes=7)
  save_file(model.state_dict(), str(tmp_path / 'rx.safetensors'))
  ckpt = pretrained.load_checkpoint(str(tmp_path / 'rx.safetensors'))
  assert ckpt.config.name == 'resnext50_32x4d' and ckpt.config.num_classes == 7


def test_a_recorded_convolutional_config_keeps_its_size_and_numerics(tmp_path):
  """A vit_jax export of a BiT run at 64 px records its config; it used to come back at
  the registered timm model's 448 px, with timm's StdConv epsilon instead of the run's."""
  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  config = models.get_config('BiT-R50x1')
  config.update(image_size=64, num_classes=5, stdconv_eps=1e-10)
  variables = models.init_variables(models.create(config), 64)
  ckpt = pretrained.Checkpoint(config, variables['params'], 'orbax',
                               model_state={k: v for k, v in variables.items()
                                            if k != 'params'},
                               pp_eval='decode|resize(64)|value_range(-1, 1)|onehot(5)')
  for name in ('bit.safetensors', 'bit.pth'):
    notes = []
    convert._write_timm(ckpt, str(tmp_path / name), notes)  # pylint: disable=protected-access
    back = pretrained.load_checkpoint(str(tmp_path / name))
    if name.endswith('.safetensors'):  # recorded: size and epsilon kept, no note
      assert back.config.image_size == 64 and back.config.stdconv_eps == 1e-10
      assert not [n for n in notes if 'preprocessing' in n]
    else:  # a torch file records nothing: the note says what predict will use instead
      assert back.config.image_size == 448
      assert any("predict reads it back with 'decode|resize(448)|value_range(-1, 1)'" in n
                 for n in notes), notes
