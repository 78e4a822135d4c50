"""Fast paths change speed or memory, not results: mixed precision (bf16 matmul inputs,
float32 accumulation) and rematerialisation policies."""

import functools

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


@pytest.mark.parametrize('layer_loop,blocks_traced', [('unroll', 2), ('scan', 1)])
def test_bf16_matmuls_accumulate_in_float32(layer_loop, blocks_traced):
  """Every weight matmul (a dot without batch dimensions) of the bf16 model takes bf16
  operands and produces float32; the attention products keep float32 logits and return
  the compute dtype. The scanned blocks give the unrolled blocks' logits."""
  module = models.create('ViT-Ti/16', **dict(SMALL, dtype='bfloat16', layer_loop=layer_loop))
  _, params, images = _setup()
  jaxpr = jax.make_jaxpr(lambda p, x: module.apply({'params': p}, x, train=False))(params,
                                                                                   images)
  dots = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == 'dot_general']
  weight_dots = [e for e in dots if e.params['dimension_numbers'][1] == ((), ())]
  # q, k, v, out, fc1, fc2 per block (a scan traces its block once), and the head.
  assert len(weight_dots) == blocks_traced * 6 + 1
  for e in weight_dots:
    assert all(v.aval.dtype == jnp.bfloat16 for v in e.invars), e
    assert e.outvars[0].aval.dtype == jnp.float32, e
  if layer_loop == 'scan':  # equal up to bf16 rounding (XLA fuses the two differently)
    unrolled = module.clone(layer_loop='unroll')
    np.testing.assert_allclose(module.apply({'params': params}, images),
                               unrolled.apply({'params': params}, images), atol=1e-2)


def _all_eqns(jaxpr):
  """The equations of a jaxpr and, recursively, of the jaxprs inside them."""
  for e in jaxpr.eqns:
    yield e
    for sub in [v.jaxpr if hasattr(v, 'jaxpr') else v for v in e.params.values()
                if hasattr(v, 'eqns') or hasattr(v, 'jaxpr')]:
      yield from _all_eqns(sub)


def test_bf16_logits_close_to_float32():
  fp32, params, images = _setup()
  bf16 = models.create('ViT-Ti/16', **dict(SMALL, dtype='bfloat16'))
  want = np.asarray(fp32.apply({'params': params}, images, train=False))
  got = bf16.apply({'params': params}, images, train=False)
  assert got.dtype == jnp.float32
  # bf16 has 8 bits of mantissa: ~1% relative error per rounded operand.
  np.testing.assert_allclose(np.asarray(got), want, atol=0.03 * np.abs(want).max() + 1e-3)


# 'dots': the scan test; 'auto' is 'dots_no_batch' on CPU (test_auto_remat_policy_...).
@pytest.mark.parametrize('policy', ['full', 'dots_no_batch'])
def test_remat_gives_the_same_loss_and_gradients(policy):
  fp32, params, images = _setup(dropout_rate=0.1, drop_path_rate=0.1, remat_policy=None)
  remat = models.create('ViT-Ti/16', **dict(SMALL, dropout_rate=0.1, drop_path_rate=0.1,
                                           remat_policy=policy))
  assert jax.tree.structure(models.init_params(remat, 32)) == jax.tree.structure(params)

  def loss(module):
    def f(p):
      logits = module.apply({'params': p}, images, train=True,
                            rngs={'dropout': jax.random.PRNGKey(3)})
      return jnp.mean(jax.nn.log_softmax(logits)[:, 0])
    return jax.jit(jax.value_and_grad(f))(params)

  (l1, g1), (l2, g2) = loss(fp32), loss(remat)
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5)


def test_layer_loop_scan_equals_unroll_with_the_same_parameter_names():
  """layer_loop='scan' (the default) runs the encoderblock_{i} parameters as one lax.scan:
  same names, logits and gradients as the unrolled Python loop. (Under remat and with
  dropout: test_every_layer_layout_draws_the_same_dropout_masks.)"""
  unrolled = models.create('ViT-Ti/16', **dict(SMALL, num_layers=3, layer_loop='unroll',
                                               remat_policy=None))
  looped = unrolled.clone(layer_loop='scan')
  params = models.init_params(unrolled, 32)
  assert jax.tree.structure(models.init_params(looped, 32)) == jax.tree.structure(params)
  assert 'encoderblock_2' in params['Transformer']
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: p + rng.normal(0, 0.05, p.shape).astype(p.dtype), params)
  images = rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)

  def loss(module):
    def f(p):
      logits = module.apply({'params': p}, images, train=False)
      return jnp.mean(jax.nn.log_softmax(logits)[:, 0])
    return jax.jit(jax.value_and_grad(f))

  (l1, g1), (l2, g2) = loss(unrolled)(params), loss(looped)(params)
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5)
  # The blocks are really one scan (one compiled body), not three copies.
  prims = {e.primitive.name for e in jax.make_jaxpr(
      lambda p: looped.apply({'params': p}, images))(params).jaxpr.eqns}
  assert 'scan' in prims
  # Attention maps need the unrolled blocks: the scan default falls back to them.
  maps = models.attention_maps(looped, params, images)
  assert len(maps) == 3 and maps[0].shape == (4, 4, 17, 17)


def test_unknown_layer_loop_is_an_error():
  with pytest.raises(ValueError, match="layer_loop='loop' is not one of"):
    models.create('ViT-Ti/16', **dict(SMALL, layer_loop='loop'))


def test_auto_remat_policy_is_dots_no_batch_on_cpu_only(monkeypatch):
  from vit_jax.models import remat  # pylint: disable=g-import-not-at-top
  assert models.create('ViT-Ti/16').remat_policy == 'auto'
  assert remat.resolve('auto') == 'dots_no_batch'  # the tests run on CPU
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert remat.resolve('auto') is None
  assert remat.resolve('full') == 'full'


def test_unknown_remat_policy_is_an_error():
  with pytest.raises(ValueError, match="remat_policy='everything' is not one of"):
    models.create('ViT-Ti/16', remat_policy='everything')


@pytest.mark.parametrize('remat', [None, 'dots'])
def test_scan_over_layers_equals_the_unrolled_encoder(remat):
  """Same logits and gradients; parameters are the unrolled ones stacked per layer."""
  fp32, params, images = _setup(drop_path_rate=0.2)
  scanned = models.create('ViT-Ti/16', **dict(SMALL, drop_path_rate=0.2, scan_layers=True,
                                              remat_policy=remat))
  stacked = models.stack_layers(params)
  assert jax.tree.structure(models.init_params(scanned, 32)) == jax.tree.structure(stacked)
  assert stacked['Transformer']['encoderblock']['LayerNorm_0']['scale'].shape == (2, 64)
  unstacked = models.unstack_layers(stacked)
  for a, b in zip(jax.tree.leaves(unstacked), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)

  def loss(module, p):
    logits = module.apply({'params': p}, images, train=False)
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(fp32, p)))(params)
  l2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(stacked)
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(models.stack_layers(g1)), jax.tree.leaves(g2)):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5)
  # Training mode (dropout, per-layer drop-path rates) runs and differs from eval.
  train_logits = scanned.apply({'params': stacked}, images, train=True,
                               rngs={'dropout': jax.random.PRNGKey(0)})
  assert not np.allclose(train_logits, scanned.apply({'params': stacked}, images))
  # Model FLOPs do not depend on the layout (XLA would count a scanned body once).
  assert models.forward_flops(scanned, 32) == models.forward_flops(fp32, 32)
  # The scan keeps no block's attention (models.attention_maps unrolls the model itself).
  with pytest.raises(ValueError, match='capture_attention needs scan_layers=False'):
    scanned.apply({'params': stacked}, images, train=False, capture_attention=True,
                  mutable=['intermediates'])


def test_pretrained_weights_fit_a_scanned_model():
  from vit_jax.checkpoints import pretrained  # pylint: disable=import-outside-toplevel
  _, params, images = _setup()
  scanned = models.create('ViT-Ti/16', **dict(SMALL, scan_layers=True))
  reference = jax.device_get(models.init_params(scanned, 32))
  fitted = pretrained.adapt(params, reference, keep_head=True)
  assert jax.tree.structure(fitted) == jax.tree.structure(reference)
  fp32 = models.create('ViT-Ti/16', **SMALL)
  np.testing.assert_allclose(scanned.apply({'params': fitted}, images),
                             fp32.apply({'params': params}, images), atol=1e-5)


@pytest.mark.parametrize('x_shape,w_shape,contract', [
    ((4, 5, 8), (8, 6), 1),         # Dense
    ((4, 5, 8), (8, 3, 2), 1),      # DenseGeneral to (heads, head_dim): q, k, v
    ((4, 5, 3, 2), (3, 2, 7), 2),   # DenseGeneral from (heads, head_dim): out
])
def test_bf16_backward_matmuls_take_bf16_operands(x_shape, w_shape, contract):
  """The gradient of a bf16 Dense matmul equals the float32 gradient within bf16 rounding,
  and both backward matmuls take bf16 operands with float32 accumulation (left to
  autodiff, the float32 cotangent would make them float32 matmuls)."""
  from vit_jax.models import dense_matmul  # pylint: disable=g-import-not-at-top
  dot = dense_matmul.dot_general_fn(jnp.bfloat16)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=w_shape), jnp.bfloat16)
  dn = ((tuple(range(len(x_shape) - contract, len(x_shape))), tuple(range(contract))),
        ((), ()))
  out_shape = x_shape[:len(x_shape) - contract] + w_shape[contract:]
  c = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
  grads = jax.grad(lambda a, b: jnp.sum(dot(a, b, dn) * c), (0, 1))(x, w)
  ref = jax.grad(lambda a, b: jnp.sum(jax.lax.dot_general(a, b, dn) * c), (0, 1))(
      x.astype(jnp.float32), w.astype(jnp.float32))
  for got, want in zip(grads, ref):
    assert got.dtype == jnp.bfloat16 and got.shape == want.shape
    rel = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
    assert rel < 1e-2  # bf16: 8 mantissa bits, one rounding of the cotangent and result
  jaxpr = jax.make_jaxpr(jax.grad(lambda a, b: jnp.sum(dot(a, b, dn) * c), (0, 1)))(x, w)
  backward = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'dot_general']
  assert len(backward) == 2
  for e in backward:
    assert all(v.aval.dtype == jnp.bfloat16 for v in e.invars), e
    assert e.outvars[0].aval.dtype == jnp.float32, e


@pytest.mark.parametrize('remat', [None, 'dots_no_batch'])
def test_every_layer_layout_draws_the_same_dropout_masks(remat):
  """Dropout, attention dropout and drop-path: the scanned (stacked parameters), looped
  and unrolled encoders hand each block the same key, so a training step's loss and
  gradients do not depend on the layout."""
  kw = dict(SMALL, dropout_rate=0.2, attention_dropout_rate=0.2, drop_path_rate=0.3,
            remat_policy=remat)
  unrolled, params, images = _setup(**kw, layer_loop='unroll')
  layouts = {'unroll': (unrolled, params),
             'scan': (unrolled.clone(layer_loop='scan'), params),
             'scan_layers': (models.create('ViT-Ti/16', **kw, scan_layers=True),
                             models.stack_layers(params))}

  def loss_and_grad(module):
    @jax.jit
    def step(p, seed):
      def f(p):
        logits = module.apply({'params': p}, images, train=True,
                              rngs={'dropout': jax.random.PRNGKey(seed)})
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0])
      loss, grad = jax.value_and_grad(f)(p)
      return loss, models.unstack_layers(grad) if 'encoderblock' in grad['Transformer'] else grad
    return step

  unrolled_step = loss_and_grad(unrolled)
  want_loss, want_grad = unrolled_step(params, 0)
  no_dropout = layouts['scan'][0].clone(dropout_rate=0.0, attention_dropout_rate=0.0,
                                        drop_path_rate=0.0)
  eval_loss, _ = loss_and_grad(no_dropout)(params, 0)
  assert abs(float(want_loss) - float(eval_loss)) > 1e-4  # the masks change the loss
  assert abs(float(want_loss) - float(unrolled_step(params, 1)[0])) > 1e-4  # and the seed
  assert float(unrolled_step(params, 0)[0]) == float(want_loss)  # one seed, one draw
  for name in ('scan', 'scan_layers'):
    loss, grad = loss_and_grad(layouts[name][0])(layouts[name][1], 0)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=name)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want_grad),
                            jax.tree.leaves(grad)):
      np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4, err_msg=f'{name} {path}')


@pytest.mark.parametrize('layout', [dict(layer_loop='unroll'), dict(layer_loop='scan'),
                                    dict(scan_layers=True)])
def test_zero_drop_path_draws_no_random_bits(layout):
  """With drop_path_rate=0 and dropout on, no layout draws drop-path masks: each block
  draws random bits for its four dropout sites only (attention weights, attention
  output, GELU output, MLP output), after the embedding's dropout."""
  module = models.create('ViT-Ti/16', **dict(SMALL, **layout, dropout_rate=0.1,
                                             attention_dropout_rate=0.1, drop_path_rate=0.0))
  _, params, images = _setup()
  if layout.get('scan_layers'):
    params = models.stack_layers(params)
  jaxpr = jax.make_jaxpr(lambda p, x: module.apply(
      {'params': p}, x, train=True, rngs={'dropout': jax.random.PRNGKey(0)}))(params, images)
  draws = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == 'random_bits']
  blocks_traced = 1 if layout.get('scan_layers') or layout['layer_loop'] == 'scan' else 2
  assert len(draws) == 1 + 4 * blocks_traced, [e.outvars[0].aval.shape for e in draws]


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_mixed_precision_remat_keeps_the_attention_probabilities(dtype, capsys):
  """remat_policy 'auto' (dots_no_batch on CPU) keeps the float32 softmax output of each
  block's attention for the backward pass under bf16, and recomputes it in float32;
  either way the gradients are those without remat."""
  module = models.create('ViT-Ti/16', **dict(SMALL, dtype=dtype))
  _, params, images = _setup()

  def loss(p, module=module):
    return jnp.mean(jax.nn.log_softmax(module.apply({'params': p}, images, train=True))[:, 0])

  jax.ad_checkpoint.print_saved_residuals(loss, params)
  saved = capsys.readouterr().out
  # The blocks run as one scan, which stacks what they keep: (layers, batch x heads,
  # tokens, tokens) probabilities.
  probs = [line for line in saved.splitlines() if line.strip().startswith('f32[2,16,17,17]')]
  assert len(probs) == (1 if dtype == 'bfloat16' else 0), saved
  grads = jax.jit(jax.grad(loss))(params)
  want = jax.jit(jax.grad(functools.partial(loss, module=module.clone(remat_policy=None))))(
      params)
  # float32: the same to rounding. bf16: the recomputed forward pass may round in another
  # order (up to 3.8e-6 on gradients of order 0.1 with XLA's LLVM optimisations off on an
  # AVX-512 host, 0 with them on), 1000x under bf16's own error here (bf16 vs float32
  # gradients differ by up to 2.5e-2).
  atol = 1e-6 if dtype == 'float32' else 2e-5
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(grads)):
    np.testing.assert_allclose(b, a, atol=atol, rtol=1e-5)
