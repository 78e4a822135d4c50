"""vit_jax <-> transformers `ViTForImageClassification`: logits, export and v4 key names.

Small random transformers ViTs (perturbed LayerNorms and biases, a non-zero classifier
scaled so that mean |logit| ~ 1) are converted with `checkpoints.from_hf` and compared
with transformers on the same random images; `to_hf` must load strictly back.
"""

import re

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from vit_jax import checkpoints  # noqa: E402
from vit_jax import models  # noqa: E402

TOL = 1e-5   # max |logit difference|, fp32
LOGIT_RANGE = (0.2, 5.0)
IMAGE_SIZE = 64
SMALL = dict(hidden_size=192, num_hidden_layers=3, num_attention_heads=3,
             intermediate_size=768, image_size=IMAGE_SIZE, patch_size=16, num_labels=7)

# transformers v5 name -> v4 name (the inverse of what from_hf undoes).
_V5_TO_V4 = (
    (r'^vit\.layers\.(\d+)\.', r'vit.encoder.layer.\1.'),
    (r'\.attention\.q_proj\.', '.attention.attention.query.'),
    (r'\.attention\.k_proj\.', '.attention.attention.key.'),
    (r'\.attention\.v_proj\.', '.attention.attention.value.'),
    (r'\.attention\.o_proj\.', '.attention.output.dense.'),
    (r'\.mlp\.fc1\.', '.intermediate.dense.'),
    (r'\.mlp\.fc2\.', '.output.dense.'),
)


def _v4_names(sd):
  out = {}
  for k, v in sd.items():
    for pattern, repl in _V5_TO_V4:
      k = re.sub(pattern, repl, k)
    out[k] = v
  return out


def _build(ck, seed, **overrides):
  torch.manual_seed(seed)
  config = transformers.ViTConfig(**dict(SMALL, **overrides))
  model = transformers.ViTForImageClassification(config).eval()
  assert ck.perturb_torch(model, seed=seed + 1) > 0
  x = ck.random_images(IMAGE_SIZE, seed=seed + 2)
  ck.set_torch_head(model, model.classifier, ck.to_nchw(x), seed=seed + 3)
  return model, x, ck.torch_logits(model, x, hf=True)


@pytest.fixture(scope='module')
def hf(ck):
  model, x, ref = _build(ck, seed=20)
  config, params = checkpoints.from_hf(model)
  out = ck.jax_logits(models.create(config), params, x)
  return dict(model=model, x=x, ref=ref, config=config, params=params, out=out)


def _assert_same_params(a, b):
  fa, fb = checkpoints.flatten(a), checkpoints.flatten(b)
  assert set(fa) == set(fb), set(fa) ^ set(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_from_hf_logits_match(hf, ck):
  d = ck.max_diff(hf['out'], hf['ref'], 'from_hf vs transformers')
  assert LOGIT_RANGE[0] < np.abs(hf['ref']).mean() < LOGIT_RANGE[1]
  assert d < TOL


def test_from_hf_config(hf):
  c = hf['config']
  assert (c.hidden_size, c.num_heads, c.num_layers, c.mlp_dim) == (192, 3, 3, 768)
  assert tuple(c.patch_size) == (16, 16)
  assert c.image_size == IMAGE_SIZE
  assert c.num_classes == 7
  assert c.classifier == 'token'
  assert c.layernorm_eps == 1e-12  # transformers' default
  assert c.gelu_approximate is False
  assert c.resnet is None and not c.get('representation_size')


def test_to_hf_loads_strictly_and_matches(hf, ck):
  hf_config = checkpoints.to_hf_config(hf['config'])
  assert hf_config.hidden_act == 'gelu' and hf_config.layer_norm_eps == 1e-12
  torch.manual_seed(123)
  fresh = transformers.ViTForImageClassification(hf_config).eval()
  sd = checkpoints.to_hf(hf['config'], hf['params'])
  assert set(sd) == set(fresh.state_dict())
  fresh.load_state_dict(sd, strict=True)
  logits = ck.torch_logits(fresh, hf['x'], hf=True)
  assert ck.max_diff(logits, hf['out'], 'to_hf -> transformers vs vit_jax',
                     reference=hf['ref']) < TOL
  assert ck.max_diff(logits, hf['ref'], 'to_hf -> transformers vs transformers') < TOL
  for k, v in hf['model'].state_dict().items():
    assert torch.equal(sd[k], v), f'{k} changed in the transformers round trip'


def test_from_hf_v4_state_dict(hf, ck):
  sd = _v4_names(hf['model'].state_dict())
  assert 'vit.encoder.layer.0.attention.attention.query.weight' in sd
  assert 'vit.encoder.layer.2.output.dense.bias' in sd
  assert 'vit.encoder.layer.1.attention.output.dense.weight' in sd
  assert not any('q_proj' in k or 'mlp.fc' in k or 'vit.layers.' in k for k in sd)
  config, params = checkpoints.from_hf(sd, hf_config=hf['model'].config)
  assert config.num_layers == 3 and config.num_classes == 7
  _assert_same_params(params, hf['params'])
  out = ck.jax_logits(models.create(config), params, hf['x'])
  assert ck.max_diff(out, hf['ref'], 'from_hf(v4 state dict) vs transformers') < TOL


def test_from_hf_state_dict_needs_the_config(hf):
  with pytest.raises(ValueError, match='hf_config'):
    checkpoints.from_hf(hf['model'].state_dict())


def test_gelu_tanh_and_eps_1e6(ck):
  model, x, ref = _build(ck, seed=30, hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6)
  config, params = checkpoints.from_hf(model)
  assert config.gelu_approximate is True
  assert config.layernorm_eps == 1e-6
  module = models.create(config)
  assert module.gelu_approximate is True and module.layernorm_eps == 1e-6
  out = ck.jax_logits(module, params, x)
  d = ck.max_diff(out, ref, 'from_hf(gelu_pytorch_tanh, eps 1e-6) vs transformers')
  assert LOGIT_RANGE[0] < np.abs(ref).mean() < LOGIT_RANGE[1]
  assert d < TOL
  # The GELU flavour is visible at this tolerance: the exact one does not match.
  exact = ck.jax_logits(models.create(config, gelu_approximate=False), params, x)
  assert ck.max_diff(exact, ref, 'same with exact GELU (must differ)') > 5 * TOL
  # Exported back, the config keeps the numerics.
  hf_config = checkpoints.to_hf_config(config)
  assert hf_config.hidden_act == 'gelu_pytorch_tanh' and hf_config.layer_norm_eps == 1e-6


def test_to_hf_refuses_gap_model():
  config = models.get_config('ViT-Ti/16')
  config.update(num_layers=1, num_classes=3, classifier='gap', image_size=32)
  params = models.init_params(models.create(config), 32)
  with pytest.raises(ValueError, match="class token.*'gap'"):
    checkpoints.to_hf(config, params)


def test_to_hf_refuses_hybrid():
  config = models.get_config('R+ViT-Ti/16')  # root-block-only ResNet stem
  config.update(num_layers=1, num_classes=3, image_size=32)
  params = models.init_params(models.create(config), 32)
  assert 'conv_root' in params
  with pytest.raises(ValueError, match='hybrid'):
    checkpoints.to_hf(config, params)


def test_to_hf_refuses_pre_logits():
  config = models.get_config('ViT-Ti/16')
  config.update(num_layers=1, num_classes=3, representation_size=16, image_size=32)
  params = models.init_params(models.create(config), 32)
  with pytest.raises(ValueError, match='pre_logits'):
    checkpoints.to_hf(config, params)


def test_a_save_pretrained_directory_reads_as_its_weights(hf, ck, tmp_path):
  """The directory transformers' save_pretrained (and `vit_jax.convert --to=hf`) writes:
  config.json + model.safetensors, read as the file."""
  from vit_jax.checkpoints import pretrained  # pylint: disable=g-import-not-at-top
  hf['model'].save_pretrained(str(tmp_path / 'vit'))
  assert (tmp_path / 'vit' / 'model.safetensors').is_file()
  got = pretrained.load_checkpoint(str(tmp_path / 'vit'))
  assert got.kind == 'hf' and got.config.to_dict() == hf['config'].to_dict()
  _assert_same_params(got.params, hf['params'])
  out = ck.jax_logits(models.create(got.config), got.params, hf['x'])
  assert ck.max_diff(out, hf['ref'], 'save_pretrained dir vs transformers') < TOL
  # from_hf takes the directory, or its weights file, with the config.json there.
  for source in (tmp_path / 'vit', str(tmp_path / 'vit' / 'model.safetensors')):
    config, params = checkpoints.from_hf(source)
    assert config.to_dict() == hf['config'].to_dict()
    _assert_same_params(params, hf['params'])
  (tmp_path / 'vit' / 'model.safetensors').unlink()  # config.json alone: not a checkpoint
  with pytest.raises(FileNotFoundError, match='transformers directory holding '
                     'model.safetensors or pytorch_model.bin beside its config.json'):
    pretrained.load_checkpoint(str(tmp_path / 'vit'))


def test_a_bare_vit_model_directory_reads_without_its_head(hf, ck, tmp_path):
  """A transformers `ViTModel` (no classifier, as the in21k feature extractors on the Hub)
  saved with save_pretrained: its names have no 'vit.' prefix and the v4 layout
  ('encoder.layer.0.attention.attention.query'). It used to fail with a KeyError."""
  from vit_jax.checkpoints import pretrained  # pylint: disable=g-import-not-at-top
  hf['model'].vit.save_pretrained(str(tmp_path / 'bare'))
  got = pretrained.load_checkpoint(str(tmp_path / 'bare'))
  assert got.kind == 'hf' and got.config.num_classes == 0
  want = {k: v for k, v in checkpoints.flatten(hf['params']).items()
          if not k.startswith('head/')}
  _assert_same_params(got.params, checkpoints.unflatten(want))
  # The features (final LayerNorm of the class token) equal transformers'.
  with torch.no_grad():
    ref = hf['model'].vit(ck.to_nchw(hf['x'])).last_hidden_state[:, 0].numpy()
  out = ck.jax_logits(models.create(got.config), got.params, hf['x'])
  assert ck.max_diff(out, ref, 'bare ViTModel features vs transformers') < TOL


def test_a_directory_s_image_processor_gives_the_preprocessing(hf, tmp_path):
  """The preprocessor_config.json beside the weights (ImageNet mean/std here) is the
  evaluation preprocessing: class probabilities equal transformers' own pipeline. It used
  to be ignored for [-1, 1]."""
  from vit_jax import inference  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints import pretrained  # pylint: disable=g-import-not-at-top
  skimage_data = pytest.importorskip('skimage.data')
  hf['model'].save_pretrained(str(tmp_path / 'vit'))
  processor = transformers.ViTImageProcessor(
      size={'height': IMAGE_SIZE, 'width': IMAGE_SIZE}, image_mean=[0.485, 0.456, 0.406],
      image_std=[0.229, 0.224, 0.225])
  processor.save_pretrained(str(tmp_path / 'vit'))
  got = pretrained.load_checkpoint(str(tmp_path / 'vit'))
  assert got.pp_eval == (f'decode|resize({IMAGE_SIZE})|normalize(mean=(0.485, 0.456, 0.406), '
                         'std=(0.229, 0.224, 0.225))')
  image = skimage_data.astronaut()
  with torch.no_grad():
    inputs = processor(images=image, return_tensors='pt')
    want = torch.softmax(hf['model'](**inputs).logits, -1).numpy()[0]
  probs = inference.ImageClassifier.from_pretrained(str(tmp_path / 'vit')).predict_proba(
      [image])[0]
  # Resizing a 512 px image to 64 px: TF's and PIL's antialiased bilinear differ slightly
  # (7e-5 here); the [-1, 1] the file used to be read with is 0.02 off.
  np.testing.assert_allclose(probs, want, atol=2e-3)
  old = inference.ImageClassifier.from_pretrained(
      str(tmp_path / 'vit'), pp=f'decode|resize({IMAGE_SIZE})|value_range(-1, 1)')
  assert np.abs(old.predict_proba([image])[0] - want).max() > 1e-2
  # [-1, 1] (mean = std = 0.5) reads as the release's value_range.
  transformers.ViTImageProcessor(size={'height': IMAGE_SIZE, 'width': IMAGE_SIZE}
                                 ).save_pretrained(str(tmp_path / 'vit'))
  assert pretrained.load_checkpoint(str(tmp_path / 'vit')).pp_eval == (
      f'decode|resize({IMAGE_SIZE})|value_range(-1, 1)')
  # A processor giving another size than the model's: the default (a warning says so).
  transformers.ViTImageProcessor(size={'height': 32, 'width': 48}).save_pretrained(
      str(tmp_path / 'vit'))
  assert pretrained.load_checkpoint(str(tmp_path / 'vit')).pp_eval is None


def test_processors_with_a_crop_or_without_a_fixed_size():
  """DeiT's processors resize to 256 (bicubic) and crop 224: read as such (a resize to
  256 alone made predict fail on the token count); processors with no fixed size fall
  back to the default preprocessing (None)."""
  from vit_jax.checkpoints import hf_format  # pylint: disable=g-import-not-at-top
  from vit_jax.data import preprocess_ops  # pylint: disable=g-import-not-at-top
  deit = {'do_resize': True, 'size': {'height': 256, 'width': 256}, 'resample': 3,
          'do_center_crop': True, 'crop_size': {'height': 224, 'width': 224},
          'image_mean': [0.485, 0.456, 0.406], 'image_std': [0.229, 0.224, 0.225]}
  pp = hf_format.pp_eval_from_image_processor(deit, 224)
  assert pp.startswith("decode|resize(256, method='bicubic')|central_crop(224)|normalize(")
  assert preprocess_ops.output_spec(pp)[0] == (224, 224)
  short = {'size': {'shortest_edge': 256}, 'do_center_crop': True,
           'crop_size': {'height': 224, 'width': 224}}
  assert hf_format.pp_eval_from_image_processor(short, 224) == (
      'decode|resize_small(256)|central_crop(224)|value_range(-1, 1)')
  assert hf_format.pp_eval_from_image_processor({'do_resize': False}, 224) is None
  assert hf_format.pp_eval_from_image_processor({'size': {'shortest_edge': 256}}, 224) is None


def test_a_features_model_exports_a_config_without_a_classifier(hf):
  """num_classes=0: to_hf writes no classifier, and to_hf_config said num_labels=2, so a
  strict load into ViTForImageClassification failed on the missing classifier."""
  config = hf['config'].copy_and_resolve_references()
  config.num_classes = 0
  params = {k: v for k, v in hf['params'].items() if k != 'head'}
  hf_config = checkpoints.to_hf_config(config)
  assert hf_config.num_labels == 0
  model = transformers.ViTForImageClassification(hf_config).eval()
  model.load_state_dict(checkpoints.to_hf(config, params), strict=True)


def test_a_sharded_save_pretrained_directory_reads_as_one(hf, ck, tmp_path):
  """save_pretrained(max_shard_size=...) writes shards and an index: it used to be
  refused as 'no Orbax checkpoint under DIR'."""
  from vit_jax.checkpoints import pretrained  # pylint: disable=g-import-not-at-top
  hf['model'].save_pretrained(str(tmp_path / 'vit'), max_shard_size='300KB')
  assert (tmp_path / 'vit' / 'model.safetensors.index.json').is_file()
  assert len(list((tmp_path / 'vit').glob('model-*-of-*.safetensors'))) > 1
  got = pretrained.load_checkpoint(str(tmp_path / 'vit'))
  assert got.kind == 'hf'
  _assert_same_params(got.params, hf['params'])
  config, params = checkpoints.from_hf(tmp_path / 'vit')
  _assert_same_params(params, hf['params'])
  next((tmp_path / 'vit').glob('model-*-of-*.safetensors')).unlink()
  with pytest.raises(FileNotFoundError, match='names the shard .* which is missing'):
    pretrained.load_checkpoint(str(tmp_path / 'vit'))


def test_another_kind_of_transformers_model_is_named(tmp_path):
  """A Swin or DeiT directory used to be refused as 'not a ViT state dict ... lacks
  pos_embed (every timm VisionTransformer has them)'."""
  from vit_jax.checkpoints import pretrained  # pylint: disable=g-import-not-at-top
  model = transformers.SwinForImageClassification(transformers.SwinConfig(
      image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 1],
      window_size=4, num_labels=3))
  model.save_pretrained(str(tmp_path / 'swin'))
  with pytest.raises(ValueError, match="a transformers 'swin' model"):
    pretrained.load_checkpoint(str(tmp_path / 'swin'))
  with pytest.raises(ValueError, match="a transformers 'swin' model"):
    checkpoints.from_hf(tmp_path / 'swin')


def test_a_list_patch_size_reads_and_a_non_square_image_is_named(ck):
  """patch_size=[8, 8] was a TypeError from int(); a non-square image a shape mismatch
  that suggested resampling the position embedding."""
  model, x, ref = _build(ck, seed=30, patch_size=[16, 16])
  config, params = checkpoints.from_hf(model)
  assert tuple(config.patch_size) == (16, 16) and config.image_size == IMAGE_SIZE
  assert ck.max_diff(ck.jax_logits(models.create(config), params, x), ref, 'list patch') < TOL
  wide = transformers.ViTForImageClassification(transformers.ViTConfig(
      **dict(SMALL, num_hidden_layers=1, image_size=[32, 64])))
  with pytest.raises(ValueError, match=r'images of \[32, 64\] pixels'):
    checkpoints.from_hf(wide)


def test_non_square_patches_export_as_a_list():
  """to_hf_config wrote patch_size[0]: an 8x4-patch model came back as 8x8."""
  from vit_jax.checkpoints import hf_format  # pylint: disable=g-import-not-at-top
  config = models.get_config('ViT-Ti/16')
  config.update(patch_size=(8, 4), image_size=32, num_layers=1)
  assert list(hf_format.to_hf_config(config).patch_size) == [8, 4]
  config.patch_size = (16, 16)
  assert hf_format.to_hf_config(config).patch_size == 16


def test_an_mae_pre_training_model_reads_as_its_encoder(ck, tmp_path, caplog):
  """ViTMAEForPreTraining (model_type vit_mae, the layout of facebook/vit-mae-*) failed
  with a bare KeyError: its decoder's layers were counted as encoder layers. The decoder
  is left out with a warning; the features equal the encoder's class token (masking
  nothing: the class token's output does not depend on the order of the patches)."""
  cfg = transformers.ViTMAEConfig(
      hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
      image_size=32, patch_size=8, decoder_hidden_size=32, decoder_num_hidden_layers=3,
      decoder_num_attention_heads=2, decoder_intermediate_size=64, mask_ratio=0.0)
  torch.manual_seed(0)
  model = transformers.ViTMAEForPreTraining(cfg).eval()
  assert ck.perturb_torch(model, seed=1) > 0
  model.save_pretrained(str(tmp_path / 'mae'))
  x = ck.random_images(32, seed=2)
  with torch.no_grad():
    want = model.vit(pixel_values=ck.to_nchw(x)).last_hidden_state[:, 0].numpy()
  with caplog.at_level('WARNING'):
    config, params = checkpoints.from_hf(model)
  assert 'MAE decoder' in caplog.text
  assert config.num_layers == 2 and config.num_classes == 0
  got = ck.jax_logits(models.create(config), params, x)
  np.testing.assert_allclose(got, want, atol=TOL)
  _, from_dir = checkpoints.from_hf(tmp_path / 'mae')
  _assert_same_params(from_dir, params)


def test_a_transformers_deit_names_its_distillation_token(tmp_path):
  from vit_jax.checkpoints import pretrained  # pylint: disable=g-import-not-at-top
  model = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(
      hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
      image_size=32, patch_size=8, num_labels=3))
  model.save_pretrained(str(tmp_path / 'deit'))
  with pytest.raises(ValueError, match='distillation token'):
    pretrained.load_checkpoint(str(tmp_path / 'deit'))
  with pytest.raises(ValueError, match='distillation token'):
    checkpoints.from_hf(tmp_path / 'deit')


@pytest.mark.parametrize('act', ['gelu_python', 'gelu_accurate', 'gelu_python_tanh'])
def test_other_names_of_the_two_gelus_read(ck, act):
  """transformers names the exact and tanh GELU several ways; these were refused."""
  model, x, ref = _build(ck, seed=40, hidden_act=act, num_hidden_layers=1)
  config, params = checkpoints.from_hf(model)
  assert config.gelu_approximate is (act != 'gelu_python')
  np.testing.assert_allclose(ck.jax_logits(models.create(config), params, x), ref, atol=TOL)
