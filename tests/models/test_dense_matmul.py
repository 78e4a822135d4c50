"""The Dense-layer matmul and the heads-major attention: their custom backward passes give
autodiff's gradients, and on XLA:CPU every matmul of a bf16 backward pass really runs with
bf16 operands (XLA silently runs a matmul in float32 when an operand is a transposed
view, which the jaxpr does not show)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.models import attention
from vit_jax.models import dense_matmul

CASES = [  # x shape, w shape, contracted axes
    ((4, 5, 8), (8, 6), 1),         # Dense, more outputs than inputs: x is transposed
    ((4, 6, 12), (12, 4), 1),       # MLP's second layer, fewer outputs: g is transposed
    ((4, 5, 8), (8, 3, 2), 1),      # DenseGeneral to (heads, head_dim): q, k, v
    ((4, 5, 3, 2), (3, 2, 7), 2),   # DenseGeneral from (heads, head_dim): out
    ((4, 5, 7), (7, 3), 1),         # a prime input width
    ((6, 8), (8, 3), 1),            # one free axis (the head)
]


def _dimension_numbers(x_shape, contract):
  return ((tuple(range(len(x_shape) - contract, len(x_shape))), tuple(range(contract))),
          ((), ()))


def _grads(dot, x, w, dn, c):
  return jax.jit(jax.grad(lambda a, b: jnp.sum(dot(a, b, dn) * c), (0, 1)))(x, w)


@pytest.mark.parametrize('backend', ['cpu', 'gpu'])
@pytest.mark.parametrize('x_shape,w_shape,contract', CASES)
def test_float32_gradients_equal_autodiff(x_shape, w_shape, contract, backend):
  """Both backward forms (CPU's transposed-operand one, and the plain one used elsewhere)
  give lax.dot_general's gradients to float32 rounding."""
  dot = dense_matmul.dot_general_fn(jnp.float32, backend='cpu')
  if backend == 'gpu':  # float32 off CPU is flax's plain dot; test the custom one anyway
    dot = lambda a, b, dn: dense_matmul._dense_dot_general(  # noqa: E731
        a, b, dn, transpose_tokens=False)
  rng = np.random.default_rng(0)
  x = rng.normal(size=x_shape).astype(np.float32)
  w = rng.normal(size=w_shape).astype(np.float32)
  dn = _dimension_numbers(x_shape, contract)
  c = rng.normal(size=x_shape[:len(x_shape) - contract] + w_shape[contract:]).astype(np.float32)
  got = _grads(dot, x, w, dn, c)
  want = _grads(jax.lax.dot_general, x, w, dn, c)
  for g, r in zip(got, want):
    assert g.shape == r.shape and g.dtype == jnp.float32
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(lambda a, b: dot(a, b, dn))(x, w),
                             jax.lax.dot_general(x, w, dn), rtol=1e-6, atol=1e-6)


def test_float32_off_cpu_is_flax_default():
  assert dense_matmul.dot_general_fn(jnp.float32, backend='gpu') is None
  assert dense_matmul.dot_general_fn(jnp.bfloat16, backend='gpu') is not None


def _dot_operand_types(hlo_text):
  """The element types of every dot's operands in compiled HLO text, per dot."""
  types, result = {}, []
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[', line)
    if m:
      types[m.group(1)] = m.group(2)
  for line in hlo_text.splitlines():
    m = re.search(r' dot\(%?([\w.\-]+), %?([\w.\-]+)\)', line)
    if m:
      result.append((types.get(m.group(1)), types.get(m.group(2)), line.strip()[:160]))
  return result


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU behaviour')
def test_bf16_backward_matmuls_run_in_bf16_on_cpu():
  """An MLP (token batch 2x40) in bf16: every matmul XLA:CPU compiles for the forward
  and backward pass takes bf16 operands. Left to autodiff, or with the weight gradient
  written as x^T . g, XLA converts both operands to float32."""
  dot = dense_matmul.dot_general_fn(jnp.bfloat16, backend='cpu')
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 40, 32)), jnp.bfloat16)
  w1 = jnp.asarray(rng.normal(size=(32, 128)), jnp.bfloat16)
  w2 = jnp.asarray(rng.normal(size=(128, 32)), jnp.bfloat16)
  dn = _dimension_numbers(x.shape, 1)

  def loss(x, w1, w2, dot_fn):
    h = jax.nn.gelu(dot_fn(x, w1, dn)).astype(jnp.bfloat16)
    return jnp.sum(dot_fn(h, w2, dn) ** 2)

  def operand_types(dot_fn):
    grad = jax.jit(jax.grad(lambda *a: loss(*a, dot_fn), (0, 1, 2)))
    return _dot_operand_types(grad.lower(x, w1, w2).compile().as_text())

  ours = operand_types(dot)
  assert len(ours) == 6, ours  # 2 forward, 2 x 2 backward
  assert all(a == b == 'bf16' for a, b, _ in ours), ours
  plain = lambda a, b, d: jax.lax.dot_general(  # noqa: E731
      a, b, d, preferred_element_type=jnp.float32)
  # The failure this guards against is real: autodiff's weight gradients of the same
  # model (bf16 operands in the jaxpr) run in float32.
  assert any(a == 'f32' for a, _, _ in operand_types(plain))
  # And the gradients agree with autodiff's to bf16 rounding.
  got = jax.grad(lambda *a: loss(*a, dot), (1, 2))(x, w1, w2)
  want = jax.grad(lambda *a: loss(*a, plain), (1, 2))(x, w1, w2)
  for g, r in zip(got, want):
    g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
    assert np.max(np.abs(g - r)) / np.max(np.abs(r)) < 2e-2


@pytest.mark.parametrize('q_len,heads', [(9, 3), (1, 2)])  # self-attention; a MAP probe
def test_heads_major_attention_equals_jax(q_len, heads):
  """Output and gradients of q, k and v equal jax.nn.dot_product_attention's (float32,
  1e-5)."""
  rng = np.random.default_rng(1)
  q = rng.normal(size=(2, q_len, heads, 8)).astype(np.float32)
  k, v = (rng.normal(size=(2, 9, heads, 8)).astype(np.float32) for _ in range(2))
  c = rng.normal(size=(2, q_len, heads, 8)).astype(np.float32)
  ours = jax.jit(attention.heads_major_attention)
  np.testing.assert_allclose(ours(q, k, v), jax.nn.dot_product_attention(q, k, v),
                             rtol=1e-5, atol=1e-5)
  got = jax.grad(lambda *a: jnp.sum(ours(*a) * c), (0, 1, 2))(q, k, v)
  want = jax.grad(lambda *a: jnp.sum(jax.nn.dot_product_attention(*a) * c), (0, 1, 2))(
      q, k, v)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
  # The form that returns the weights gives the same output; its weights sum to 1.
  out, weights = attention.heads_major_attention_with_weights(q, k, v)
  np.testing.assert_allclose(out, ours(q, k, v), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.sum(weights, -1), 1.0, rtol=1e-5)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU behaviour')
def test_bf16_attention_matmuls_run_in_bf16_on_cpu():
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 9, 3, 8)), jnp.bfloat16) for _ in range(3))
  grad = jax.jit(jax.grad(
      lambda *a: jnp.sum(attention.heads_major_attention(*a).astype(jnp.float32) ** 2),
      (0, 1, 2)))
  dots = _dot_operand_types(grad.lower(q, k, v).compile().as_text())
  assert len(dots) >= 6, dots  # 2 forward (some recomputed), 4 backward
  assert all(a == b == 'bf16' for a, b, _ in dots), dots
  got = grad(q, k, v)
  f32 = [a.astype(jnp.float32) for a in (q, k, v)]
  want = jax.grad(lambda *a: jnp.sum(jax.nn.dot_product_attention(*a) ** 2), (0, 1, 2))(*f32)
  for g, r in zip(got, want):
    g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
    assert np.max(np.abs(g - r)) / np.max(np.abs(r)) < 3e-2  # bf16 operands


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU behaviour')
def test_bf16_vit_train_step_matmuls_run_in_bf16_on_cpu():
  """The compiled bf16 train step of a 2-block ViT (the benchmark's config: stacked blocks,
  remat, heads-major attention): every matmul takes bf16 operands but the head's weight
  gradient, a (batch, width)^T . (batch, classes) product with one free axis."""
  dots = _dot_operand_types(_compiled_train_step('bfloat16', num_layers=2))
  assert len(dots) > 20, dots  # 2 blocks x (6 forward + 12 backward + recomputed) + head
  float32 = [line for a, b, line in dots if not a == b == 'bf16']
  assert len(float32) == 1 and 'f32[192,10]' in float32[0], float32


# StableHLO ops that only move, convert or hold values.
_MOVES = frozenset({
    'constant', 'convert', 'bitcast_convert', 'reshape', 'transpose', 'broadcast_in_dim',
    'slice', 'dynamic_slice', 'dynamic_update_slice', 'concatenate', 'pad', 'tuple',
    'get_tuple_element', 'optimization_barrier', 'while', 'case', 'return', 'iota'})


def _computed_in_bf16(stablehlo_text):
  """(op, result shape) of each StableHLO op that computes a bf16 result, rather than
  moving or converting one. Before XLA's optimisation: XLA:CPU then rewrites bf16
  arithmetic into float32 operations with a rounding after each one."""
  found = []
  for line in stablehlo_text.splitlines():
    m = re.search(r'= stablehlo\.(\w+)[ (]', line)
    result = line.split(' loc(')[0].rsplit('->', 1)[-1].rsplit(':', 1)[-1]
    types = re.findall(r'tensor<((?:\d+x)*)bf16>', result)
    if m and types and m.group(1) not in _MOVES:
      found.append((m.group(1), types[-1].rstrip('x')))
  return found


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU behaviour')
def test_bf16_vit_train_step_computes_its_elementwise_work_in_float32():
  """Under mixed precision, LayerNorm, GELU, softmax, the residual stream and the
  optimizer compute in float32; bf16 values are matmul operands. A chain of elementwise
  ops computed in bf16 runs 2x to 4x slower on XLA:CPU than in float32 (the tanh-GELU over
  ViT-B/16's MLP activations: 7.8 ms against 1.8 ms; BENCHMARKS.md). What remains in bf16
  is small: the patch embedding's bias and position-embedding adds and their gradients'
  sums, and the sum of the query, key and value input gradients, one (batch, tokens,
  width) array per block."""
  text = _lowered_train_step('bfloat16', num_layers=2).as_text()
  found = _computed_in_bf16(text)
  assert {op for op, _ in found} <= {'add', 'reduce', 'convolution'}, found
  # Nothing in bf16 over the MLP's hidden units (768 for ViT-Ti) or the attention logits
  # (5 tokens at 32 px: ...x5x5).
  assert not [(op, shape) for op, shape in found if shape.endswith('x768') or
              shape.endswith('x5x5')], found
  assert sum(op == 'add' for op, _ in found) <= 2 + 2 * 2, found  # embedding, 2 blocks
  # The check sees the failure it guards against: GELU applied to bf16 values.
  gelu = jax.jit(lambda x: jax.nn.gelu(x.astype(jnp.bfloat16)).astype(jnp.float32))
  ops = {op for op, _ in _computed_in_bf16(gelu.lower(jnp.ones((4, 8))).as_text())}
  assert {'tanh', 'multiply'} <= ops, ops


def _compiled_train_step(dtype, **overrides):
  """Optimised HLO text of a small ViT's train step (the benchmark's config)."""
  return _lowered_train_step(dtype, **overrides).compile().as_text()


def _lowered_train_step(dtype, **overrides):
  """A small ViT's train step (the benchmark's config), lowered (jax.stages.Lowered)."""
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top
  from vit_jax.benchmark import model_speed  # pylint: disable=g-import-not-at-top
  from vit_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = model_speed.train_config('ViT-Ti/16', batch=4, resolution=32, dtype=dtype,
                                    num_classes=10, overrides=overrides)
  trainer = loop.Trainer(config, sharding.create_mesh(config.mesh), 1000)
  rng = np.random.default_rng(0)
  data = jax.device_put(
      {'image': rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32),
       'label': np.eye(10, dtype=np.float32)[rng.integers(0, 10, 4)]},
      trainer.batch_sharding)
  return trainer.lower_train_step(trainer.init_state(), data)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU behaviour')
def test_unrolled_blocks_transpose_the_mlp_gradient_without_recomputing_later_blocks():
  """With the blocks unrolled, XLA fused into the transposed copy of each MLP's output
  gradient the elementwise gradients of every later block (up to 560 instructions in
  ViT-B/16, 230 ms a layer); the copy now takes a materialised gradient."""
  from vit_jax.benchmark import step_profile  # pylint: disable=g-import-not-at-top
  hlo = _compiled_train_step('float32', num_layers=4, scan_layers=False,
                             layer_loop='unroll')
  instructions, computations = step_profile._parse_hlo(hlo)
  sizes = []
  for opcode, rest, _ in instructions.values():
    called = re.search(r'calls=%([^\s,]+)', rest)
    if (opcode == 'fusion' and called and 'MlpBlock_0/Dense_1' in rest
        and any(instructions[i][0] == 'transpose' for i in computations[called.group(1)])):
      sizes.append(len(computations[called.group(1)]))
  assert len(sizes) >= 4, sizes  # one per block at least
  assert max(sizes) <= 20, sizes


def test_heads_major_attention_bias_and_its_gradient():
  """A (groups, q, k) bias repeated over the (batch, head) pairs, as Swin's windows use it:
  output and gradients of q, k, v and the bias equal autodiff of the einsum form (1e-5)."""
  rng = np.random.default_rng(3)
  b, t, h, d, groups = 4, 6, 2, 8, 4  # groups = 2 windows x 2 heads
  q, k, v = (rng.normal(size=(b, t, h, d)).astype(np.float32) for _ in range(3))
  bias = rng.normal(size=(groups, t, t)).astype(np.float32)
  c = rng.normal(size=(b, t, h, d)).astype(np.float32)

  def reference(q, k, v, bias):
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(d)
    logits = (logits.reshape(-1, groups, t, t) + bias).reshape(b, h, t, t)
    return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, -1), v)

  ours = attention.heads_major_attention
  np.testing.assert_allclose(ours(q, k, v, bias), reference(q, k, v, bias), rtol=1e-5,
                             atol=1e-5)
  got = jax.grad(lambda *a: jnp.sum(ours(*a) * c), (0, 1, 2, 3))(q, k, v, bias)
  want = jax.grad(lambda *a: jnp.sum(reference(*a) * c), (0, 1, 2, 3))(q, k, v, bias)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='groups dividing batch x heads = 8'):
    ours(q, k, v, bias[:3])
