"""The models as a researcher uses them from their own code: clear errors for params of
another layout, rates outside [0, 1), the direct module constructor, float32 logits in
mixed precision for every family, and exports of stacked or bfloat16 params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoints
from vit_jax import models
from vit_jax.models import vit

TINY = dict(patch_size=(8, 8), hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2,
            num_classes=3)
X = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)


def test_params_of_the_other_block_layout_are_refused_with_the_converter():
  unrolled = models.create('ViT-Ti/16', **TINY)
  stacked = models.create('ViT-Ti/16', **TINY, scan_layers=True)
  variables = models.init_variables(unrolled, 16)
  converted = models.stack_layers(variables)  # takes the variables, not only params
  np.testing.assert_array_equal(stacked.apply(converted, X), unrolled.apply(variables, X))
  back = models.unstack_layers(converted)
  assert jax.tree.structure(back) == jax.tree.structure(variables)
  import flax  # pylint: disable=g-import-not-at-top
  frozen = models.stack_layers(flax.core.freeze(variables))  # a FrozenDict too
  np.testing.assert_array_equal(stacked.apply(frozen, X), unrolled.apply(variables, X))
  with pytest.raises(ValueError, match=r'blocks stacked .*unstack_layers'):
    unrolled.apply(converted, X)  # a KeyError 'encoderblock_0' before
  with pytest.raises(ValueError, match=r'blocks unrolled .*stack_layers'):
    stacked.apply(variables, X)  # flax's "collection is empty" before
  resnet = models.init_variables(models.create('ResNet-50', layers=(1, 1, 1, 1)), 16)
  assert models.stack_layers(resnet)['params'] is resnet['params']  # no encoder: unchanged


def test_unpooled_on_class_token_params_names_token_unpooled():
  variables = models.init_variables(models.create('ViT-Ti/16', **TINY), 16)
  unpooled = models.create('ViT-Ti/16', **dict(TINY, num_classes=0), classifier='unpooled')
  with pytest.raises(ValueError, match="use classifier='token_unpooled'"):
    unpooled.apply(variables, X)
  tokens = models.create('ViT-Ti/16', **dict(TINY, num_classes=0), classifier='token_unpooled')
  assert tokens.apply(variables, X).shape == (2, 5, 32)


@pytest.mark.parametrize('field, value', [('drop_path_rate', 1.0), ('drop_path_rate', -0.5),
                                          ('dropout_rate', 1.5),
                                          ('attention_dropout_rate', 1.0)])
def test_rates_outside_0_1_are_refused(field, value):
  # drop_path_rate=1 gave NaN gradients with the blocks scanned; -0.5 was ignored there
  # and rescaled by 1/1.5 unrolled.
  with pytest.raises(ValueError, match=f'{field}=.* must be a number in \\[0, 1\\)'):
    models.create('ViT-Ti/16', **TINY, **{field: value})


def test_the_module_takes_an_int_patch_size():
  kw = dict(TINY, patch_size=8)
  direct = vit.VisionTransformer(**kw)  # a TypeError in total_stride before
  variables = direct.init(jax.random.PRNGKey(0), X)
  made = models.create('ViT-Ti/16', **TINY)
  np.testing.assert_array_equal(direct.apply(variables, X), made.apply(variables, X))


def test_swin_logits_are_float32_in_mixed_precision():
  swin = models.create('Swin-T', image_size=16, patch_size=2, embed_dim=16, depths=(1, 1),
                       num_heads=(1, 2), window_size=4, num_classes=10, dtype='bfloat16')
  out = swin.apply(models.init_variables(swin, 16), X, train=False)
  assert out.dtype == jnp.float32  # bfloat16 before; ViT, ResNet and BiT give float32


def test_exports_unroll_stacked_blocks_and_widen_bfloat16(tmp_path):
  config = models.get_config('ViT-Ti/16')
  config.update(image_size=16, scan_layers=True, param_dtype='bfloat16', **TINY)
  module = models.create(config)
  params = models.init_variables(module, 16)['params']
  checkpoints.save_npz(tmp_path / 'w.npz', params)  # wrote a layout it then refused
  loaded = checkpoints.load_checkpoint(str(tmp_path / 'w.npz'))
  assert loaded.config.num_layers == 2
  unrolled = checkpoints.flatten(models.unstack_layers(params))
  for k, v in checkpoints.flatten(loaded.params).items():
    np.testing.assert_array_equal(v, np.asarray(unrolled[k], np.float32), err_msg=k)
  torch = pytest.importorskip('torch')
  sd = checkpoints.to_timm(config, params)  # a KeyError (stacked), a TypeError (bfloat16)
  assert sd['blocks.1.mlp.fc1.weight'].dtype == torch.float32
  assert len(checkpoints.to_hf(config, params)) > 0


@pytest.mark.parametrize('dtype, tol, classifier', [('float32', 1e-6, 'token'),
                                                     ('bfloat16', 3e-2, 'map')])
def test_custom_vjp_false_allows_forward_mode_with_the_same_gradients(dtype, tol, classifier):
  """custom_vjp=False: plain autodiff, so jax.jvp works (it raised "can't apply
  forward-mode autodiff (jvp) to a custom_vjp function" on CPU whatever the settings);
  its reverse-mode gradients equal the fast path's, and its JVP equals grad . tangent."""
  fast = models.create('ViT-Ti/16', **TINY, dtype=dtype, classifier=classifier)
  plain = models.create('ViT-Ti/16', **TINY, dtype=dtype, classifier=classifier,
                        custom_vjp=False)
  params = models.init_variables(fast, 16)['params']
  params = jax.tree.map(
      lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(2), a.shape, a.dtype), params)

  def loss(module):
    return lambda p: (module.apply({'params': p}, X) ** 2).mean()
  # Under jit: op by op, the Swin case took 45 s on a 2-core CPU.
  want, got = jax.jit(jax.grad(loss(fast)))(params), jax.jit(jax.grad(loss(plain)))(params)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert float(jnp.abs(a - b).max()) <= tol * scale
  tangent = jax.tree.map(lambda a: jnp.full_like(a, 0.01), params)
  _, jvp = jax.jit(lambda p, t: jax.jvp(loss(plain), (p,), (t,)))(params, tangent)
  projected = sum(float(jnp.vdot(g, t)) for g, t in zip(jax.tree.leaves(got),
                                                          jax.tree.leaves(tangent)))
  assert float(jvp) == pytest.approx(projected, rel=tol, abs=1e-7)
  with pytest.raises(TypeError, match='forward-mode'):
    jax.jvp(loss(fast), (params,), (tangent,))  # the default keeps the fast backward pass


def test_swin_custom_vjp_false_allows_forward_mode():
  """Swin's window attention and Dense layers leave the backward pass to autodiff with
  custom_vjp=False: jax.jvp works and the gradients equal the fast path's. A Swin config
  written before the field existed still builds (custom_vjp=True)."""
  kw = dict(image_size=16, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
            window_size=4, num_classes=10, drop_path_rate=0.0)
  fast, plain = models.create('Swin-T', **kw), models.create('Swin-T', **kw, custom_vjp=False)
  variables = models.init_variables(fast, 16)
  params = jax.tree.map(
      lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(2), a.shape, a.dtype),
      variables['params'])

  def loss(module):  # train=True: the CPU path with the custom backward pass
    return lambda p: (module.apply({'params': p}, X, train=True) ** 2).mean()
  # Under jit: op by op, the Swin case took 45 s on a 2-core CPU.
  want, got = jax.jit(jax.grad(loss(fast)))(params), jax.jit(jax.grad(loss(plain)))(params)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert float(jnp.abs(a - b).max()) <= 1e-5 * scale
  tangent = jax.tree.map(lambda a: jnp.full_like(a, 0.01), params)
  _, jvp = jax.jit(lambda p, t: jax.jvp(loss(plain), (p,), (t,)))(params, tangent)
  projected = sum(float(jnp.vdot(g, t)) for g, t in zip(jax.tree.leaves(got),
                                                          jax.tree.leaves(tangent)))
  assert float(jvp) == pytest.approx(projected, rel=1e-4, abs=1e-7)
  with pytest.raises(TypeError, match='forward-mode'):
    jax.jvp(loss(fast), (params,), (tangent,))  # the default: the custom backward passes
  old = models.get_config('Swin-T')
  old.update(kw)
  del old['custom_vjp']  # a config of an earlier version
  assert models.create(old).custom_vjp


@pytest.mark.parametrize('name, overrides', [
    ('ViT-Ti/16', TINY),
    ('ResNet-50', dict(layers=(1, 1, 1, 1), num_classes=3)),
    ('swin_tiny_patch4_window7_224', dict(embed_dim=8, depths=(1, 1), num_heads=(1, 1),
                                          window_size=4, image_size=16, num_classes=3)),
])
def test_integer_pixels_are_refused_with_how_to_scale_them(name, overrides):
  # uint8 pixels in 0..255 gave logits (of images far outside the weights' range) before.
  module = models.create(name, **overrides)
  variables = models.init_variables(module, 16)
  module.apply(variables, X)
  with pytest.raises(TypeError, match=r'expected float images .*got uint8') as raised:
    module.apply(variables, jnp.zeros((2, 16, 16, 3), jnp.uint8))
  # Each family's scaling (a ResNet was told [-1, 1], not timm's ImageNet mean and std).
  assert ('[-1, 1] for ViT and BiT' in str(raised.value)
          and 'ImageNet mean and std for the timm weights of Swin, ResNet' in str(raised.value))


def test_train_with_dropout_and_no_dropout_key_names_the_rates_and_the_fix():
  module = models.create('ViT-Ti/16', **TINY, dropout_rate=0.1)
  variables = models.init_variables(module, 16)
  with pytest.raises(ValueError, match=r"dropout_rate=0.1.*rngs=\{'dropout': key\}"):
    module.apply(variables, X, train=True)
  module.apply(variables, X, train=True, rngs={'dropout': jax.random.PRNGKey(1)})
  plain = models.create('ViT-Ti/16', **TINY)  # no stochastic layer: no key needed
  np.testing.assert_array_equal(plain.apply(variables, X, train=True),
                                plain.apply(variables, X))


def test_numpy_scalar_overrides_and_misspelled_fields():
  labels = np.array([0, 2, 1])
  module = models.create('ViT-Ti/16', **dict(TINY, num_classes=labels.max() + 1,
                                             patch_size=np.int64(8)))
  assert module.num_classes == 3 and type(module.num_classes) is int
  assert tuple(module.patch_size) == (8, 8)
  with pytest.raises(ValueError, match=r'patch_size=16.0 must be one or two positive ints'):
    models.create('ViT-Ti/16', patch_size=16.0)
  with pytest.raises(ValueError, match=r"'num_class' -> 'num_classes'"):
    models.create('ViT-Ti/16', num_class=10)


def test_attention_maps_of_a_scanned_model_and_of_another_family():
  unrolled = models.create('ViT-Ti/16', **TINY)
  variables = models.init_variables(unrolled, 16)
  maps = models.attention_maps(unrolled, variables['params'], X)
  assert len(maps) == 2 and maps[0].shape == (2, 2, 5, 5)
  np.testing.assert_allclose(np.sum(maps[1], -1), 1, atol=1e-5)
  scanned = models.create('ViT-Ti/16', **TINY, scan_layers=True)  # a ValueError before
  stacked = models.stack_layers(variables)['params']
  for m in models.attention_maps(scanned, stacked, X), models.attention_maps(unrolled, stacked, X):
    for a, b in zip(m, maps):
      np.testing.assert_allclose(a, b, atol=1e-6)
  swin = models.create('swin_tiny_patch4_window7_224', embed_dim=8, depths=(1, 1),
                       num_heads=(1, 1), window_size=4, image_size=16, num_classes=3)
  with pytest.raises(TypeError, match='takes a VisionTransformer .*got a SwinTransformer'):
    models.attention_maps(swin, models.init_variables(swin, 16)['params'], X)


@pytest.mark.parametrize('field, value, match', [
    ('num_layers', 2.0, r'num_layers=2.0 \(float\): the field takes an int, e.g. num_layers=12'),
    ('classifier', 3, r"classifier=3 \(int\): the field takes a str, e.g. classifier='token'"),
])
def test_an_override_of_the_wrong_type_names_the_field_and_its_type(field, value, match):
  with pytest.raises(ValueError, match=match):  # ml_collections' TypeError before
    models.create('ViT-B/16', **{field: value})


@pytest.mark.parametrize('name', ['ViT-Ti/16', 'Swin-T'])
def test_init_helpers_take_a_height_and_width(name):
  """init_params / abstract_variables / forward_flops took a square int only (a (h, w)
  size was jax's 'Shapes must be 1D sequences of concrete values of integer type')."""
  overrides = TINY if name.startswith('ViT') else dict(
      embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=2, num_classes=3,
      image_size=(16, 32))
  module = models.create(name, **overrides)
  params = models.init_params(module, (16, 32))
  abstract = models.abstract_params(module, (16, 32))
  assert jax.tree.map(lambda p: p.shape, params) == jax.tree.map(lambda p: p.shape, abstract)
  x = jnp.zeros((1, 16, 32, 3), jnp.float32)
  assert module.apply({'params': params}, x).shape == (1, 3)
  assert models.forward_flops(module, (16, 32)) > models.forward_flops(module, 16) > 0
  if name.startswith('ViT'):  # 8 patches of 8 against 4 and the class token
    assert models.analytic_flops(module, (16, 32)) == pytest.approx(
        models.forward_flops(module, (16, 32)), rel=0.1)
  with pytest.raises(ValueError, match=r"image_size='16x32': an int \(square images\) or"):
    models.init_params(module, '16x32')


def test_library_errors_name_the_field_and_the_fix():
  """Three flax/jax errors that named no field: a hybrid root GroupNorm cannot split,
  cuDNN attention without a GPU, and params without a head for a model with one."""
  with pytest.raises(ValueError, match=r'resnet.width_factor=0.25 gives a root of 16 channels'):
    models.create('R26+ViT-S/32', **dict(TINY, patch_size=1),
                  resnet=dict(num_layers=(1,), width_factor=0.25))
  module = models.create('ViT-Ti/16', **TINY)
  params = models.init_params(module, 16)
  if jax.default_backend() != 'gpu':
    cudnn = models.create('ViT-Ti/16', **TINY, attention_impl='cudnn')
    with pytest.raises(ValueError, match="attention_impl='cudnn' needs an NVIDIA GPU"):
      cudnn.apply({'params': params}, X)
  features = models.init_params(models.create('ViT-Ti/16', **dict(TINY, num_classes=0)), 16)
  with pytest.raises(ValueError, match=r"the params have no head \('head'\), and this model "
                                       'has num_classes=3'):
    module.apply({'params': features}, X)


@pytest.mark.parametrize('name, overrides, rate', [
    ('Swin-T', dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=2,
                    image_size=16), 'drop_path_rate'),
    ('ResNet-50', dict(layers=(1, 1, 1, 1)), 'dropout_rate'),
    ('Res2Net-50 26w4s', dict(layers=(1, 1, 1, 1)), 'drop_path_rate'),
    ('BiT-R50x1', dict(num_layers=(1,)), 'drop_path_rate'),
])
def test_every_family_names_the_fix_for_a_training_apply(name, overrides, rate):
  """Swin, ResNet, Res2Net and BiT passed flax's errors through ('unit01 needs PRNG for
  "dropout"', "Cannot update variable 'mean' in '/bn1'", 'Collection batch_stats not
  found'), which name a submodule and not the fix; the ViT named it already."""
  module = models.create(name, num_classes=3, **overrides, **{rate: 0.1})
  variables = models.init_variables(module, 16)
  has_bn = 'batch_stats' in variables
  mutable = ['batch_stats'] if has_bn else False
  with pytest.raises(ValueError, match=rf"{rate}=0.1.*rngs=\{{'dropout': key\}}"):
    module.apply(variables, X, train=True, mutable=mutable)
  out = module.apply(variables, X, train=True, mutable=mutable,
                     rngs={'dropout': jax.random.PRNGKey(1)})
  assert (out[0] if has_bn else out).shape == (2, 3)
  if has_bn:
    with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
      module.apply(variables, X, train=True, rngs={'dropout': jax.random.PRNGKey(1)})
    with pytest.raises(ValueError, match="the variables have no 'batch_stats'"):
      module.apply({'params': variables['params']}, X)
    frozen = models.create(name, num_classes=3, **overrides, bn_frozen=True)
    frozen.apply(variables, X, train=True)  # frozen statistics: nothing to update
