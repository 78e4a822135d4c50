"""The matmul of every Dense layer: mixed precision, and a backward pass XLA:CPU runs fast.

`dot_general_fn(dtype)` gives the `dot_general` that the ViT's Dense and DenseGeneral
layers use (query, key, value, out, the MLP, pre_logits and the head):

- **Mixed precision.** With bfloat16 (or float16) compute, the matmul operands are in that
  dtype and the products accumulate and come out in float32; the residual stream,
  LayerNorm inputs and logits stay float32. On this project's CPUs that is about 2x the
  speed of a float32 matmul, while bf16 in / bf16 out is no faster than float32; on GPUs
  and TPUs it is what the tensor cores do anyway. The backward pass rounds the float32
  cotangent to the operands' dtype first, as PyTorch autocast does, so that both gradient
  matmuls also take low-precision operands (left to autodiff, the float32 cotangent
  would make them float32 matmuls: two thirds of the training FLOPs at float32 speed).
- **The weight gradient on CPU.** x^T . g contracts the tokens, x's leading axes.
  XLA:CPU runs a bf16 matmul with a transposed operand in float32 (its operand upcaster
  keeps bf16 only for operands in row-major layout), through Eigen rather than its fast
  matmul library: ViT-B/16's bf16 weight gradients ran at float32 speed, 0.6 s of a 2.1 s
  step. Written as x transposed to (features, batch, tokens) contracted over its last two
  axes, the transpose is a real copy that XLA keeps, and the matmul runs in bf16 at 2.1x
  to 2.4x the speed (measured on ViT-B/16's shapes, BENCHMARKS.md). Where g has fewer
  features than x (the MLP's second layer), g is transposed instead, and the product
  back, into a buffer of its own (`_materialised`: 3.5% of the float32 step). In float32
  the custom form otherwise changes the step time by no more than the noise (2.70 s
  against 2.73 s).

The forward product is `lax.dot_general` either way; results equal autodiff's up to the
order of summation (tested in tests/models/test_dense_matmul.py).
"""

import functools

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from vit_jax.models import manual_axes

WEIGHT_MATMUL = 'weight_matmul'  # checkpoint_name of the Dense matmuls (for remat policies)


def dot_general_fn(dtype, backend: str | None = None, custom_vjp: bool = True):
  """The dot_general for Dense layers computing in `dtype` on `backend` (default: jax's).

  None (flax's plain `lax.dot_general`) for float32 off CPU. custom_vjp=False: no custom
  backward pass (plain autodiff, forward mode possible), float32 accumulation kept.
  """
  backend = backend or jax.default_backend()
  low_precision = jnp.dtype(dtype) != jnp.float32
  if not custom_vjp:
    return _float32_products if low_precision else None
  if not low_precision and backend != 'cpu':
    return None
  return functools.partial(_dense_dot_general, transpose_tokens=backend == 'cpu')


def _float32_products(x, w, dimension_numbers, precision=None, preferred_element_type=None,
                      **kwargs):
  """lax.dot_general accumulating in float32, left to autodiff."""
  del preferred_element_type
  return jax.lax.dot_general(x, w, dimension_numbers, precision=precision,
                             preferred_element_type=jnp.float32, **kwargs)


def _is_tensordot(x, w, dimension_numbers) -> bool:
  """True for x's trailing axes contracted with w's leading axes, no batch axes (Dense)."""
  (xc, wc), (xb, wb) = dimension_numbers
  k = len(xc)
  return (not xb and not wb and tuple(xc) == tuple(range(x.ndim - k, x.ndim))
          and tuple(wc) == tuple(range(k)))


def _dense_dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None,
                       *, transpose_tokens: bool, **kwargs):
  """Float32 products of x and w (low precision or float32 operands)."""
  del preferred_element_type  # always float32
  if precision is None and not kwargs and x.dtype == w.dtype and _is_tensordot(
      x, w, dimension_numbers):
    # Named, so that remat policies keep it like a weight matmul (a dot inside a custom
    # VJP is not a dot_general to jax.checkpoint's policies).
    x, w = manual_axes.same_varying(x, w)  # inside shard_map: see manual_axes.py
    return checkpoint_name(_tensordot(x, w, dimension_numbers, transpose_tokens),
                           WEIGHT_MATMUL)
  return jax.lax.dot_general(x, w, dimension_numbers, precision=precision,
                             preferred_element_type=jnp.float32, **kwargs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _tensordot(x, w, dimension_numbers, transpose_tokens):
  del transpose_tokens
  return jax.lax.dot_general(x, w, dimension_numbers, preferred_element_type=jnp.float32)


def _tensordot_fwd(x, w, dimension_numbers, transpose_tokens):
  return _tensordot(x, w, dimension_numbers, transpose_tokens), (x, w)


def _tensordot_bwd(dimension_numbers, transpose_tokens, residuals, g):
  """dx = g . w^T and dw = x^T . g, with operands in x's dtype, accumulated in float32."""
  x, w = residuals
  k = len(dimension_numbers[0][0])
  free = x.shape[:x.ndim - k]
  kk = int(np.prod(x.shape[x.ndim - k:]))
  n = w.size // kk
  g = g.astype(x.dtype)
  f32 = jnp.float32
  dx = jax.lax.dot_general(g.reshape(-1, n), w.reshape(kk, n), (((1,), (1,)), ((), ())),
                           preferred_element_type=f32)
  lead = free[0] if len(free) >= 2 else 1
  split = _smallest_factor(kk)
  if not transpose_tokens or lead == 1 or x.size // (lead * kk) == 1:
    dw = jax.lax.dot_general(x.reshape(-1, kk), g.reshape(-1, n), (((0,), (0,)), ((), ())),
                             preferred_element_type=f32)
  elif kk <= n or split is None:
    # (features, batch, rest): a transpose the reshape makes XLA materialise (module doc).
    x_t = jnp.transpose(x.reshape(lead, -1, kk), (2, 0, 1))
    dw = jax.lax.dot_general(x_t, g.reshape(lead, -1, n), (((1, 2), (0, 1)), ((), ())),
                             preferred_element_type=f32)
  else:
    # Fewer output features than input ones (the MLP's second layer): transpose g, the
    # smaller operand, and the product back; x is often recomputed elementwise work
    # (GELU) that XLA would otherwise recompute inside the transposed copy, 10x slower.
    # g is materialised first: with the blocks unrolled, XLA fused into this transposed
    # copy the elementwise gradients of every later block's residual stream (500
    # instructions), recomputing them per layer at up to 230 ms each.
    g_t = _materialised(lambda a: jnp.transpose(a.reshape(lead, -1, n), (2, 0, 1)), g)
    dw_t = jax.lax.dot_general(g_t, x.reshape(lead, -1, kk), (((1, 2), (0, 1)), ((), ())),
                               preferred_element_type=f32)  # (n, kk)
    # Transposed through a reshape: a plain .T becomes the matmul's output layout, which
    # XLA:CPU then runs in a kernel without bf16 support (an error at run time).
    dw = _materialised(
        lambda a: jnp.transpose(a.reshape(n, split, kk // split), (1, 2, 0)).reshape(kk, n),
        dw_t)
  return dx.reshape(x.shape).astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


def _materialised(fn, x):
  """fn(x), computed into a buffer of its own rather than fused into its consumer.

  Under `nn.scan` the consumer of a weight gradient is the write into the stacked
  gradient. XLA:CPU fuses a transpose into that write as a single-threaded strided loop:
  7 ms per layer for ViT-B/16's (3072, 768) MLP kernel, alone on the critical path, where
  the transpose on its own takes 1.5 ms. A conditional is a fusion boundary that XLA keeps;
  both branches are fn, so the predicate (a read of x, which XLA cannot fold) does not
  change the result.
  """
  return jax.lax.cond(jnp.isfinite(x.reshape(-1)[0]), fn, fn, x)


def _smallest_factor(k: int) -> int | None:
  """The smallest factor of k above 1 and below k, or None for a prime (or 1)."""
  for f in range(2, int(k ** 0.5) + 1):
    if k % f == 0:
      return f
  return None


_tensordot.defvjp(_tensordot_fwd, _tensordot_bwd)
