"""Multi-head self-attention with the parameter names of Flax's linen module.

The parameters are `query`, `key`, `value` (kernels of shape (D, heads, D/heads)) and
`out` (kernel (heads, D/heads, D)), exactly as `flax.linen.MultiHeadDotProductAttention`
stores them, so published ViT checkpoints load unchanged. The computation goes through
`jax.nn.dot_product_attention`, which lets XLA (or cuDNN on GPU) pick a fused kernel.
Two cases need the attention matrix itself and take an explicit path instead: returning
the weights for visualisation, and attention dropout while training.
"""

from typing import Any

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ATTENTION_IMPLEMENTATIONS = (None, 'xla', 'cudnn')


def attention_weights(query: jax.Array, key: jax.Array) -> jax.Array:
  """Softmax attention matrix (batch, heads, q_len, k_len), computed in float32."""
  depth = query.shape[-1]
  logits = jnp.einsum('bqhd,bkhd->bhqk', query, key,
                      preferred_element_type=jnp.float32)
  return jax.nn.softmax(logits / jnp.sqrt(depth).astype(jnp.float32), axis=-1)


def matmul_fn(dtype):
  """The dot_general of every Dense layer for compute `dtype`.

  Mixed precision: with bfloat16 (or float16) compute, matmul inputs are in that dtype
  and products accumulate and come out in float32 (the residual stream, LayerNorm inputs
  and logits stay float32). On CPUs this is about 2x the speed of a float32 matmul, while
  bf16 in / bf16 out is no faster than float32; on GPUs and TPUs it is what the tensor
  cores do anyway. None (the default lax.dot_general) for float32.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return None
  return _mixed_precision_dot_general


def _is_tensordot(x, w, dimension_numbers) -> bool:
  """True for x's trailing axes contracted with w's leading axes, no batch axes (Dense)."""
  (xc, wc), (xb, wb) = dimension_numbers
  k = len(xc)
  return (not xb and not wb and tuple(xc) == tuple(range(x.ndim - k, x.ndim))
          and tuple(wc) == tuple(range(k)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _tensordot_f32(x, w, dimension_numbers):
  return jax.lax.dot_general(x, w, dimension_numbers, preferred_element_type=jnp.float32)


def _tensordot_f32_fwd(x, w, dimension_numbers):
  return _tensordot_f32(x, w, dimension_numbers), (x, w)


def _tensordot_f32_bwd(dimension_numbers, residuals, g):
  """Both gradient matmuls with low-precision operands and float32 accumulation.

  Left to autodiff, the float32 cotangent g meets the bf16 operand and XLA runs the
  backward matmuls in float32 (two thirds of the training FLOPs at float32 speed). Here g
  is rounded to the operands' dtype first, as PyTorch autocast does.
  """
  x, w = residuals
  k = len(dimension_numbers[0][0])
  x_free, x_c = x.shape[:x.ndim - k], x.shape[x.ndim - k:]
  m, kk = int(np.prod(x_free)), int(np.prod(x_c))
  # As 2-D matmuls (XLA's CPU dot supports bf16 x bf16 -> f32 in that form):
  # dx = g . w^T, dw = x^T . g.
  x2, w2 = x.reshape(m, kk), w.reshape(kk, -1)
  g2 = g.astype(x.dtype).reshape(m, -1)
  dx = jax.lax.dot_general(g2, w2, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  dw = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return dx.reshape(x.shape).astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


_tensordot_f32.defvjp(_tensordot_f32_fwd, _tensordot_f32_bwd)


def _mixed_precision_dot_general(x, w, dimension_numbers, precision=None,
                                 preferred_element_type=None, **kwargs):
  """Low-precision operands, float32 products, and (for Dense layers) a backward pass
  whose matmuls also take low-precision operands."""
  del preferred_element_type  # always float32
  if precision is None and not kwargs and x.dtype == w.dtype and _is_tensordot(
      x, w, dimension_numbers):
    return _tensordot_f32(x, w, dimension_numbers)
  return jax.lax.dot_general(x, w, dimension_numbers, precision=precision,
                             preferred_element_type=jnp.float32, **kwargs)


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention over a (batch, tokens, width) sequence."""
  num_heads: int
  dropout_rate: float = 0.0
  implementation: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, *, deterministic: bool = True,
               return_weights: bool = False):
    """Returns the attended values, and the attention weights if asked for.

    inputs_kv defaults to inputs_q (self-attention); the MAP head passes a learned
    probe as query and the tokens as keys and values.
    """
    if inputs_kv is None:
      inputs_kv = inputs_q
    width = inputs_q.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads={self.num_heads}')
    if self.implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f'attention implementation {self.implementation!r} is not one of '
                       f'{ATTENTION_IMPLEMENTATIONS}')
    head_dim = width // self.num_heads
    dot_general = matmul_fn(self.dtype)
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
      weights = attention_weights(query, key)
      probs = weights
      if use_dropout:
        probs = nn.Dropout(rate=self.dropout_rate)(probs, deterministic=False)
      out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(self.dtype), value)
    else:
      out = jax.nn.dot_product_attention(query, key, value,
                                         implementation=self.implementation)
    out = nn.DenseGeneral(
        features=width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), dot_general=dot_general,
        name='out')(out)
    if return_weights:
      return out, weights
    return out
