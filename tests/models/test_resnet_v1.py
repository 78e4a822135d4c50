"""ResNet v1.5 / ResNeXt / Res2Net (BatchNorm) against timm: sizes, logits, export, training.

Each logit case builds a timm model with random weights, BatchNorm weights and biases
perturbed away from 1 / 0, running statistics randomised (mean N(0, 0.1), var U(0.5, 2))
and a head drawn so that mean |logit| ~ 1; it is imported with `timm_resnet` and run on
the same random images (64 px, batch 2, fp32, eval mode). Parameter counts of every
registered name are compared without allocating anything (jax.eval_shape, torch 'meta').
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

from vit_jax.checkpoints import timm_resnet  # noqa: E402
from vit_jax.checkpoints import tree  # noqa: E402
from vit_jax.models import res2net  # noqa: E402
from vit_jax.models import resnet_v1  # noqa: E402

TOL = 1e-4           # max |logit difference|, fp32, eval mode
STATS_TOL = 1e-4     # max |running statistic difference| after one training step
LOGIT_RANGE = (0.2, 5.0)
IMAGE_SIZE = 64
BATCH = 2

FAMILIES = {'resnet': resnet_v1, 'res2net': res2net}
TIMM_PARAMS = {  # published sizes (1000 classes) the counts must reproduce
    'resnet50': 25_557_032, 'resnext50_32x4d': 25_028_904, 'res2net50_26w_4s': 25_699_120,
}


def _all_configs():
  out = {}
  for mod in FAMILIES.values():
    out.update(mod.named_configs())
  return out


def _module(config):
  return FAMILIES[config.family].from_config(config)


def _our_count(config) -> int:
  module = _module(config)
  x = jax.ShapeDtypeStruct((1, 32, 32, config.in_channels), jnp.float32)
  shapes = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False), x)
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes['params']))


def _timm_name(config) -> str:
  """The timm name with the same architecture as a registered (paper or timm) name."""
  if not config.name[0].isupper():
    return config.name
  configs = _all_configs()
  for name, c in configs.items():
    if not name[0].isupper() and {**c.to_dict(), 'name': config.name} == config.to_dict():
      return name
  raise AssertionError(f'no timm twin of {config.name}')


def _meta_state_dict(name, **kwargs):
  """Zero-cost numpy stand-ins (right shapes) for a timm model's state dict."""
  with torch.device('meta'):
    model = timm.create_model(name, **kwargs)
  return model, {k: np.broadcast_to(np.float32(0), tuple(v.shape))
                 for k, v in model.state_dict().items()}


@pytest.mark.parametrize('name', sorted(_all_configs()))
def test_param_count_matches_timm(name):
  config = _all_configs()[name]
  with torch.device('meta'):
    model = timm.create_model(_timm_name(config))
  theirs = sum(p.numel() for p in model.parameters())
  ours = _our_count(config)
  assert ours == theirs, (name, ours, theirs)
  if config.name in TIMM_PARAMS:
    assert ours == TIMM_PARAMS[config.name]


@pytest.mark.parametrize('name', ['res2next50', 'wide_resnet50_2', 'resnext101_64x4d',
                                  'res2net50_48w_2s', 'resnet26'])
def test_config_from_timm_reads_unregistered_models(name):
  """Depth, groups, widths and scale come from the state dict shapes alone."""
  model, sd = _meta_state_dict(name, num_classes=7, in_chans=1)
  config = timm_resnet.config_from_timm(sd, name + '.some_tag')
  assert config.num_classes == 7 and config.in_channels == 1 and config.name == name
  assert _our_count(config) == sum(p.numel() for p in model.parameters())


def test_config_from_timm_registered_name_and_headless():
  _, sd = _meta_state_dict('res2net50_26w_4s', num_classes=0)
  config = timm_resnet.config_from_timm(sd, 'res2net50_26w_4s.in1k')
  expected = res2net.named_configs()['res2net50_26w_4s']
  expected.num_classes = 0
  assert config.to_dict() == expected.to_dict()
  assert set(config.keys()) == set(res2net.FIELD_DOCS)
  for c in resnet_v1.named_configs().values():
    assert set(c.keys()) == set(resnet_v1.FIELD_DOCS)


# Logits -------------------------------------------------------------------------------------


def _images(seed=0):
  return np.random.RandomState(seed).uniform(
      -1, 1, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _randomise_bn(model, seed):
  """Perturbs BN weights (N(0, 0.2)) and biases (N(0, 0.05)); random running stats."""
  g = torch.Generator().manual_seed(seed)
  count = 0
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.add_(torch.randn(m.weight.shape, generator=g) * 0.2)
        m.bias.add_(torch.randn(m.bias.shape, generator=g) * 0.05)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
        count += 1
  assert count > 0


def _calibrate_head(model, x_nchw, seed):
  """Draws fc so that mean |logit| is about 1 on these images."""
  captured = []
  hook = model.fc.register_forward_pre_hook(lambda mod, inputs: captured.append(inputs[0]))
  with torch.no_grad():
    model(x_nchw)
  hook.remove()
  feats = captured[0].numpy().astype(np.float64)
  std = 1.0 / (np.sqrt(np.mean(feats ** 2)) * np.sqrt(feats.shape[-1]))
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    model.fc.weight.copy_(torch.randn(model.fc.weight.shape, generator=g) * std)
    model.fc.bias.copy_(torch.randn(model.fc.bias.shape, generator=g) * 0.05)


def _numpy_sd(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _torch_logits(model, x):
  with torch.no_grad():
    return model(_nchw(x)).numpy()


@pytest.fixture(scope='module', params=['resnet50', 'resnext50_32x4d', 'res2net50_26w_4s'])
def converted(request):
  name = request.param
  torch.manual_seed(0)
  model = timm.create_model(name, pretrained=False).eval()
  _randomise_bn(model, seed=1)
  x = _images(seed=2)
  _calibrate_head(model, _nchw(x), seed=3)
  ref = _torch_logits(model, x)
  sd = _numpy_sd(model)
  config = timm_resnet.config_from_timm(sd, name + '.a1_in1k')
  variables = timm_resnet.variables_from_timm(sd, config)
  module = _module(config)
  out = np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x))
  return dict(name=name, model=model, x=x, ref=ref, config=config, variables=variables,
              out=out)


def test_logits_match_timm(converted):
  ref, out = converted['ref'], converted['out']
  assert out.shape == ref.shape == (BATCH, 1000) and out.dtype == np.float32
  scale = float(np.mean(np.abs(ref)))
  diff = float(np.max(np.abs(out - ref)))
  print(f'[tolerance] {converted["name"]}: max|diff|={diff:.2e} mean|logit|={scale:.2f}')
  assert LOGIT_RANGE[0] < scale < LOGIT_RANGE[1]
  assert diff < TOL


def test_variables_are_float32_numpy(converted):
  variables = converted['variables']
  assert set(variables) == {'params', 'batch_stats'}
  leaves = jax.tree.leaves(variables)
  assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in leaves)
  flat = tree.flatten(variables)
  assert 'params/layer1/block_0/downsample/conv/kernel' in flat
  assert 'batch_stats/layer4/block_2/bn3/var' in flat
  assert 'params/fc/kernel' in flat and 'params/conv1/kernel' in flat


def test_export_loads_strict_and_reproduces_logits(converted):
  sd = timm_resnet.to_timm(converted['config'], converted['variables'])
  assert all(isinstance(v, np.ndarray) for v in sd.values())
  with torch.device('meta'):  # no initialisation: every tensor comes from `sd`
    model = timm.create_model(converted['name'], pretrained=False).eval()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True,
                        assign=True)
  np.testing.assert_array_equal(_torch_logits(model, converted['x']), converted['ref'])


# Training mode ------------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['resnet50', 'res2net50_26w_4s'])
def test_train_mode_updates_batch_stats_like_torch(name):
  """One training forward: outputs (batch statistics) and running statistics as torch,
  whose running_var takes the unbiased batch variance. One block per stage keeps it fast."""
  torch.manual_seed(0)
  model = timm.create_model(name, pretrained=False, layers=(1, 1, 1, 1), num_classes=5)
  _randomise_bn(model, seed=1)
  sd = _numpy_sd(model)
  config = timm_resnet.config_from_timm(sd, name)
  assert tuple(config.layers) == (1, 1, 1, 1)
  variables = timm_resnet.variables_from_timm(sd, config)
  x = _images(seed=4)
  model.train()
  with torch.no_grad():
    ref = model(_nchw(x)).numpy()
  module = _module(config)
  out, state = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, x)
  np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=0)
  updated = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  flat = tree.flatten({'batch_stats': state['batch_stats']})
  assert len(flat) == 2 * sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
  worst = 0.0
  for key, value in flat.items():
    theirs = updated[timm_resnet._timm_key(key)]  # pylint: disable=protected-access
    worst = max(worst, float(np.max(np.abs(np.asarray(value) - theirs))))
  print(f'[tolerance] {name} running stats: max|diff|={worst:.2e}')
  assert worst < STATS_TOL


def _tiny(family='resnet', **overrides):
  mod = FAMILIES[family]
  config = dict(next(iter(mod.named_configs().values())))
  config.update({'layers': (1, 1, 1, 1), 'num_classes': 3, **overrides})
  return mod.from_config(config)


def _random_variables(module, x, seed=0):
  """Random variables of the right shapes without compiling `init` (slow on CPU: its
  random number generation takes XLA ~15 s to compile)."""
  shapes = tree.flatten(jax.eval_shape(
      lambda x: module.init(jax.random.PRNGKey(0), x, train=False), x))
  rng = np.random.RandomState(seed)
  out = {}
  for key, s in shapes.items():
    if key.endswith('/kernel'):
      v = rng.normal(0, 1 / np.sqrt(np.prod(s.shape[:-1])), s.shape)
    elif key.endswith('/var'):
      v = rng.uniform(0.5, 2, s.shape)
    else:
      v = rng.normal(1.0 if key.endswith('/scale') else 0.0, 0.1, s.shape)
    out[key] = jnp.asarray(v, s.dtype)
  return tree.unflatten(out)


def test_drop_path_dropout_features_and_bfloat16():
  x = jnp.asarray(_images()[:, :32, :32])
  module = _tiny('resnet', drop_path_rate=0.5, dropout_rate=0.2)
  variables = _random_variables(module, x)
  fn = jax.jit(lambda v, x, r: module.apply(v, x, train=True, mutable=['batch_stats'],
                                            rngs={'dropout': r})[0])
  a, b = fn(variables, x, jax.random.PRNGKey(1)), fn(variables, x, jax.random.PRNGKey(2))
  assert not np.allclose(a, b)
  headless = _tiny('resnet', num_classes=0, dtype='bfloat16')
  v = jax.eval_shape(lambda x: headless.init(jax.random.PRNGKey(0), x, train=False), x)
  assert 'fc' not in v['params']
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v))
  y = jax.eval_shape(lambda v, x: headless.apply(v, x, train=False), v, x)
  assert y.shape == (BATCH, 2048) and y.dtype == jnp.float32


@pytest.mark.parametrize('family', ['resnet', 'res2net'])
def test_frozen_batch_norm_trains_with_its_running_statistics_and_keeps_them(family):
  x = jnp.asarray(_images()[:, :32, :32])
  frozen = _tiny(family, bn_frozen=True)
  variables = _random_variables(frozen, x)
  train = lambda m: jax.jit(functools.partial(  # noqa: E731  (op by op: 3x slower)
      m.apply, train=True, mutable=['batch_stats']))(variables, x)
  out, state = train(frozen)
  # As in eval mode (timm's FrozenBatchNorm2d), and the statistics stay as loaded.
  np.testing.assert_allclose(out, jax.jit(functools.partial(frozen.apply, train=False))(
      variables, x), atol=1e-5, rtol=0)
  for key, value in tree.flatten(state['batch_stats']).items():
    np.testing.assert_array_equal(value, tree.flatten(variables['batch_stats'])[key])
  # Without it the same variables normalise with the batch and move the statistics.
  out_bn, state_bn = train(_tiny(family))
  assert not np.allclose(out_bn, out, atol=1e-3)
  assert not np.allclose(tree.flatten(state_bn['batch_stats'])['bn1/mean'],
                         tree.flatten(variables['batch_stats'])['bn1/mean'])


# Errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize('family,field,value,match', [
    ('resnet', 'block', 'basic', "block='basic'.*bottleneck"),
    ('resnet', 'block', 'bottle2neck', "block='bottle2neck'.*'bottleneck'"),
    ('res2net', 'block', 'bottleneck', "block='bottleneck'.*'bottle2neck'"),
    ('resnet', 'cardinality', 0, 'cardinality=0.*positive int'),
    ('resnet', 'base_width', 2.5, 'base_width=2.5.*positive int'),
    ('resnet', 'layers', (3, 4, 6), r'layers=\(3, 4, 6\).*4 positive ints'),
    ('res2net', 'scale', 0, 'scale=0.*positive int'),
    ('resnet', 'dtype', 'float64', "dtype='float64'.*bfloat16"),
    ('resnet', 'bn_momentum', 1.0, 'bn_momentum=1.0.*0, 1'),
    ('resnet', 'bn_frozen', 'yes', "bn_frozen='yes'.*True or False"),
    ('resnet', 'family', 'swin', "family='swin'"),
    ('resnet', 'patch_size', 16, r"unknown resnet config field\(s\) \['patch_size'\]"),
])
def test_bad_config_raises(family, field, value, match):
  mod = FAMILIES[family]
  config = dict(next(iter(mod.named_configs().values())))
  config[field] = value
  with pytest.raises(ValueError, match=match):
    mod.from_config(config)


def test_bad_input_and_bad_state_dicts():
  module = _tiny()
  with pytest.raises(ValueError, match='NCHW'):
    jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, train=False),
                   jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match='not handled'):
    timm_resnet.config_from_timm({}, 'resnet50d')
  _, sd = _meta_state_dict('resnet50')
  config = timm_resnet.config_from_timm(sd, 'resnet50')
  broken = dict(sd)
  del broken['layer2.0.bn2.running_var']
  broken['layer2.0.se.fc.weight'] = np.zeros((4, 4), np.float32)
  with pytest.raises(tree.CheckpointMismatchError,
                     match=r'(?s)missing.*layer2\.0\.bn2\.running_var.*unexpected.*se\.fc'):
    timm_resnet.variables_from_timm(broken, config)
  small = ml_collections.ConfigDict(config.to_dict())
  small.base_width = 32
  with pytest.raises(tree.CheckpointMismatchError, match=r'layer1/block_0/conv2/kernel'):
    timm_resnet.variables_from_timm(sd, small)


# Slow: on CPU the split path is what test_logits_match_timm[resnext50_32x4d] runs.
@pytest.mark.slow
def test_split_grouped_conv_equals_native_forward_and_gradient():
  """grouped_conv='split' (one conv per group, the CPU default) computes what XLA's
  feature_group_count does, in the forward pass and in the parameter gradient."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  x = np.random.RandomState(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  results = {}
  for impl in ('split', 'native'):
    module = models.create('ResNeXt-50 32x4d', layers=(1, 1, 1, 1), num_classes=5,
                           grouped_conv=impl, zero_init_last=False)
    shapes = jax.eval_shape(lambda v, m=module: m.init(jax.random.PRNGKey(0), v, train=False),
                            x)  # random values without compiling init's RNG
    rng = np.random.RandomState(1)
    variables = jax.tree.map(
        lambda a: (rng.normal(size=a.shape) * 0.1 + (1.0 if a.ndim == 1 else 0.0)).astype(
            np.float32), shapes)

    # Eval mode: batch statistics of the 1x1 last stage (2 values per channel) would make
    # the gradient ill-conditioned, hiding the comparison in float noise.
    def loss(params, m=module, v=variables):
      return jnp.sum(m.apply({**v, 'params': params}, x, train=False) ** 2)
    results[impl] = jax.jit(jax.value_and_grad(loss))(variables['params'])
  (ls, gs), (ln, gn) = results['split'], results['native']
  np.testing.assert_allclose(ls, ln, rtol=1e-5)
  worst = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))
              for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gn)))
  print(f'[tolerance] split vs native grouped conv: max relative gradient diff {worst:.2e}')
  assert worst < 1e-4
  with pytest.raises(ValueError, match='grouped_conv'):
    models.create('ResNeXt-50 32x4d', grouped_conv='fast')


def test_a_frozen_batch_norm_probe_loads_weights_of_the_same_resnet_and_names_its_timm_model():
  """bn_frozen changes no parameter: weights recorded without it load into a probe with
  it, and a probe workdir still exports to its timm model."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints import pretrained  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints import timm_format  # pylint: disable=g-import-not-at-top
  c = models.get_config('ResNet-50')
  c.update(layers=(1, 1, 1, 1), image_size=32, num_classes=10)
  shapes = models.abstract_variables(models.create(c), 32)
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  ckpt = pretrained.Checkpoint(c, zeros['params'], 'orbax',
                               model_state={'batch_stats': zeros['batch_stats']})
  probe = models.get_config('ResNet-50')
  probe.update(layers=(1, 1, 1, 1), image_size=32, num_classes=10, bn_frozen=True)
  adapted = pretrained.adapt_variables(ckpt, zeros, probe)
  assert set(adapted) == {'params', 'batch_stats'}
  full = models.get_config('ResNet-50')
  full.update(name='my-probe', bn_frozen=True)
  assert timm_format.timm_name(full) == 'resnet50'
