"""Run by test_sharding_and_accumulation: many independent steps with an all-gather on 2
CPU devices, summed by loop.sum_over_batches; prints the sum."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=2'
                           ' --xla_cpu_collective_call_terminate_timeout_seconds=20')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position

from vit_jax.train import loop  # pylint: disable=g-import-not-at-top,wrong-import-position

mesh = Mesh(np.array(jax.devices()), ('fsdp',))
sharded = NamedSharding(mesh, P('fsdp', None))
rng = np.random.default_rng(0)
w_host = rng.standard_normal((512, 512)).astype(np.float32) / 23
x_host = [rng.standard_normal((64, 512)).astype(np.float32) for _ in range(4)]
w = jax.device_put(w_host, sharded)
xs = [jax.device_put(x, sharded) for x in x_host]


@jax.jit
def step(w, x):
  w = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))  # the all-gather
  return {'s': jnp.tanh(x @ w @ w).sum()}


n = 400
total = loop.sum_over_batches(step, w, (xs[i % 4] for i in range(n)), jax.devices())
expected = sum(float(np.tanh(x_host[i % 4] @ w_host @ w_host).sum()) for i in range(n))
print(f'sum {float(total["s"]):.4f} expected {expected:.4f}')
