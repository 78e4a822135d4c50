"""`sharding.model_axis_problem` and `fsdp_axis_problem`: a model or fsdp axis that splits
nothing, or leaves parameters whole, is named (they used to run without a word)."""

import types

from vit_jax import models
from vit_jax import sharding


def _mesh(model):
  return types.SimpleNamespace(shape={'data': 1, 'fsdp': 1, 'model': model})


def _params(name, **overrides):
  return models.abstract_params(models.create(name, **overrides), 32)


def test_a_model_axis_that_divides_the_heads_and_mlp_is_fine():
  params = _params('ViT-Ti/16', num_layers=1, num_heads=4, hidden_size=64, mlp_dim=128)
  assert sharding.model_axis_problem(params, _mesh(4)) is None
  assert sharding.model_axis_problem(params, _mesh(1)) is None


def test_heads_the_model_axis_does_not_divide_are_named():
  params = _params('ViT-Ti/16', num_layers=1, num_heads=3, hidden_size=48, mlp_dim=128)
  problem = sharding.model_axis_problem(params, _mesh(8))
  # query, key, value (kernels and biases) and out: 3 heads stay whole; the MLP splits.
  assert problem.startswith('config.mesh.model=8 does not divide the split dimension of 7 '
                            'of the 10 parameters'), problem
  assert 'MultiHeadDotProductAttention_0/key/bias (3, 16)' in problem


def test_a_stacked_vit_is_checked_past_its_layer_axis():
  params = _params('ViT-Ti/16', num_layers=2, num_heads=3, hidden_size=48, mlp_dim=128,
                   scan_layers=True)
  assert 'does not divide' in sharding.model_axis_problem(params, _mesh(8))
  params = _params('ViT-Ti/16', num_layers=2, num_heads=4, hidden_size=64, mlp_dim=128,
                   scan_layers=True)
  assert sharding.model_axis_problem(params, _mesh(4)) is None


def test_a_model_with_nothing_to_split_is_named():
  params = models.abstract_params(models.create('ResNet-50', num_classes=10), 32)
  problem = sharding.model_axis_problem(params, _mesh(2))
  assert problem.startswith('config.mesh.model=2: no parameter of this model is split')
  assert '--config.mesh.data or --config.mesh.fsdp' in problem


def _fsdp_mesh(fsdp):
  return types.SimpleNamespace(shape={'data': 1, 'fsdp': fsdp, 'model': 1})


def test_an_fsdp_axis_that_shards_nothing_or_leaves_large_kernels_whole_is_named():
  """fsdp=8 over a model whose parameters are all under min_fsdp_size, or whose kernels
  have no dimension divisible by 8, kept a full copy on every device without a word."""
  params = _params('ViT-Ti/16', num_layers=1, num_heads=4, hidden_size=64, mlp_dim=128)
  problem = sharding.fsdp_axis_problem(params, _fsdp_mesh(8))  # all under 2**18
  assert problem.startswith('config.mesh.fsdp=8 shards none of the '), problem
  assert 'config.min_fsdp_size=262,144' in problem
  assert sharding.fsdp_axis_problem(params, _fsdp_mesh(8), min_fsdp_size=64) is None
  assert sharding.fsdp_axis_problem(params, _fsdp_mesh(1)) is None
  # Widths 12 and 36: the attention and MLP kernels stay whole, the rest is sharded.
  params = _params('ViT-Ti/16', num_layers=1, num_heads=3, hidden_size=12, mlp_dim=36,
                   num_classes=16)
  problem = sharding.fsdp_axis_problem(params, _fsdp_mesh(8), min_fsdp_size=64)
  assert problem.startswith('config.mesh.fsdp=8 leaves '), problem
  assert 'MlpBlock_0/Dense_0/kernel (12, 36)' in problem
  # Counted independently: the elements whose spec names fsdp.
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  whole = [l.shape for l in jax.tree_util.tree_leaves(params)
           if np.prod(l.shape) >= 64 and not any(d % 8 == 0 for d in l.shape)]
  assert whole and f'leaves {len(whole)} parameters' in problem, (whole, problem)
