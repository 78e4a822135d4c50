"""Mixup and CutMix of a training batch, inside the jitted train step (pure JAX).

Mixing on the accelerator costs a few elementwise passes over the batch; in tf.data on
the host it cost 164 ms a batch of 128 at 224 px on 2 cores (843 -> 513 img/s), which on
an accelerator host would starve the step.

Each example is paired with its neighbour: 0 with 1, 2 with 3, ... (an odd batch pairs
example i with B - 1 - i, the middle one with itself). A batch is sharded over the devices
in contiguous blocks, so with an even number of examples per device no example leaves
its device. Examples are shuffled, so this pairs random examples as timm's reversed batch
does. One lam per batch is drawn from Beta(alpha, alpha), as timm's Mixup does by default:

  mixup:  image = lam x + (1 - lam) x_partner,  label = lam y + (1 - lam) y_partner.
  cutmix: a box of round(sqrt(1 - lam) H) x round(sqrt(1 - lam) W) pixels (area about
          (1 - lam) H W), centred on a uniform pixel and clipped to the image, comes from
          the partner; the label weight is the exact pasted fraction p = box area / (H W):
          label = (1 - p) y + p y_partner.
  mix:    with both alphas > 0, cutmix with probability switch_prob, else mixup; an
          alpha <= 0 disables that method.

The batch is mixed whole, before it is split into micro-batches for gradient
accumulation, so a step with accum_steps > 1 still equals one step on the whole batch.
"""

import dataclasses

import jax
import jax.numpy as jnp

# Folded into the step's key for the mixing draws, apart from the dropout keys (which use
# the step's key itself, or the micro-batch index 0 .. accum_steps - 1 folded in).
_MIX_SALT = 0x6D6978  # 'mix'


@dataclasses.dataclass(frozen=True)
class MixConfig:
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  switch_prob: float = 0.5

  def __post_init__(self):
    for name in ('mixup_alpha', 'cutmix_alpha'):
      value = getattr(self, name)
      if not value >= 0:
        raise ValueError(f'config.input.{name}={value!r} must be >= 0 (0 disables it)')
    if not 0 <= self.switch_prob <= 1:
      raise ValueError(f'config.input.mix_switch_prob={self.switch_prob!r} must be in '
                       '[0, 1]')

  @property
  def enabled(self) -> bool:
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0

  @classmethod
  def from_input_config(cls, input_config) -> 'MixConfig':
    return cls(mixup_alpha=input_config.get('mixup_alpha', 0.0) or 0.0,
               cutmix_alpha=input_config.get('cutmix_alpha', 0.0) or 0.0,
               switch_prob=input_config.get('mix_switch_prob', 0.5))


def partner(x: jax.Array) -> jax.Array:
  """x with each example replaced by its partner (see the module docstring)."""
  b = x.shape[0]
  if b % 2:
    return jnp.flip(x, axis=0)
  pairs = x.reshape((b // 2, 2) + x.shape[1:])
  return jnp.flip(pairs, axis=1).reshape(x.shape)


def sample_lam(rng: jax.Array, alpha: float) -> jax.Array:
  """lam ~ Beta(alpha, alpha), a float32 scalar."""
  return jax.random.beta(rng, alpha, alpha, dtype=jnp.float32)


def _float(image):
  return image if jnp.issubdtype(image.dtype, jnp.floating) else image.astype(jnp.float32)


def mixup(image, label, lam):
  image = _float(image)
  lam_image = lam.astype(image.dtype)
  image = lam_image * image + (1 - lam_image) * partner(image)
  label = lam * label + (1 - lam) * partner(label)
  return image, label


def cutmix_box(rng: jax.Array, height: int, width: int, lam: jax.Array):
  """(top, bottom, left, right) int32 of a box of area ~ (1 - lam) H W, clipped."""
  r_y, r_x = jax.random.split(rng)
  cut = jnp.sqrt(1.0 - lam)
  cut_h = jnp.round(cut * height).astype(jnp.int32)
  cut_w = jnp.round(cut * width).astype(jnp.int32)
  cy = jax.random.randint(r_y, (), 0, height)
  cx = jax.random.randint(r_x, (), 0, width)
  top, left = cy - cut_h // 2, cx - cut_w // 2
  return (jnp.clip(top, 0, height), jnp.clip(top + cut_h, 0, height),
          jnp.clip(left, 0, width), jnp.clip(left + cut_w, 0, width))


def cutmix(image, label, box):
  top, bottom, left, right = box
  height, width = image.shape[1], image.shape[2]
  rows, cols = jnp.arange(height), jnp.arange(width)
  inside = (((rows >= top) & (rows < bottom))[:, None]
            & ((cols >= left) & (cols < right))[None, :])
  image = jnp.where(inside[None, :, :, None], partner(image), image)
  pasted = ((bottom - top) * (right - left)).astype(jnp.float32) / (height * width)
  label = (1 - pasted) * label + pasted * partner(label)
  return image, label


def _check(batch):
  label = batch['label']
  if label.ndim != 2 or not jnp.issubdtype(label.dtype, jnp.floating):
    raise ValueError('mixup/cutmix need float one-hot or soft labels of shape (B, K), got '
                     f"{label.dtype} {label.shape}: add onehot(num_classes) to "
                     'config.input.pp_train')
  if batch['image'].ndim != 4:
    raise ValueError(f"mixup/cutmix need images of shape (B, H, W, C), got "
                     f"{batch['image'].shape}")


def mix(batch: dict, rng: jax.Array, config: MixConfig) -> dict:
  """The batch with 'image' and 'label' mixed (other keys pass through)."""
  if not config.enabled:
    return batch
  _check(batch)
  image, label = batch['image'], batch['label']
  r_switch, r_lam, r_box = jax.random.split(rng, 3)

  def do_mixup():
    return mixup(image, label, sample_lam(r_lam, config.mixup_alpha))

  def do_cutmix():
    lam = sample_lam(r_lam, config.cutmix_alpha)
    return cutmix(image, label, cutmix_box(r_box, image.shape[1], image.shape[2], lam))

  if config.cutmix_alpha <= 0:
    image, label = do_mixup()
  elif config.mixup_alpha <= 0:
    image, label = do_cutmix()
  else:
    image = _float(image)
    use_cutmix = jax.random.uniform(r_switch) < config.switch_prob
    image, label = jax.lax.cond(use_cutmix, do_cutmix, do_mixup)
  return dict(batch, image=image, label=label)


def step_rng(train_step_rng: jax.Array) -> jax.Array:
  """The mixing key of a train step, given the step's key."""
  return jax.random.fold_in(train_step_rng, _MIX_SALT)
