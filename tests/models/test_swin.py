"""Swin Transformer: parameter counts, logits and export against timm, window geometry.

Weights are random with LayerNorm weights and biases perturbed, relative position bias
tables drawn with std 0.5 (so that the bias, the window index and the shift mask all
matter) and a head drawn so that logits are of order one. Small custom Swins (embed 32,
a shifted block where the case needs one) cover non-square inputs, per-stage windows and
stages smaller than the window; they keep XLA's compile time, most of this file's time,
down.
"""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax.checkpoints import timm_swin
from vit_jax.checkpoints import tree
from vit_jax.models import swin

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
import torch_reference as torch_ref  # pylint: disable=g-import-not-at-top,wrong-import-position

TINY = 'swin_tiny_patch4_window7_224'
SMALL = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))
TOL = 1e-4


def _config(base=TINY, **overrides):
  """A registered config with overrides (type-free, so image_size may become (h, w))."""
  return ml_collections.ConfigDict({**swin.named_configs()[base].to_dict(), **overrides})


def _images(hw, seed=0, batch=2):
  return torch_ref.random_images(swin.pair(hw), seed=seed, batch=batch)


def _randomise(model, x, seed=0):
  """Perturbs norms and biases (tests/torch_reference.py), tables N(0, .5), calibrated head."""
  g = torch.Generator().manual_seed(seed)
  assert torch_ref.perturb_torch(model, generator=g) > 0
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('relative_position_bias_table'):
        p.copy_(torch.randn(p.shape, generator=g) * 0.5)
  torch_ref.set_torch_head(model, model.head.fc, torch_ref.to_nchw(x), seed=seed)


def _timm_model(x, name=TINY, **kwargs):
  model = timm.create_model(name, pretrained=False, img_size=x.shape[1:3], **kwargs).eval()
  _randomise(model, x)
  return model


def _timm_logits(model, x):
  with torch.no_grad():
    return model(torch_ref.to_nchw(x)).numpy()


# For the small models: XLA's LLVM optimisation is most of their cost and changes nothing
# that matters here (logits agree to 1e-7 with the default level).
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _logits(config, variables, x, compiler_options=FAST_COMPILE):
  module = swin.from_config(config)
  fn = jax.jit(lambda v, x: module.apply(v, x, train=False), compiler_options=compiler_options)
  return np.asarray(fn(variables, x))


def _sd(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _diff(a, b, what):
  d = float(np.max(np.abs(np.asarray(a, np.float64) - b)))
  print(f'[tolerance] {what}: max|diff|={d:.2e} mean|logit|={np.mean(np.abs(b)):.2f}')
  return d


# ------------------------------------------------------------------------------------------


def _timm_equivalent(name, c):
  """(timm model name, kwargs) building the same architecture as registered config `c`."""
  if name.startswith('swin_'):
    return name, {}
  size = name.split('-')[1].split('/')[0]
  return swin.timm_name(size, 7, 224), dict(img_size=c.image_size, window_size=c.window_size)


def test_param_counts_equal_timm():
  counts, by_architecture = {}, {}
  for name, c in swin.named_configs().items():
    assert set(c.keys()) == set(swin.FIELD_DOCS) and c.family == 'swin'
    # Names sharing an architecture (e.g. 'Swin-B/384', 'swin_base_patch4_window12_384')
    # are traced once: the count depends on these fields only.
    arch = (c.embed_dim, c.depths, c.num_heads, c.window_size, c.image_size, c.mlp_ratio)
    if arch not in by_architecture:
      by_architecture[arch] = sum(int(np.prod(v.shape)) for v in
                                  jax.tree.leaves(timm_swin.abstract_variables(c)['params']))
    ours = by_architecture[arch]
    tname, kwargs = _timm_equivalent(name, c)
    with torch.device('meta'):
      model = timm.create_model(tname, **kwargs)
    theirs = sum(p.numel() for p in model.parameters())
    print(f'[params] {name}: {ours:,} (timm {theirs:,})')
    assert ours == theirs, name
    counts[name] = ours
  assert counts['Swin-T'] == counts[TINY] == 28_288_354


def test_swin_tiny_logits_and_export():
  x = _images(224)
  model = _timm_model(x)
  ref = _timm_logits(model, x)
  sd = _sd(model)
  config = timm_swin.config_from_timm(sd, TINY + '.ms_in1k')
  assert (config.embed_dim, config.depths, config.num_heads) == (96, (2, 2, 6, 2), (3, 6, 12, 24))
  variables = timm_swin.variables_from_timm(sd, config)
  ours = _logits(config, variables, x, compiler_options=None)  # as used outside tests
  assert _diff(ours, ref, 'swin_tiny 224') < TOL

  exported = timm_swin.to_timm(config, variables)
  assert sorted(exported) == sorted(sd)
  fresh = timm.create_model(TINY, pretrained=False, weight_init='skip').eval()
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  assert _diff(ours, _timm_logits(fresh, x), 'swin_tiny exported') < TOL


@pytest.mark.parametrize('image_size,window,depths', [
    # non-square; the last stage is 7x14: its odd block shifts along the width only
    ((224, 448), 7, (2, 1, 1, 2)),
    # per-stage windows; stage 2 equals its window, stage 3 (4x4) is smaller than its 8
    (128, (8, 4, 8, 8), (1, 2, 1, 2)),
])
def test_custom_swin_matches_timm(image_size, window, depths):
  x = _images(image_size)
  arch = dict(SMALL, depths=depths)
  model = _timm_model(x, window_size=window, **arch)
  config = _config(image_size=image_size, window_size=window, **arch)
  plan = swin.stage_plan(image_size, 4, depths, window)
  for (res, win, shift), layer in zip(plan, model.layers):
    block = layer.blocks[-1]
    assert tuple(block.window_size) == win, (res, win)
    assert tuple(block.shift_size) == (shift if len(layer.blocks) > 1 else (0, 0)), res
  variables = timm_swin.variables_from_timm(_sd(model), config)
  assert _diff(_logits(config, variables, x), _timm_logits(model, x),
               f'small swin {image_size} window {window}') < TOL


def test_input_that_does_not_fit_is_refused():
  with pytest.raises(ValueError, match=r'image_size=230.*not a multiple of the patch'):
    swin.from_config(_config(image_size=230))
  with pytest.raises(ValueError, match=r'stage 0 has size 60, not a multiple of its window 7'
                     r'.*sizes that work near 240: 224, 448'):
    swin.from_config(_config(image_size=240))
  module = swin.from_config(_config(**SMALL))
  with pytest.raises(ValueError, match=r'width 200: .*stage 2 merges 2x2 patches of an odd'):
    jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 224, 200, 3)),
                                       train=False))


@pytest.mark.parametrize('field,value,match', [
    ('num_heads', (3, 5, 12, 24), r'num_heads\[1\]=5 does not divide the width 192'),
    ('num_heads', (3, 6, 12), 'one entry per stage'),
    ('window_size', (7, 7), 'one int per stage'),
    ('window_size', 0, 'positive'),
    ('dtype', 'float64', r"dtype='float64' is not one of \['bfloat16', 'float32'\]"),
    ('drop_path_rate', 1.0, r'drop_path_rate=1.0 must be in \[0, 1\)'),
    ('depths', (), 'non-empty sequence of positive ints'),
    ('family', 'vit', "family='vit'"),
])
def test_bad_config_value_raises(field, value, match):
  with pytest.raises(ValueError, match=match):
    swin.from_config(_config(**{field: value}))


def test_unknown_field_and_timm_name():
  with pytest.raises(ValueError, match=r"unknown \['hidden_size'\]"):
    swin.from_config(_config(hidden_size=3))
  assert re.match(timm_swin.NAMES, 'swin_base_patch4_window12_384.ms_in22k_ft_in1k')
  assert not re.match(timm_swin.NAMES, 'swin_s3_tiny_224')
  with pytest.raises(ValueError, match='not a timm Swin name'):
    timm_swin.config_from_timm({}, 'swin_tiny_patch4_window12_384')


def test_bias_table_resampling_matches_timm():
  resize_rel_pos_bias_table = timm.layers.resize_rel_pos_bias_table
  rng = np.random.RandomState(0)
  for old, new in ((7, 12), (12, 7), (7, (4, 7)), ((4, 7), (7, 7))):
    oh, ow = swin.pair(old)
    nh, nw = swin.pair(new)
    table = rng.normal(0, 1, ((2 * oh - 1) * (2 * ow - 1), 3)).astype(np.float32)
    theirs = resize_rel_pos_bias_table(torch.from_numpy(table), (nh, nw),
                                       ((2 * nh - 1) * (2 * nw - 1), 3), (oh, ow)).numpy()
    ours = swin.resample_relative_position_bias(table, new, old)
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() < 1e-5, (old, new)


def test_window_resampled_params_match_timm():
  """224 px / window 7 -> 384 px / window 12: timm's checkpoint_filter_fn vs ours."""
  checkpoint_filter_fn = timm.models.swin_transformer.checkpoint_filter_fn
  x = _images(384, batch=1)
  src = _timm_model(_images(224), **SMALL)
  dst = timm.create_model(TINY, pretrained=False, img_size=384, window_size=12, **SMALL).eval()
  filtered = checkpoint_filter_fn(src.state_dict(), dst)
  dst.load_state_dict(filtered, strict=True)

  config224 = _config(**SMALL)
  config384 = _config(image_size=384, window_size=12, **SMALL)
  params = timm_swin.variables_from_timm(_sd(src), config224)['params']
  resampled = swin.resample_window_params(params, config384)
  theirs = timm_swin.variables_from_timm(
      {k: v.numpy() for k, v in filtered.items()}, config384)['params']
  flat_ours, flat_theirs = tree.flatten(resampled), tree.flatten(theirs)
  assert sorted(flat_ours) == sorted(flat_theirs)
  worst = max(np.abs(flat_ours[k] - flat_theirs[k]).max() for k in flat_ours)
  assert worst < 1e-5
  assert _diff(_logits(config384, {'params': resampled}, x), _timm_logits(dst, x),
               'small swin 224/w7 -> 384/w12') < TOL


def test_mismatched_window_names_the_resampler():
  model = timm.create_model(TINY, pretrained=False, **SMALL)
  with pytest.raises(tree.CheckpointMismatchError, match='resample_window_params'):
    timm_swin.variables_from_timm(_sd(model), _config(image_size=384, window_size=12, **SMALL))


def test_drop_path_only_in_train():
  config = _config(image_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                   window_size=4, drop_path_rate=0.5, num_classes=0)
  module = swin.from_config(config)
  x = jnp.asarray(_images(32, batch=8))
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False))
  rng = np.random.RandomState(0)
  variables = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)
  evaluated = np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False),
                                 compiler_options=FAST_COMPILE)(variables, x))
  train = jax.jit(lambda v, x, key: module.apply(v, x, train=True, rngs={'dropout': key}),
                  compiler_options=FAST_COMPILE)
  a, b, a_again = (np.asarray(train(variables, x, jax.random.key(k))) for k in (1, 2, 1))
  np.testing.assert_array_equal(a, a_again)
  # Branches are dropped per sample: some samples change between keys, others need not.
  differ = [not np.allclose(a[i], b[i]) for i in range(len(a))]
  assert any(differ)
  assert any(not np.allclose(a[i], evaluated[i]) for i in range(len(a)))


def test_training_forward_and_gradients_match_timm():
  """The training forward pass (on CPU: heads-major attention with a custom backward pass;
  evaluation keeps the einsums) gives timm's logits, and the gradient of every parameter
  equals the one PyTorch's autograd computes for timm's model (relative 1e-4)."""
  x = _images(64)
  arch = dict(SMALL, depths=(2, 2), num_heads=(2, 4))  # shifted blocks, shift masks
  model = _timm_model(x, window_size=4, drop_path_rate=0.0, **arch)
  config = _config(image_size=64, window_size=4, drop_path_rate=0.0, **arch)
  variables = timm_swin.variables_from_timm(_sd(model), config)
  module = swin.from_config(config)
  c = np.random.RandomState(1).normal(size=(2, 1000)).astype(np.float32)

  def loss(v):
    logits = module.apply(v, x, train=True, rngs={'dropout': jax.random.key(0)})
    return jnp.sum(logits * c), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True),
                               compiler_options=FAST_COMPILE)(variables)
  model.zero_grad()
  want = model(torch_ref.to_nchw(x))
  (want * torch.from_numpy(c)).sum().backward()
  assert _diff(logits, want.detach().numpy(), 'train-mode logits') < TOL
  ours = timm_swin.to_timm(config, grads)
  checked = 0
  for name, p in model.named_parameters():
    g = p.grad.numpy()
    scale = max(float(np.max(np.abs(g))), 1e-6)
    assert float(np.max(np.abs(ours[name] - g))) / scale < 1e-4, name
    checked += 1
  assert checked == len(ours)


@pytest.mark.parametrize('policy', ['dots_no_batch', 'full'])
def test_remat_policies_give_the_same_gradients(policy):
  config = _config(image_size=32, embed_dim=16, depths=(2, 1), num_heads=(1, 2),
                   window_size=4, drop_path_rate=0.0, num_classes=3)
  x = jnp.asarray(_images(32))
  plain = swin.from_config(config)
  variables = plain.init(jax.random.key(0), x, train=False)

  def grads(module):
    loss = lambda v: jnp.sum(module.apply(v, x, train=True) ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(variables)

  config.remat_policy = policy
  remat = swin.from_config(config)
  jaxpr = str(jax.make_jaxpr(lambda v: remat.apply(v, x, train=True))(variables))
  assert 'checkpoint' in jaxpr or 'remat' in jaxpr  # the blocks are rematerialised
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6),
               grads(remat), grads(plain))


def test_custom_vjp_takes_a_bool_only():
  """custom_vjp='False' was taken as True (a non-empty string), and jax.jvp then failed
  on the custom_vjp functions."""
  for bad in ('False', 0, None):
    with pytest.raises(ValueError, match=r"custom_vjp=.* the field takes a bool"):
      swin.from_config(_config(custom_vjp=bad))
  assert swin.from_config(_config(custom_vjp=np.bool_(False))).custom_vjp is False
