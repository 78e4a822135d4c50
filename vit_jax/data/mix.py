"""Mixup and CutMix on batches (TensorFlow, run after batching in tf.data).

A batch is {'image': (B, H, W, C) float32, 'label': (B, K) float32 one-hot or soft,
'rng': (2,) int64 stateless seed of the batch}; other keys pass through. Each example is
paired with the batch reversed (example i with example B - 1 - i), and one lam per batch
is drawn from Beta(alpha, alpha) (as the ratio of two stateless gammas). Like the
per-example ops, a function takes `seed, batch['rng'] = stateless_split(batch['rng'])`,
so the result depends only on the batch's rng.

  mixup:  image = lam x + (1 - lam) x_rev,     label = lam y + (1 - lam) y_rev.
  cutmix: a box of round(sqrt(1 - lam) H) x round(sqrt(1 - lam) W) pixels (area about
          (1 - lam) H W), centred on a uniform pixel and clipped to the image, is pasted
          from x_rev; the label weight is the exact pasted fraction p = box area / (H W):
          label = (1 - p) y + p y_rev.
  mix:    timm's Mixup with both enabled: cutmix with probability switch_prob, else
          mixup (an alpha <= 0 disables that method).
"""

import tensorflow as tf

Batch = dict[str, tf.Tensor]


def _next_seed(batch: Batch) -> tf.Tensor:
  rng = batch.get('rng')
  if rng is None:
    raise ValueError("mix ops need batch['rng'] (an int64 (2,) stateless seed).")
  if rng.shape.rank != 1:
    raise ValueError(f"batch['rng'] must be one (2,) seed for the batch, got shape "
                     f'{rng.shape}; e.g. take the first row of the batched rngs.')
  seed, batch['rng'] = tf.unstack(tf.random.experimental.stateless_split(rng, 2))
  return seed


def _check(batch: Batch):
  label = batch['label']
  if label.shape.rank != 2 or not label.dtype.is_floating:
    raise ValueError('mixup/cutmix need float one-hot or soft labels of shape (B, K), '
                     f"got {label.dtype.name} {label.shape}; apply onehot() first.")


def sample_beta(seed, alpha: float) -> tf.Tensor:
  """lam ~ Beta(alpha, alpha), float32 scalar, as g1 / (g1 + g2) of stateless gammas."""
  s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  g1 = tf.random.stateless_gamma([], s1, alpha)
  g2 = tf.random.stateless_gamma([], s2, alpha)
  total = g1 + g2
  return tf.where(total > 0, g1 / tf.where(total > 0, total, 1.0), 0.5)


def _mixup(image, label, alpha, seed):
  lam = sample_beta(seed, alpha)
  image = tf.cast(image, tf.float32)
  image = lam * image + (1 - lam) * tf.reverse(image, [0])
  label = lam * label + (1 - lam) * tf.reverse(label, [0])
  return image, label


def cutmix_box(height, width, lam, seed):
  """(top, bottom, left, right) int32 of a box of area ~ (1 - lam) H W, clipped."""
  s_y, s_x = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  cut = tf.sqrt(1.0 - lam)
  cut_h = tf.cast(tf.round(cut * tf.cast(height, tf.float32)), tf.int32)
  cut_w = tf.cast(tf.round(cut * tf.cast(width, tf.float32)), tf.int32)
  cy = tf.random.stateless_uniform([], s_y, 0, height, dtype=tf.int32)
  cx = tf.random.stateless_uniform([], s_x, 0, width, dtype=tf.int32)
  top, left = cy - cut_h // 2, cx - cut_w // 2
  return (tf.clip_by_value(top, 0, height), tf.clip_by_value(top + cut_h, 0, height),
          tf.clip_by_value(left, 0, width), tf.clip_by_value(left + cut_w, 0, width))


def _cutmix(image, label, alpha, seed):
  s_lam, s_box = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  lam = sample_beta(s_lam, alpha)
  shape = tf.shape(image)
  height, width = shape[1], shape[2]
  top, bottom, left, right = cutmix_box(height, width, lam, s_box)
  rows, cols = tf.range(height), tf.range(width)
  inside = (((rows >= top) & (rows < bottom))[:, None]
            & ((cols >= left) & (cols < right))[None, :])
  image = tf.where(inside[None, :, :, None], tf.reverse(image, [0]), image)
  pasted = (tf.cast((bottom - top) * (right - left), tf.float32)
            / tf.cast(height * width, tf.float32))
  label = (1 - pasted) * label + pasted * tf.reverse(label, [0])
  return image, label


def _apply(batch: Batch, alpha: float, fn, name: str) -> Batch:
  if alpha <= 0:
    raise ValueError(f'{name} alpha must be > 0, got {alpha!r}')
  batch = dict(batch)
  _check(batch)
  seed = _next_seed(batch)
  batch['image'], batch['label'] = fn(batch['image'], batch['label'], alpha, seed)
  return batch


def mixup(batch: Batch, alpha: float) -> Batch:
  """Mixup (Zhang et al. 2018) with lam ~ Beta(alpha, alpha), alpha > 0."""
  return _apply(batch, alpha, _mixup, 'mixup')


def cutmix(batch: Batch, alpha: float) -> Batch:
  """CutMix (Yun et al. 2019) with lam ~ Beta(alpha, alpha), alpha > 0."""
  return _apply(batch, alpha, _cutmix, 'cutmix')


def mix(batch: Batch, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
        switch_prob: float = 0.5) -> Batch:
  """timm-style: per batch, cutmix with probability switch_prob, else mixup.

  With only one alpha > 0 that method is always used; with neither, the batch is
  returned unchanged (its rng still advances).
  """
  if not 0 <= switch_prob <= 1:
    raise ValueError(f'switch_prob must be in [0, 1], got {switch_prob!r}')
  batch = dict(batch)
  seed = _next_seed(batch)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return batch
  _check(batch)
  image, label = batch['image'], batch['label']
  if cutmix_alpha <= 0:
    image, label = _mixup(image, label, mixup_alpha, seed)
  elif mixup_alpha <= 0:
    image, label = _cutmix(image, label, cutmix_alpha, seed)
  else:
    s_switch, s_mix = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    use_cutmix = tf.random.stateless_uniform([], s_switch) < switch_prob
    image = tf.cast(image, tf.float32)
    image, label = tf.cond(use_cutmix,
                           lambda: _cutmix(image, label, cutmix_alpha, s_mix),
                           lambda: _mixup(image, label, mixup_alpha, s_mix))
  batch['image'], batch['label'] = image, label
  return batch
