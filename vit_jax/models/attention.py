"""Multi-head self-attention with the parameter names of Flax's linen module.

The parameters are `query`, `key`, `value` (kernels of shape (D, heads, D/heads)) and
`out` (kernel (heads, D/heads, D)), exactly as `flax.linen.MultiHeadDotProductAttention`
stores them, so published ViT checkpoints load unchanged. The attention itself has
two implementations:

- `jax.nn.dot_product_attention` ('xla', 'cudnn'), which lets XLA or cuDNN pick a fused
  kernel; the default (None) on GPU and TPU;
- 'heads_major': the heads moved in front of the tokens, so that every batched matmul of
  the forward and backward pass contracts the last axis of row-major operands; the
  default on CPU. XLA:CPU's fast matmul library only takes that form, and runs a bf16
  matmul in float32 when an operand is a transposed view, so the backward pass (a custom
  VJP) materialises the two transposes it needs. One ViT-B/16 layer's attention, fwd+bwd
  at batch 8 on a 2-core EPYC: 52 ms with `jax.nn.dot_product_attention`, 36 ms with
  heads-major einsums left to autodiff, 33 ms with the custom VJP in float32 and 28 ms in
  bf16 (39 ms left to autodiff). Returning the attention weights for visualisation, and
  attention dropout while training, take the einsum form, which exposes the weights.
"""

from typing import Any

import functools

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from vit_jax.models import manual_axes
from vit_jax.models import dense_matmul

ATTENTION_IMPLEMENTATIONS = (None, 'xla', 'cudnn', 'heads_major')
# checkpoint_name of the heads-major attention's softmax output (for remat policies).
ATTENTION_PROBS = 'attention_probs'


def resolve_implementation(implementation: str | None) -> str | None:
  """None picks 'heads_major' on CPU and leaves the choice to jax elsewhere."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f'attention implementation {implementation!r} is not one of '
                     f'{ATTENTION_IMPLEMENTATIONS}')
  if implementation is None and jax.default_backend() == 'cpu':
    return 'heads_major'
  if implementation == 'cudnn' and jax.default_backend() != 'gpu':
    raise ValueError(  # (jax's own: a bare 'cuDNN is not detected.')
        f"attention_impl='cudnn' needs an NVIDIA GPU, and this process's backend is "
        f"{jax.default_backend()}: use attention_impl=None (the best for the backend) or "
        "'xla'")
  return implementation


def heads_major_attention(query, key, value, bias=None):
  """softmax(q k^T / sqrt(d) + bias) v over (batch, tokens, heads, depth) inputs.

  The logits, softmax and its gradient are float32; the four batched matmuls take the
  inputs' dtype (bf16 under mixed precision) and accumulate in float32. `bias` (float32,
  differentiable) has shape (groups, q_len, k_len): with the (batch, head) pairs in
  row-major order, pair i gets bias[i % groups]; (heads, q_len, k_len) is a per-head
  bias, and Swin passes its windows folded into the batch with (windows * heads) groups.
  """
  b, q_len, heads, depth = query.shape
  if bias is not None and (bias.ndim != 3 or (b * heads) % bias.shape[0]
                           or bias.shape[1:] != (q_len, key.shape[1])):
    raise ValueError(f'bias shape {bias.shape} is not (groups, {q_len}, {key.shape[1]}) '
                     f'with groups dividing batch x heads = {b * heads}')
  q, k, v, bias = manual_axes.same_varying(  # inside shard_map: see manual_axes.py
      *(_heads_first(t) for t in (query, key, value)), bias)
  out = _attention_core(q, k, v, bias, heads)
  return jnp.swapaxes(out.reshape(b, heads, q_len, depth), 1, 2)


def heads_major_attention_with_weights(query, key, value, probs_fn=None):
  """heads_major_attention that also returns the weights (batch, heads, q_len, k_len).

  `probs_fn` (e.g. dropout) maps the weights to the probabilities that multiply the
  values. Left to autodiff.
  """
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (query, key, value))  # (b, h, t, d)
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits / np.sqrt(q.shape[-1]).astype(np.float32), axis=-1)
  probs = weights if probs_fn is None else probs_fn(weights)
  out = jnp.einsum('bhqk,bhkd->bhqd', probs.astype(v.dtype), v)
  return jnp.swapaxes(out, 1, 2), weights


# Batched matmuls over (batch*heads, rows, depth) operands with float32 accumulation.
_ABT = (((2,), (2,)), ((0,), (0,)))  # a . b^T
_AB = (((2,), (1,)), ((0,), (0,)))   # a . b


def _bmm(a, b, dimension_numbers):
  return jax.lax.dot_general(a, b, dimension_numbers, preferred_element_type=jnp.float32)


def _heads_first(x):
  """(b, t, h, d) -> (b*h, t, d). The reshape after the transpose makes XLA copy it into
  row-major order instead of handing the matmul a transposed view."""
  b, t, h, d = x.shape
  return jnp.swapaxes(x, 1, 2).reshape(b * h, t, d)


def _transposed(x, heads):
  """(B, m, n) -> (B, n, m), materialised for the same reason (B split into (B/h, h))."""
  batch, m, n = x.shape
  return jnp.swapaxes(x.reshape(batch // heads, heads, m, n), 2, 3).reshape(batch, n, m)


def _add_bias(logits, bias):
  if bias is None:
    return logits
  batch, m, n = logits.shape
  groups = bias.shape[0]
  return (logits.reshape(batch // groups, groups, m, n) + bias).reshape(batch, m, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_core(q, k, v, bias, heads):
  return _attention_core_fwd(q, k, v, bias, heads)[0]


def _attention_core_fwd(q, k, v, bias, heads):
  del heads
  scale = np.float32(q.shape[-1] ** -0.5)
  probs = checkpoint_name(jax.nn.softmax(_add_bias(_bmm(q, k, _ABT) * scale, bias), axis=-1),
                          ATTENTION_PROBS)
  return _bmm(probs.astype(v.dtype), v, _AB).astype(v.dtype), (q, k, v, bias, probs)


def _attention_core_bwd(heads, residuals, d_out):
  q, k, v, bias, probs = residuals
  scale = np.float32(q.shape[-1] ** -0.5)
  d_out = d_out.astype(v.dtype)
  d_probs = _bmm(d_out, v, _ABT)
  d_v = _bmm(_transposed(probs.astype(v.dtype), heads), d_out, _AB)
  d_logits = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
  d_bias = None
  if bias is not None:
    d_bias = jnp.sum(d_logits.reshape(-1, *bias.shape), axis=0)
    d_bias = d_bias.astype(bias.dtype)
  d_logits = (d_logits * scale).astype(q.dtype)
  d_q = _bmm(d_logits, k, _AB)
  d_k = _bmm(_transposed(d_logits, heads), q, _AB)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_bias


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention over a (batch, tokens, width) sequence."""
  num_heads: int
  dropout_rate: float = 0.0
  implementation: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  custom_vjp: bool = True  # False: plain autodiff (no heads_major, no custom Dense rule)

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, *, deterministic: bool = True,
               return_weights: bool = False, dropout_rng=None):
    """Returns the attended values, and the attention weights if asked for.

    inputs_kv defaults to inputs_q (self-attention); the MAP head passes a learned
    probe as query and the tokens as keys and values. The attention dropout takes
    `dropout_rng`, or a key drawn from the 'dropout' stream.
    """
    if inputs_kv is None:
      inputs_kv = inputs_q
    width = inputs_q.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads={self.num_heads}')
    implementation = resolve_implementation(self.implementation)
    if implementation == 'heads_major' and not self.custom_vjp:
      implementation = 'xla'  # heads_major's backward pass is a custom_vjp
    head_dim = width // self.num_heads
    dot_general = dense_matmul.dot_general_fn(self.dtype, custom_vjp=self.custom_vjp)
    dense = lambda name: nn.DenseGeneral(  # noqa: E731
        features=(self.num_heads, head_dim), axis=-1, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=nn.initializers.xavier_uniform(),
        dot_general=dot_general, name=name)
    # Projections accumulate in float32 under mixed precision; the attention products
    # take the compute dtype again (their logits and softmax are float32 inside).
    query = dense('query')(inputs_q).astype(self.dtype)
    key = dense('key')(inputs_kv).astype(self.dtype)
    value = dense('value')(inputs_kv).astype(self.dtype)

    use_dropout = self.dropout_rate > 0.0 and not deterministic
    weights = None
    if return_weights or use_dropout:
      dropout = None
      if use_dropout:
        dropout = lambda w: nn.Dropout(rate=self.dropout_rate)(  # noqa: E731
            w, deterministic=False, rng=dropout_rng)
      out, weights = heads_major_attention_with_weights(query, key, value, dropout)
    elif implementation == 'heads_major':
      out = heads_major_attention(query, key, value)
    else:
      out = jax.nn.dot_product_attention(query, key, value, implementation=implementation)
    out = nn.DenseGeneral(
        features=width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), dot_general=dot_general,
        name='out')(out)
    if return_weights:
      return out, weights
    return out
