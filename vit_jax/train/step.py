"""The train state, the loss, and the train and evaluation steps (pure functions).

`make_train_step` returns a function (state, batch) -> (state, metrics) meant to be
jitted with explicit shardings (see `loop.py`). With accum_steps > 1 the batch is split
into accum_steps micro-batches (example i goes to micro-batch i % accum_steps, which
keeps every micro-batch spread evenly over the devices), gradients are averaged, and
the update equals that of one step on the whole batch.

Models with state besides their parameters (BatchNorm's running statistics in the
'batch_stats' collection) keep it in `TrainState.model_state`; it is updated by every
training forward pass and used, not updated, in evaluation. Under jit the batch is one
global array sharded over the devices, so a BatchNorm mean over the batch axis is the
mean over all devices' examples (XLA inserts the all-reduce): statistics are synchronised
across devices without any axis names. With accum_steps > 1 each micro-batch updates the
running statistics in turn, as a sequence of smaller batches would.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vit_jax import sharding as sharding_lib
from vit_jax.train import batch_mix
from vit_jax.train import optimizer as optimizer_lib

LOSSES = ('softmax_xent', 'sigmoid_xent')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  model_state: Any = flax.struct.field(default_factory=dict)  # e.g. {'batch_stats': ...}

  def variables(self) -> dict:
    """The Flax variables of the model: {'params': ..., **model_state}."""
    return {'params': self.params, **self.model_state}


def loss_fn_for(name: str):
  if name == 'softmax_xent':
    return lambda logits, labels: optax.softmax_cross_entropy(logits, labels)
  if name == 'sigmoid_xent':
    return lambda logits, labels: optax.sigmoid_binary_cross_entropy(logits, labels).sum(-1)
  raise ValueError(f'config.loss={name!r} is not one of {LOSSES}')


def _microbatches(x, accum_steps: int):
  """(B, ...) -> (accum_steps, B / accum_steps, ...), micro-batch i = x[i::accum_steps]."""
  b = x.shape[0]
  x = x.reshape((b // accum_steps, accum_steps) + x.shape[1:])
  x = jnp.swapaxes(x, 0, 1)
  spec = jax.sharding.PartitionSpec(None, sharding_lib.BATCH_AXES)
  return _constrain(x, spec)


def _constrain(x, spec):
  try:
    return jax.lax.with_sharding_constraint(x, spec)
  except (RuntimeError, ValueError):  # no mesh in context (e.g. plain jit on one device)
    return x


def make_train_step(module, optimizer: optax.GradientTransformation, *, loss: str,
                    accum_steps: int = 1, skip_nonfinite: bool = False,
                    trainable: str | None = None, freeze: str | None = None,
                    mix: batch_mix.MixConfig | None = None):
  """(state, batch) -> (new state, metrics); batch has 'image' and 'label' (soft).

  trainable / freeze: config's regexes; the logged grad_norm is then the norm of the
  trained gradients only (the one that is clipped).
  mix: mixup / cutmix of the whole batch before the forward pass (`batch_mix.py`).
  """
  loss_of = loss_fn_for(loss)

  def compute_loss(params, model_state, images, labels, rng):
    variables = {'params': params, **model_state}
    with nn.logical_axis_rules(sharding_lib.LOGICAL_RULES):
      if model_state:
        logits, new_model_state = module.apply(variables, images, train=True,
                                               rngs={'dropout': rng},
                                               mutable=list(model_state))
      else:
        logits = module.apply(variables, images, train=True, rngs={'dropout': rng})
        new_model_state = model_state
    return jnp.mean(loss_of(logits, labels)), new_model_state

  grad_fn = jax.value_and_grad(compute_loss, has_aux=True)

  def train_step(state: TrainState, batch):
    step_rng = jax.random.fold_in(state.rng, state.step)
    if mix is not None and mix.enabled:
      batch = batch_mix.mix(batch, batch_mix.step_rng(step_rng), mix)
    images, labels = batch['image'], batch['label']
    if accum_steps == 1:
      (loss_value, model_state), grads = grad_fn(state.params, state.model_state, images,
                                                 labels, step_rng)
    else:
      mb_images = _microbatches(images, accum_steps)
      mb_labels = _microbatches(labels, accum_steps)

      def one(carry, i):
        loss_sum, grad_sum, model_state = carry
        (l, model_state), g = grad_fn(state.params, model_state, mb_images[i], mb_labels[i],
                                      jax.random.fold_in(step_rng, i))
        return (loss_sum + l, jax.tree.map(jnp.add, grad_sum, g), model_state), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (loss_sum, grad_sum, model_state), _ = jax.lax.scan(
          one, (0.0, zeros, state.model_state), jnp.arange(accum_steps))
      loss_value = loss_sum / accum_steps
      grads = jax.tree.map(lambda g: g / accum_steps, grad_sum)

    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(optimizer_lib.trained_gradients(grads, trainable, freeze))
    finite = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
      new_params = jax.tree.map(keep, new_params, state.params)
      # The optimizer's step counts (its integer leaves) go on: the learning-rate schedule
      # follows the step, as logged (it fell a step behind at each skip, never reaching
      # its end). The moments and parameters stay as they were.
      new_opt_state = jax.tree.map(
          lambda new, old: new if jnp.issubdtype(new.dtype, jnp.integer) else keep(new, old),
          new_opt_state, state.opt_state)
      model_state = jax.tree.map(keep, model_state, state.model_state)
    new_state = state.replace(step=state.step + 1, params=new_params,
                              opt_state=new_opt_state, model_state=model_state)
    metrics = {'loss': loss_value, 'grad_norm': grad_norm,
               # Of the new parameters: a norm of the old ones would make XLA copy every
               # parameter before updating it in place (2% of a ViT-B/16 step on a CPU).
               'param_norm': optax.tree.norm(new_params),
               'finite': finite.astype(jnp.int32)}
    return new_state, metrics

  return train_step


def make_eval_step(module, *, loss: str):
  """(variables, batch) -> sums over real examples: loss, top-1 and top-5 correct, count.

  variables: {'params': ..., **model_state} (`TrainState.variables()`).
  """
  loss_of = loss_fn_for(loss)

  def eval_step(variables, batch):
    with nn.logical_axis_rules(sharding_lib.LOGICAL_RULES):
      logits = module.apply(variables, batch['image'], train=False)
    labels = batch['label']
    mask = batch['_mask'].astype(jnp.float32)
    # A prediction is correct if it is a label with the highest target weight: the class
    # of a (smoothed) one-hot label, or any positive of a multi-hot label. An example
    # without a label (an empty multi-hot list, smoothed or not: its largest weight is
    # below 0.5) has none: it counts, never as a hit. (Every class positive: all hit.)
    top = jnp.max(labels, axis=-1, keepdims=True)
    positive = (labels >= top) & ((labels > jnp.min(labels, axis=-1, keepdims=True))
                                  | (top >= 0.5))
    topk = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    hits = jnp.take_along_axis(positive, topk, axis=-1)
    top1 = hits[:, 0].astype(jnp.float32)
    top5 = jnp.any(hits, axis=-1).astype(jnp.float32)
    return {'loss_sum': jnp.sum(loss_of(logits, labels) * mask),
            'top1_sum': jnp.sum(top1 * mask), 'top5_sum': jnp.sum(top5 * mask),
            'count': jnp.sum(mask)}

  return eval_step
