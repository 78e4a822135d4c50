"""Learning-rate schedules and the optax optimizer of a training config.

config.optimizer: name ('adam' or 'sgd'), b1, b2 (Adam), momentum (SGD), weight_decay
(decoupled, applied to kernels only, and multiplied by the learning rate as in AdamW and
AugReg: each step subtracts weight_decay x lr(t) x kernel, so the ViT recipe's 0.03 at lr
1e-3 is big_vision's absolute decay of 3e-5), grad_clip_norm (global norm; 0 disables),
mu_dtype ('bfloat16' to store Adam's first moment / SGD momentum in bf16).
config.trainable / config.freeze: regexes on parameter paths ('Transformer/encoderblock_0/
MlpBlock_3/Dense_0/kernel'); only matching / all but matching parameters are trained (a
linear probe is trainable='^head/'). Frozen parameters get no update, no weight decay, no
optimizer state, and do not count in the clipped global norm. With the blocks stacked
(scan_layers=True: 'Transformer/encoderblock/...' with a leading layer axis) a regex sees
the stacked path and each block's own name ('Transformer/encoderblock_3/...'), so
freeze='^Transformer/encoderblock_[0-5]/' freezes the first six layers of each stacked
parameter (their gradients and updates are zeroed; their optimizer moments stay zero)
and freeze='^Transformer/encoderblock/' all of them.
config.schedule: base_lr, warmup_steps, decay ('linear', 'cosine', 'rsqrt' or
'constant'), end_lr_fraction (linear/cosine end value as a fraction of base_lr).
base_lr_batch > 0 makes base_lr the rate of that global batch, scaled linearly to
config.batch_size (a recipe's `--config.batch_size=256` then scales its rate too);
warmup_epochs > 0 gives the warmup in epochs of the training split, instead of
warmup_steps (it then stays the same share of training at any batch size).
"""

import re

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ('linear', 'cosine', 'rsqrt', 'constant')
OPTIMIZERS = ('adam', 'sgd')


class ScheduleError(ValueError):
  """A schedule that cannot work (e.g. a warmup longer than the run); names the field."""


def check_schedule(schedule_config) -> None:
  """ValueError naming a schedule field that cannot work."""
  s = schedule_config
  batch, epochs = s.get('base_lr_batch', 0), s.get('warmup_epochs', 0.0)
  if not isinstance(batch, int) or isinstance(batch, bool) or batch < 0:
    raise ScheduleError(f'config.schedule.base_lr_batch={batch!r} must be 0 (base_lr is the '
                        'rate) or the positive global batch size base_lr is for')
  if not isinstance(epochs, (int, float)) or epochs < 0:
    raise ScheduleError(f'config.schedule.warmup_epochs={epochs!r} must be 0 (warmup_steps '
                        'counts) or a positive number of epochs')
  if epochs and s.get('warmup_steps', 0):
    raise ScheduleError(f"config.schedule.warmup_epochs={epochs} and warmup_steps="
                        f"{s.get('warmup_steps')} are both set: give one "
                        '(--config.schedule.warmup_epochs=0 to count warmup_steps, or '
                        '--config.schedule.warmup_steps=0)')


def resolved_schedule(schedule_config, *, batch_size: int | None = None,
                      steps_per_epoch: float | None = None) -> dict:
  """{'base_lr', 'warmup_steps', ...}: base_lr scaled to batch_size where base_lr_batch
  is set, warmup_epochs turned into steps."""
  check_schedule(schedule_config)
  s = dict(schedule_config)
  base, ref = float(s['base_lr']), s.get('base_lr_batch', 0)
  if ref:
    if batch_size is None:
      raise ScheduleError('config.schedule.base_lr_batch is set: the batch size is needed')
    s['base_lr'] = base * batch_size / ref
  epochs = s.get('warmup_epochs', 0.0)
  if epochs:
    if steps_per_epoch is None:
      raise ScheduleError('config.schedule.warmup_epochs is set: the steps per epoch are '
                          'needed (use warmup_steps where there is no dataset)')
    s['warmup_steps'] = int(round(epochs * steps_per_epoch))
  return s


def learning_rate_schedule(schedule_config, total_steps: int, *,
                           batch_size: int | None = None,
                           steps_per_epoch: float | None = None) -> optax.Schedule:
  """Linear warmup from 0 to base_lr, then the configured decay until total_steps.

  batch_size / steps_per_epoch: needed where base_lr_batch / warmup_epochs are set.
  """
  resolved = resolved_schedule(schedule_config, batch_size=batch_size,
                               steps_per_epoch=steps_per_epoch)
  base = float(resolved['base_lr'])
  warmup = int(resolved.get('warmup_steps', 0))
  decay = resolved.get('decay', 'cosine')
  end = base * float(resolved.get('end_lr_fraction', 0.0))
  if decay not in SCHEDULES:
    raise ScheduleError(f'config.schedule.decay={decay!r} is not one of {SCHEDULES}')
  if warmup >= total_steps and total_steps > 0:
    epochs = resolved.get('warmup_epochs')
    given = (f'warmup_epochs={epochs} ({warmup} steps)' if epochs
             else f'warmup_steps={warmup}')
    # warmup_epochs, where set, overrides warmup_steps: the fix must name the field in use.
    fix = (f'--config.schedule.warmup_epochs={epochs * total_steps / 10 / warmup:.3g}'
           if epochs else f'--config.schedule.warmup_steps={total_steps // 10}')
    raise ScheduleError(f'config.schedule.{given} is not below the '
                        f'{total_steps} total steps of the run (config.total_steps, or '
                        'config.num_epochs times the steps per epoch): lower it, e.g. '
                        f'{fix}, or train longer')
  rest = max(total_steps - warmup, 1)
  if decay == 'linear':
    after = optax.linear_schedule(base, end, rest)
  elif decay == 'cosine':
    after = optax.cosine_decay_schedule(base, rest, alpha=end / base if base else 0.0)
  elif decay == 'rsqrt':
    timescale = max(warmup, 1)
    after = lambda step: base * jnp.sqrt(  # noqa: E731
        timescale / jnp.maximum(jnp.asarray(step, jnp.float32) + timescale, 1.0))
  else:
    after = optax.constant_schedule(base)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), after], [warmup])


def decay_mask(params):
  """True for kernels (matrices and convolutions, the patch embedding `embedding/kernel` and
  the head included): no decay on biases, norms, `pos_embedding` or `cls`."""
  def is_kernel(path, leaf):
    return getattr(path[-1], 'key', None) == 'kernel' and leaf.ndim >= 2
  return jax.tree_util.tree_map_with_path(is_kernel, params)


class FreezeError(ValueError):
  """config.trainable / config.freeze that select nothing or everything."""


def _path_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


_STACKED_BLOCKS = 'encoderblock'  # the path segment of the blocks stacked by nn.scan


def _layer_names(path, leaf) -> list[tuple[str, ...]]:
  """The names the regexes see for a parameter, one tuple per layer: its path, and for a
  leaf of the stacked blocks also the layer's name in the unstacked layout
  (encoderblock_{i}); a regex matches a layer when it matches any of its names."""
  name = _path_name(path)
  parts = name.split('/')
  if _STACKED_BLOCKS not in parts[:-1]:
    return [(name,)]
  i = parts.index(_STACKED_BLOCKS)
  return [(name, '/'.join(parts[:i] + [f'{_STACKED_BLOCKS}_{layer}'] + parts[i + 1:]))
          for layer in range(leaf.shape[0])]


def _matches(pattern: str, names: tuple[str, ...]) -> bool:
  return any(re.search(pattern, n) for n in names)


def _trained(names: tuple[str, ...], trainable: str | None, freeze: str | None) -> bool:
  return bool((not trainable or _matches(trainable, names)) and not (
      freeze and _matches(freeze, names)))


def trainable_labels(params, trainable: str | None = None, freeze: str | None = None):
  """'train' or 'frozen' per parameter, from the two regexes (re.search on the path;
  a stacked leaf trains when any of its layers does, see `freeze_stacked_layers`)."""
  layers = [names for p, leaf in jax.tree_util.tree_leaves_with_path(params)
            for names in _layer_names(p, leaf)]
  for field, pattern in (('trainable', trainable), ('freeze', freeze)):
    if pattern and not any(_matches(pattern, names) for names in layers):
      shown = [names[-1] for names in layers]
      tops = sorted({name.split('/')[0] for name in shown})  # e.g. a ResNet's head is fc
      raise FreezeError(f'config.{field}={pattern!r} matches no parameter; parameter paths '
                        f'look like {shown[:3]} ... {shown[-2:]}, under the top-level '
                        f"modules {', '.join(tops[:30])}" + (' ...' if len(tops) > 30 else ''))

  def label(path, leaf):
    train = any(_trained(n, trainable, freeze) for n in _layer_names(path, leaf))
    return 'train' if train else 'frozen'
  labels = jax.tree_util.tree_map_with_path(label, params)
  if 'train' not in jax.tree.leaves(labels):
    raise FreezeError(f'config.trainable={trainable!r} and config.freeze={freeze!r} leave no '
                      'parameter to train')
  return labels


def freeze_stacked_layers(tx: optax.GradientTransformation, trainable: str | None,
                          freeze: str | None) -> optax.GradientTransformation:
  """`tx` with the frozen layers of the stacked blocks' leaves zeroed where their other
  layers train (a mask along the leading layer axis; every other leaf passes unchanged).
  The gradients are masked before `tx` (frozen layers stay out of the clipped norm and
  the moments) and its updates after (weight decay). The state is `tx`'s own."""
  def mask(tree):
    def one(path, u):
      trained = [_trained(n, trainable, freeze) for n in _layer_names(path, u)]
      if all(trained):
        return u
      return u * jnp.asarray(trained, u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))
    return jax.tree_util.tree_map_with_path(one, tree)

  def update(updates, state, params=None):
    updates, state = tx.update(mask(updates), state, params)
    return mask(updates), state
  return optax.GradientTransformation(tx.init, update)


def trained_gradients(grads, trainable: str | None, freeze: str | None):
  """The gradient entries that train, as the clipped norm sees them: the leaves of frozen
  parameters left out, the frozen layers of a stacked leaf zeroed. Leaving frozen leaves
  out (rather than multiplying them by zero) lets XLA drop their backward pass where
  nothing else reads them: a linear probe computes no gradient of the frozen body."""
  if not (trainable or freeze):
    return grads
  out = []
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    trained = [_trained(n, trainable, freeze) for n in _layer_names(path, g)]
    if all(trained):
      out.append(g)
    elif any(trained):
      out.append(g * jnp.asarray(trained, g.dtype).reshape((-1,) + (1,) * (g.ndim - 1)))
  return out


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm as one multiply of each gradient by a scalar.

  optax divides every element by the norm; XLA then writes a clipped copy of each gradient
  before the optimizer reads it. A scalar multiply is cheap enough for XLA to fold into the
  optimizer's own passes over the gradients. Same state (empty), so checkpoints match.
  """
  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def create_optimizer(config, total_steps: int, steps_per_epoch: float | None = None
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, learning-rate schedule) for config.optimizer and config.schedule
  (steps_per_epoch: for config.schedule.warmup_epochs)."""
  opt = config.optimizer
  schedule = learning_rate_schedule(config.schedule, total_steps,
                                    batch_size=config.batch_size,
                                    steps_per_epoch=steps_per_epoch)
  mu_dtype = jnp.bfloat16 if opt.get('mu_dtype', 'float32') == 'bfloat16' else None
  wd = float(opt.get('weight_decay', 0.0))
  parts = []
  if opt.get('grad_clip_norm', 1.0):
    parts.append(clip_by_global_norm(float(opt.grad_clip_norm)))
  if opt.name == 'adam':
    parts.append(optax.scale_by_adam(b1=opt.get('b1', 0.9), b2=opt.get('b2', 0.999),
                                     eps=opt.get('eps', 1e-8), mu_dtype=mu_dtype))
  elif opt.name == 'sgd':
    parts.append(optax.trace(decay=opt.get('momentum', 0.9), accumulator_dtype=mu_dtype))
  else:
    raise ValueError(f'config.optimizer.name={opt.name!r} is not one of {OPTIMIZERS}')
  if wd:
    parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
  parts.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*parts)
  trainable, freeze = config.get('trainable'), config.get('freeze')
  if trainable or freeze:
    tx = optax.multi_transform(
        {'train': freeze_stacked_layers(tx, trainable, freeze), 'frozen': optax.set_to_zero()},
        lambda params: trainable_labels(params, trainable, freeze))
  return tx, schedule
