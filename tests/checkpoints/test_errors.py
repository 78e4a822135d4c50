"""Checked loading: `merge_into` and the refusals of `from_timm` / `to_timm` name what
does not fit (keys, shapes) and say what to do about it."""

import numpy as np
import pytest

from vit_jax import checkpoints
from vit_jax import models

CheckpointMismatchError = checkpoints.CheckpointMismatchError
NUM_CLASSES = 5
IMAGE_SIZE = 32  # 2x2 patches of 16: a small but complete ViT-Ti/16


@pytest.fixture(scope='module')
def reference():
  """Initialised ViT-Ti/16 params (1 block, 5 classes, 32px), flat numpy."""
  module = models.create('ViT-Ti/16', num_layers=1, num_classes=NUM_CLASSES)
  params = models.init_params(module, IMAGE_SIZE)
  return {k: np.asarray(v) for k, v in checkpoints.flatten(params).items()}


@pytest.fixture
def loaded(reference):
  """A 'checkpoint' for the reference model: the same keys and shapes, other values."""
  rng = np.random.RandomState(0)
  return {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in reference.items()}


def test_mismatch_error_is_a_value_error():
  assert issubclass(CheckpointMismatchError, ValueError)


def test_exact_fit_loads_the_checkpoint_values(reference, loaded):
  merged = checkpoints.flatten(checkpoints.merge_into(reference, loaded))
  assert set(merged) == set(reference)
  for k, v in loaded.items():
    np.testing.assert_array_equal(merged[k], v, err_msg=k)
  # A nested checkpoint is the same as a flat one.
  nested = checkpoints.flatten(checkpoints.merge_into(reference, checkpoints.unflatten(loaded)))
  for k, v in loaded.items():
    np.testing.assert_array_equal(nested[k], v, err_msg=k)


def test_reference_dtypes_are_kept(reference, loaded):
  loaded64 = {k: v.astype(np.float64) for k, v in loaded.items()}
  merged = checkpoints.flatten(checkpoints.merge_into(reference, loaded64))
  assert {v.dtype for v in merged.values()} == {np.dtype(np.float32)}


def test_missing_keys_are_named(reference, loaded):
  gone = ('Transformer/encoderblock_0/LayerNorm_1/scale', 'cls')
  partial = {k: v for k, v in loaded.items() if k not in gone}
  with pytest.raises(CheckpointMismatchError, match='missing') as info:
    checkpoints.merge_into(reference, partial)
  for k in gone:
    assert k in str(info.value)
  # strict=False takes them from the reference instead.
  merged = checkpoints.flatten(checkpoints.merge_into(reference, partial, strict=False))
  for k in gone:
    np.testing.assert_array_equal(merged[k], reference[k])
  np.testing.assert_array_equal(merged['embedding/kernel'], loaded['embedding/kernel'])


def test_unexpected_keys_are_named(reference, loaded):
  extra = dict(loaded)
  extra['Transformer/encoderblock_1/LayerNorm_0/scale'] = np.ones(192, np.float32)
  with pytest.raises(CheckpointMismatchError, match='unexpected') as info:
    checkpoints.merge_into(reference, extra)
  assert 'Transformer/encoderblock_1/LayerNorm_0/scale' in str(info.value)
  assert 'missing' not in str(info.value)
  merged = checkpoints.flatten(checkpoints.merge_into(reference, extra, strict=False))
  assert set(merged) == set(reference)


def test_head_shape_mismatch_names_both_shapes_and_hints_drop_head(reference, loaded):
  other = dict(loaded)
  other['head/kernel'] = np.zeros((192, 10), np.float32)
  other['head/bias'] = np.zeros((10,), np.float32)
  for strict in (True, False):  # shapes are always checked
    with pytest.raises(CheckpointMismatchError) as info:
      checkpoints.merge_into(reference, other, strict=strict)
    msg = str(info.value)
    assert 'head/kernel' in msg and 'head/bias' in msg
    assert '(192, 10)' in msg and f'(192, {NUM_CLASSES})' in msg
    assert 'drop_head=True' in msg
    assert 'resample_posemb' not in msg


def test_pos_embedding_mismatch_hints_resample_posemb(reference, loaded):
  other = dict(loaded)
  key = 'Transformer/posembed_input/pos_embedding'
  assert reference[key].shape == (1, 5, 192)
  other[key] = np.zeros((1, 17, 192), np.float32)  # a 4x4 grid + class token: 64px
  with pytest.raises(CheckpointMismatchError, match='resample_posemb') as info:
    checkpoints.merge_into(reference, other)
  msg = str(info.value)
  assert key in msg and '(1, 17, 192)' in msg and '(1, 5, 192)' in msg
  assert 'drop_head' not in msg


def test_another_width_is_named_as_another_architecture_not_a_resolution(reference):
  """A checkpoint of width 64 used to get the resolution and class-count hints, and a
  list of every parameter (hundreds of lines at B/16)."""
  module = models.create('ViT-Ti/16', num_layers=1, num_classes=NUM_CLASSES, hidden_size=64,
                         num_heads=2, mlp_dim=128)
  wider = checkpoints.flatten(models.init_params(module, IMAGE_SIZE))
  with pytest.raises(CheckpointMismatchError) as info:
    checkpoints.merge_into(reference, wider)
  msg = str(info.value)
  assert 'another architecture' in msg and 'infer_model_config' in msg
  assert 'resample_posemb' not in msg and 'drop_head' not in msg
  assert len(msg.splitlines()) < 60


def test_drop_head_keeps_the_reference_head(reference, loaded):
  other = dict(loaded)
  other['head/kernel'] = np.ones((192, 10), np.float32)
  other['head/bias'] = np.ones((10,), np.float32)
  merged = checkpoints.flatten(checkpoints.merge_into(reference, other, drop_head=True))
  assert set(merged) == set(reference)
  np.testing.assert_array_equal(merged['head/kernel'], reference['head/kernel'])
  np.testing.assert_array_equal(merged['head/bias'], reference['head/bias'])
  assert merged['head/kernel'].shape == (192, NUM_CLASSES)
  for k, v in loaded.items():
    if not k.startswith('head/'):
      np.testing.assert_array_equal(merged[k], v, err_msg=k)


def test_pre_logits_not_in_the_model_is_dropped_with_drop_head(reference, loaded):
  other = dict(loaded)
  other['pre_logits/kernel'] = np.ones((192, 192), np.float32)
  other['pre_logits/bias'] = np.ones((192,), np.float32)
  other['head/kernel'] = np.ones((192, 10), np.float32)
  other['head/bias'] = np.ones((10,), np.float32)
  with pytest.raises(CheckpointMismatchError, match='unexpected') as info:
    checkpoints.merge_into(reference, other)
  assert 'pre_logits/kernel' in str(info.value)
  merged = checkpoints.flatten(checkpoints.merge_into(reference, other, drop_head=True))
  assert set(merged) == set(reference)
  assert not any(k.startswith('pre_logits') for k in merged)


def test_abstract_reference_cannot_fill_missing_keys():
  module = models.create('ViT-Ti/16', num_layers=1, num_classes=NUM_CLASSES)
  abstract = models.abstract_params(module, IMAGE_SIZE)
  flat = {k: np.zeros(v.shape, v.dtype) for k, v in checkpoints.flatten(abstract).items()}
  del flat['cls']
  with pytest.raises(CheckpointMismatchError, match='init_params'):
    checkpoints.merge_into(abstract, flat, strict=False)


def test_to_timm_refuses_pre_logits():
  config = models.get_config('ViT-Ti/16')
  config.update(num_layers=1, num_classes=3, representation_size=16, image_size=IMAGE_SIZE)
  params = models.init_params(models.create(config), IMAGE_SIZE)
  with pytest.raises(ValueError, match='pre_logits'):
    checkpoints.to_timm(config, params)


# ---------------------------------------------------------------------------
# from_timm refusals (need timm / torch).

@pytest.fixture(scope='module')
def timm_sd():
  torch = pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  torch.manual_seed(0)
  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=1,
                            num_classes=NUM_CLASSES, img_size=IMAGE_SIZE)
  return model.state_dict()


def test_from_timm_state_dict_fits_with_a_name(timm_sd):
  config, _ = checkpoints.from_timm(timm_sd, 'vit_tiny_patch16_224')
  assert (config.num_layers, config.num_classes, config.image_size) == (1, NUM_CLASSES,
                                                                        IMAGE_SIZE)


def test_from_timm_state_dict_needs_a_name(timm_sd):
  with pytest.raises(ValueError, match='name'):
    checkpoints.from_timm(timm_sd)


def test_from_timm_unknown_key_is_named(timm_sd):
  import torch  # pylint: disable=g-import-not-at-top
  sd = dict(timm_sd)
  sd['blocks.0.extra.weight'] = torch.ones(192)
  with pytest.raises(CheckpointMismatchError, match=r'blocks\.0\.extra\.weight'):
    checkpoints.from_timm(sd, 'vit_tiny_patch16_224')


def test_from_timm_missing_key_is_named(timm_sd):
  sd = {k: v for k, v in timm_sd.items() if k != 'norm.bias'}
  with pytest.raises((KeyError, CheckpointMismatchError), match=r'norm\.bias'):
    checkpoints.from_timm(sd, 'vit_tiny_patch16_224')


def test_from_timm_refuses_fc_norm():
  pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=1, num_classes=3,
                            img_size=IMAGE_SIZE, global_pool='avg', class_token=False)
  assert model.fc_norm.__class__.__name__ == 'LayerNorm'  # timm's default for 'avg'
  with pytest.raises(ValueError, match='fc_norm'):
    checkpoints.from_timm(model)


@pytest.mark.parametrize('kwargs, named', [
    (dict(global_pool='avg', fc_norm=False), "global_pool='avg' with a class token"),
    (dict(global_pool='max', class_token=False, fc_norm=False), "global_pool='max'"),
    (dict(global_pool='avgmax', class_token=False, fc_norm=False), "global_pool='avgmax'"),
])
def test_from_timm_refuses_a_pooling_vit_jax_does_not_have(kwargs, named):
  """These timm models have the keys of a class-token or GAP ViT: read by the keys
  alone they imported as one, with other logits (off by 2 to 4 here)."""
  pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=1, num_classes=3,
                            img_size=IMAGE_SIZE, **kwargs)
  with pytest.raises(ValueError, match=named):
    checkpoints.from_timm(model)


def test_from_timm_takes_a_feature_extractor_without_pooling(caplog):
  """global_pool='' with no head: the weights of a class-token or GAP ViT (loaded before
  the pooling check; it must not refuse them). The config pools (what fine-tuning wants)
  and says so, with the classifier that returns every token as timm does."""
  torch = pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  for kwargs, classifier, unpooled in ((dict(), 'token', 'token_unpooled'),
                                       (dict(class_token=False, fc_norm=False), 'gap',
                                        'unpooled')):
    model = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=1, num_classes=0,
                              img_size=IMAGE_SIZE, global_pool='', **kwargs).eval()
    caplog.clear()
    with caplog.at_level('WARNING'):
      config, params = checkpoints.from_timm(model)
    assert config.classifier == classifier and config.num_classes == 0
    assert f"set classifier='{unpooled}' for timm's output" in caplog.text
    config.classifier = unpooled
    x = np.random.RandomState(0).uniform(-1, 1, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(
        np.float32)
    with torch.no_grad():
      want = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    got = np.asarray(models.create(config).apply({'params': params}, x, train=False))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_from_timm_reads_a_head_on_every_token(caplog):
  """global_pool='' with a head: timm applies it to every token; the model was refused
  ("global_pool='' with a class token"), though classifier='token_unpooled' (or
  'unpooled' without a class token) computes exactly that."""
  torch = pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  for kwargs, unpooled, pooled in ((dict(), 'token_unpooled', 'token'),
                                   (dict(class_token=False, fc_norm=False), 'unpooled', 'gap')):
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=1, num_classes=3,
                              img_size=IMAGE_SIZE, global_pool='', **kwargs).eval()
    with torch.no_grad():
      model.head.weight.normal_(0, 0.5)
    caplog.clear()
    with caplog.at_level('WARNING'):
      config, params = checkpoints.from_timm(model)
    assert config.classifier == unpooled and config.num_classes == 3
    assert f"for a pooled classifier (to fine-tune) set classifier='{pooled}'" in caplog.text
    x = np.random.RandomState(0).uniform(-1, 1, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(
        np.float32)
    with torch.no_grad():
      want = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    got = np.asarray(models.create(config).apply({'params': params}, x, train=False))
    assert got.shape == want.shape and np.abs(want).mean() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_from_timm_refuses_blocks_that_compute_otherwise_under_the_same_names():
  """A ResPostBlock (norm after the residual branch) has Block's weight names: it loaded
  without a word and its logits were 0.8 off timm's."""
  pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  from timm.models.vision_transformer import ResPostBlock  # pylint: disable=g-import-not-at-top
  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=2, num_classes=3,
                            img_size=IMAGE_SIZE, block_fn=ResPostBlock)
  with pytest.raises(ValueError, match=r"type ResPostBlock \(timm's block_fn; vit_jax "
                                       r"computes timm's Block\)"):
    checkpoints.from_timm(model)


def test_from_timm_reads_an_unregistered_vit_off_the_model_and_refuses_distillation(ck):
  """DeiT: no registered config of its name, but the model shows heads and numerics; its
  state dict alone says what to pass. The distilled DeiT has a second prefix token."""
  pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  model = timm.create_model('deit_tiny_patch16_224', pretrained=False, depth=2, num_classes=4,
                            img_size=IMAGE_SIZE).eval()
  assert ck.perturb_torch(model, seed=1) > 0
  x = ck.random_images(IMAGE_SIZE, seed=2)
  ck.set_torch_head(model, model.head, ck.to_nchw(x), seed=3)
  config, params = checkpoints.from_timm(model)
  assert config.name == 'deit_tiny_patch16_224' and config.num_heads == 3
  assert config.classifier == 'token' and not config.gelu_approximate
  out = models.create(config).apply({'params': params}, x, train=False)
  assert ck.max_diff(np.asarray(out), ck.torch_logits(model, x), 'DeiT-Ti') < 1e-5
  with pytest.raises(ValueError, match=r"unknown model name(.|\n)*pass the timm model itself"):
    checkpoints.from_timm(model.state_dict(), 'deit_tiny_patch16_224')
  distilled = timm.create_model('deit_tiny_distilled_patch16_224', pretrained=False, depth=1,
                                img_size=IMAGE_SIZE)
  with pytest.raises(ValueError, match='a distillation token'):
    checkpoints.from_timm(distilled)


@pytest.mark.parametrize('kwargs, message', [
    (dict(qkv_bias=False), r'qkv_bias=False'),
    (dict(proj_bias=False), r"no blocks.0.attn.proj.bias \(timm's proj_bias"),
], ids=['qkv_bias', 'proj_bias'])
def test_from_timm_refuses_attention_without_biases(kwargs, message):
  """Were bare KeyErrors: 'blocks.0.attn.qkv.bias', 'blocks.0.attn.proj.bias'."""
  pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=1, num_classes=3,
                            img_size=IMAGE_SIZE, **kwargs)
  for source in (model, model.state_dict()):
    with pytest.raises(ValueError, match=message):
      checkpoints.from_timm(source, 'vit_tiny_patch16_224')


def test_from_hf_refuses_a_state_dict_of_another_kind():
  """Was a bare KeyError 'vit.embeddings.position_embeddings'."""
  pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=1, num_classes=3,
                            img_size=IMAGE_SIZE)
  hf_config = {'hidden_size': 192, 'num_attention_heads': 3, 'intermediate_size': 768,
               'patch_size': 16}
  with pytest.raises(ValueError, match='not a transformers ViT state dict: it lacks '
                     'vit.embeddings.position_embeddings'):
    checkpoints.from_hf(model.state_dict(), hf_config=hf_config)


def test_from_timm_refuses_layer_scale():
  pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=1, num_classes=3,
                            img_size=IMAGE_SIZE, init_values=1e-5)
  with pytest.raises(ValueError, match='LayerScale'):
    checkpoints.from_timm(model)


def test_stacked_and_per_block_layouts_name_the_conversion():
  """Per-block weights into a model with stacked blocks (and back): the error says which
  function converts them, and the converted weights load."""
  stacked_model = models.create('ViT-Ti/16', num_layers=2, num_classes=5, scan_layers=True)
  per_block = models.init_params(models.create('ViT-Ti/16', num_layers=2, num_classes=5,
                                               scan_layers=False), IMAGE_SIZE)
  stacked = models.init_params(stacked_model, IMAGE_SIZE)
  with pytest.raises(CheckpointMismatchError, match=r'models\.stack_layers\(params\)'):
    checkpoints.merge_into(stacked, per_block)
  checkpoints.merge_into(stacked, models.stack_layers(per_block))
  with pytest.raises(CheckpointMismatchError, match=r'models\.unstack_layers\(params\)'):
    checkpoints.merge_into(per_block, stacked)
  checkpoints.merge_into(per_block, models.unstack_layers(stacked))


def test_from_timm_names_a_timm_model_it_does_not_convert():
  """resnet18 (basic blocks) was answered with "not a ViT state dict"."""
  pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  with pytest.raises(ValueError, match=r"'resnet18' is not a timm model vit_jax converts"):
    checkpoints.from_timm(timm.create_model('resnet18', pretrained=False, num_classes=3))


def test_from_timm_names_a_non_square_grid_and_reads_non_square_patches():
  """A non-square timm ViT used to fail on a position embedding of another resolution; a
  square image of 4x8 patches on an image size the patch does not divide (it read 20 px)."""
  torch = pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=1, num_classes=3,
                            img_size=(32, 64))
  with pytest.raises(ValueError, match='no square image makes'):
    checkpoints.from_timm(model)
  # 2x8 tokens, as many as a 64 px square's 4x4: the module tells (a state dict cannot).
  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=1, num_classes=3,
                            img_size=(32, 128))
  with pytest.raises(ValueError, match='takes 32x128 images'):
    checkpoints.from_timm(model)
  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=1, num_classes=3,
                            img_size=IMAGE_SIZE, patch_size=(4, 8)).eval()
  config, params = checkpoints.from_timm(model)
  assert config.image_size == IMAGE_SIZE and tuple(config.patch_size) == (4, 8)
  x = np.random.RandomState(0).uniform(-1, 1, (2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  out = np.asarray(models.create(config).apply({'params': params}, x))
  np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize('kwargs, named', [
    (dict(norm_layer='rmsnorm'), 'norms without a bias'),
    (dict(reg_tokens=4), 'register tokens'),
    (dict(class_token=False, global_pool='avg'), 'fc_norm'),
    (dict(pre_norm=True), 'pre_norm=True'),
    (dict(final_norm=False), 'final_norm=False'),
    (dict(class_token=False, global_pool='map', final_norm=False), 'final_norm=False'),
    (dict(init_values=1e-5), 'LayerScale'),
    (dict(qk_norm=True), 'qk_norm=True'),
    (dict(global_pool='map'), "global_pool='map' with class_token=True"),
    (dict(no_embed_class=True), 'no_embed_class=True'),
    (dict(scale_attn_norm=True), 'scale_attn_norm=True'),
    (dict(scale_mlp_norm=True), 'scale_mlp_norm=True'),
    (dict(embed_norm_layer='layernorm'), 'embed_norm_layer'),
    (dict(attn_layer='diff'), "attn_layer='diff'"),
    (dict(mlp_layer='SwiGLU'), 'mlp_layer=SwiGLU'),
    (dict(block_fn='ParallelScalingBlock'), 'block_fn=ParallelScalingBlock'),
    (dict(block_fn='ParallelThingsBlock'), 'ParallelThingsBlock'),
    (dict(pos_embed='none'), "pos_embed='none'"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_from_timm_names_the_feature_a_state_dict_has(kwargs, named):
  """A state dict shows these by its keys. They used to be refused as a missing
  'norm.weight' or 'patch_embed.proj.bias', as a non-square image, or (RmsNorm) with a
  bare KeyError that ended a training run with a traceback; the last five as 'not a ViT
  state dict ... (every timm VisionTransformer has them)' or as keys not mapped."""
  pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  from timm.layers import mlp  # pylint: disable=g-import-not-at-top
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  classes = dict(mlp_layer=mlp, block_fn=vision_transformer)
  kwargs = {k: getattr(classes[k], v) if k in classes else v for k, v in kwargs.items()}
  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=1, num_classes=3,
                            img_size=IMAGE_SIZE, **kwargs)
  with pytest.raises(ValueError, match=named):
    checkpoints.from_timm(model.state_dict(), 'vit_tiny_patch16_224')
