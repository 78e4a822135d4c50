"""Helper script: train steps of a small BatchNorm ResNet on synthetic data under a mesh.

Run as `python bn_sharded_run.py DATA FSDP ACCUM OUT.npz` in a process started with
XLA_FLAGS=--xla_force_host_platform_device_count=8; writes the losses, the final
parameters and BatchNorm statistics, and (LOCAL) the statistics a single forward pass
gives on the first batch as a whole (GLOBAL1) and on the first device's share of it
alone (LOCAL1), next to the run's own statistics after that first step (STEP1).
"""

import sys

import jax
import numpy as np

from sharded_run import flatten as _flat
from sharded_run import trainer_on_mesh
from vit_jax import models
from vit_jax.train import defaults

BATCH = 16


def config_for(data: int, fsdp: int, accum: int):
  c = defaults.default_config()
  c.model = models.get_config('ResNet-50')
  c.model.update(name='tiny-resnet', layers=(1, 1, 1, 1), image_size=32, num_classes=5,
                 zero_init_last=False)
  c.batch_size = BATCH
  c.accum_steps = accum
  c.mesh.update(data=data, fsdp=fsdp, model=1)
  c.min_fsdp_size = 64
  c.optimizer.update(name='sgd', momentum=0.9, weight_decay=0.0)
  c.schedule.update(base_lr=0.05, warmup_steps=1, decay='cosine')
  return c


def main():
  data, fsdp, accum, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
  trainer = trainer_on_mesh(config_for(data, fsdp, accum))
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  losses, first_images, step1 = [], None, None
  initial = jax.device_get(state.variables())
  for _ in range(3):
    # Examples differ in brightness and contrast, so per-device statistics would differ.
    scale = rng.uniform(0.2, 2.0, (BATCH, 1, 1, 1))
    images = (rng.normal(size=(BATCH, 32, 32, 3)) * scale + scale).astype(np.float32)
    first_images = images if first_images is None else first_images
    labels = np.eye(5, dtype=np.float32)[rng.integers(0, 5, BATCH)]
    batch = jax.device_put({'image': images, 'label': labels}, trainer.batch_sharding)
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics['loss']))
    if step1 is None:
      step1 = jax.device_get(state.model_state)

  def stats_of(images):  # one training forward pass, plain Flax on one device
    _, new = trainer.module.apply(initial, images, train=True,
                                  rngs={'dropout': jax.random.PRNGKey(0)},
                                  mutable=['batch_stats'])
    return new
  share = BATCH // (data * fsdp)
  arrays = {f'param:{k}': v for k, v in _flat(state.params).items()}
  arrays.update({f'stats:{k}': v for k, v in _flat(state.model_state).items()})
  arrays.update({f'step1:{k}': v for k, v in _flat(step1).items()})
  arrays.update({f'global1:{k}': v for k, v in _flat(stats_of(first_images)).items()})
  arrays.update({f'local1:{k}': v for k, v in _flat(stats_of(first_images[:share])).items()})
  np.savez(out, losses=np.array(losses), **arrays)


if __name__ == '__main__':
  main()
