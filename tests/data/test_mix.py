"""Mixup / CutMix on batches: checked against numpy on the batch and its reverse."""

import numpy as np
import pytest
import tensorflow as tf

from vit_jax.data import mix
from vit_jax.data import traced

B, H, W, K = 6, 16, 20, 8
LABELS = np.array([0, 1, 2, 3, 4, 5])   # distinct, so each row's weights are readable


def _batch(seed=(1, 2), label_smoothing=0.0):
  rng = np.random.RandomState(0)
  onehot = np.eye(K, dtype=np.float32)[LABELS]
  onehot = onehot * (1 - label_smoothing) + label_smoothing / K
  return {'image': tf.constant(rng.uniform(-1, 1, (B, H, W, 3)).astype(np.float32)),
          'label': tf.constant(onehot), 'rng': tf.constant(seed, tf.int64),
          'other': tf.constant(np.arange(B))}


def _numpy(batch):
  return {k: v.numpy() for k, v in batch.items()}


def test_mixup_matches_numpy():
  batch = _batch()
  x, y = batch['image'].numpy(), batch['label'].numpy()
  for s in range(5):
    out = _numpy(mix.mixup(dict(batch, rng=tf.constant([s, 0], tf.int64)), alpha=0.8))
    np.testing.assert_allclose(out['label'].sum(1), 1, atol=1e-6)
    lam = out['label'][np.arange(B), LABELS]   # the weight of each example's own class
    np.testing.assert_allclose(lam, lam[0], atol=1e-6)   # one lam per batch
    lam = lam[0]
    np.testing.assert_allclose(out['label'], lam * y + (1 - lam) * y[::-1], atol=1e-6)
    np.testing.assert_allclose(out['image'], lam * x + (1 - lam) * x[::-1], atol=1e-6)
    np.testing.assert_array_equal(out['other'], np.arange(B))
    assert not np.array_equal(out['rng'], [s, 0])


def test_cutmix_pixels_and_label_weights_exact():
  batch = _batch()
  x, y = batch['image'].numpy(), batch['label'].numpy()
  pasted_fractions = []
  for s in range(20):
    out = _numpy(mix.cutmix(dict(batch, rng=tf.constant([s, 0], tf.int64)), alpha=1.0))
    np.testing.assert_allclose(out['label'].sum(1), 1, atol=1e-6)
    from_x = np.all(out['image'] == x, axis=-1)
    from_rev = np.all(out['image'] == x[::-1], axis=-1)
    assert np.all(from_x | from_rev)                      # every pixel from one image
    pasted = from_rev & ~from_x                           # (x != x_rev everywhere here)
    np.testing.assert_array_equal(pasted, np.broadcast_to(pasted[0], pasted.shape))
    rows, cols = np.nonzero(pasted[0])
    if rows.size:                                         # a single rectangle
      box = np.zeros((H, W), bool)
      box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
      np.testing.assert_array_equal(pasted[0], box)
    fraction = np.float32(pasted[0].sum()) / np.float32(H * W)
    # The weight of the pasted example's class is exactly the pasted fraction.
    np.testing.assert_array_equal(out['label'][np.arange(B), LABELS[::-1]], fraction)
    np.testing.assert_allclose(out['label'][np.arange(B), LABELS], 1 - fraction,
                               atol=1e-7)
    pasted_fractions.append(fraction)
  assert 0 < np.mean(pasted_fractions) < 1 and len(set(pasted_fractions)) > 10


def test_cutmix_box_area_matches_lam():
  # Box sides round(sqrt(1 - lam) * H), round(sqrt(1 - lam) * W) before clipping.
  for s in range(50):
    seed = tf.constant([s, 3], tf.int64)
    lam = float(mix.sample_beta(seed, 1.0))
    top, bottom, left, right = [int(v) for v in mix.cutmix_box(H, W, lam, seed)]
    cut = np.sqrt(1 - lam)
    assert 0 <= top <= bottom <= H and 0 <= left <= right <= W
    assert bottom - top <= round(cut * H) and right - left <= round(cut * W)
    if 0 < top and bottom < H:
      assert bottom - top == round(cut * H)


def test_beta_distribution():
  stats = pytest.importorskip('scipy.stats')
  for alpha in (0.2, 1.0):
    lams = tf.function(lambda: tf.map_fn(  # pylint: disable=cell-var-from-loop
        lambda s: mix.sample_beta(tf.stack([s, 7]), alpha),
        tf.range(800, dtype=tf.int64), fn_output_signature=tf.float32))()
    assert stats.kstest(lams.numpy(), stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def test_mix_switches_and_is_deterministic():
  batch = _batch(label_smoothing=0.1)
  x = batch['image'].numpy()
  kinds = []
  for s in range(30):
    b = dict(batch, rng=tf.constant([s, 1], tf.int64))
    out = _numpy(mix.mix(b))
    np.testing.assert_array_equal(out['image'], _numpy(mix.mix(b))['image'])
    np.testing.assert_allclose(out['label'].sum(1), 1, atol=1e-6)
    cut = np.all((out['image'] == x) | (out['image'] == x[::-1]))
    kinds.append(cut)
  assert 5 <= sum(kinds) <= 25
  b = dict(batch, rng=tf.constant([0, 1], tf.int64))
  for s in range(5):
    b['rng'] = tf.constant([s, 1], tf.int64)
    only_mixup = mix.mix(b, switch_prob=0.0)['image'].numpy()
    only_cutmix = mix.mix(b, switch_prob=1.0)['image'].numpy()
    assert not np.all((only_mixup == x) | (only_mixup == x[::-1]))
    assert np.all((only_cutmix == x) | (only_cutmix == x[::-1]))
  np.testing.assert_array_equal(mix.mix(b, cutmix_alpha=0)['image'],
                                mix.mixup(b, 0.8)['image'])
  np.testing.assert_array_equal(mix.mix(b, mixup_alpha=0)['image'],
                                mix.cutmix(b, 1.0)['image'])
  np.testing.assert_array_equal(mix.mix(b, 0, 0)['image'], x)


@pytest.mark.parametrize('autograph', [True, False])
def test_mix_in_tf_data_after_batching_equals_eager(autograph):
  """Mapped as the training pipeline maps it (traced without AutoGraph) and with it."""
  batch = _batch()
  ds = tf.data.Dataset.from_tensor_slices(
      {'image': batch['image'], 'label': batch['label']}).repeat(2).batch(4)
  ds = ds.enumerate().map(lambda i, b: dict(b, rng=tf.stack([i, 5 * i])))
  plain = list(ds)
  mixed = list(ds.map(mix.mix if autograph else traced.without_autograph(mix.mix)))
  assert [m['image'].shape[0] for m in mixed] == [4, 4, 4]
  for p, m in zip(plain, mixed):
    eager = mix.mix(p)
    for k in ('image', 'label', 'rng'):
      np.testing.assert_array_equal(m[k], eager[k])


def test_errors():
  batch = _batch()
  with pytest.raises(ValueError, match='apply onehot'):
    mix.mixup(dict(batch, label=tf.constant(LABELS)), 0.8)
  with pytest.raises(ValueError, match=r"one \(2,\) seed"):
    mix.cutmix(dict(batch, rng=tf.zeros([B, 2], tf.int64)), 1.0)
  with pytest.raises(ValueError, match='alpha must be > 0'):
    mix.mixup(batch, 0.0)
