"""init_from: every kind of pretrained weights, adapted to a new head and resolution."""

import functools
import json

import jax
import numpy as np
import pytest
import torch
import timm
from transformers import ViTConfig, ViTForImageClassification

from vit_jax import checkpoints, models
from vit_jax.checkpoints import pretrained
from vit_jax.checkpoints import train_state

SMALL = dict(patch_size=8, hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128)
POS = 'Transformer/posembed_input/pos_embedding'


def _params(seed=0, size=32, **kw):
  module = models.create('ViT-Ti/16', **dict(SMALL, **kw))
  params = models.init_params(module, size, seed=seed)
  rng = np.random.default_rng(seed)
  # Non-trivial values everywhere (the real init has a zero head and zero class token).
  return jax.tree.map(lambda p: np.asarray(p) + rng.normal(0, 0.1, p.shape).astype(p.dtype),
                      params)


def test_npz_to_new_resolution_and_head(tmp_path):
  source = _params(num_classes=10)
  checkpoints.save_npz(tmp_path / 'w.npz', source)
  target = models.init_params(models.create('ViT-Ti/16', num_classes=2, **SMALL), 48)
  out = pretrained.adapt(pretrained.load(str(tmp_path / 'w.npz')), target)
  flat_s, flat_t, flat_o = map(checkpoints.flatten, (source, target, out))
  assert flat_o[POS].shape == (1, 1 + 36, 64)
  np.testing.assert_allclose(flat_o[POS], models.resample_posemb(flat_s[POS], 6, 'bilinear'),
                             atol=1e-6)
  np.testing.assert_array_equal(flat_o['head/kernel'], flat_t['head/kernel'])  # new head
  assert flat_o['head/kernel'].shape == (64, 2) and not flat_o['head/kernel'].any()
  for k in flat_s:
    if k not in (POS, 'head/kernel', 'head/bias'):
      np.testing.assert_array_equal(flat_o[k], flat_s[k], err_msg=k)
  bicubic = pretrained.adapt(pretrained.load(str(tmp_path / 'w.npz')), target,
                             posemb_method='bicubic')
  assert not np.allclose(checkpoints.flatten(bicubic)[POS], flat_o[POS])


def test_pre_logits_dropped_when_the_new_model_has_none():
  source = _params(num_classes=10, representation_size=32)  # an ImageNet-21k style model
  target = models.init_params(models.create('ViT-Ti/16', num_classes=10, **SMALL), 32)
  out = checkpoints.flatten(pretrained.adapt(source, target))
  assert not any(k.startswith('pre_logits') for k in out)
  assert out['head/kernel'].shape == (64, 10) and not out['head/kernel'].any()


def test_a_new_representation_layer_starts_new_and_a_kept_head_says_which_width():
  """A model with a representation layer fine-tuned from weights without one was refused
  ('missing from the pretrained weights: pre_logits/...', though the message of another
  width says the representation layer may change); with init_head='keep' the refusal
  named no fix."""
  source = _params(num_classes=10)
  target = models.init_params(models.create('ViT-Ti/16', num_classes=10, representation_size=16,
                                            **SMALL), 32)
  out = checkpoints.flatten(pretrained.adapt(source, target))
  flat_target = checkpoints.flatten(target)
  np.testing.assert_array_equal(out['pre_logits/kernel'], flat_target['pre_logits/kernel'])
  np.testing.assert_array_equal(out['Transformer/encoder_norm/scale'],
                                checkpoints.flatten(source)['Transformer/encoder_norm/scale'])
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r'representation_size=None leaves it out, or '
                           r'--config.init_head=reset starts a new head'):
    pretrained.adapt(source, target, keep_head=True)
  wide = _params(num_classes=10, representation_size=32)
  plain = models.init_params(models.create('ViT-Ti/16', num_classes=10, **SMALL), 32)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"representation_size=32 keeps the weights' one"):
    pretrained.adapt(wide, plain, keep_head=True)
  # Another width: a new layer too (with a new head), or the width to set (kept head).
  out = checkpoints.flatten(pretrained.adapt(wide, target))
  np.testing.assert_array_equal(out['pre_logits/kernel'], flat_target['pre_logits/kernel'])
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"pre_logits/kernel: .*\n.*representation_size=32 keeps"):
    pretrained.adapt(wide, target, keep_head=True)


def test_another_architecture_names_every_difference_and_the_flags_at_once():
  """Fine-tuning ViT-Ti/16 from 96-wide weights of 3 layers, 4 heads, MLP 192, patch 8
  named width, depth and patch first and the heads and MLP width only on the next run,
  then said 'Set config.model ...', which the command line does not take."""
  source = _params(hidden_size=96, num_layers=3, num_heads=4, mlp_dim=192)   # patch 8
  target = models.abstract_variables(models.create('ViT-Ti/16', num_classes=10), 32)['params']
  with pytest.raises(checkpoints.CheckpointMismatchError) as raised:
    pretrained.adapt(source, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), target))
  message = str(raised.value)
  for line in ('width (hidden_size): checkpoint 96, model 192',
               'depth (num_layers): checkpoint 3, model 12',
               'heads (num_heads): checkpoint 4, model 3',
               'MLP width (mlp_dim): checkpoint 192, model 768'):
    assert line in message, message
  assert ('Give the model the architecture of the checkpoint: --config.model.hidden_size=96 '
          '--config.model.num_layers=3 --config.model.num_heads=4 --config.model.mlp_dim=192 '
          '--config.model.patch_size=8 (or, in Python, those fields of the model config); '
          'only the head, the representation layer and the resolution may change.'
          ) in message, message


def test_a_kept_head_of_another_representation_or_class_count_names_that():
  """A head kept from weights with a representation layer was blamed on 'another
  architecture: width, MLP width, heads or patch size differ'; another class count named
  Python calls, not the flag."""
  source = _params(num_classes=10, representation_size=32)
  plain = models.init_params(models.create('ViT-Ti/16', num_classes=10, **SMALL), 32)
  with pytest.raises(checkpoints.CheckpointMismatchError) as raised:
    pretrained.adapt(source, plain, keep_head=True)
  assert 'another architecture' not in str(raised.value)
  assert 'the representation layer differs: see the last line' in str(raised.value)
  other = models.init_params(models.create('ViT-Ti/16', num_classes=3, **SMALL), 32)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r'another class count: start a new head, --config.init_head=reset '
                           r'when fine-tuning(.|\n)*head/kernel: \(64, 10\) in the pretrained '
                           r'weights, \(64, 3\) in the model'):
    pretrained.adapt(_params(num_classes=10), other, keep_head=True)


def test_keep_head_keeps_the_trained_head():
  source = _params(num_classes=10)
  target = models.init_params(models.create('ViT-Ti/16', num_classes=10, **SMALL), 32)
  kept = checkpoints.flatten(pretrained.adapt(source, target, keep_head=True))
  np.testing.assert_array_equal(kept['head/kernel'], checkpoints.flatten(source)['head/kernel'])
  with pytest.raises(checkpoints.CheckpointMismatchError, match='head/kernel'):
    other = models.init_params(models.create('ViT-Ti/16', num_classes=3, **SMALL), 32)
    pretrained.adapt(source, other, keep_head=True)


def test_timm_safetensors_and_hf_files(tmp_path):
  from safetensors.torch import save_file
  torch.manual_seed(0)
  tm = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=2, num_classes=5,
                         img_size=64).eval()
  save_file(tm.state_dict(), str(tmp_path / 'timm.safetensors'))
  config = models.get_config('ViT-Ti/16')
  config.update(num_layers=2, num_classes=5, image_size=64)
  loaded = pretrained.load(str(tmp_path / 'timm.safetensors'), model_config=config)
  _, expected = checkpoints.from_timm(tm)
  for k, v in checkpoints.flatten(expected).items():
    np.testing.assert_array_equal(checkpoints.flatten(loaded)[k], v)

  hf = ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=128,
                                            image_size=32, patch_size=8, num_labels=3)).eval()
  hf_dir = tmp_path / 'hf'
  hf_dir.mkdir()
  save_file(hf.state_dict(), str(hf_dir / 'model.safetensors'))
  (hf_dir / 'config.json').write_text(json.dumps(hf.config.to_dict()))
  loaded = pretrained.load(str(hf_dir / 'model.safetensors'))
  _, expected = checkpoints.from_hf(hf)
  for k, v in checkpoints.flatten(expected).items():
    np.testing.assert_array_equal(checkpoints.flatten(loaded)[k], v)
  (hf_dir / 'config.json').unlink()
  with pytest.raises(FileNotFoundError, match='config.json'):
    pretrained.load(str(hf_dir / 'model.safetensors'))


def test_orbax_workdir(tmp_path):
  params = _params(num_classes=4)
  ckpt = train_state.TrainCheckpointer(tmp_path / 'checkpoints', async_save=False)
  state = {'step': np.int32(7), 'params': params, 'rng': np.zeros(2, np.uint32)}
  ckpt.save(7, state, {'step': 7})
  ckpt.close()
  for path in (tmp_path, tmp_path / 'checkpoints', tmp_path / 'checkpoints' / '7'):
    loaded = checkpoints.flatten(pretrained.load(str(path)))
    for k, v in checkpoints.flatten(params).items():
      np.testing.assert_array_equal(loaded[k], v)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='no Orbax checkpoint'):
    pretrained.load(str(tmp_path / 'empty'))


def test_orbax_weights_are_read_without_the_optimizer_state(tmp_path):
  """predict, visualize and convert restored the whole train state to keep its params:
  the Adam moments tripled the memory, and a damaged optimizer state failed the read."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  params = _params(num_classes=4)
  state = {'step': np.int32(7), 'params': params,
           'opt_state': {'mu': jax.tree.map(np.ones_like, params)}}
  step = tmp_path / 'checkpoints' / '7'
  # One folder a leaf (no OCDBT), so the optimizer's part can be damaged alone.
  ocp.PyTreeCheckpointer(use_ocdbt=False).save(epath.Path(step / 'state'), state)
  damaged = [p for p in (step / 'state').iterdir() if p.name.startswith('opt_state')]
  assert damaged
  for p in damaged:  # the data gone, the array's metadata (.zarray) left
    for chunk in p.iterdir():
      if not chunk.name.startswith('.'):
        chunk.unlink()
  loaded = checkpoints.flatten(pretrained.load(str(tmp_path)))
  for k, v in checkpoints.flatten(params).items():
    np.testing.assert_array_equal(loaded[k], v)


def test_a_damaged_newest_step_names_the_steps_to_read_instead(tmp_path):
  """It was TensorStore's message (a page of JSON spec), and no way forward."""
  params = _params(num_classes=4)
  ckpt = train_state.TrainCheckpointer(tmp_path / 'checkpoints', async_save=False,
                                       keep_last=3)
  for step in (5, 7):
    ckpt.save(step, {'step': np.int32(step), 'params': params}, {'step': step})
  ckpt.close()
  for f in (tmp_path / 'checkpoints' / '7' / 'state').rglob('*'):
    if f.is_file() and f.parent.name == 'd':  # the array data, metadata left
      f.write_bytes(b'\0' * 16)
  with pytest.raises(ValueError) as e:
    pretrained.load(str(tmp_path))
  message = str(e.value)
  assert message.startswith(f"the checkpoint {tmp_path / 'checkpoints' / '7'} of {tmp_path} "
                            'cannot be read ('), message
  assert 'tensorstore_spec' not in message and ': it may be damaged or incomplete' in message
  assert message.endswith(f"read another step of it, e.g. {tmp_path / 'checkpoints' / '5'} "
                          '(steps: 5)'), message
  assert len(message) < 700
  loaded = checkpoints.flatten(pretrained.load(str(tmp_path / 'checkpoints' / '5')))
  np.testing.assert_array_equal(loaded['head/bias'], checkpoints.flatten(params)['head/bias'])


@pytest.mark.parametrize('kw,message', [
    (dict(classifier='gap'), 'classifier: the checkpoint has a class token'),
    (dict(hidden_size=32, num_heads=4, mlp_dim=64), 'width \\(hidden_size\\): checkpoint 64, model 32'),
    (dict(num_layers=3), 'depth \\(num_layers\\): checkpoint 2, model 3'),
    (dict(patch_size=4), 'patch embedding kernel'),
])
def test_structural_mismatch_is_refused_with_what_differs(kw, message):
  source = _params(num_classes=10)
  target = models.init_params(models.create('ViT-Ti/16', **dict(SMALL, num_classes=10, **kw)),
                              32)
  with pytest.raises(checkpoints.CheckpointMismatchError, match=message):
    pretrained.adapt(source, target)


def test_unknown_kind_is_an_error(tmp_path):
  (tmp_path / 'weights.h5').write_text('x')
  with pytest.raises(ValueError, match='cannot tell what kind'):
    pretrained.load(str(tmp_path / 'weights.h5'))


def test_torch_state_dict_files_without_a_model_config(tmp_path):
  """timm .pth and transformers pytorch_model.bin (torch.save); with no model config the
  timm heads come from the width (192 -> 3, ViT-Ti) and the HF config from config.json."""
  torch.manual_seed(1)
  tm = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=2, num_classes=5,
                         img_size=64).eval()
  torch.save(tm.state_dict(), tmp_path / 'timm.pth')
  ckpt = pretrained.load_checkpoint(str(tmp_path / 'timm.pth'))
  assert ckpt.kind == 'timm' and ckpt.config.num_heads == 3 and ckpt.config.image_size == 64
  _, expected = checkpoints.from_timm(tm)
  for k, v in checkpoints.flatten(expected).items():
    np.testing.assert_array_equal(checkpoints.flatten(ckpt.params)[k], v)

  hf = ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=128,
                                            image_size=32, patch_size=8, num_labels=3)).eval()
  (tmp_path / 'hf').mkdir()
  torch.save(hf.state_dict(), tmp_path / 'hf' / 'pytorch_model.bin')
  (tmp_path / 'hf' / 'config.json').write_text(json.dumps(hf.config.to_dict()))
  ckpt = pretrained.load_checkpoint(str(tmp_path / 'hf' / 'pytorch_model.bin'))
  assert ckpt.kind == 'hf' and ckpt.config.num_heads == 4 and ckpt.class_names is None
  _, expected = checkpoints.from_hf(hf)
  for k, v in checkpoints.flatten(expected).items():
    np.testing.assert_array_equal(checkpoints.flatten(ckpt.params)[k], v)


def test_hybrid_stem_mismatch_is_refused():
  plain = _params(num_classes=10)
  hybrid = models.init_params(models.create('R+ViT-Ti/16', hidden_size=64, num_layers=2,
                                            num_heads=4, mlp_dim=128, num_classes=10), 32)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match='hybrid ResNet stem: present in only one'):
    pretrained.adapt(plain, hybrid)


def test_npz_architecture_is_read_from_the_shapes(tmp_path):
  """.npz files carry no config: structure from shapes, numerics of the original release."""
  for name, kw, size in [('ViT-Ti/16', dict(num_layers=2, classifier='map',
                                            representation_size=48), 48),
                         ('R50+ViT-B/16', dict(num_layers=1, hidden_size=64, num_heads=2,
                                               mlp_dim=128, resnet=dict(
                                                   num_layers=(1, 2), width_factor=0.5,
                                                   stdconv_eps=1e-5, stdconv_eps_in_sqrt=False,
                                                   gn_eps=1e-6)), 32)]:
    module = models.create(name, num_classes=7, **kw)
    params = models.init_params(module, size)
    checkpoints.save_npz(tmp_path / 'w.npz', params)
    ckpt = pretrained.load_checkpoint(str(tmp_path / 'w.npz'))
    expected = models.get_config(name)
    expected.update(num_classes=7, image_size=size, **kw)
    if 'resnet' in kw:
      expected.resnet = kw['resnet']
    for field in ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim', 'classifier',
                  'representation_size', 'num_classes', 'image_size', 'gelu_approximate'):
      assert ckpt.config[field] == expected[field], field
    assert tuple(ckpt.config.patch_size) == tuple(expected.patch_size)
    if expected.resnet:
      assert tuple(ckpt.config.resnet.num_layers) == tuple(expected.resnet['num_layers'])
      assert ckpt.config.resnet.width_factor == expected.resnet['width_factor']
    x = np.random.RandomState(0).uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
    logits = lambda m, p: jax.jit(functools.partial(m.apply, train=False))(  # noqa: E731
        {'params': p}, x)
    np.testing.assert_allclose(logits(models.create(ckpt.config), ckpt.params),
                               logits(module, params), atol=1e-5)


def test_npz_fields_without_a_name_keep_the_release_numerics(tmp_path, caplog):
  """--model='field=value' for an .npz took timm's ViT-B/16 as its base and switched the
  file to exact GELU (the file without --model reads with the release's tanh GELU)."""
  module = models.create('ViT-Ti/16', num_layers=1, hidden_size=32, num_heads=2, mlp_dim=64,
                         num_classes=3)
  checkpoints.save_npz(tmp_path / 'w.npz', models.init_params(module, 32))
  plain = pretrained.load_checkpoint(str(tmp_path / 'w.npz'))
  eps = pretrained.load_checkpoint(str(tmp_path / 'w.npz'), model='layernorm_eps=1e-5')
  assert eps.config.layernorm_eps == 1e-5 and plain.config.layernorm_eps == 1e-6
  assert eps.config.gelu_approximate is plain.config.gelu_approximate is True
  # A field the weights decide otherwise is named (it was dropped without a word).
  caplog.clear()
  with caplog.at_level('WARNING'):
    heads = pretrained.load_checkpoint(str(tmp_path / 'w.npz'), model='num_heads=4,'
                                       'layernorm_eps=1e-5')
  assert heads.config.num_heads == 2 and heads.config.layernorm_eps == 1e-5
  assert '--model num_heads=4 is not used: the weights at' in caplog.text
  assert 'have num_heads=2' in caplog.text and 'layernorm_eps' not in caplog.text
  # A state dict's fields without a name are still timm's (its numerics).
  assert pretrained.parse_model_spec('num_heads=4').gelu_approximate is False


def test_transformers_weights_into_another_head_count_or_numerics(tmp_path, caplog):
  """transformers' config.json records heads, GELU and epsilon: another head count is one
  message naming num_heads (was one shape error per parameter); other numerics load,
  with a warning that says how to keep them."""
  hf = ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=128,
                                            image_size=32, patch_size=8, num_labels=3))
  hf.save_pretrained(str(tmp_path / 'hf'))  # exact GELU, layer_norm_eps 1e-12
  ckpt = pretrained.load_checkpoint(str(tmp_path / 'hf'))
  config = models.get_config('ViT-Ti/16')
  config.update(dict(SMALL, patch_size=(8, 8), num_heads=2), image_size=32, num_classes=5)
  reference = {'params': models.init_params(models.create(config), 32)}
  with pytest.raises(checkpoints.CheckpointMismatchError) as info:
    pretrained.adapt_variables(ckpt, reference, config)
  assert 'heads (num_heads): checkpoint 4, model 2' in str(info.value)
  assert str(info.value).count('\n') < 5
  config.num_heads = 4
  reference = {'params': models.init_params(models.create(config), 32)}
  with caplog.at_level('WARNING'):
    out = pretrained.adapt_variables(ckpt, reference, config)
  assert out['params']['head']['kernel'].shape == (64, 5)
  assert ("gelu_approximate=False, layernorm_eps=1e-12; this model uses "
          "gelu_approximate=True, layernorm_eps=1e-06") in caplog.text
  assert '--config.model.gelu_approximate=False --config.model.layernorm_eps=1e-12' in (
      caplog.text)
  caplog.clear()
  config.update(gelu_approximate=False, layernorm_eps=1e-12)
  with caplog.at_level('WARNING'):
    pretrained.adapt_variables(ckpt, reference, config)
  assert 'were made with' not in caplog.text


def test_timm_weights_into_a_paper_name_config_warn_of_the_gelu(tmp_path, caplog):
  """timm's ViTs use exact GELU and the paper-name configs tanh: init_from of a timm file
  into configs/finetune_*.py used to change the GELU without a word."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  tm = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=1, num_classes=5,
                         img_size=32)
  save_file(tm.state_dict(), str(tmp_path / 'timm.safetensors'))
  config = models.get_config('ViT-Ti/16')
  config.update(num_layers=1, num_classes=5, image_size=32)
  reference = {'params': models.init_params(models.create(config), 32)}
  ckpt = pretrained.load_checkpoint(str(tmp_path / 'timm.safetensors'), model=config)
  with caplog.at_level('WARNING'):
    pretrained.adapt_variables(ckpt, reference, config)
  assert ('timm computes these pretrained weights with gelu_approximate=False; this model '
          'uses gelu_approximate=True' in caplog.text), caplog.text
  caplog.clear()
  config.gelu_approximate = False  # as the warning says: no warning then
  with caplog.at_level('WARNING'):
    pretrained.adapt_variables(
        pretrained.load_checkpoint(str(tmp_path / 'timm.safetensors'), model=config),
        {'params': models.init_params(models.create(config), 32)}, config)
  assert 'pretrained weights' not in caplog.text


def test_the_one_call_load_of_the_readme(tmp_path):
  """README's `load_checkpoint` + `adapt_variables` lines, on an .npz of a small ViT: a new
  10-class head and a resampled position embedding, ready to apply."""
  checkpoints.save_npz(tmp_path / 'w.npz', _params(num_classes=3))
  ckpt = checkpoints.load_checkpoint(str(tmp_path / 'w.npz'))
  config = ckpt.config.copy_and_resolve_references()
  config.update(num_classes=10, image_size=48)
  init = {'params': models.init_params(models.create(config), 48)}
  variables = checkpoints.adapt_variables(ckpt, init, config)
  flat = checkpoints.flatten(variables['params'])
  assert flat[POS].shape == (1, 1 + 36, 64) and flat['head/kernel'].shape == (64, 10)
  out = models.create(config).apply(variables, np.zeros((2, 48, 48, 3), np.float32),
                                    train=False)
  assert out.shape == (2, 10)


def _saved_timm_vit(path, name, **kwargs):
  """A 2-block timm ViT on 32 px (patches of 8, 3 classes), every weight perturbed,
  its state dict saved at `path`."""
  torch.manual_seed(0)
  model = timm.create_model(name, pretrained=False, depth=2, img_size=32, patch_size=8,
                            num_classes=3, **kwargs).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  torch.save(model.state_dict(), path)
  return model


def test_a_timm_vit_of_no_registered_width_warns_and_takes_its_heads(tmp_path, monkeypatch):
  """A timm ViT 256 wide with 8 heads (heads of 32): the state dict does not record the
  heads, and 256 is no registered width. It used to be read with 4 heads without a word
  (logits 1.2 off timm's, and predict printed them); now a warning says how to give the
  number, `model='num_heads=8'` (--model=num_heads=8) reads it as timm computes it, and a
  number that does not divide the width says so."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  model = _saved_timm_vit(tmp_path / 'w.pth', 'vit_base_patch16_224', embed_dim=256,
                          num_heads=8)
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *a: warnings.append(msg % a))
  guessed = checkpoints.load_checkpoint(str(tmp_path / 'w.pth'))
  assert guessed.config.num_heads == 4
  assert len(warnings) == 1 and 'read with num_heads=4' in warnings[0], warnings
  assert '--model=num_heads=N' in warnings[0]
  warnings.clear()
  ckpt = checkpoints.load_checkpoint(str(tmp_path / 'w.pth'), model='num_heads=8')
  assert ckpt.config.num_heads == 8 and not warnings
  assert ckpt.config.name == 'ViT (2 layers x 256 wide, MLP 1024, patch 8)'  # not ViT-B's
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  got = np.asarray(models.create(ckpt.config).apply({'params': ckpt.params}, x, train=False))
  np.testing.assert_allclose(got, want, atol=1e-4)
  wrong = np.asarray(models.create(guessed.config).apply({'params': guessed.params}, x,
                                                         train=False))
  assert np.abs(wrong - want).max() > 1e-2  # the guess was wrong, as the warning allows
  with pytest.raises(ValueError, match='256 does not split into num_heads=6 heads'):
    checkpoints.load_checkpoint(str(tmp_path / 'w.pth'), model='vit_base_patch16_224,num_heads=6')
  with pytest.raises(ValueError, match="'heads' is not a field"):
    checkpoints.load_checkpoint(str(tmp_path / 'w.pth'), model='heads=8')


def test_model_specs_take_tuples_lists_and_name_bad_values():
  parse = pretrained.parse_model_spec
  assert parse('num_heads=8').num_heads == 8
  assert parse('ViT-B/16,gelu_approximate=false').gelu_approximate is False
  swin = parse('swin_tiny_patch4_window7_224,window_size=[4, 4, 4, 2]')
  assert tuple(swin.window_size) == (4, 4, 4, 2)
  assert tuple(parse('ViT-B/16,patch_size=(8, 8)').patch_size) == (8, 8)
  assert tuple(parse('ViT-B/16,patch_size=16').patch_size) == (16, 16)  # one side: square
  with pytest.raises(ValueError, match=r"--model='ViT-B/16,num_heads=\(2, 2\)': "
                                       r'num_heads=\(2, 2\) does not fit the field'):
    parse('ViT-B/16,num_heads=(2, 2)')
  with pytest.raises(ValueError, match='one model name at most'):
    parse('ViT-B/16,ViT-S/16')


def test_non_square_patches_read_back_and_resample_on_their_grid(tmp_path):
  """32 px in 8x4 patches is a 4 x 8 grid: the project's own .npz of it used to be
  refused ('32 patch tokens, not a square grid'), and adapt to 48 px took a 5 x 5 grid."""
  from vit_jax.models import posemb as posemb_lib  # pylint: disable=g-import-not-at-top
  kw = dict(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=1, patch_size=(8, 4),
            num_classes=3)
  module = models.create('ViT-B/16', **kw)
  params = models.init_params(module, 32)
  checkpoints.save_npz(tmp_path / 'w.npz', params)
  ckpt = pretrained.load_checkpoint(str(tmp_path / 'w.npz'))
  assert ckpt.config.image_size == 32 and tuple(ckpt.config.patch_size) == (8, 4)
  x = np.random.RandomState(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
  logits = lambda m, p: np.asarray(jax.jit(  # noqa: E731
      functools.partial(m.apply, train=False))({'params': p}, x))
  np.testing.assert_array_equal(logits(models.create(ckpt.config), ckpt.params),
                                logits(module, params))
  reference = models.init_params(models.create('ViT-B/16', **dict(kw, num_classes=7)), 48)
  adapted = pretrained.adapt(ckpt.params, reference)
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  want = posemb_lib.resample_posemb(np.asarray(posemb), (6, 12), num_prefix_tokens=1,
                                    old_grid=(4, 8))
  np.testing.assert_allclose(adapted['Transformer']['posembed_input']['pos_embedding'], want,
                             rtol=1e-6)


@pytest.mark.skipif(jax.default_backend() == 'gpu', reason='cudnn runs on a GPU as it is')
def test_weights_trained_with_cudnn_attention_are_read_off_gpu(tmp_path):
  """A run trained with attention_impl='cudnn' records it: predict on a machine without
  an NVIDIA GPU failed at the first forward pass ('cuDNN is not detected')."""
  from vit_jax.inference import ImageClassifier  # pylint: disable=g-import-not-at-top
  params = _params(num_classes=4)
  model = models.get_config('ViT-Ti/16')
  model.update(dict(SMALL, patch_size=(8, 8)), num_classes=4, image_size=32,
               attention_impl='cudnn')
  ckpt = train_state.TrainCheckpointer(tmp_path / 'checkpoints', async_save=False)
  ckpt.save(7, {'step': np.int32(7), 'params': params}, {'step': 7, 'model': model.to_dict()})
  ckpt.close()
  loaded = pretrained.load_checkpoint(str(tmp_path))
  assert loaded.config.attention_impl is None
  kept = pretrained.load_checkpoint(str(tmp_path), runnable_here=False)
  assert kept.config.attention_impl == 'cudnn'
  # vit_jax.convert on a CPU host keeps the run's choice in what it writes (it recorded
  # None), and the export reads back here with the default attention.
  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  convert.run(str(tmp_path), str(tmp_path / 'out.safetensors'))
  exported = pretrained.load_checkpoint(str(tmp_path / 'out.safetensors'), runnable_here=False)
  assert exported.config.attention_impl == 'cudnn'
  assert pretrained.load_checkpoint(str(tmp_path / 'out.safetensors')).config.attention_impl is None
  clf = ImageClassifier.from_pretrained(str(tmp_path))
  pixels = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  expected = models.create(loaded.config).apply({'params': params}, pixels, train=False)
  np.testing.assert_allclose(clf.logits(pixels), expected, rtol=1e-4, atol=1e-4)


def test_timm_weights_read_as_a_model_of_another_width_take_heads_of_their_width(
    tmp_path, monkeypatch):
  """ViT-Ti weights (192 wide, 3 heads) read with model='vit_small_patch16_224' took
  ViT-S's 6 heads without a word (logits 0.2 off timm's, in predict and convert too);
  now the heads of the weights' width, with a warning. A spec that sets num_heads, or a
  config of its own, still decides."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  model = _saved_timm_vit(tmp_path / 'w.pth', 'vit_tiny_patch16_224')
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *a: warnings.append(msg % a))
  ckpt = checkpoints.load_checkpoint(str(tmp_path / 'w.pth'), model='vit_small_patch16_224')
  assert ckpt.config.num_heads == 3 and ckpt.config.hidden_size == 192
  assert len(warnings) == 1, warnings
  assert 'weights are 192 wide and model vit_small_patch16_224 is 384 wide' in warnings[0]
  assert 'read with num_heads=3' in warnings[0]
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  got = np.asarray(models.create(ckpt.config).apply({'params': ckpt.params}, x, train=False))
  np.testing.assert_allclose(got, want, atol=1e-4)
  warnings.clear()
  asked = checkpoints.load_checkpoint(str(tmp_path / 'w.pth'),
                                      model='vit_small_patch16_224,num_heads=6')
  assert asked.config.num_heads == 6 and not warnings
  own = models.get_config('vit_small_patch16_224')
  own.num_heads = 2
  assert checkpoints.load_checkpoint(str(tmp_path / 'w.pth'), model=own).config.num_heads == 2
  assert not warnings


def test_a_gs_workdir_being_written_reads_its_newest_finished_step(tmp_path, monkeypatch):
  """On gs:// Orbax writes a step folder in place and marks it done with
  commit_success.txt; reading the run of a workdir still training took the newest step
  folder, half written, and failed on its missing files."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  local = tmp_path / 'run' / 'checkpoints'
  for step, done in ((5, True), (7, False)):
    (local / str(step) / 'state').mkdir(parents=True)
    if done:
      (local / str(step) / 'commit_success.txt').write_text('')
  real_path = epath.Path

  def fake_bucket(path):  # gs://bucket/run -> the local folder, remote as far as it knows
    return real_path(str(path).replace('gs://bucket', str(tmp_path)))
  monkeypatch.setattr(epath, 'Path', fake_bucket)
  assert pretrained.orbax_step_dir('gs://bucket/run').endswith('/checkpoints/5')
  assert pretrained.orbax_step_dir('gs://bucket/run/checkpoints').endswith('/checkpoints/5')
  # Locally a step folder is renamed into place when finished: the newest is read.
  monkeypatch.setattr(epath, 'Path', real_path)
  assert pretrained.orbax_step_dir(str(tmp_path / 'run')).endswith('/checkpoints/7')
