"""Fast paths change speed or memory, not results: mixed precision (bf16 matmul inputs,
float32 accumulation) and rematerialisation policies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models

SMALL = dict(num_layers=2, hidden_size=64, num_heads=4, mlp_dim=128, num_classes=10,
             image_size=32, patch_size=8)


def _setup(**kw):
  fp32 = models.create('ViT-Ti/16', **dict(SMALL, **kw))
  params = models.init_params(fp32, 32)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: p + rng.normal(0, 0.05, p.shape).astype(p.dtype), params)
  images = rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
  return fp32, params, images


def test_bf16_matmuls_accumulate_in_float32():
  """Every weight matmul (a dot without batch dimensions) of the bf16 model takes bf16
  operands and produces float32; the attention products (batched dots inside
  jax.nn.dot_product_attention) keep float32 logits and return the compute dtype."""
  module = models.create('ViT-Ti/16', **dict(SMALL, dtype='bfloat16'))
  _, params, images = _setup()
  jaxpr = jax.make_jaxpr(lambda p, x: module.apply({'params': p}, x, train=False))(params,
                                                                                   images)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'dot_general']
  dots += [e for e in _inner_eqns(jaxpr.jaxpr) if e.primitive.name == 'dot_general']
  weight_dots = [e for e in dots if e.params['dimension_numbers'][1] == ((), ())]
  assert len(weight_dots) == 2 * 6 + 1  # q, k, v, out, fc1, fc2 per block, head
  for e in weight_dots:
    assert all(v.aval.dtype == jnp.bfloat16 for v in e.invars), e
    assert e.outvars[0].aval.dtype == jnp.float32, e


def _inner_eqns(jaxpr):
  for e in jaxpr.eqns:
    for sub in [v.jaxpr if hasattr(v, 'jaxpr') else v for v in e.params.values()
                if hasattr(v, 'eqns') or hasattr(v, 'jaxpr')]:
      yield from sub.eqns
      yield from _inner_eqns(sub)


def test_bf16_logits_close_to_float32():
  fp32, params, images = _setup()
  bf16 = models.create('ViT-Ti/16', **dict(SMALL, dtype='bfloat16'))
  want = np.asarray(fp32.apply({'params': params}, images, train=False))
  got = bf16.apply({'params': params}, images, train=False)
  assert got.dtype == jnp.float32
  # bf16 has 8 bits of mantissa: ~1% relative error per rounded operand.
  np.testing.assert_allclose(np.asarray(got), want, atol=0.03 * np.abs(want).max() + 1e-3)


@pytest.mark.parametrize('policy', ['full', 'dots', 'dots_no_batch'])
def test_remat_gives_the_same_loss_and_gradients(policy):
  fp32, params, images = _setup(dropout_rate=0.1, drop_path_rate=0.1)
  remat = models.create('ViT-Ti/16', **dict(SMALL, dropout_rate=0.1, drop_path_rate=0.1,
                                           remat_policy=policy))
  assert jax.tree.structure(models.init_params(remat, 32)) == jax.tree.structure(params)

  def loss(module):
    def f(p):
      logits = module.apply({'params': p}, images, train=True,
                            rngs={'dropout': jax.random.PRNGKey(3)})
      return jnp.mean(jax.nn.log_softmax(logits)[:, 0])
    return jax.value_and_grad(f)(params)

  (l1, g1), (l2, g2) = loss(fp32), loss(remat)
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5)


def test_unknown_remat_policy_is_an_error():
  with pytest.raises(ValueError, match="remat_policy='everything' is not one of"):
    models.create('ViT-Ti/16', remat_policy='everything')
