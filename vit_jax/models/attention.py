"""Multi-head self-attention with the parameter names of Flax's linen module.

The parameters are `query`, `key`, `value` (kernels of shape (D, heads, D/heads)) and
`out` (kernel (heads, D/heads, D)), exactly as `flax.linen.MultiHeadDotProductAttention`
stores them, so published ViT checkpoints load unchanged. The computation goes through
`jax.nn.dot_product_attention`, which lets XLA (or cuDNN on GPU) pick a fused kernel.
Two cases need the attention matrix itself and take an explicit path instead: returning
the weights for visualisation, and attention dropout while training.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ATTENTION_IMPLEMENTATIONS = (None, 'xla', 'cudnn')


def attention_weights(query: jax.Array, key: jax.Array) -> jax.Array:
  """Softmax attention matrix (batch, heads, q_len, k_len), computed in float32."""
  depth = query.shape[-1]
  logits = jnp.einsum('bqhd,bkhd->bhqk', query, key,
                      preferred_element_type=jnp.float32)
  return jax.nn.softmax(logits / jnp.sqrt(depth).astype(jnp.float32), axis=-1)


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
    dense = lambda name: nn.DenseGeneral(  # noqa: E731
        features=(self.num_heads, head_dim), axis=-1, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=nn.initializers.xavier_uniform(),
        name=name)
    query = dense('query')(inputs_q)
    key = dense('key')(inputs_kv)
    value = dense('value')(inputs_kv)

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
        kernel_init=nn.initializers.xavier_uniform(), name='out')(out)
    if return_weights:
      return out, weights
    return out
