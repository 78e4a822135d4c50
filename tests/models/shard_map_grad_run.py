"""Helper script: gradients of ViT (float32 and bf16) and Swin inside
`jax.shard_map` (check_vma on, its default) over 8 CPU devices, against jax.grad on one
device (times 8: jax sums a replicated parameter's gradient over the devices). Run in a process started with XLA_FLAGS=--xla_force_host_platform_device_count=8;
prints one JSON line {name: max |difference| relative to the largest gradient}.
"""

import json

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from vit_jax import models

CASES = {
    'vit': ('ViT-Ti/16', dict(num_classes=10, hidden_size=32, mlp_dim=64, num_layers=2,
                              num_heads=2, image_size=16, patch_size=(8, 8))),
    'vit_bf16': ('ViT-Ti/16', dict(num_classes=10, hidden_size=32, mlp_dim=64, num_layers=2,
                                   num_heads=2, image_size=16, patch_size=(8, 8),
                                   dtype='bfloat16')),
    'swin': ('Swin-T', dict(image_size=16, patch_size=2, embed_dim=16, depths=(2, 2),
                            num_heads=(1, 2), window_size=4, num_classes=10)),
}


def main():
  mesh = jax.make_mesh((8,), ('b',))
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 16, 16, 3))
  xs = jax.device_put(x, NamedSharding(mesh, P('b')))
  out = {}
  for key, (name, kw) in CASES.items():
    module = models.create(name, **kw)
    variables = models.init_variables(module, 16)
    params = jax.tree.map(
        lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(3), a.shape, a.dtype),
        variables['params'])

    def loss(p, images, module=module, variables=variables):
      logits = module.apply(dict(variables, params=p), images, train=False)
      return (logits.astype(jnp.float32) ** 2).mean()
    want = jax.jit(jax.grad(loss))(params, x)  # op by op, it took most of a minute
    sharded = jax.jit(jax.shard_map(
        lambda p, images, loss=loss: jax.lax.pmean(jax.grad(loss)(p, images), 'b'),
        mesh=mesh, in_specs=(P(), P('b')), out_specs=P()))
    got = sharded(params, xs)
    # jax's convention (plain autodiff, as ResNet's): the gradient of a replicated
    # parameter inside shard_map is summed over the devices, so the pmean above is the
    # device count times the one-device gradient of the mean loss.
    want = jax.tree.map(lambda g: 8 * g, want)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want))
    out[key] = max(float(jnp.abs(a - b).max()) for a, b in
                   zip(jax.tree.leaves(got), jax.tree.leaves(want))) / scale
  print(json.dumps(out))


if __name__ == '__main__':
  main()
