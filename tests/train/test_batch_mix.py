"""Mixup / CutMix in the train step: checked against numpy on the batch and its pairs,
Beta draws against scipy, sharded mixing against one device, and the step's wiring."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import subprocess_env

from vit_jax.train import batch_mix

B, H, W, K = 6, 16, 20, 8
LABELS = np.array([0, 1, 2, 3, 4, 5])   # distinct, so each row's weights are readable


def _batch(b=B, label_smoothing=0.0):
  rng = np.random.RandomState(0)
  onehot = np.eye(K, dtype=np.float32)[LABELS[:b]]
  onehot = onehot * (1 - label_smoothing) + label_smoothing / K
  return {'image': rng.uniform(-1, 1, (b, H, W, 3)).astype(np.float32),
          'label': onehot, 'other': np.arange(b)}


def _pairs(x):
  """numpy: example 2k with 2k + 1."""
  idx = np.arange(len(x)) ^ 1
  return x[idx]


@functools.cache
def _jitted_mix(**kwargs):
  return jax.jit(lambda b, r: batch_mix.mix(b, r, batch_mix.MixConfig(**kwargs)))


def _mix(batch, seed, **kwargs):
  out = _jitted_mix(**kwargs)(batch, jax.random.PRNGKey(seed))
  return jax.tree.map(np.asarray, out)


def test_partner_is_the_neighbour_and_odd_batches_reverse():
  x = np.arange(6)
  np.testing.assert_array_equal(batch_mix.partner(jnp.asarray(x)), [1, 0, 3, 2, 5, 4])
  np.testing.assert_array_equal(batch_mix.partner(jnp.arange(5)), [4, 3, 2, 1, 0])


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_mixup_matches_numpy(smoothing):
  batch = _batch(label_smoothing=smoothing)
  x, y = batch['image'], batch['label']
  lams = []
  for s in range(5):
    out = _mix(batch, s, mixup_alpha=0.8)
    np.testing.assert_allclose(out['label'].sum(1), 1, atol=1e-6)
    # The weight of each example's own class: lam (1 - s) + s/K (+ none from the partner).
    own = out['label'][np.arange(B), LABELS]
    lam = (own - smoothing / K) / (1 - smoothing)
    np.testing.assert_allclose(lam, lam[0], atol=1e-6)   # one lam per batch
    lam = lam[0]
    np.testing.assert_allclose(out['label'], lam * y + (1 - lam) * _pairs(y), atol=1e-6)
    np.testing.assert_allclose(out['image'], lam * x + (1 - lam) * _pairs(x), atol=1e-6)
    np.testing.assert_array_equal(out['other'], np.arange(B))
    lams.append(lam)
  assert len(set(np.round(lams, 6))) == 5   # each key its own lam


def test_cutmix_pixels_and_label_weights_exact():
  batch = _batch()
  x = batch['image']
  fractions = []
  for s in range(20):
    out = _mix(batch, s, cutmix_alpha=1.0)
    np.testing.assert_allclose(out['label'].sum(1), 1, atol=1e-6)
    from_x = np.all(out['image'] == x, axis=-1)
    from_partner = np.all(out['image'] == _pairs(x), axis=-1)
    assert np.all(from_x | from_partner)                   # every pixel from one image
    pasted = from_partner & ~from_x                         # (x != partner everywhere here)
    np.testing.assert_array_equal(pasted, np.broadcast_to(pasted[0], pasted.shape))
    rows, cols = np.nonzero(pasted[0])
    if rows.size:                                           # a single rectangle
      box = np.zeros((H, W), bool)
      box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
      np.testing.assert_array_equal(pasted[0], box)
    fraction = np.float32(pasted[0].sum()) / np.float32(H * W)
    # The weight of the pasted example's class is exactly the pasted fraction.
    np.testing.assert_allclose(out['label'][np.arange(B), _pairs(LABELS)], fraction,
                               rtol=1e-6)
    np.testing.assert_allclose(out['label'][np.arange(B), LABELS], 1 - fraction, atol=1e-6)
    fractions.append(fraction)
  assert 0 < np.mean(fractions) < 1 and len(set(fractions)) > 10


def test_cutmix_box_area_matches_lam():
  # Box sides round(sqrt(1 - lam) * H), round(sqrt(1 - lam) * W) before clipping.
  for s in range(50):
    r_lam, r_box = jax.random.split(jax.random.PRNGKey(s))
    lam = float(batch_mix.sample_lam(r_lam, 1.0))
    top, bottom, left, right = [int(v) for v in batch_mix.cutmix_box(r_box, H, W,
                                                                     jnp.float32(lam))]
    cut = np.sqrt(1 - lam)
    assert 0 <= top <= bottom <= H and 0 <= left <= right <= W
    assert bottom - top <= round(cut * H) and right - left <= round(cut * W)
    if 0 < top and bottom < H:
      assert bottom - top == round(cut * H)


def test_lam_follows_beta_against_scipy():
  stats = pytest.importorskip('scipy.stats')
  for alpha in (0.2, 0.8, 1.0):
    keys = jax.random.split(jax.random.PRNGKey(3), 2000)
    lams = np.asarray(jax.vmap(lambda k: batch_mix.sample_lam(k, alpha))(keys))
    assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def test_switch_prob_picks_cutmix_that_often():
  batch = _batch()
  x = batch['image']
  for prob in (0.0, 0.3, 1.0):
    cut = []
    for s in range(100):
      out = _mix(batch, s, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=prob)
      # cutmix keeps every pixel of one image; mixup blends every pixel (lam in (0, 1)).
      from_one = np.all((out['image'] == x) | (out['image'] == _pairs(x)))
      cut.append(from_one)
    rate = np.mean(cut)
    assert abs(rate - prob) < 0.12, (prob, rate)


def test_disabled_mix_returns_the_batch():
  batch = _batch()
  out = batch_mix.mix(batch, jax.random.PRNGKey(0), batch_mix.MixConfig())
  assert out is batch


def test_bad_settings_and_labels_are_refused():
  with pytest.raises(ValueError, match='mixup_alpha=-0.1'):
    batch_mix.MixConfig(mixup_alpha=-0.1)
  with pytest.raises(ValueError, match='mix_switch_prob=1.5'):
    batch_mix.MixConfig(mixup_alpha=1.0, switch_prob=1.5)
  batch = dict(_batch(), label=LABELS)
  with pytest.raises(ValueError, match=r'onehot\(num_classes\)'):
    batch_mix.mix(batch, jax.random.PRNGKey(0), batch_mix.MixConfig(mixup_alpha=1.0))


def test_train_step_trains_on_the_mixed_batch():
  """The step's loss equals the plain step's on the batch mixed with the step's key."""
  import optax
  from vit_jax import models
  from vit_jax.train import step as step_lib

  module = models.create('ViT-Ti/16', image_size=16, patch_size=4, hidden_size=16,
                         num_layers=1, num_heads=2, mlp_dim=32, num_classes=K)
  params = models.init_params(module, 16)
  opt = optax.sgd(0.1)
  state = step_lib.TrainState(step=jnp.asarray(3, jnp.int32), params=params,
                              opt_state=opt.init(params), rng=jax.random.PRNGKey(7))
  batch = _batch()
  batch = {'image': batch['image'][:, :, :16], 'label': batch['label']}
  mix = batch_mix.MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0)
  mixed_step = jax.jit(step_lib.make_train_step(module, opt, loss='softmax_xent', mix=mix))
  plain_step = jax.jit(step_lib.make_train_step(module, opt, loss='softmax_xent'))
  key = batch_mix.step_rng(jax.random.fold_in(state.rng, state.step))
  mixed_by_hand = batch_mix.mix(batch, key, mix)
  # (The head starts at zero, so the first loss is log K whatever the labels: compare the
  # gradient norm, which the labels set, too.)
  mixed = mixed_step(state, batch)[1]
  by_hand = plain_step(state, mixed_by_hand)[1]
  plain = plain_step(state, batch)[1]
  for k in ('loss', 'grad_norm'):
    assert float(mixed[k]) == pytest.approx(float(by_hand[k]), abs=1e-6)
  assert abs(float(mixed['grad_norm']) - float(plain['grad_norm'])) > 1e-3


_SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from vit_jax.train import batch_mix
mesh = jax.make_mesh((8,), ('data',))
rng = np.random.RandomState(0)
batch = {'image': rng.uniform(-1, 1, (16, 8, 8, 3)).astype(np.float32),
         'label': np.eye(4, dtype=np.float32)[rng.randint(0, 4, 16)]}
for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
  config = batch_mix.MixConfig(mixup_alpha=mixup, cutmix_alpha=cutmix)
  fn = lambda b, k: batch_mix.mix(b, k, config)
  sharded = jax.device_put(batch, NamedSharding(mesh, P('data')))
  jitted = jax.jit(fn, out_shardings=NamedSharding(mesh, P('data')))
  hlo = jitted.lower(sharded, jax.random.PRNGKey(1)).compile().as_text()
  moves = [op for op in ('all-to-all', 'collective-permute', 'all-gather', 'all-reduce')
           if op in hlo]
  assert not moves, (mixup, cutmix, moves)
  for seed in range(3):
    out = jitted(sharded, jax.random.PRNGKey(seed))
    one = jax.jit(fn)(jax.device_put(batch, jax.devices()[0]), jax.random.PRNGKey(seed))
    for k in ('image', 'label'):
      np.testing.assert_allclose(np.asarray(out[k]), np.asarray(one[k]), atol=1e-6)
print('ok')
"""


def test_sharded_mixing_stays_on_each_device_and_equals_one_device():
  """8 devices, 2 examples each: no collective in the compiled mixing, same result."""
  env = subprocess_env.cpu_env(devices=8)
  proc = subprocess.run([sys.executable, '-c', _SHARDED], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0 and 'ok' in proc.stdout, subprocess_env.failure(proc)
