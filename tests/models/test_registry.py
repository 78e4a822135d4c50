"""The model registry: configs against timm's architectures, errors, numerics options, FLOPs.

Parameter counts come from `models.abstract_params` (shapes only, nothing allocated) and
are compared with timm models built on PyTorch's meta device (no memory, no weights).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

PAPER_TO_TIMM = {
    'ViT-Ti/16': 'vit_tiny_patch16_224',
    'ViT-S/32': 'vit_small_patch32_224',
    'ViT-S/16': 'vit_small_patch16_224',
    'ViT-S/8': 'vit_small_patch8_224',
    'ViT-B/32': 'vit_base_patch32_224',
    'ViT-B/16': 'vit_base_patch16_224',
    'ViT-B/8': 'vit_base_patch8_224',
    'ViT-L/32': 'vit_large_patch32_224',
    'ViT-L/16': 'vit_large_patch16_224',
    'ViT-H/14': 'vit_huge_patch14_224',
    'R50+ViT-B/16': 'vit_base_r50_s16_224',
    'R26+ViT-S/32': 'vit_small_r26_s32_224',
    'R26+ViT-B/32': 'vit_base_r26_s32_224',
    'R50+ViT-L/32': 'vit_large_r50_s32_224',
    'R+ViT-Ti/16': 'vit_tiny_r_s16_p8_224',
}
HYBRIDS = ('R50+ViT-B/16', 'R26+ViT-S/32', 'R26+ViT-B/32', 'R50+ViT-L/32', 'R+ViT-Ti/16')

def timm_name(name):
  return PAPER_TO_TIMM.get(name, name)


def _names():
  return models.list_models('vit')


@functools.lru_cache(maxsize=None)
def timm_meta(name):
  """A timm model on the meta device (shapes only) and its parameter count."""
  if not timm.is_model(name):
    raise AssertionError(f'{name!r} is not a timm model')
  with torch.device('meta'):
    m = timm.create_model(name, pretrained=False, num_classes=1000)
  return m, sum(p.numel() for p in m.parameters())


@functools.lru_cache(maxsize=None)
def our_param_count(name):
  cfg = models.get_config(name)
  return models.param_count(models.abstract_params(models.create(name), cfg.image_size))


def test_paper_names_are_all_registered():
  names = models.list_models('vit')
  assert set(PAPER_TO_TIMM) <= set(names)
  assert set(PAPER_TO_TIMM.values()) <= set(names)
  # Paper names first, then timm names.
  kinds = [n.startswith('vit_') for n in names]
  assert kinds == sorted(kinds)
  assert len(names) == len(set(names))


@pytest.mark.parametrize('name', _names())
def test_param_count_and_architecture_match_timm(name):
  cfg = models.get_config(name)
  m, theirs = timm_meta(timm_name(name))
  assert our_param_count(name) == theirs
  # The architecture itself, not only the total.
  assert cfg.hidden_size == m.embed_dim
  assert cfg.num_layers == len(m.blocks)
  assert cfg.num_heads == m.blocks[0].attn.num_heads
  assert cfg.mlp_dim == m.blocks[0].mlp.fc1.out_features
  assert tuple(cfg.patch_size) == tuple(m.patch_embed.patch_size)
  assert cfg.layernorm_eps == pytest.approx(m.norm.eps)
  backbone = getattr(m.patch_embed, 'backbone', None)  # timm's HybridEmbed
  assert (cfg.resnet is not None) == (backbone is not None)
  if backbone is not None:  # stage depths; R+ViT-Ti/16 is the root block only
    depths = [len(s.blocks) for s in backbone.stages] if hasattr(backbone, 'stages') else []
    assert list(cfg.resnet.num_layers) == depths
  if name.startswith('vit_'):
    assert cfg.image_size == m.pretrained_cfg['input_size'][-1]
    assert cfg.gelu_approximate is (m.blocks[0].mlp.act.approximate == 'tanh')


@pytest.mark.parametrize('name', _names())
def test_every_config_builds_at_its_image_size(name):
  module = models.create(name)
  cfg = models.get_config(name)
  sh, sw = module.total_stride()
  assert cfg.image_size % sh == 0 and cfg.image_size % sw == 0


@pytest.mark.parametrize('name,count', [
    ('ViT-Ti/16', 5_717_416), ('ViT-B/16', 86_567_656), ('ViT-L/16', 304_326_632),
    ('R26+ViT-S/32', 36_431_912)])
def test_published_param_counts(name, count):
  assert our_param_count(name) == count


@pytest.mark.parametrize('paper', HYBRIDS)
def test_hybrid_timm_configs_use_timm_epsilons(paper):
  for res in (224, 384):
    name = timm_name(paper)[:-3] + str(res)
    if name not in models.list_models():  # timm has no 384 px variant of some
      continue
    r = models.get_config(name).resnet
    assert r.gn_eps == 1e-5 and r.stdconv_eps == 1e-8 and r.stdconv_eps_in_sqrt
  paper_cfg = models.get_config(paper).resnet
  assert paper_cfg.gn_eps == 1e-6 and paper_cfg.stdconv_eps == 1e-5
  assert not paper_cfg.stdconv_eps_in_sqrt
  # And those are the epsilons timm's stem really uses.
  m, _ = timm_meta(timm_name(paper))
  gn_eps = {mod.eps for mod in m.patch_embed.backbone.modules()
            if isinstance(mod, torch.nn.GroupNorm)}
  conv_eps = {mod.eps for mod in m.patch_embed.backbone.modules()
              if type(mod).__name__.startswith('StdConv')}
  assert gn_eps == {1e-5} and conv_eps == {1e-8}


def test_gelu_numerics_per_naming_scheme():
  for name in models.list_models('vit'):
    cfg = models.get_config(name)
    assert cfg.gelu_approximate is (not name.startswith('vit_')), name
    assert models.create(name).gelu_approximate is cfg.gelu_approximate


def test_config_fields_are_documented_and_create_accepts_a_config():
  docs = models.field_docs()
  for name in ('ViT-B/16', 'R50+ViT-B/16', 'vit_base_patch16_384'):
    cfg = models.get_config(name)
    assert set(cfg.keys()) == set(docs)
    assert models.create(cfg) == models.create(name)
  cfg = models.get_config('ViT-B/16')
  cfg.hidden_size = 1
  assert models.get_config('ViT-B/16').hidden_size == 768  # a fresh copy each time


def test_create_overrides():
  module = models.create('ViT-B/16', num_classes=10, dropout_rate=0.1, dtype='bfloat16')
  assert module.num_classes == 10 and module.dropout_rate == 0.1
  assert module.dtype == jnp.bfloat16
  assert models.create('ViT-B/16').num_classes == 1000  # overrides do not leak


def test_create_accepts_int_patch_size_override():
  assert models.create('ViT-B/16', patch_size=8).patch_size == (8, 8)


def test_create_accepts_dtype_object_override():
  assert models.create('ViT-B/16', dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_unknown_name_suggests_closest():
  with pytest.raises(ValueError, match='ViT-B/16') as info:
    models.get_config('ViT-B/17')
  assert 'ViT-B/17' in str(info.value)
  with pytest.raises(ValueError):
    models.create('ViT-B/17')


def test_unknown_field_is_named():
  with pytest.raises(ValueError, match='not_a_field'):
    models.create('ViT-B/16', not_a_field=1)


def test_hidden_size_not_divisible_by_heads():
  with pytest.raises(ValueError, match='divisible'):
    models.create('ViT-B/16', hidden_size=100)


def test_bad_dtype_raises():
  with pytest.raises(ValueError, match='float64'):
    models.create('ViT-B/16', dtype='float64')


def test_forward_flops_compiles_when_the_lowered_program_has_no_cost_analysis(monkeypatch):
  """forward_flops reads the lowered program's cost analysis; where a backend gives none,
  it compiles and reads the compiled program's, which for a ViT counts the same FLOPs
  within 0.01% (the matmuls are the same; a few elementwise ops differ)."""
  import jax  # pylint: disable=g-import-not-at-top
  module = models.create('ViT-Ti/16', num_layers=2)
  compiled_calls = []
  real_compile = jax.stages.Lowered.compile

  def compile_and_count(self, *args, **kwargs):
    compiled_calls.append(1)
    return real_compile(self, *args, **kwargs)

  monkeypatch.setattr(jax.stages.Lowered, 'compile', compile_and_count)
  lowered = models.forward_flops(module, 64)
  assert compiled_calls == []  # on CPU the lowered program is analysed: nothing compiled
  monkeypatch.setattr(jax.stages.Lowered, 'cost_analysis', lambda self: None)
  assert models.forward_flops(module, 64) == pytest.approx(lowered, rel=1e-4)
  assert compiled_calls == [1]


def test_forward_flops_vit_ti16():
  module = models.create('ViT-Ti/16')
  xla = models.forward_flops(module, 224)
  analytic = models.analytic_flops(module, 224)
  assert xla == pytest.approx(analytic, rel=0.05)
  # Independent figure: ViT-Ti/16 at 224 is about 1.26 GMACs (timm reports ~1.3).
  assert xla == pytest.approx(2 * 1.26e9, rel=0.10)
  # And PyTorch's own FLOP counter on timm's model (meta device, nothing computed).
  from torch.utils.flop_counter import FlopCounterMode
  m, _ = timm_meta('vit_tiny_patch16_224')
  with torch.device('meta'), FlopCounterMode(display=False) as counter:
    m(torch.empty(1, 3, 224, 224))
  assert xla == pytest.approx(counter.get_total_flops(), rel=0.05)


@pytest.mark.parametrize('name,overrides,message', [
    # These used to fail later with a ZeroDivisionError or TypeError traceback, or (no
    # blocks, a negative epsilon) train a wrong model without a word.
    ('ViT-Ti/16', dict(num_heads=0), 'num_heads=0 must be a positive int'),
    ('ViT-Ti/16', dict(hidden_size=0), 'hidden_size=0 must be a positive int'),
    ('ViT-Ti/16', dict(mlp_dim=-5), 'mlp_dim=-5 must be a positive int'),
    ('ViT-Ti/16', dict(num_layers=0), 'num_layers=0 must be a positive int'),
    ('ViT-Ti/16', dict(in_channels=0), 'in_channels=0 must be a positive int'),
    ('ViT-Ti/16', dict(layernorm_eps=-1.0), 'layernorm_eps=-1.0 must be a positive number'),
    ('ViT-Ti/16', dict(num_classes=-1), 'num_classes=-1 must be a non-negative int'),
    ('R50+ViT-B/16', dict(resnet=dict(num_layers=(3, 4, 9), width_factor=0)),
     'resnet.width_factor=0 must be a positive number'),
    ('R50+ViT-B/16', dict(resnet=dict(num_layers=(3, 0, 9))),
     r'resnet.num_layers=\(3, 0, 9\) must be a tuple of positive ints'),
    ('R50+ViT-B/16', dict(resnet=dict(num_layers=(3, 4, 9), gn_eps=0.0)),
     'resnet.gn_eps=0.0 must be a positive number'),
])
def test_a_vit_field_that_cannot_build_a_model_is_named(name, overrides, message):
  with pytest.raises(ValueError, match=message):
    models.create(name, **overrides)


def test_every_registered_model_passes_the_field_checks():
  for name in models.list_models():
    models.create(name)
  # The root-only stem of a hybrid (no ResNet stages) is a valid ResNet stem.
  models.create('R50+ViT-B/16', resnet=dict(num_layers=()))


def test_a_resnet_override_keeps_the_stem_numerics_it_does_not_give():
  """create(timm hybrid, resnet=dict(num_layers=...)) used to replace the whole stem
  config, so the unnamed fields took the original release's epsilons (1e-5 outside the
  sqrt, GroupNorm 1e-6) instead of timm's (1e-8 inside, 1e-5)."""
  module = models.create('vit_base_r50_s16_224', resnet=dict(num_layers=(1, 1, 1)))
  assert (module.stdconv_eps, module.stdconv_eps_in_sqrt, module.gn_eps) == (1e-8, True, 1e-5)
  assert tuple(module.resnet_layers) == (1, 1, 1)


def test_a_family_field_of_another_type_than_the_registered_one_is_taken():
  """Swin's image_size is one int or (height, width): create(..., image_size=(32, 64))
  was an ml_collections TypeError (the registered config holds an int)."""
  module = models.create('Swin-T', image_size=(32, 64), embed_dim=16, depths=(1, 1),
                         num_heads=(1, 1), window_size=4, patch_size=2, num_classes=3)
  x = np.zeros((1, 32, 64, 3), np.float32)
  variables = jax.jit(lambda k: module.init(k, x, train=False))(jax.random.PRNGKey(0))
  assert jax.jit(lambda v: module.apply(v, x, train=False))(variables).shape == (1, 3)


@pytest.mark.parametrize('name,kw', [
    ('Swin-T', dict(embed_dim=16, depths=(1, 1), num_heads=(1, 1), window_size=4,
                    patch_size=2, image_size=32)),
    ('BiT-R50x1', dict(num_layers=(1, 1, 1, 1), width_factor=0.5, image_size=32)),
    ('resnet50', dict(layers=(1, 1, 1, 1), image_size=32)),
    ('ViT-Ti/16', dict(num_layers=1, image_size=32)),
])
def test_features_without_a_head_are_float32_in_mixed_precision(name, kw):
  """Swin's and BiT's features came back in bfloat16 (their logits, and every other
  family's features, are float32)."""
  module = models.create(name, **kw, num_classes=0, dtype='bfloat16')
  x = np.zeros((1, 32, 32, 3), np.float32)
  variables = jax.jit(lambda k: module.init(k, x, train=False))(jax.random.PRNGKey(0))
  out = jax.jit(lambda v: module.apply(v, x, train=False))(variables)
  assert out.ndim == 2 and out.dtype == jnp.float32, (out.shape, out.dtype)


def test_an_unknown_family_or_a_name_that_is_no_string_is_named():
  """list_models('swinn') returned [] without a word (field_docs('swinn') refused it);
  get_config(None) failed inside difflib ('NoneType' object is not iterable)."""
  with pytest.raises(ValueError, match=r"unknown model family 'swinn'; families: \['vit', "):
    models.list_models('swinn')
  assert 'Swin-T' in models.list_models('swin') and 'ViT-B/16' in models.list_models('vit')
  with pytest.raises(ValueError, match=r'a model name is a string, e.g. get_config\("ViT-B/16"\); '
                                       'got None'):
    models.get_config(None)
