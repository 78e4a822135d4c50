"""Schedules and optimizer construction against their formulas."""

import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import models
from vit_jax.train import defaults
from vit_jax.train import optimizer as optimizer_lib


def _schedule(decay, warmup=10, total=110, base=0.5, end=0.0):
  cfg = ml_collections.ConfigDict(dict(base_lr=base, warmup_steps=warmup, decay=decay,
                                       end_lr_fraction=end))
  return optimizer_lib.learning_rate_schedule(cfg, total)


def test_linear_warmup_then_each_decay():
  for decay in ('linear', 'cosine', 'rsqrt', 'constant'):
    s = _schedule(decay)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.25)
    assert float(s(10)) == pytest.approx(0.5)
  # After warmup, t = fraction of the decay phase.
  t = 0.3
  step = 10 + int(t * 100)
  assert float(_schedule('linear')(step)) == pytest.approx(0.5 * (1 - t))
  assert float(_schedule('cosine')(step)) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * t)))
  assert float(_schedule('rsqrt')(step)) == pytest.approx(0.5 * math.sqrt(10 / (30 + 10)))
  assert float(_schedule('linear', end=0.1)(110)) == pytest.approx(0.05)
  assert float(_schedule('cosine')(110)) == pytest.approx(0.0, abs=1e-9)


def test_schedule_errors_name_the_field():
  with pytest.raises(ValueError, match='config.schedule.decay'):
    _schedule('exponential')
  with pytest.raises(ValueError, match=r'warmup_steps=200 is not below the 110 total steps.*'
                     r'--config.schedule.warmup_steps=11'):
    _schedule('cosine', warmup=200)


def test_base_lr_scales_with_the_batch_and_warmup_counts_in_epochs():
  cfg = ml_collections.ConfigDict(dict(base_lr=0.1, base_lr_batch=256, warmup_steps=0,
                                       warmup_epochs=2.0, decay='constant'))
  s = optimizer_lib.learning_rate_schedule(cfg, 1000, batch_size=1024, steps_per_epoch=50)
  assert float(s(100)) == pytest.approx(0.4)  # 0.1 x 1024 / 256, after 2 x 50 steps
  assert float(s(50)) == pytest.approx(0.2)  # half way through the warmup
  s = optimizer_lib.learning_rate_schedule(cfg, 1000, batch_size=128, steps_per_epoch=400)
  assert float(s(800)) == pytest.approx(0.05) and float(s(400)) == pytest.approx(0.025)
  with pytest.raises(ValueError, match=r'warmup_epochs=2.0 \(100 steps\) is not below the 90'
                     r'.*e.g. --config.schedule.warmup_epochs=0.18,'):
    optimizer_lib.learning_rate_schedule(cfg, 90, batch_size=1024, steps_per_epoch=50)
  # The fix names warmup_epochs (it used to suggest warmup_steps, which warmup_epochs
  # overrides), and it works.
  optimizer_lib.learning_rate_schedule(dict(cfg, warmup_epochs=0.18), 90, batch_size=1024,
                                       steps_per_epoch=50)
  with pytest.raises(ValueError, match='warmup_epochs=2.0 and warmup_steps=5 are both set'):
    optimizer_lib.check_schedule(dict(cfg, warmup_steps=5))
  with pytest.raises(ValueError, match='base_lr_batch=-1 must be 0'):
    optimizer_lib.check_schedule(dict(cfg, base_lr_batch=-1))


def test_a_family_recipe_rescales_after_a_batch_override():
  from vit_jax.train import recipes  # pylint: disable=g-import-not-at-top
  c = recipes.imagenet1k_supervised('ResNet-50')
  assert c.batch_size == 1024
  c.batch_size = 256  # as --config.batch_size=256 does
  r = optimizer_lib.resolved_schedule(c.schedule, batch_size=c.batch_size,
                                      steps_per_epoch=1_268_093 / 256)
  assert r['base_lr'] == pytest.approx(0.1)  # Goyal et al.: 0.1 x batch / 256
  assert r['warmup_steps'] == round(5 * 1_268_093 / 256)  # still 5 epochs
  with pytest.raises(defaults.ConfigError, match='warmup_epochs=5.0 and warmup_steps=9'):
    c.schedule.warmup_steps = 9
    defaults.validate(c, num_devices=1, process_count=1, check_input=False)


def test_weight_decay_only_on_kernels_and_bf16_moments():
  module = models.create('ViT-Ti/16', image_size=16, patch_size=8, hidden_size=32,
                         num_layers=1, num_heads=2, mlp_dim=64, num_classes=3)
  params = models.init_params(module, 16)
  mask = optimizer_lib.decay_mask(params)
  flat = {'/'.join(str(getattr(k, 'key', k)) for k in p): v
          for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat['Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel']
  assert flat['embedding/kernel'] and flat['head/kernel']
  assert not flat['Transformer/encoderblock_0/MlpBlock_0/Dense_0/bias']
  assert not flat['Transformer/encoder_norm/scale'] and not flat['cls']
  assert not flat['Transformer/posembed_input/pos_embedding']

  config = defaults.default_config()
  config.optimizer.update(weight_decay=0.1, mu_dtype='bfloat16')
  config.schedule.update(base_lr=1.0, warmup_steps=0, decay='constant')
  opt, _ = optimizer_lib.create_optimizer(config, 10)
  state = opt.init(params)
  mus = [x for x in jax.tree.leaves(state) if hasattr(x, 'dtype') and x.dtype == jnp.bfloat16]
  assert mus, 'Adam first moments are stored in bfloat16'
  # With zero gradients, only decayed parameters move, by lr * wd * p.
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(zeros, state, params)
  u = {'/'.join(str(getattr(k, 'key', k)) for k in p): np.asarray(v)
       for p, v in jax.tree_util.tree_leaves_with_path(updates)}
  p = {'/'.join(str(getattr(k, 'key', k)) for k in q): np.asarray(v)
       for q, v in jax.tree_util.tree_leaves_with_path(params)}
  k = 'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'
  np.testing.assert_allclose(u[k], -0.1 * p[k], rtol=1e-6)
  assert not u['Transformer/encoder_norm/scale'].any()


def test_sgd_and_unknown_optimizer():
  config = defaults.default_config()
  config.optimizer.update(name='sgd', momentum=0.9)
  opt, _ = optimizer_lib.create_optimizer(config, 10)
  assert opt.init({'w': jnp.ones(3)}) is not None
  config.optimizer.name = 'lamb'
  with pytest.raises(ValueError, match="config.optimizer.name='lamb'"):
    optimizer_lib.create_optimizer(config, 10)


def _tiny_params(scan_layers=False, num_layers=2):
  module = models.create('ViT-Ti/16', num_layers=num_layers, hidden_size=16, mlp_dim=32,
                         num_heads=2, num_classes=3, image_size=32, scan_layers=scan_layers)
  return module.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)['params']


def _one_update(trainable=None, freeze=None, clip=1.0, params=None):
  config = defaults.default_config()
  config.optimizer.update(name='sgd', momentum=0.0, weight_decay=0.1, grad_clip_norm=clip)
  config.schedule.update(base_lr=1.0, warmup_steps=0, decay='constant')
  config.trainable, config.freeze = trainable, freeze
  tx, _ = optimizer_lib.create_optimizer(config, total_steps=10)
  params = _tiny_params() if params is None else params
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  return params, updates


def _by_name(tree):
  return {optimizer_lib._path_name(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _changed(updates):
  flat = jax.tree_util.tree_leaves_with_path(updates)
  return {optimizer_lib._path_name(p) for p, u in flat if np.any(np.asarray(u) != 0)}


def test_linear_probe_updates_only_the_head_and_clips_on_its_own_norm():
  params, updates = _one_update(trainable='^head/', clip=1.0)
  assert _changed(updates) == {'head/kernel', 'head/bias'}
  # The clipped global norm covers the head only: its update (SGD lr 1, before decay of
  # the kernel) has norm 1 = the clip, whatever the size of the frozen rest.
  head_grad_norm = 0.5 * math.sqrt(params['head']['kernel'].size + params['head']['bias'].size)
  assert head_grad_norm > 1.0
  bias_update = np.asarray(updates['head']['bias'])
  np.testing.assert_allclose(bias_update, -0.5 / head_grad_norm, rtol=1e-5)


def test_freeze_regex_keeps_the_matching_subtrees_fixed():
  _, updates = _one_update(freeze=r'^(embedding|Transformer/encoderblock_0)/')
  changed = _changed(updates)
  assert not any(n.startswith(('embedding/', 'Transformer/encoderblock_0/')) for n in changed)
  assert any(n.startswith('Transformer/encoderblock_1/') for n in changed)
  assert {'head/kernel', 'cls', 'Transformer/posembed_input/pos_embedding'} <= changed


@pytest.mark.parametrize('freeze, trainable', [
    (r'^(embedding|Transformer/encoderblock_[0-1])/', None),
    (None, r'^(head|Transformer/encoderblock_2)/'),
    (r'encoderblock_[13]/MlpBlock_0/', None),
])
def test_freezing_single_blocks_works_on_stacked_blocks(freeze, trainable):
  """With scan_layers=True (the recipes' layout) a regex naming blocks freezes those
  layers of each stacked parameter: the updates equal the unstacked layout's, clipped
  norm and weight decay included."""
  from vit_jax.models import scan_layout  # pylint: disable=g-import-not-at-top
  stacked = _tiny_params(scan_layers=True, num_layers=4)
  unrolled = scan_layout.unstack_layers(jax.tree.map(np.asarray, stacked))
  _, stacked_updates = _one_update(trainable=trainable, freeze=freeze, params=stacked)
  _, unrolled_updates = _one_update(trainable=trainable, freeze=freeze, params=unrolled)
  got = _by_name(scan_layout.unstack_layers(jax.tree.map(np.asarray, stacked_updates)))
  want = _by_name(jax.tree.map(np.asarray, unrolled_updates))
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)
  frozen = [n for n in want if not np.any(want[n])]
  trained = [n for n in want if np.any(want[n])]
  assert frozen and trained  # the regex split the blocks
  assert any('encoderblock_' in n for n in frozen) and any('encoderblock_' in n for n in trained)


@pytest.mark.parametrize('freeze', [r'^Transformer/encoderblock/', r'encoderblock/.*/kernel$'])
def test_a_regex_on_the_stacked_path_still_matches_every_layer(freeze):
  stacked = _tiny_params(scan_layers=True, num_layers=3)
  _, updates = _one_update(freeze=freeze, params=stacked)
  changed = _changed(updates)
  frozen = {n for n in _by_name(updates) if re.search(freeze, n)}
  assert frozen and not frozen & changed
  assert 'head/kernel' in changed


def test_freeze_errors_name_the_field_and_show_paths():
  with pytest.raises(optimizer_lib.FreezeError, match=r"config.trainable='\^heads/'.*head/"):
    _one_update(trainable='^heads/')
  with pytest.raises(optimizer_lib.FreezeError, match='leave no parameter'):
    _one_update(freeze='.')
  # A ResNet's head is fc: the message lists the top-level modules, where it shows (the
  # sample of paths used to show only the first and last, bn1/... and layer4/...).
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  resnet = models.abstract_params(models.create('ResNet-50', num_classes=10), 32)
  with pytest.raises(optimizer_lib.FreezeError,
                     match=r"'\^head/' matches no parameter.*top-level modules .*, fc, "):
    optimizer_lib.trainable_labels(resnet, trainable='^head/')
  config = defaults.default_config()
  config.freeze = '(unclosed'
  with pytest.raises(defaults.ConfigError, match=r"config.freeze='\(unclosed' is not a valid"):
    defaults.validate(config, num_devices=1, process_count=1)
  config.freeze = None
  config.trainable = '^nothing_like_this/'
  with pytest.raises(defaults.ConfigError, match='config.trainable'):
    defaults.validate(config, num_devices=1, process_count=1)


@pytest.mark.parametrize('max_norm', [0.5, 3.0, 100.0])
def test_clip_by_global_norm_equals_optax_and_numpy(max_norm):
  """The scalar-multiply clip: same result as optax's and as the formula, same state."""
  import optax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  grads = {'a': rng.normal(size=(3, 4)).astype(np.float32),
           'b': {'c': rng.normal(size=(5,)).astype(np.float32)}}
  ours = optimizer_lib.clip_by_global_norm(max_norm)
  theirs = optax.clip_by_global_norm(max_norm)
  assert jax.tree.structure(ours.init(grads)) == jax.tree.structure(theirs.init(grads))
  got, _ = ours.update(grads, ours.init(grads))
  want, _ = theirs.update(grads, theirs.init(grads))
  norm = np.sqrt(sum(np.sum(np.float64(g) ** 2) for g in jax.tree.leaves(grads)))
  scale = min(1.0, max_norm / norm)
  for g, o, w in zip(jax.tree.leaves(grads), jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(o, np.float64(g) * scale, rtol=1e-6)
    np.testing.assert_allclose(o, w, rtol=1e-6)
  got_norm = float(optax.tree.norm(got))
  assert got_norm == pytest.approx(min(norm, max_norm), rel=1e-6)


def test_nonfinite_gradients_stay_nonfinite_after_clipping():
  clip = optimizer_lib.clip_by_global_norm(1.0)
  got, _ = clip.update({'a': jnp.array([1.0, jnp.nan])}, clip.init(None))
  assert not np.isfinite(np.asarray(got['a'])).any()


@pytest.mark.parametrize('trainable,freeze', [('^head/', None), (None, 'encoderblock_0/')])
def test_the_logged_grad_norm_is_the_norm_of_the_trained_gradients(trainable, freeze):
  """As the clipped norm: frozen parameters (and frozen layers of a stacked leaf) have no
  share in it. Checked against jax.grad of the loss and a numpy norm over the trained
  entries."""
  from vit_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  module = models.create('ViT-Ti/16', image_size=16, patch_size=8, hidden_size=32,
                         num_layers=2, num_heads=2, mlp_dim=64, num_classes=3,
                         scan_layers=True)
  params = models.init_params(module, 16)
  params['head']['kernel'] = jax.random.normal(  # so that the body gets gradients too
      jax.random.PRNGKey(2), params['head']['kernel'].shape)
  config = defaults.default_config()
  config.trainable, config.freeze = trainable, freeze
  opt, _ = optimizer_lib.create_optimizer(config, 10)
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=opt.init(params), rng=jax.random.PRNGKey(0))
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
  labels = jax.nn.one_hot(jnp.arange(4) % 3, 3)
  fn = step_lib.make_train_step(module, opt, loss='softmax_xent', trainable=trainable,
                                freeze=freeze)
  _, metrics = jax.jit(fn)(state, {'image': images, 'label': labels})

  def loss(p):
    logits = module.apply({'params': p}, images, train=True, rngs={'dropout': state.rng})
    return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), -1))
  grads = jax.grad(loss)(params)
  squares = 0.0
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    g = np.asarray(g, np.float64)
    if trainable:
      squares += np.sum(g**2) if name.startswith('head/') else 0.0
    elif name.startswith('Transformer/encoderblock/'):  # stacked: layer 0 frozen
      squares += np.sum(g[1:]**2)
    else:
      squares += np.sum(g**2)
  everything = np.sqrt(sum(np.sum(np.asarray(g, np.float64)**2) for g in jax.tree.leaves(grads)))
  assert float(metrics['grad_norm']) == pytest.approx(np.sqrt(squares), rel=1e-4)
  assert abs(float(metrics['grad_norm']) - everything) > 1e-3 * everything  # not all of them


def test_a_skipped_nonfinite_step_keeps_the_schedule_on_the_step():
  """nonfinite='skip' kept the optimizer's step count as well as its moments, so the
  learning rate applied fell a step behind the logged one at every skip. Checked by the
  update SGD applies after a skip: -lr(step) x gradient."""
  from vit_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  module = models.create('ViT-Ti/16', image_size=16, patch_size=8, hidden_size=32,
                         num_layers=1, num_heads=2, mlp_dim=64, num_classes=3)
  params = models.init_params(module, 16)
  config = defaults.default_config()
  config.optimizer.update(name='sgd', momentum=0.0, grad_clip_norm=0.0, weight_decay=0.0)
  config.schedule.update(base_lr=0.1, warmup_steps=0, decay='linear')
  opt, schedule = optimizer_lib.create_optimizer(config, 10)
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=opt.init(params), rng=jax.random.PRNGKey(0))
  fn = jax.jit(step_lib.make_train_step(module, opt, loss='softmax_xent',
                                        skip_nonfinite=True))
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
  labels = jax.nn.one_hot(jnp.arange(4) % 3, 3)
  good = {'image': images, 'label': labels}
  bad = {'image': jnp.full_like(images, jnp.nan), 'label': labels}
  for batch in (good, bad, good):
    state, metrics = fn(state, batch)
  assert int(state.step) == 3 and int(metrics['finite']) == 1
  before = state.params
  state, _ = fn(state, good)  # the update of step 3: -schedule(3) x gradient

  def loss(p):
    logits = module.apply({'params': p}, images, train=True, rngs={'dropout': state.rng})
    return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), -1))
  grad = np.asarray(jax.grad(loss)(before)['head']['kernel'], np.float64)
  step = (np.asarray(before['head']['kernel'], np.float64)
          - np.asarray(state.params['head']['kernel'], np.float64))
  i = np.unravel_index(np.argmax(np.abs(grad)), grad.shape)
  assert step[i] / grad[i] == pytest.approx(float(schedule(3)), rel=1e-4)
  assert float(schedule(3)) != pytest.approx(float(schedule(2)), rel=1e-3)
