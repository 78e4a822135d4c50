"""BiT ResNetV2 (vit_jax.models.bit) against timm's resnetv2_*_bit, and the BiT .npz layout.

Parameter counts of every registered name are compared without allocating anything (jax
eval_shape, timm on the meta device). Numerics use timm's resnetv2_50x1_bit with random
weights: GroupNorm weights +N(0, 0.2), every bias +N(0, 0.05), and a head drawn so that
logits have std ~1; 2 images of 64 px in [-1, 1].

Float32 rounding: the 16 random pre-activation units of R50x1 amplify it, so logits carry
~5e-5 of noise on either side. Measured on 5 seeds (64 px, batch 2): vit_jax fp32 vs timm
fp32 5.3e-5 to 6.7e-5, vs timm float64 6.4e-5 to 7.0e-5, timm fp32 vs timm float64 3.5e-5 to
5.2e-5 (1.1e-4 when timm gets a channels-last input view: other kernels). Both fp32
comparisons are asserted below 1e-4; in float64 on both sides vit_jax equals timm to 1e-6
(asserted on a small model here; R50x1 measured 1.5e-7, the float32 cast of the logits).
"""

import copy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax.checkpoints import bit_npz
from vit_jax.checkpoints import timm_bit
from vit_jax.checkpoints import tree
from vit_jax.models import bit

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
import torch_reference as torch_ref  # pylint: disable=g-import-not-at-top,wrong-import-position

RES, BATCH = 64, torch_ref.BATCH
PAPER_TO_TIMM = {p: t for p, (t, _, _) in bit.MODELS.items()}


def _randomise(model, images, seed=0):
  """Perturbs GroupNorm weights and biases and draws a head giving logits of std ~1."""
  g = torch.Generator().manual_seed(seed)
  assert torch_ref.perturb_torch(model, generator=g) > 0
  with torch.no_grad():
    fc = getattr(model.head, 'fc', None)
    if isinstance(fc, torch.nn.Conv2d):
      feats = model.forward_head(model.forward_features(torch_ref.to_nchw(images)), pre_logits=True)
      std = torch_ref.calibrated_head_std(feats.double().numpy())
      fc.weight.copy_(torch.randn(fc.weight.shape, generator=g) * std)
      fc.bias.copy_(torch.randn(fc.bias.shape, generator=g) * torch_ref.BIAS_STD)
  return model


def _torch_out(model, images):
  with torch.no_grad():
    return model(torch_ref.to_nchw(images)).numpy()


def _jax_out(config, variables, images, train=False, rngs=None):
  module = bit.from_config(config)
  return np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=train, rngs=rngs))(
      variables, images))


def _state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _max_diff(a, b, what):
  d = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
  print(f'[tolerance] {what}: max|diff|={d:.2e} mean|ref|={np.mean(np.abs(b)):.2f}')
  return d


# ------------------------------------------------------------------ configs and counts


def _count_ours(config):
  module = bit.from_config(config)
  x = jax.ShapeDtypeStruct((1, 64, 64, config.in_channels), jnp.float32)
  shapes = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False), x)
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


def test_named_configs_have_exactly_the_documented_fields():
  configs = bit.named_configs()
  assert set(PAPER_TO_TIMM) | set(PAPER_TO_TIMM.values()) == set(configs)
  for name, c in configs.items():
    assert set(c.keys()) == set(bit.FIELD_DOCS), name
    assert c.name == name and c.family == 'bit' and c.num_classes == 1000
    assert c.dtype == c.param_dtype == 'float32'
    paper = name.startswith('BiT-')
    assert c.stdconv_eps == (1e-10 if paper else 1e-8) and c.gn_eps == 1e-5
    assert c.image_size == (224 if paper else 448)


def test_param_counts_equal_timm_for_every_name():
  timm_counts = {}
  for timm_name in sorted(set(PAPER_TO_TIMM.values())):
    with torch.device('meta'):
      model = timm.create_model(timm_name)
    timm_counts[timm_name] = sum(p.numel() for p in model.parameters())
  assert timm_counts['resnetv2_50x1_bit'] == 25_549_352
  ours_by_shape = {}  # paper and timm names differ in epsilons only: trace each shape once
  for name, config in bit.named_configs().items():
    timm_name = PAPER_TO_TIMM.get(name, name)
    key = (config.num_layers, config.width_factor, config.in_channels, config.num_classes)
    if key not in ours_by_shape:
      ours_by_shape[key] = _count_ours(config)
    ours = ours_by_shape[key]
    print(f'[params] {name}: {ours:,} (timm {timm_name}: {timm_counts[timm_name]:,})')
    assert ours == timm_counts[timm_name], name


def test_timm_name_regex_and_config_from_shapes_only():
  for ok in ('resnetv2_50x1_bit', 'resnetv2_152x4_bit.goog_in21k',
             'resnetv2_50x1_bit.goog_distilled_in1k'):
    assert timm_bit.re.match(timm_bit.NAMES, ok), ok
  for bad in ('resnetv2_50', 'resnet50', 'resnetv2_50x1_bitm', 'vit_base_r50_s16_224'):
    assert not timm_bit.re.match(timm_bit.NAMES, bad), bad
  with torch.device('meta'):
    model = timm.create_model('resnetv2_152x4_bit', num_classes=21843)
  # Zero-stride views: the shapes of a 936M-parameter state dict without its memory.
  sd = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()}
  c = timm_bit.config_from_timm(sd, 'resnetv2_152x4_bit.goog_in21k')
  assert (c.num_classes, c.width_factor, c.num_layers) == (21843, 4, (3, 8, 36, 3))
  assert c.stdconv_eps == 1e-8 and c.in_channels == 3
  with pytest.raises(ValueError, match='resnetv2_'):
    timm_bit.config_from_timm(sd, 'resnet50')


# ------------------------------------------------------------------ R50x1 numerics


@pytest.fixture(scope='module')
def r50():
  """timm resnetv2_50x1_bit with random weights, its logits (fp32 and float64) and the
  imported config, variables and fp32 logits."""
  torch.manual_seed(0)
  images = torch_ref.random_images(RES)
  model = _randomise(timm.create_model('resnetv2_50x1_bit').eval(), images)
  ref32 = _torch_out(model, images)
  with torch.no_grad():
    ref64 = copy.deepcopy(model).double()(torch_ref.to_nchw(images).double()).numpy()
  sd = _state_dict(model)
  config = timm_bit.config_from_timm(sd, 'resnetv2_50x1_bit.goog_in21k_ft_in1k')
  variables = timm_bit.variables_from_timm(sd, config)
  out = _jax_out(config, variables, images)
  return dict(model=model, images=images, ref32=ref32, ref64=ref64, config=config,
              variables=variables, out=out)


def test_r50x1_logits_equal_timm(r50):
  assert r50['config'].num_layers == (3, 4, 6, 3) and r50['config'].width_factor == 1
  assert 0.5 < np.mean(np.abs(r50['ref64'])) < 2  # logits of order one
  assert _max_diff(r50['out'], r50['ref64'], 'resnetv2_50x1_bit fp32 vs timm float64') < 1e-4
  _max_diff(r50['ref32'], r50['ref64'], 'timm fp32 vs timm float64 (reference noise)')
  assert _max_diff(r50['out'], r50['ref32'], 'resnetv2_50x1_bit fp32 vs timm fp32') < 1e-4


def _blank_copy(model):
  """A copy of `model` with every parameter NaN: loads must overwrite them all."""
  model = copy.deepcopy(model)
  with torch.no_grad():
    for p in model.parameters():
      p.fill_(float('nan'))
  return model


def test_r50x1_export_round_trip(r50):
  sd = timm_bit.to_timm(r50['config'], r50['variables'])
  assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in sd.values())
  model = _blank_copy(r50['model'])
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  np.testing.assert_array_equal(_torch_out(model, r50['images']), r50['ref32'])


def test_r50x1_npz_loads_into_timm_load_pretrained(r50, tmp_path):
  path = tmp_path / 'BiT-M-R50x1.npz'
  bit_npz.save_bit_npz(r50['variables'], path)
  with np.load(path) as f:
    names = set(f.files)
  for name in ('resnet/root_block/standardized_conv2d/kernel', 'resnet/group_norm/gamma',
               'resnet/block1/unit01/a/proj/standardized_conv2d/kernel',
               'resnet/block4/unit03/c/group_norm/beta', 'resnet/head/conv2d/bias'):
    assert name in names, name
  model = _blank_copy(r50['model'])
  model.load_pretrained(str(path))  # timm's loader of the original BiT files
  np.testing.assert_array_equal(_torch_out(model, r50['images']), r50['ref32'])
  loaded = tree.flatten(bit_npz.load_bit_npz(path))
  expected = tree.flatten(r50['variables']['params'])
  assert set(loaded) == set(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(loaded[k], v)


def test_npz_release_quirks_load(tmp_path):
  """(1, 1, 1, C) GroupNorm parameters and numbered conv names, as in some BiT files."""
  path = tmp_path / 'quirky.npz'
  np.savez(path, **{
      'resnet/root_block/standardized_conv2d/kernel': np.ones((7, 7, 3, 64), np.float32),
      'resnet/block1/unit01/a/standardized_conv2d_2/kernel': np.ones((1, 1, 64, 64)),
      'resnet/group_norm/gamma': np.ones((1, 1, 1, 2048), np.float32)})
  flat = tree.flatten(bit_npz.load_bit_npz(path))
  assert flat['group_norm/gamma'].shape == (2048,)
  assert 'block1/unit01/a/standardized_conv2d/kernel' in flat
  np.savez(tmp_path / 'vit.npz', embedding=np.ones(3))
  with pytest.raises(ValueError, match='not a BiT'):
    bit_npz.load_bit_npz(tmp_path / 'vit.npz')


# ------------------------------------------------------------------ small custom models


def _small_timm(num_classes, in_channels=3, drop_path_rate=0.0):
  c = ml_collections.ConfigDict(bit.named_configs()['resnetv2_50x1_bit'].to_dict())
  c.update(num_layers=(2, 1, 1), width_factor=0.5, num_classes=num_classes,
           in_channels=in_channels, drop_path_rate=drop_path_rate)
  return c, timm_bit.create_timm_model(c)


@pytest.mark.parametrize('num_classes', [0, 7])
def test_small_custom_model_and_features_equal_timm(num_classes):
  """Depth, width, input channels and classes are read off the state dict."""
  _, model = _small_timm(num_classes, in_channels=2)
  images = torch_ref.random_images(32, channels=2, seed=1)
  _randomise(model, images, seed=1)
  sd = _state_dict(model)
  config = timm_bit.config_from_timm(sd, 'resnetv2_50x1_bit')
  assert (config.num_layers, config.width_factor, config.in_channels, config.num_classes) == (
      (2, 1, 1), 0.5, 2, num_classes)
  variables = timm_bit.variables_from_timm(sd, config)
  out = _jax_out(config, variables, images)
  ref = _torch_out(model, images)
  assert out.shape == (BATCH, num_classes or 512)
  assert _max_diff(out, ref, f'small BiT num_classes={num_classes}') < 1e-4
  exported = timm_bit.to_timm(config, variables)
  assert set(exported) == set(sd)
  if not num_classes:
    return
  # Float64 on both sides: the implementation is exact (1e-7 is the float32 logits cast).
  module = bit.from_config(config).clone(dtype=jnp.float64, param_dtype=jnp.float64)
  with torch.no_grad():
    ref64 = model.double()(torch_ref.to_nchw(images).double()).numpy()
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
    out64 = np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(
        v64, images.astype(np.float64)))
  assert _max_diff(out64, ref64, 'small BiT float64') < 1e-6


def test_drop_path_rates_match_timm_and_train_mode():
  layers = timm.layers
  ours = bit.drop_path_rates([3, 4, 6, 3], 0.1)
  theirs = layers.calculate_drop_path_rates(0.1, [3, 4, 6, 3], stagewise=True)
  assert [len(s) for s in ours] == [len(s) for s in theirs]
  assert sum(ours, []) == pytest.approx(sum(theirs, []))
  config, _ = _small_timm(5, drop_path_rate=0.9)
  config.num_layers = (3,)
  module = bit.from_config(config)
  images = torch_ref.random_images(32, batch=8)
  shapes = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False), images)
  rng = np.random.RandomState(0)  # random weights without compiling the initialisers
  variables = jax.tree.map(lambda s: rng.normal(0, 1, s.shape).astype(np.float32), shapes)
  train = jax.jit(lambda v, x, r: module.apply(v, x, train=True, rngs={'dropout': r}))
  a = np.asarray(train(variables, images, jax.random.PRNGKey(1)))
  b = np.asarray(train(variables, images, jax.random.PRNGKey(2)))
  evaluation = np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(
      variables, images))
  # Stochastic depth (rates 0, 0.45, 0.9 here) acts in training only, differently per draw.
  assert not np.allclose(a, b)
  assert not np.allclose(a, evaluation)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize('field,value', [
    ('width_factor', 0.3), ('num_layers', ()), ('num_layers', (3, 0)), ('family', 'resnet'),
    ('dtype', 'int8'), ('param_dtype', 'float64'), ('stdconv_eps', 0.0), ('gn_eps', -1.0),
    ('drop_path_rate', 1.0), ('num_classes', -1), ('in_channels', 0)])
def test_bad_config_raises_naming_the_field(field, value):
  c = bit.named_configs()['BiT-R50x1']
  c[field] = value
  with pytest.raises(ValueError, match=field):
    bit.from_config(c)


def test_missing_or_unknown_field_raises():
  c = bit.named_configs()['BiT-R50x1']
  del c['gn_eps']
  with pytest.raises(ValueError, match='gn_eps'):
    bit.from_config(c)
  c = bit.named_configs()['BiT-R50x1']
  c.widht_factor = 2
  with pytest.raises(ValueError, match='widht_factor'):
    bit.from_config(c)


def test_mismatched_state_dict_names_the_keys():
  config, model = _small_timm(3)
  sd = _state_dict(model)
  wrong = ml_collections.ConfigDict(config.to_dict())
  wrong.num_layers = (1, 1, 1)
  with pytest.raises(tree.CheckpointMismatchError, match=r'stages\.0\.blocks\.1\.'):
    timm_bit.variables_from_timm(sd, wrong)
  del sd['norm.weight']
  with pytest.raises(tree.CheckpointMismatchError, match=r'norm\.weight \(-> group_norm/gamma'):
    timm_bit.variables_from_timm(sd, config)
  sd = _state_dict(model)
  sd['stem.conv.weight'] = sd['stem.conv.weight'][:, :2]
  with pytest.raises(tree.CheckpointMismatchError, match='root_block'):
    timm_bit.variables_from_timm(sd, config)


def test_nchw_input_gets_a_hint():
  module = bit.from_config(bit.named_configs()['BiT-R50x1'])
  with pytest.raises(ValueError, match='NCHW'):
    jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False),
                   jax.ShapeDtypeStruct((1, 3, 64, 64), jnp.float32))


def test_numpy_ints_count_and_bools_do_not():
  """np.int64(3) classes (labels.max() + 1) was 'invalid', True was one class: as the other
  families now."""
  c = ml_collections.ConfigDict(dict(bit.named_configs()['BiT-R50x1'].to_dict(),
                                     num_layers=(1, 1, 1, 1), num_classes=np.int64(3),
                                     in_channels=np.int64(1)))
  module = bit.from_config(c)
  assert module.num_classes == 3 and type(module.num_classes) is int
  assert module.in_channels == 1
  for field in ('num_classes', 'in_channels'):
    bad = ml_collections.ConfigDict(dict(c.to_dict(), **{field: True}))
    with pytest.raises(ValueError, match=field):
      bit.from_config(bad)
