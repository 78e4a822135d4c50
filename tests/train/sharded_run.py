"""Helper script: a few train steps of a small ViT on synthetic data under a given mesh.

Run as `python sharded_run.py DATA FSDP ACCUM OUT.npz [MODEL [SCAN]]` in a process started with
XLA_FLAGS=--xla_force_host_platform_device_count=8; writes the losses, the final
parameters and the parameter shardings.
"""

import json
import sys

import jax
import numpy as np

from vit_jax.train import defaults
from vit_jax.train import loop


def config_for(data: int, fsdp: int, accum: int, model: int = 1, scan: bool = False):
  c = defaults.default_config()
  c.model.update(image_size=16, patch_size=(4, 4), hidden_size=32, num_layers=2,
                 num_heads=2, mlp_dim=64, num_classes=5, dropout_rate=0.1, scan_layers=scan)
  c.batch_size = 16
  c.accum_steps = accum
  c.mesh.update(data=data, fsdp=fsdp, model=model)
  c.min_fsdp_size = 64  # shard every parameter matrix in this small model
  # SGD: Adam would turn the float noise in gradients that are exactly zero in theory
  # (the key bias: softmax ignores a shift shared by all keys) into full-size updates.
  c.optimizer.update(name='sgd', momentum=0.9, weight_decay=0.01)
  c.schedule.update(base_lr=0.1, warmup_steps=1, decay='cosine')
  return c


def trainer_on_mesh(config):
  """A Trainer on the first data x fsdp x model devices, as a (data, fsdp, model) mesh."""
  data, fsdp, model = config.mesh.data, config.mesh.fsdp, config.mesh.model
  devices = np.asarray(jax.devices()[:data * fsdp * model]).reshape(data, fsdp, model)
  return loop.Trainer(config, jax.sharding.Mesh(devices, ('data', 'fsdp', 'model')),
                      total_steps=6)


def flatten(tree):
  """{'a/b/c': numpy array} of a pytree of arrays."""
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def main():
  data, fsdp, accum, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
  model = int(sys.argv[5]) if len(sys.argv) > 5 else 1
  scan = len(sys.argv) > 6 and sys.argv[6] == 'scan'
  trainer = trainer_on_mesh(config_for(data, fsdp, accum, model, scan))
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(4):
    images = rng.uniform(-1, 1, (16, 16, 16, 3)).astype(np.float32)
    labels = np.eye(5, dtype=np.float32)[rng.integers(0, 5, 16)]
    batch = jax.device_put({'image': images, 'label': labels}, trainer.batch_sharding)
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics['loss']))
  specs = {'/'.join(str(getattr(k, 'key', k)) for k in path): str(v.sharding.spec)
           for path, v in jax.tree_util.tree_leaves_with_path(state.params)}
  np.savez(out, losses=np.array(losses),
           **{f'param:{k}': v for k, v in flatten(state.params).items()})
  with open(out + '.json', 'w') as f:
    json.dump({'specs': specs, 'devices': trainer.mesh.devices.size}, f)


if __name__ == '__main__':
  main()
