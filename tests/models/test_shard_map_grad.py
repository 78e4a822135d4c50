"""Gradients inside `jax.shard_map` (check_vma on, its default), for a researcher's own
data-parallel step: the layers with a custom backward pass (the Dense matmuls, the
heads-major attention) used to be refused there ("Custom VJP bwd rule must produce an
output with the same type as the args"); they now give plain autodiff's gradients."""

import json
import pathlib
import subprocess
import sys

import subprocess_env

HERE = pathlib.Path(__file__).resolve().parent


def test_gradients_inside_shard_map_equal_one_device():
  proc = subprocess.run([sys.executable, str(HERE / 'shard_map_grad_run.py')],
                        env=subprocess_env.cpu_env(devices=8), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  errors = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(errors) == {'vit', 'vit_bf16', 'swin'}
  # Relative to the largest gradient: float32 summation order; bf16 operands.
  for name, tol in (('vit', 1e-5), ('swin', 1e-5), ('vit_bf16', 3e-2)):
    assert errors[name] < tol, (name, errors[name])
