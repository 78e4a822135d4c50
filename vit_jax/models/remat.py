"""Rematerialisation policies of the transformer blocks (ViT and Swin).

`remat_policy='auto'` (the default) is 'dots_no_batch' on CPU and None elsewhere. On CPU,
keeping only the weight matmuls' outputs and recomputing the rest in the backward pass
(GELU, LayerNorm, softmax and the attention products) moves less memory than keeping
everything: ViT-B/16's float32 train step at batch 8 on a 2-core EPYC takes 2.61 s
against 3.75 s without remat (BENCHMARKS.md). Accelerators keep everything.

Under mixed precision (a low-precision compute dtype), 'dots_no_batch' also keeps the
heads-major attention's softmax output (float32, one (batch x heads, tokens, tokens)
array per block), instead of recomputing the logits matmul and the softmax: ViT-B/16's
bf16 step at batch 8 on a 2-core Xeon took 0.951x to 0.980x the time (3 runs; float32 1.017x,
so float32 keeps recomputing them). The values are the same either way.
"""

import jax
import jax.numpy as jnp

from vit_jax.models import attention
from vit_jax.models import dense_matmul

POLICIES = (None, 'auto', 'full', 'dots', 'dots_no_batch')


def resolve(name: str | None) -> str | None:
  """'auto' is 'dots_no_batch' on CPU and None elsewhere; other names stay as they are."""
  if name not in POLICIES:
    raise ValueError(f'remat_policy={name!r} is not one of {POLICIES}')
  if name == 'auto':
    return 'dots_no_batch' if jax.default_backend() == 'cpu' else None
  return name


def policy(name: str | None, dtype=jnp.float32):
  """jax.checkpoint policy of a block: what the backward pass keeps from the forward.

  None: keep everything (no rematerialisation). 'full': keep only the block inputs and
  recompute the block (least memory). 'dots': keep matmul outputs, recompute the
  elementwise ops. 'dots_no_batch': keep the weight matmuls' outputs only, and with a
  low-precision compute `dtype` the attention probabilities too (module doc). 'auto':
  see `resolve`.
  """
  name = resolve(name)
  policies = jax.checkpoint_policies
  # The Dense matmuls run inside a custom VJP (vit_jax/models/dense_matmul.py), where a
  # policy sees no dot_general: they are kept by their name instead.
  weights = policies.save_only_these_names(dense_matmul.WEIGHT_MATMUL)
  no_batch = weights
  if jnp.dtype(dtype) != jnp.float32:
    no_batch = policies.save_only_these_names(dense_matmul.WEIGHT_MATMUL,
                                              attention.ATTENTION_PROBS)
  return {
      'full': policies.nothing_saveable,
      'dots': policies.save_from_both_policies(policies.checkpoint_dots, weights),
      'dots_no_batch': policies.save_from_both_policies(
          policies.dots_with_no_batch_dims_saveable, no_batch),
  }.get(name)
