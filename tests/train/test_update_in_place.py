"""The compiled train step updates the state in place: XLA writes no copy of a parameter
and no clipped copy of a gradient before the optimizer's own passes (each is a full read
and write of the model, 2% of a ViT-B/16 step on a CPU), and no weight gradient is
transposed inside its write into the stacked gradient (a single-threaded strided loop,
3.5% of the float32 step; BENCHMARKS.md)."""

import re

import jax
import numpy as np
import optax
import pytest

from vit_jax import sharding
from vit_jax.train import defaults
from vit_jax.train import loop
from vit_jax.train import optimizer as optimizer_lib

MLP_KERNEL = 'f32[2,32,128]'  # the stacked MlpBlock_0/Dense_0 kernels of the model below


def _entry(monkeypatch, clip=None, whole=False):
  """The ENTRY computation (or the whole module) of the compiled train step of a 2-layer
  stacked ViT."""
  if clip is not None:
    monkeypatch.setattr(optimizer_lib, 'clip_by_global_norm', clip)
  c = defaults.default_config()
  c.model.update(image_size=16, patch_size=(4, 4), hidden_size=32, num_layers=2, num_heads=2,
                 mlp_dim=128, num_classes=5, scan_layers=True)
  c.batch_size = 8
  c.optimizer.update(name='adam', weight_decay=0.01, grad_clip_norm=1.0)
  c.mesh.update(data=1, fsdp=1, model=1)
  trainer = loop.Trainer(c, sharding.create_mesh(c.mesh), total_steps=10)
  spec = lambda shape: jax.ShapeDtypeStruct(shape, np.float32,  # noqa: E731
                                            sharding=trainer.batch_sharding)
  hlo = trainer.lower_train_step(trainer.abstract_state(), {
      'image': spec((8, 16, 16, 3)), 'label': spec((8, 5))}).compile().as_text()
  return hlo if whole else hlo[hlo.index('\nENTRY'):]


def _writes_of_kernel_shape(entry):
  """Instructions of the ENTRY computation that write a buffer of the MLP kernel stack's
  shape (not parameters, tuple elements or bitcasts, which write nothing)."""
  return [l for l in entry.splitlines()
          if re.search(r'= ' + re.escape(MLP_KERNEL) + r'\{[\d,]*\} (fusion|copy)\(', l)]


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='counts XLA:CPU instructions')
def test_no_parameter_is_copied_before_its_in_place_update(monkeypatch):
  entry = _entry(monkeypatch)
  copies = [l.strip()[:120] for l in entry.splitlines()
            if re.search(r'= f32\[[\d,]+\]\S* copy\(%state_params', l)]
  # XLA may still copy a tiny one (here the head's 5 biases): the bulk is what costs.
  large = [l for l in copies if np.prod([int(d) for d in re.search(r'f32\[([\d,]+)\]', l)
                                          .group(1).split(',')]) >= 1024]
  assert not large, copies


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='counts XLA:CPU instructions')
def test_clipping_writes_no_copy_of_the_gradients(monkeypatch):
  ours = _writes_of_kernel_shape(_entry(monkeypatch))
  with_optax = _writes_of_kernel_shape(_entry(monkeypatch, clip=optax.clip_by_global_norm))
  # optax's division by the norm is written out as one more pass over each gradient.
  assert len(ours) < len(with_optax), (ours, with_optax)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='reads XLA:CPU fusions')
def test_no_transpose_is_fused_into_the_stacked_gradient_writes(monkeypatch):
  hlo = _entry(monkeypatch, whole=True)
  computations = dict(re.findall(r'\n(%[\w.\-]+) \([^\n]*\{\n(.*?)\n\}', hlo, re.S))
  writes = [c for c in computations.values() if 'dynamic-update-slice(' in c]
  assert writes
  transposed = [c for c in writes if ' transpose(' in c]
  assert not transposed, transposed[0][:2000]
