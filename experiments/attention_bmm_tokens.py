"""GFLOP/s of the attention's two batched matmuls at several token counts, both layouts.

    python experiments/attention_bmm_tokens.py

Batch 8, 12 heads, depth 64 (ViT-B), float32, best of 5 after a warm-up; BENCHMARKS.md
("Padding the tokens does not pay") has the figures of the AVX2-only host.
"""

import time

import jax
import jax.numpy as jnp


def best_seconds(fn, *args, repeats=5):
  fn(*args).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    fn(*args).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return best


def main(batch=8, heads=12, depth=64):
  # einsum spec and the operands' shapes, 0 standing for the token count.
  products = {
      'q k^T, heads-major': ('bhqd,bhkd->bhqk', (batch, heads, 0, depth),
                             (batch, heads, 0, depth)),
      'q k^T, tokens-major': ('bqhd,bkhd->bhqk', (batch, 0, heads, depth),
                              (batch, 0, heads, depth)),
      'p v, heads-major': ('bhqk,bhkd->bhqd', (batch, heads, 0, 0), (batch, heads, 0, depth)),
      'p v, tokens-major': ('bhqk,bkhd->bqhd', (batch, heads, 0, 0), (batch, 0, heads, depth)),
  }
  for tokens in (197, 200, 208, 224, 256):
    row = []
    for name, (spec, a_shape, b_shape) in products.items():
      a = jnp.ones([tokens if d == 0 else d for d in a_shape], jnp.float32)
      b = jnp.ones([tokens if d == 0 else d for d in b_shape], jnp.float32)
      fn = jax.jit(lambda x, y, spec=spec: jnp.einsum(spec, x, y))
      flops = 2 * batch * heads * tokens * tokens * depth
      row.append(f'{name} {flops / best_seconds(fn, a, b) / 1e9:.1f}')
    print(f'{tokens} tokens: ' + ', '.join(row), flush=True)


if __name__ == '__main__':
  main()
