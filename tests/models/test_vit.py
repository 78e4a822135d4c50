"""The Flax VisionTransformer module: shapes, parameter names, numerics and errors.

Small models only (2 layers, width 64, 32 px images) so the file runs in seconds on CPU.
Numerical references are independent: numpy float64 re-implementations and
flax.linen.MultiHeadDotProductAttention (the module the original checkpoints came from).
"""

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp

import numpy as np
import pytest
import scipy.special
from flax import traverse_util

from vit_jax import models
from vit_jax.models import attention as attention_lib
from vit_jax.models import vit as vit_lib

SMALL = dict(num_layers=2, hidden_size=64, num_heads=4, mlp_dim=128, num_classes=10)
D, HEADS, IMG, B = 64, 4, 32, 2
TOKENS = (IMG // 16) ** 2  # 4 patches of 16 px


def small(**overrides):
  return models.create('ViT-Ti/16', **{**SMALL, **overrides})


def images(batch=B, size=IMG, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(-1.0, 1.0, (batch, size, size, channels)), jnp.float32)


def normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


_JITTED = {}


def run(module, params, x, *, rng=None, mutable=False, **kwargs):
  """module.apply under jit (compiling once beats op-by-op dispatch on a small CPU)."""
  key = (repr(module), repr(mutable), repr(sorted(kwargs.items())), rng is None)
  if key not in _JITTED:
    def fn(p, x, r):
      rngs = None if r is None else {'dropout': r}
      return module.apply({'params': p}, x, rngs=rngs, mutable=mutable, **kwargs)
    _JITTED[key] = jax.jit(fn)
  return _JITTED[key](params, x, rng)


def flat(params):
  return {k: v for k, v in traverse_util.flatten_dict(params, sep='/').items()}


def random_params(module, image_size=IMG, seed=0):
  """Random float32 parameters with the module's tree, without compiling its init.

  (`models.init_params` compiles the initialisers, seconds per model on a small CPU;
  the equivalence tests only need some well-scaled values.)
  """
  return fill(models.abstract_params(module, image_size), seed)


def random_module_params(module, *args, seed=0, **kwargs):
  """Random parameters for a submodule, from the shapes of its init."""
  return fill(jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))['params'], seed)


def fill(abstract, seed):
  rng = np.random.default_rng(seed)
  tree = flat(abstract)
  out = {}
  for path, leaf in tree.items():
    shape, name = tuple(leaf.shape), path.split('/')[-1]
    if name == 'scale':
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name == 'bias':
      value = 0.1 * rng.standard_normal(shape)
    elif name in ('pos_embedding', 'cls', 'probe'):
      value = 0.5 * rng.standard_normal(shape)
    else:  # kernels; query/key/value are (in, heads, head_dim), out is (heads, head_dim, out)
      proj = path.split('/')[-2]
      fan_in = shape[0] if proj in ('query', 'key', 'value') else int(np.prod(shape[:-1]))
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    out[path] = jnp.asarray(value, leaf.dtype)
  return traverse_util.unflatten_dict(out, sep='/')


@pytest.fixture(scope='module')
def token_model():
  module = small()
  return module, random_params(module)


# ---------------------------------------------------------------------------- shapes


@pytest.mark.parametrize('classifier,shape', [
    ('token', (B, 10)), ('gap', (B, 10)), ('map', (B, 10)),
    ('unpooled', (B, TOKENS, 10)), ('token_unpooled', (B, TOKENS + 1, 10))])
def test_output_shapes(classifier, shape):
  module = small(classifier=classifier)
  params = random_params(module)
  out = run(module, params, images())
  assert out.shape == shape
  assert out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))
  assert 'head' in params
  assert ('cls' in params) == (classifier in ('token', 'token_unpooled'))


@pytest.mark.parametrize('classifier', ['unpooled', 'token_unpooled'])
def test_unpooled_models_apply_the_head_to_every_token(classifier):
  """As the original release: pre-logits and head on each token (they were dropped
  without a word, num_classes=10 gave the features); num_classes=0 gives the features."""
  module = small(classifier=classifier, representation_size=16)
  params = random_params(module)
  logits = np.asarray(run(module, params, images()))
  features_module = small(classifier=classifier, num_classes=0)
  features = np.asarray(run(features_module, {k: v for k, v in params.items()
                                              if k not in ('head', 'pre_logits')}, images()))
  assert features.shape[-1] == D and logits.shape == features.shape[:2] + (10,)
  pre = np.tanh(features @ np.asarray(params['pre_logits']['kernel'])
                + np.asarray(params['pre_logits']['bias']))
  want = pre @ np.asarray(params['head']['kernel']) + np.asarray(params['head']['bias'])
  np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)
  # The analytic FLOP count follows: the per-token layers against XLA's count.
  heads = models.forward_flops(module, IMG) - models.forward_flops(features_module, IMG)
  analytic = (models.analytic_flops(module, IMG)
              - models.analytic_flops(features_module, IMG))
  assert heads == pytest.approx(analytic, rel=0.05)


@pytest.mark.parametrize('num_classes', [0, None])
def test_no_classes_returns_pooled_features(num_classes):
  module = small(num_classes=num_classes)
  params = random_params(module)
  assert 'head' not in params
  out = run(module, params, images())
  assert out.shape == (B, D)
  # With the token classifier the features are the normalised class token.
  unpooled = small(classifier='token_unpooled', num_classes=num_classes)
  full = run(unpooled, params, images())
  np.testing.assert_allclose(out, full[:, 0], atol=1e-6, rtol=0)


def test_representation_size_adds_pre_logits():
  module = small(representation_size=32)
  params = random_params(module)
  assert params['pre_logits']['kernel'].shape == (D, 32)
  assert params['pre_logits']['bias'].shape == (32,)
  assert params['head']['kernel'].shape == (32, 10)
  assert 'pre_logits' not in models.abstract_params(small(), IMG)
  # Features (num_classes=0) come out of the tanh: within [-1, 1], width 32.
  feats = run(small(representation_size=32, num_classes=0), params, images())
  assert feats.shape == (B, 32)
  assert np.all(np.abs(np.asarray(feats)) <= 1.0)


# ------------------------------------------------------------------- parameter names


def _expected_vit_keys(num_layers, cls=True):
  keys = {'embedding/kernel', 'embedding/bias', 'Transformer/posembed_input/pos_embedding',
          'Transformer/encoder_norm/scale', 'Transformer/encoder_norm/bias',
          'head/kernel', 'head/bias'}
  if cls:
    keys.add('cls')
  for i in range(num_layers):
    p = f'Transformer/encoderblock_{i}/'
    for ln in ('LayerNorm_0', 'LayerNorm_1'):
      keys |= {p + ln + '/scale', p + ln + '/bias'}
    for proj in ('query', 'key', 'value', 'out'):
      keys |= {p + f'MultiHeadDotProductAttention_0/{proj}/kernel',
               p + f'MultiHeadDotProductAttention_0/{proj}/bias'}
    for dense in ('Dense_0', 'Dense_1'):
      keys |= {p + f'MlpBlock_0/{dense}/kernel', p + f'MlpBlock_0/{dense}/bias'}
  return keys


def test_parameter_names_and_shapes_match_original_linen():
  params = flat(models.abstract_params(small(), IMG))
  assert set(params) == _expected_vit_keys(2)
  shapes = {k: tuple(v.shape) for k, v in params.items()}
  blk = 'Transformer/encoderblock_0/'
  mha = blk + 'MultiHeadDotProductAttention_0/'
  assert shapes['embedding/kernel'] == (16, 16, 3, D)
  assert shapes['cls'] == (1, 1, D)
  assert shapes['Transformer/posembed_input/pos_embedding'] == (1, TOKENS + 1, D)
  for proj in ('query', 'key', 'value'):
    assert shapes[mha + proj + '/kernel'] == (D, HEADS, D // HEADS)
    assert shapes[mha + proj + '/bias'] == (HEADS, D // HEADS)
  assert shapes[mha + 'out/kernel'] == (HEADS, D // HEADS, D)
  assert shapes[mha + 'out/bias'] == (D,)
  assert shapes[blk + 'MlpBlock_0/Dense_0/kernel'] == (D, 128)
  assert shapes[blk + 'MlpBlock_0/Dense_1/kernel'] == (128, D)
  assert shapes['head/kernel'] == (D, 10)


def test_attention_parameters_match_flax_linen_module():
  """Same tree (names and shapes) as flax.linen.MultiHeadDotProductAttention."""
  x = jnp.zeros((1, 5, D))
  ours = jax.eval_shape(lambda: attention_lib.MultiHeadDotProductAttention(
      num_heads=HEADS).init(jax.random.PRNGKey(0), x))['params']
  ref = jax.eval_shape(lambda: nn.MultiHeadDotProductAttention(num_heads=HEADS).init(
      jax.random.PRNGKey(0), x, x))['params']
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, ref)


def test_map_head_parameter_names():
  params = flat(models.abstract_params(small(classifier='map'), IMG))
  assert params['MAPHead_0/probe'].shape == (1, 1, D)
  for k in ('MAPHead_0/MultiHeadDotProductAttention_0/query/kernel',
            'MAPHead_0/MultiHeadDotProductAttention_0/out/kernel',
            'MAPHead_0/LayerNorm_0/scale', 'MAPHead_0/MlpBlock_0/Dense_0/kernel',
            'MAPHead_0/MlpBlock_0/Dense_1/kernel'):
    assert k in params, k
  assert 'cls' not in params
  assert params['Transformer/posembed_input/pos_embedding'].shape == (1, TOKENS, D)


def test_hybrid_parameter_names():
  module = models.create('R26+ViT-S/32', num_layers=1, hidden_size=64, num_heads=4,
                         mlp_dim=128)
  params = flat(models.abstract_params(module, 64))
  for k in ('conv_root/kernel', 'gn_root/scale', 'gn_root/bias',
            'block4/unit2/conv3/kernel', 'embedding/kernel', 'cls',
            'Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel'):
    assert k in params, k
  for conv in ('conv1', 'conv2', 'conv3', 'conv_proj'):
    assert f'block1/unit1/{conv}/kernel' in params
    assert f'block1/unit1/{conv}/bias' not in params  # weight-standardised, no bias
  for gn in ('gn1', 'gn2', 'gn3', 'gn_proj'):
    assert f'block1/unit1/{gn}/scale' in params and f'block1/unit1/{gn}/bias' in params
  assert 'block1/unit2/conv_proj/kernel' not in params  # projection only in unit1
  assert 'block5/unit1/conv1/kernel' not in params and 'block4/unit3/conv1/kernel' not in params
  assert params['conv_root/kernel'].shape == (7, 7, 3, 64)
  assert params['block4/unit2/conv3/kernel'].shape == (1, 1, 512, 2048)
  # R26 stem: stride 32, patch 1 -> a 64 px image gives 2x2 tokens plus the class token.
  assert params['embedding/kernel'].shape == (1, 1, 2048, 64)
  assert params['Transformer/posembed_input/pos_embedding'].shape == (1, 5, 64)
  assert module.total_stride() == (32, 32)


def test_root_only_hybrid_forward():
  module = models.create('R+ViT-Ti/16', num_layers=1, hidden_size=64, num_heads=4,
                         mlp_dim=128, num_classes=10)
  params = random_params(module, 32)
  assert 'block1/unit1/conv1/kernel' not in flat(params)
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 2, 64)
  out = run(module, params, images(size=32))
  assert out.shape == (B, 10)


# ------------------------------------------------------------------------- the head


def test_init_params_head_zero_initialised_with_bias_init():
  """The only test that runs the real initialisers (compiling them takes seconds)."""
  module = small(num_layers=1, head_bias_init=-10.0)
  params = models.init_params(module, IMG)
  np.testing.assert_array_equal(params['head']['kernel'], 0.0)
  np.testing.assert_array_equal(params['head']['bias'], -10.0)
  logits = run(module, params, images())
  np.testing.assert_array_equal(logits, -10.0)
  # The rest follows the original initialisation: zero class token, N(0, 0.02) position
  # embedding (320 samples: the std estimate is within ~4%), near-zero MLP biases.
  np.testing.assert_array_equal(params['cls'], 0.0)
  pe_std = float(np.std(params['Transformer']['posembed_input']['pos_embedding']))
  assert 0.015 < pe_std < 0.025
  mlp = params['Transformer']['encoderblock_0']['MlpBlock_0']
  assert 0 < float(np.max(np.abs(mlp['Dense_0']['bias']))) < 1e-4
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))


# -------------------------------------------------------------------------- attention


def _np_layernorm(x, scale, bias, eps):
  x = np.asarray(x, np.float64)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(scale) + np.asarray(bias)


def _np_softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def _np_attention(x_q, x_kv, p):
  """softmax(Q K^T / sqrt(d)) V with linen-layout params; returns (out, weights)."""
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  x_q, x_kv = f64(x_q), f64(x_kv)
  q = np.einsum('btd,dhk->bthk', x_q, f64(p['query']['kernel'])) + f64(p['query']['bias'])
  k = np.einsum('btd,dhk->bthk', x_kv, f64(p['key']['kernel'])) + f64(p['key']['bias'])
  v = np.einsum('btd,dhk->bthk', x_kv, f64(p['value']['kernel'])) + f64(p['value']['bias'])
  w = _np_softmax(np.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(q.shape[-1]))
  o = np.einsum('bhqs,bshk->bqhk', w, v)
  out = np.einsum('bqhk,hkd->bqd', o, f64(p['out']['kernel'])) + f64(p['out']['bias'])
  return out, w


def test_attention_maps_shapes_and_rows_sum_to_one(token_model):
  module, params = token_model
  maps = models.attention_maps(module, params, images())
  assert len(maps) == module.num_layers
  for m in maps:
    assert m.shape == (B, HEADS, TOKENS + 1, TOKENS + 1)
    m = np.asarray(m)
    assert np.all(m >= 0)
    np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5, rtol=0)
  assert not np.allclose(maps[0], maps[1])


def test_attention_maps_match_numpy_on_block_inputs(token_model):
  """Block 0's map from its LayerNorm_0 output and query/key params, in numpy."""
  module, params = token_model
  x = images()
  maps = models.attention_maps(module, params, x)
  # Per-block intermediates are recorded by the unrolled blocks (the default runs them
  # as one scan, whose body is traced once).
  _, state = run(module.clone(layer_loop='unroll'), params, x, capture_intermediates=True,
                 mutable=['intermediates'])
  blocks = state['intermediates']['Transformer']
  for i in range(module.num_layers):
    ln_out = blocks[f'encoderblock_{i}']['LayerNorm_0']['__call__'][0]
    p = params['Transformer'][f'encoderblock_{i}']['MultiHeadDotProductAttention_0']
    _, w = _np_attention(ln_out, ln_out, p)
    np.testing.assert_allclose(maps[i], w, atol=1e-5, rtol=0)


def test_explicit_attention_path_equals_fused_path(token_model):
  module, params = token_model
  x = images()
  fused = run(module, params, x)
  explicit, state = run(module, params, x, capture_attention=True, mutable=['intermediates'])
  assert 'attention_weights' in state['intermediates']['Transformer']['encoderblock_0']
  assert np.max(np.abs(np.asarray(fused))) > 1e-2  # the head is not trivially zero
  np.testing.assert_allclose(explicit, fused, atol=1e-5, rtol=0)


@pytest.mark.parametrize('return_weights', [False, True])
def test_attention_module_matches_numpy(return_weights):
  x = normal((B, 7, D), seed=3)
  mod = attention_lib.MultiHeadDotProductAttention(num_heads=HEADS)
  params = random_module_params(mod, x, seed=4)  # non-zero biases too
  out = mod.apply({'params': params}, x, return_weights=return_weights)
  ref_out, ref_w = _np_attention(x, x, params)
  if return_weights:
    out, w = out
    assert w.shape == (B, HEADS, 7, 7)
    np.testing.assert_allclose(w, ref_w, atol=1e-5, rtol=0)
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=0)
  # And the linen module the original checkpoints were made with agrees as well.
  linen = nn.MultiHeadDotProductAttention(num_heads=HEADS).apply({'params': params}, x, x)
  np.testing.assert_allclose(out, linen, atol=1e-5, rtol=0)


def test_attention_module_cross_attention_matches_numpy():
  q_in, kv_in = normal((B, 1, D), seed=5), normal((B, 9, D), seed=6)
  mod = attention_lib.MultiHeadDotProductAttention(num_heads=HEADS)
  params = random_module_params(mod, q_in, kv_in, seed=7)
  out = mod.apply({'params': params}, q_in, kv_in)
  np.testing.assert_allclose(out, _np_attention(q_in, kv_in, params)[0], atol=1e-5, rtol=0)


def test_encoder_block_matches_numpy():
  """A whole pre-LN block: x + attn(LN0(x)); x + mlp(LN1(x)), tanh GELU, eps 1e-6."""
  x = normal((B, 5, D), seed=8)
  block = vit_lib.Encoder1DBlock(mlp_dim=128, num_heads=HEADS)
  params = random_module_params(block, x, deterministic=True, seed=9)
  out = block.apply({'params': params}, x, deterministic=True)
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  y = _np_layernorm(x, params['LayerNorm_0']['scale'], params['LayerNorm_0']['bias'], 1e-6)
  h = f64(x) + _np_attention(y, y, params['MultiHeadDotProductAttention_0'])[0]
  y = _np_layernorm(h, params['LayerNorm_1']['scale'], params['LayerNorm_1']['bias'], 1e-6)
  mlp = params['MlpBlock_0']
  z = y @ f64(mlp['Dense_0']['kernel']) + f64(mlp['Dense_0']['bias'])
  z = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
  ref = h + z @ f64(mlp['Dense_1']['kernel']) + f64(mlp['Dense_1']['bias'])
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------- dropout / drop path


def test_dropout_and_drop_path():
  module = small(dropout_rate=0.1, drop_path_rate=0.2)
  params = random_params(module)
  x = images()
  t1 = run(module, params, x, train=True, rng=jax.random.PRNGKey(1))
  t1b = run(module, params, x, train=True, rng=jax.random.PRNGKey(1))
  t2 = run(module, params, x, train=True, rng=jax.random.PRNGKey(2))
  np.testing.assert_array_equal(t1, t1b)
  assert np.max(np.abs(np.asarray(t1) - np.asarray(t2))) > 1e-3
  e1 = run(module, params, x, train=False)
  e2 = run(module, params, x, train=False)
  np.testing.assert_array_equal(e1, e2)
  assert np.max(np.abs(np.asarray(t1) - np.asarray(e1))) > 1e-3
  no_dropout = run(small(), params, x)
  np.testing.assert_allclose(e1, no_dropout, atol=1e-6, rtol=0)


def test_train_without_dropout_is_deterministic_and_needs_no_rng(token_model):
  module, params = token_model
  train = run(module, params, images(), train=True)
  np.testing.assert_allclose(train, run(module, params, images(), train=False),
                             atol=1e-6, rtol=0)


def test_attention_dropout_train_differs_from_eval():
  module = small(attention_dropout_rate=0.3)
  params = random_params(module)
  x = images()
  train = run(module, params, x, train=True, rng=jax.random.PRNGKey(0))
  train2 = run(module, params, x, train=True, rng=jax.random.PRNGKey(1))
  evaluated = run(module, params, x, train=False)
  assert np.all(np.isfinite(np.asarray(train)))
  assert np.max(np.abs(np.asarray(train) - np.asarray(evaluated))) > 1e-3
  assert np.max(np.abs(np.asarray(train) - np.asarray(train2))) > 1e-3
  np.testing.assert_allclose(evaluated, run(small(), params, x),
                             atol=1e-6, rtol=0)


def test_drop_path_rates_grow_linearly_from_zero():
  module = small(num_layers=3, drop_path_rate=0.2, layer_loop='unroll')
  params = random_params(module)
  rates = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, vit_lib.DropPath) and context.method_name == '__call__':
      rates.setdefault(context.module.path[-2], set()).add(context.module.rate)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: module.apply(  # tracing is enough to see every DropPath
        {'params': params}, images(), train=True, rngs={'dropout': jax.random.PRNGKey(0)}))
  assert set(rates) == {'encoderblock_0', 'encoderblock_1', 'encoderblock_2'}
  np.testing.assert_allclose(sorted(rates['encoderblock_0']), [0.0])
  np.testing.assert_allclose(sorted(rates['encoderblock_1']), [0.1])
  np.testing.assert_allclose(sorted(rates['encoderblock_2']), [0.2])


def test_single_block_never_drops_path():
  # One block: it is the first, so its rate is 0 (as timm's linspace(0, rate, depth)).
  module = small(num_layers=1, drop_path_rate=0.9)
  params = random_params(module)
  train = run(module, params, images(), train=True, rng=jax.random.PRNGKey(0))
  np.testing.assert_allclose(train, run(module, params, images(), train=False),
                             atol=1e-6, rtol=0)


def test_drop_path_unit():
  n = 4000
  x = jnp.ones((n, 3, 2))
  layer = vit_lib.DropPath(rate=0.5)
  y = np.asarray(layer.apply({}, x, False, rngs={'dropout': jax.random.PRNGKey(0)}))
  per_example = y.reshape(n, -1)
  dropped = np.all(per_example == 0.0, axis=1)
  kept = np.all(per_example == 2.0, axis=1)  # scaled by 1 / (1 - rate)
  assert np.all(dropped | kept)  # whole examples are dropped, never single entries
  assert abs(dropped.mean() - 0.5) < 0.04  # ~5 binomial standard deviations
  np.testing.assert_array_equal(layer.apply({}, x, True), x)
  np.testing.assert_array_equal(
      vit_lib.DropPath(rate=0.0).apply({}, x, False, rngs={'dropout': jax.random.PRNGKey(0)}),
      x)
  # Mean preserved in expectation.
  assert abs(y.mean() - 1.0) < 0.08


def test_drop_path_rate_one_has_finite_gradient():
  layer = vit_lib.DropPath(rate=1.0)
  x = jnp.ones((8, 3))
  fn = lambda x: layer.apply({}, x, False, rngs={'dropout': jax.random.PRNGKey(0)})  # noqa: E731
  np.testing.assert_array_equal(fn(x), 0.0)
  grad = jax.grad(lambda x: fn(x).sum())(x)
  assert np.all(np.isfinite(np.asarray(grad)))


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize('approximate', [True, False])
def test_mlp_block_gelu_matches_numpy(approximate):
  x = normal((B, 5, D), seed=10)
  mlp = vit_lib.MlpBlock(mlp_dim=128, gelu_approximate=approximate)
  params = random_module_params(mlp, x, deterministic=True, seed=11)
  out = mlp.apply({'params': params}, x, deterministic=True)
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  z = f64(x) @ f64(params['Dense_0']['kernel']) + f64(params['Dense_0']['bias'])
  if approximate:
    z = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
  else:
    z = 0.5 * z * (1 + scipy.special.erf(z / np.sqrt(2)))
  ref = z @ f64(params['Dense_1']['kernel']) + f64(params['Dense_1']['bias'])
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_gelu_option_changes_logits(token_model):
  module, params = token_model
  approx = run(small(gelu_approximate=True), params, images())
  exact = run(small(gelu_approximate=False), params, images())
  np.testing.assert_allclose(approx, run(module, params, images()), atol=1e-6, rtol=0)
  assert np.max(np.abs(np.asarray(approx) - np.asarray(exact))) > 1e-5


def test_bfloat16_compute_keeps_float32_params_and_logits(token_model):
  _, params32 = token_model
  module = small(dtype='bfloat16')
  params = models.abstract_params(module, IMG)  # dtypes without allocating
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, params32)
  logits = run(module, params32, images())
  ref = run(small(), params32, images())
  assert logits.dtype == jnp.float32
  scale = float(np.max(np.abs(np.asarray(ref))))
  assert scale > 0.1
  np.testing.assert_allclose(logits, ref, atol=5e-2 * scale, rtol=0)
  # Every output form is float32: the tokens too (they came out in bfloat16).
  for classifier in ('unpooled', 'token_unpooled'):
    unpooled = small(dtype='bfloat16', classifier=classifier, num_classes=0)
    assert run(unpooled, random_params(unpooled), images()).dtype == jnp.float32
  # Every family's module takes train=False by default, as the ViT does.
  for name in ('Swin-T', 'BiT-R50x1'):
    module = models.create(name, num_classes=3)
    assert inspect.signature(type(module).__call__).parameters['train'].default is False


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope='module')
def params32():
  return random_params(small())


def test_error_image_not_divisible_by_patch(params32):
  with pytest.raises(ValueError, match=r'\(33, 33\).*patch size \(16, 16\)'):
    small().apply({'params': params32}, images(size=33))


def test_error_hybrid_image_not_divisible_by_stem_stride():
  module = models.create('R26+ViT-S/32', num_layers=1, hidden_size=64, num_heads=4,
                         mlp_dim=128)
  with pytest.raises(ValueError, match=r'\(48, 48\).*32'):
    models.abstract_params(module, 48)


def test_error_wrong_channel_count(params32):
  with pytest.raises(ValueError, match='channels') as info:
    small().apply({'params': params32}, images(channels=4))
  assert 'NCHW' not in str(info.value)


def test_error_nchw_hint(params32):
  x = jnp.zeros((B, 3, IMG, IMG))
  with pytest.raises(ValueError, match='NCHW'):
    small().apply({'params': params32}, x)


def test_error_rank3_input(params32):
  with pytest.raises(ValueError, match='rank 4'):
    small().apply({'params': params32}, jnp.zeros((IMG, IMG, 3)))


def test_error_resolution_mismatch_points_to_resample_posemb(params32):
  with pytest.raises(ValueError, match='resample_posemb'):
    small().apply({'params': params32}, images(size=64))


def test_resampled_posemb_runs_at_new_resolution(params32):
  params = dict(params32)
  tr = dict(params['Transformer'])
  pe = tr['posembed_input']['pos_embedding']
  tr['posembed_input'] = {'pos_embedding': models.resample_posemb(pe, 4)}
  params['Transformer'] = tr
  assert tr['posembed_input']['pos_embedding'].shape == (1, 17, D)
  out = run(small(), params, images(size=64))
  assert out.shape == (B, 10)


def test_error_unknown_classifier():
  with pytest.raises(ValueError, match='fancy'):
    small(classifier='fancy')
  module = vit_lib.VisionTransformer(num_classes=10, patch_size=(16, 16), hidden_size=D,
                                     num_layers=1, num_heads=HEADS, mlp_dim=128,
                                     classifier='fancy')
  with pytest.raises(ValueError, match='fancy'):
    models.abstract_params(module, IMG)


def test_parameters_of_fewer_blocks_than_the_model_are_named():
  """It used to be a bare KeyError: 'encoderblock_2'."""
  params = models.init_params(models.create('ViT-Ti/16', num_layers=2, num_classes=3), 32)
  deeper = models.create('ViT-Ti/16', num_layers=3, num_classes=3)
  with pytest.raises(ValueError, match=r'hold 2 encoder blocks .* num_layers=3: create the '
                     r'model with num_layers=2'):
    deeper.apply({'params': params}, np.zeros((1, 32, 32, 3), np.float32))


@pytest.mark.parametrize('num_layers,layout', [(1, {}), (2, dict(layer_loop='unroll')),
                                               (4, dict(layer_loop='unroll')),
                                               (2, dict(layer_loop='scan'))])
def test_weights_of_another_depth_are_refused_in_every_layout(num_layers, layout):
  """A model with fewer blocks than the weights used to run their first blocks silently
  (unrolled, or one block), and one with more failed with Flax's ScopeCollectionNotFound;
  only the scanned loop of several blocks named the depths."""
  kw = dict(hidden_size=32, num_heads=2, mlp_dim=64, patch_size=(8, 8), num_classes=3)
  params = models.init_params(models.create('ViT-B/16', num_layers=3, **kw), 32)
  module = models.create('ViT-B/16', num_layers=num_layers, **kw, **layout)
  x = np.zeros((1, 32, 32, 3), np.float32)
  with pytest.raises(ValueError, match='the parameters hold 3 encoder blocks'):
    jax.jit(lambda p: module.apply({'params': p}, x, train=False))(params)
