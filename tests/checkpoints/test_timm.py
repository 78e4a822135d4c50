"""vit_jax <-> timm VisionTransformer: logits, exported state dicts and configs.

Each case builds one timm model (random weights, perturbed norms and biases, a non-zero
head scaled so that mean |logit| ~ 1), converts it with `checkpoints.from_timm`, and
compares vit_jax's logits with timm's on the same random images. The conversion back
(`to_timm`, `create_timm_model`) must load strictly into timm and give the same logits.
"""

import dataclasses
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
safetensors_torch = pytest.importorskip('safetensors.torch')

from vit_jax import checkpoints  # noqa: E402
from vit_jax import models  # noqa: E402
from vit_jax.checkpoints import pretrained  # noqa: E402

TOL_PLAIN = 1e-5    # max |logit difference|, fp32, plain ViTs
TOL_HYBRID = 5e-5   # hybrids (ResNet stem with GroupNorm + weight standardisation)
LOGIT_RANGE = (0.2, 5.0)  # mean |logit| of the reference: the tolerance is meaningful


@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  name: str        # timm model name
  kwargs: dict     # timm.create_model arguments
  classifier: str  # the vit_jax classifier from_timm must pick
  resnet: tuple | None = None  # expected hybrid stem layers

  @property
  def tol(self):
    return TOL_PLAIN if self.resnet is None else TOL_HYBRID


CASES = [
    Case('ti16', 'vit_tiny_patch16_224', {}, 'token'),
    Case('b16_depth2', 'vit_base_patch16_224', dict(depth=2, num_classes=10), 'token'),
    Case('s16_gap_96px', 'vit_small_patch16_224',
         dict(depth=2, global_pool='avg', class_token=False, fc_norm=False, img_size=96,
              num_classes=7), 'gap'),
    Case('s16_map', 'vit_small_patch16_224',
         dict(depth=2, global_pool='map', class_token=False, num_classes=5), 'map'),
    Case('r26_s32', 'vit_small_r26_s32_224', dict(depth=2), 'token', (2, 2, 2, 2)),
    Case('r50_b16', 'vit_base_r50_s16_224', dict(depth=1, num_classes=10), 'token',
         (3, 4, 9)),
]


def _build_timm(case, seed):
  torch.manual_seed(seed)
  return timm.create_model(case.name, pretrained=False, **case.kwargs).eval()


@pytest.fixture(scope='module', params=CASES, ids=[c.id for c in CASES])
def conv(request, ck):
  """One converted timm model: the model, its logits, and vit_jax's config/params/logits."""
  case = request.param
  model = _build_timm(case, seed=0)
  assert ck.perturb_torch(model, seed=1) > 0
  image_size = case.kwargs.get('img_size', 224)
  x = ck.random_images(image_size, seed=2)
  ck.set_torch_head(model, model.head, ck.to_nchw(x), seed=3)
  ref = ck.torch_logits(model, x)
  config, params = checkpoints.from_timm(model)
  module = models.create(config)
  fn = jax.jit(lambda p, images: module.apply({'params': p}, images, train=False))
  out = np.asarray(fn(params, x))
  return dict(case=case, model=model, x=x, ref=ref, config=config, params=params,
              fn=fn, out=out, image_size=image_size)


def _assert_same_params(a, b):
  fa, fb = checkpoints.flatten(a), checkpoints.flatten(b)
  assert set(fa) == set(fb), set(fa) ^ set(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_logits_match_timm(conv, ck):
  case = conv['case']
  d = ck.max_diff(conv['out'], conv['ref'], f'from_timm({case.id}) vs timm')
  assert LOGIT_RANGE[0] < np.abs(conv['ref']).mean() < LOGIT_RANGE[1]
  assert d < case.tol


def test_config_read_from_weights(conv):
  case, c, model = conv['case'], conv['config'], conv['model']
  assert c.gelu_approximate is False
  assert c.classifier == case.classifier
  assert c.num_layers == len(model.blocks) == case.kwargs.get('depth', 12)
  assert c.num_classes == case.kwargs.get('num_classes', 1000)
  assert c.image_size == conv['image_size']
  assert c.hidden_size == model.embed_dim
  assert c.num_heads == model.blocks[0].attn.num_heads
  assert c.mlp_dim == model.blocks[0].mlp.fc1.out_features
  assert c.layernorm_eps == model.blocks[0].norm1.eps
  assert not c.get('representation_size')
  if case.resnet is None:
    assert c.resnet is None
    assert tuple(c.patch_size) == tuple(model.patch_embed.patch_size)
  else:
    assert tuple(c.resnet.num_layers) == case.resnet
    assert tuple(c.patch_size) == (1, 1)
    assert c.resnet.stdconv_eps == 1e-8 and c.resnet.gn_eps == 1e-5


def test_from_state_dict_with_name(conv, ck):
  case = conv['case']
  config, params = checkpoints.from_timm(conv['model'].state_dict(), case.name)
  _assert_same_params(params, conv['params'])
  for field in ('classifier', 'num_layers', 'num_classes', 'image_size', 'hidden_size',
                'num_heads', 'mlp_dim', 'layernorm_eps', 'gelu_approximate', 'patch_size'):
    assert config[field] == conv['config'][field], field
  out = np.asarray(conv['fn'](params, conv['x']))
  assert ck.max_diff(out, conv['ref'], f'from_timm(state_dict, name)({case.id}) vs timm') < case.tol


def test_from_safetensors_file(conv, ck, tmp_path):
  case = conv['case']
  path = os.path.join(tmp_path, 'model.safetensors')
  safetensors_torch.save_file(conv['model'].state_dict(), path)
  config, params = checkpoints.from_timm(path, case.name)
  assert config.classifier == case.classifier
  assert config.num_layers == conv['config'].num_layers
  _assert_same_params(params, conv['params'])
  out = np.asarray(conv['fn'](params, conv['x']))
  assert ck.max_diff(out, conv['ref'], f'from_timm(.safetensors)({case.id}) vs timm') < case.tol


def test_to_timm_has_timm_keys_shapes_and_values(conv):
  sd = checkpoints.to_timm(conv['config'], conv['params'])
  ref = conv['model'].state_dict()
  assert set(sd) == set(ref), (f'missing {sorted(set(ref) - set(sd))}, '
                               f'extra {sorted(set(sd) - set(ref))}')
  for k, v in ref.items():
    assert tuple(sd[k].shape) == tuple(v.shape), k
    assert sd[k].dtype == v.dtype, k
    assert torch.equal(sd[k], v), f'{k} changed in the timm -> vit_jax -> timm round trip'


def test_to_timm_loads_strictly_into_fresh_timm_model(conv, ck):
  case = conv['case']
  fresh = _build_timm(case, seed=123)
  before = ck.torch_logits(fresh, conv['x'])
  fresh.load_state_dict(checkpoints.to_timm(conv['config'], conv['params']), strict=True)
  after = ck.torch_logits(fresh, conv['x'])
  assert np.abs(before - conv['ref']).max() > case.tol  # the load is what makes them equal
  assert ck.max_diff(after, conv['ref'], f'to_timm({case.id}) -> fresh timm vs timm') < case.tol
  assert ck.max_diff(after, conv['out'], f'to_timm({case.id}) -> fresh timm vs vit_jax',
                     reference=conv['ref']) < case.tol


def test_create_timm_model(conv, ck):
  case = conv['case']
  model = checkpoints.create_timm_model(conv['config'], conv['params'])
  assert not model.training
  assert len(model.blocks) == conv['config'].num_layers
  logits = ck.torch_logits(model, conv['x'])
  assert ck.max_diff(logits, conv['ref'], f'create_timm_model({case.id}) vs timm') < case.tol


# ---------------------------------------------------------------------------
# The original numerics (tanh GELU) exported to timm.

def _gelu_flavour(act):
  """'tanh' or 'exact' from what the activation module computes."""
  t = torch.linspace(-4, 4, 33)
  with torch.no_grad():
    y = act(t)
  for flavour, approximate in (('tanh', 'tanh'), ('exact', 'none')):
    if torch.allclose(y, torch.nn.functional.gelu(t, approximate=approximate), atol=1e-7):
      return flavour
  return 'other'


@pytest.fixture(scope='module')
def original(ck):
  config = models.get_config('ViT-Ti/16')
  config.num_layers = 2
  config.num_classes = 5
  module = models.create('ViT-Ti/16', num_layers=2, num_classes=5)
  assert module.gelu_approximate and config.gelu_approximate
  x = ck.random_images(config.image_size, seed=5)
  params = ck.perturb_jax_params(models.init_params(module, config.image_size), seed=6)
  features = ck.jax_logits(models.create(config, num_classes=0),
                           {k: v for k, v in params.items() if k != 'head'}, x)
  params = ck.perturb_jax_params(params, seed=7, head_std=ck.calibrated_head_std(features))
  return dict(config=config, params=params, x=x, out=ck.jax_logits(module, params, x))


def test_original_numerics_exported_with_gelu_tanh(original, ck):
  model = checkpoints.create_timm_model(original['config'], original['params'])
  assert _gelu_flavour(model.blocks[0].mlp.act) == 'tanh'
  assert model.blocks[0].norm1.eps == original['config'].layernorm_eps
  ref = ck.torch_logits(model, original['x'])
  d = ck.max_diff(original['out'], ref, 'ViT-Ti/16 (tanh GELU) -> create_timm_model')
  assert LOGIT_RANGE[0] < np.abs(ref).mean() < LOGIT_RANGE[1]
  assert d < TOL_PLAIN


def test_original_numerics_differ_from_exact_gelu(original, ck):
  """The GELU flavour is visible at this tolerance, so the test above can fail."""
  config = models.get_config('ViT-Ti/16')
  config.update(num_layers=2, num_classes=5, gelu_approximate=False)
  model = checkpoints.create_timm_model(config, original['params'])
  assert _gelu_flavour(model.blocks[0].mlp.act) == 'exact'
  d = ck.max_diff(original['out'], ck.torch_logits(model, original['x']),
                  'ViT-Ti/16 (tanh GELU) vs timm with exact GELU (must differ)')
  assert d > 5 * TOL_PLAIN


@pytest.mark.parametrize('gelu_approximate', [True, False], ids=['tanh', 'exact'])
def test_from_timm_reads_back_create_timm_model(original, ck, gelu_approximate):
  config = models.get_config('ViT-Ti/16')
  config.update(num_layers=2, num_classes=5, gelu_approximate=gelu_approximate)
  model = checkpoints.create_timm_model(config, original['params'])
  config2, params2 = checkpoints.from_timm(model)
  assert config2.gelu_approximate is gelu_approximate
  out = ck.jax_logits(models.create(config2), params2, original['x'])
  ref = ck.torch_logits(model, original['x'])
  assert ck.max_diff(out, ref, f'from_timm(create_timm_model(gelu={gelu_approximate}))') < TOL_PLAIN


def test_create_timm_model_at_another_resolution(ck):
  module = models.create('ViT-Ti/16', num_layers=1, num_classes=3, image_size=64)
  config = models.get_config('ViT-Ti/16')
  config.update(num_layers=1, num_classes=3, image_size=64)
  x = ck.random_images(64, seed=8)
  params = ck.perturb_jax_params(models.init_params(module, 64), seed=9, head_std=0.1)
  model = checkpoints.create_timm_model(config, params)
  d = ck.max_diff(ck.jax_logits(module, params, x), ck.torch_logits(model, x),
                  'ViT-Ti/16 at 64px -> create_timm_model')
  assert d < TOL_PLAIN


def test_a_hybrid_timm_does_not_build_names_the_fields_that_set_it_apart():
  # 'no timm model corresponds to R50+ViT-B/16' named only the config it came from.
  config = models.get_config('R50+ViT-B/16')
  config.resnet.num_layers = (2, 2, 2)
  with pytest.raises(ValueError, match=r'resnet.num_layers=\(2, 2, 2\) \(not \(3, 4, 9\)\); '
                     'timm builds hybrids only'):
    checkpoints.create_timm_model(config)
  config = models.get_config('R50+ViT-B/16')
  config.update(hidden_size=384, num_heads=6)
  with pytest.raises(ValueError, match=r'hidden_size=384 \(not 768\), num_heads=6'):
    checkpoints.create_timm_model(config)


def test_from_timm_params_do_not_alias_the_torch_model():
  torch.manual_seed(0)
  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=1, num_classes=3,
                            img_size=32).eval()
  _, params = checkpoints.from_timm(model)
  before = np.array(params['Transformer']['encoder_norm']['scale'])
  with torch.no_grad():
    model.norm.weight.add_(1.0)
  np.testing.assert_array_equal(params['Transformer']['encoder_norm']['scale'], before)


def test_to_timm_returns_copies():
  torch.manual_seed(0)
  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=1, num_classes=3,
                            img_size=32).eval()
  config, params = checkpoints.from_timm(model)
  before = np.array(params['Transformer']['encoder_norm']['scale'])
  sd = checkpoints.to_timm(config, params)
  sd['norm.weight'].zero_()
  np.testing.assert_array_equal(params['Transformer']['encoder_norm']['scale'], before)


def test_numerics_a_model_spec_sets_are_used_for_a_state_dict(original, ck, tmp_path):
  """A .pth records no numerics: read as a registered model it gets timm's (exact GELU),
  except the fields the --model spec sets. They used to be dropped without a word."""
  path = tmp_path / 'tanh.pth'
  torch.save(checkpoints.to_timm(original['config'], original['params']), path)
  for spec, gelu in (('ViT-Ti/16', False), ('ViT-Ti/16,gelu_approximate=True', True),
                     ('gelu_approximate=True,num_heads=3', True)):
    loaded = checkpoints.load_checkpoint(path, model=spec)
    assert loaded.config.gelu_approximate is gelu, spec
    out = ck.jax_logits(models.create(loaded.config), loaded.params, original['x'])
    d = ck.max_diff(original['out'], out, f'tanh-GELU .pth read with --model={spec!r}')
    assert (d < TOL_PLAIN) is gelu, (spec, d)


def test_create_timm_model_follows_the_fields_not_the_name(ck, tmp_path):
  """A config keeps a timm name that its fields no longer match (another patch and width;
  a hybrid read from a bare state dict is named vit_base_patch16_224): timm's model used
  to be built from the name, and loading the weights failed."""
  torch.manual_seed(0)
  small = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32,
                            patch_size=8, embed_dim=32, depth=2, num_heads=2,
                            num_classes=5).eval()
  config, params = checkpoints.from_timm(small)
  assert config.name == 'vit_tiny_patch16_224' and tuple(config.patch_size) == (8, 8)
  x = ck.random_images(32, seed=1)
  rebuilt = checkpoints.create_timm_model(config, params)
  assert ck.max_diff(ck.torch_logits(rebuilt, x), ck.torch_logits(small, x),
                     'create_timm_model(vit_tiny name, patch 8, width 32)') < TOL_PLAIN
  hybrid = timm.create_model('vit_small_r26_s32_224', pretrained=False, depth=1).eval()
  path = tmp_path / 'hybrid.safetensors'
  safetensors_torch.save_file(hybrid.state_dict(), str(path))
  loaded = checkpoints.load_checkpoint(path)
  assert loaded.config.resnet is not None
  rebuilt = checkpoints.create_timm_model(loaded.config, loaded.params)
  x = ck.random_images(224, seed=2)
  assert ck.max_diff(ck.torch_logits(rebuilt, x), ck.torch_logits(hybrid, x),
                     'create_timm_model(hybrid read from a state dict)') < TOL_HYBRID


def test_training_checkpoint_files_and_wrapper_prefixes_are_read(tmp_path):
  """DeiT's and many training scripts' {'model': weights, 'optimizer': ..., 'epoch': ...},
  and DistributedDataParallel's 'module.' key prefix: the error used to list the keys."""
  torch.manual_seed(0)
  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32,
                            depth=1, num_classes=3).eval()
  _, want = checkpoints.from_timm(model)
  sd = model.state_dict()
  files = {'deit.pth': {'model': sd, 'epoch': 3, 'optimizer': {'state': {}}},
           'ddp.pth': {f'module.{k}': v for k, v in sd.items()},
           'ddp_in_model.pth': {'model': {f'module.{k}': v for k, v in sd.items()}}}
  for name, content in files.items():
    torch.save(content, tmp_path / name)
    loaded = checkpoints.load_checkpoint(tmp_path / name, model='vit_tiny_patch16_224')
    _assert_same_params(loaded.params, want)


def test_an_export_refuses_params_that_do_not_fit_the_config():
  """to_timm and to_hf read the blocks and head the config names: params of a 2-block
  model given a 1-block config lost their second block (timm then loaded the export
  strictly, logits 0.5 off), and a config without a head dropped the trained one."""
  module = models.create('vit_tiny_patch16_224', num_classes=10, num_layers=2, image_size=32)
  rng = np.random.default_rng(1)  # (the initial head is zero: every logit would agree)
  params = jax.tree.map(lambda p: np.asarray(p) + rng.normal(0, 0.05, p.shape).astype(p.dtype),
                        models.init_params(module, 32))
  config = models.get_config('vit_tiny_patch16_224')
  config.update(num_classes=10, num_layers=1, image_size=32)
  for export, target in ((checkpoints.to_timm, 'timm'), (checkpoints.to_hf, 'transformers')):
    with pytest.raises(checkpoints.CheckpointMismatchError,
                       match=rf'do not fit the config given for the {target} export: 16 '
                       r'arrays of the params the config lacks .*num_layers=2'):
      export(config, params)
  config.num_layers, config.num_classes = 2, 0
  with pytest.raises(checkpoints.CheckpointMismatchError, match='head/kernel'):
    checkpoints.to_timm(config, params)
  # The config read off the params fits, and the export runs in timm as in vit_jax.
  fitted = checkpoints.infer_model_config(params, name='vit_tiny_patch16_224')
  assert (fitted.num_layers, fitted.num_classes) == (2, 10)
  model = checkpoints.create_timm_model(fitted, params)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  ours = jax.jit(lambda p, x: models.create(fitted).apply({'params': p}, x))(params, x)
  assert np.ptp(theirs) > 0.1
  np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4)


def test_a_given_model_of_another_architecture_does_not_name_the_weights(tmp_path, caplog):
  """--model=ViT-S/16 for 192-wide ViT-Ti weights: read with the heads of their width
  (warned), but the config kept the name ViT-S/16, which convert then recorded in its
  output; it is named after the weights' own architecture."""
  torch.manual_seed(0)
  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=2, num_classes=3,
                            img_size=32)
  path = str(tmp_path / 'w.safetensors')
  safetensors_torch.save_file(model.state_dict(), path)
  with caplog.at_level('WARNING'):
    ck = pretrained.load_checkpoint(path, model='ViT-S/16')
  assert ck.config.hidden_size == 192 and ck.config.num_heads == 3
  assert ck.config.name == 'ViT (2 layers x 192 wide, MLP 768, patch 16)', ck.config.name
  assert 'the weights are 192 wide and model ViT-S/16 is 384 wide' in caplog.text
  full = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=3,
                           img_size=32)
  safetensors_torch.save_file(full.state_dict(), path)
  assert pretrained.load_checkpoint(path, model='ViT-S/16').config.name == 'ViT-Ti/16'
  assert pretrained.load_checkpoint(path, model='ViT-Ti/16').config.name == 'ViT-Ti/16'
