"""`sharding.model_axis_problem`: a model axis that splits nothing, or leaves parameters
whole, is named (it used to run as replicas of the same computation without a word)."""

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
