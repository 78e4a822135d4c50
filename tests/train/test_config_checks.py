"""`defaults.validate` catches, before any data or compilation, the configs that would
fail later: preprocessing that does not give the model's input, a one-value patch size,
a bad image size; and says when a registered model's name labels another architecture."""

import re
import time

from absl import logging
import pytest

from vit_jax import models
from vit_jax.data import preprocess_ops
from vit_jax.train import defaults


def _config(image_size=28, num_classes=10):
  c = defaults.default_config()
  c.model = models.get_config('ViT-Ti/16')
  c.model.update(name='test-ViT', image_size=image_size, num_classes=num_classes,
                 patch_size=(7, 7), hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)
  c.input.pp_train = f'decode|random_resized_crop({image_size})|value_range(-1, 1)|onehot(10)'
  c.input.pp_eval = f'decode|resize({image_size})|value_range(-1, 1)|onehot(10)'
  c.batch_size, c.total_steps = 8, 10
  return c


def _validate(c, **kw):
  defaults.validate(c, num_devices=1, process_count=1, **kw)


def test_the_preprocessing_spec_gives_its_size_and_classes():
  assert preprocess_ops.output_spec('decode|resize(32)|flip_lr|onehot(7)') == (
      (32, 32), 'resize', 7)
  assert preprocess_ops.output_spec('decode|inception_crop((24, 32))') == (
      (24, 32), 'inception_crop', None)
  # resize_small leaves the size to the image, unless the image is known to be square.
  assert preprocess_ops.output_spec('decode|resize_small(40)')[0] is None
  assert preprocess_ops.output_spec('decode|inception_crop((24, 32))|resize_small(40)')[0] is None
  assert preprocess_ops.output_spec('decode|resize(64)|resize_small(40)')[:2] == (
      (40, 40), 'resize_small')
  assert preprocess_ops.output_spec(
      'decode|resize_small(256)|central_crop(224)|value_range(-1, 1)')[:2] == (
          (224, 224), 'central_crop')
  assert preprocess_ops.output_spec('decode|flip_lr') == (None, None, None)


def test_a_matching_config_passes():
  _validate(_config())


@pytest.mark.parametrize('field', ['pp_train', 'pp_eval'])
def test_preprocessing_of_another_size_than_the_model_is_named(field):
  c = _config()
  c.model.image_size = 35  # fine-tuning at a new resolution, one spec left at 28
  other = 'pp_eval' if field == 'pp_train' else 'pp_train'
  c.input[other] = c.input[other].replace('(28)', '(35)')
  with pytest.raises(defaults.ConfigError) as e:
    _validate(c)
  msg = str(e.value)
  assert msg.startswith(f'config.input.{field}=')
  assert 'makes 28x28 images' in msg and 'config.model.image_size=35' in msg
  assert '--config.model.image_size=28' in msg


@pytest.mark.parametrize('name', ['ResNet-50', 'BiT-R50x1'])
def test_convolutional_models_take_other_sizes(name):
  """They take any input size: evaluation at a higher resolution, rectangular crops."""
  c = _config()
  c.model = models.get_config(name)
  c.model.num_classes = 10
  c.model.image_size = 32
  c.input.pp_train = 'decode|random_resized_crop((32, 48))|value_range(-1, 1)|onehot(10)'
  c.input.pp_eval = 'decode|resize(40)|value_range(-1, 1)|onehot(10)'
  _validate(c)
  c.input.pp_eval = 'decode|resize(40)|value_range(-1, 1)|onehot(7)'
  with pytest.raises(defaults.ConfigError, match='one-hot encodes 7 classes'):
    _validate(c)


def test_swin_input_size_is_checked():
  c = _config()
  c.model = models.get_config('Swin-T')
  c.model.update(num_classes=10, image_size=224)
  c.input.pp_train = 'decode|resize(224)|value_range(-1, 1)|onehot(10)'
  c.input.pp_eval = 'decode|resize(192)|value_range(-1, 1)|onehot(10)'
  with pytest.raises(defaults.ConfigError, match=r'pp_eval=.*makes 192x192 images'):
    _validate(c)


def test_a_rectangular_crop_is_named():
  c = _config()
  c.input.pp_eval = 'decode|resize((28, 21))|value_range(-1, 1)|onehot(10)'
  with pytest.raises(defaults.ConfigError, match=r'config.input.pp_eval=.*makes 28x21 images '
                     r'\(its resize\)'):
    _validate(c)


def test_onehot_classes_other_than_the_model_are_named():
  c = _config(num_classes=5)
  with pytest.raises(defaults.ConfigError,
                     match=r"config.input.pp_train=.* one-hot encodes 10 classes, but "
                           r"config.model.num_classes=5"):
    _validate(c)
  c.model.num_classes = 0  # pooled features, no head: it used to fail at the first step
  with pytest.raises(defaults.ConfigError,
                     match='num_classes=0 builds a model without a classification head'):
    _validate(c)


@pytest.mark.parametrize('field,spec,message', [
    # Each used to pass, then fail at the first step or evaluation with a traceback.
    ('pp_train', 'resize(28)|value_range(-1, 1)|onehot(10)', 'has no decode'),
    ('pp_eval', 'resize(28)|decode|value_range(-1, 1)|onehot(10)',
     'applies resize before decode'),
    ('pp_train', 'decode|resize(28)|value_range(-1, 1)', 'has no onehot'),
    ('pp_eval', 'decode|resize(28)|value_range(-1, 1)', 'has no onehot'),
    ('pp_train', '', 'is empty'),
    ('pp_eval', '  ', 'is empty'),
])
def test_preprocessing_without_decode_or_onehot_is_named(field, spec, message):
  c = _config()
  c.input[field] = spec
  with pytest.raises(defaults.ConfigError, match=f'config.input.{field}=.*{message}'):
    _validate(c)
  c.input[field] = 'keep("image", "label")|decode|resize(28)|value_range(-1, 1)|onehot(10)'
  _validate(c)  # ops that do not read pixels may come before decode


def test_a_misspelled_op_fails_at_once():
  c = _config()
  c.input.pp_train = 'decode|resise(28)|value_range(-1, 1)|onehot(10)'
  start = time.perf_counter()
  with pytest.raises(defaults.ConfigError, match=r"config.input.pp_train: Unknown "
                     r"preprocessing op 'resise'.*Did you mean 'resize'"):
    _validate(c)
  assert time.perf_counter() - start < 30  # no data, no compilation
  c.input.pp_train = 'decode|resize(28, methd="bicubic")|onehot(10)'
  with pytest.raises(defaults.ConfigError, match=r"config.input.pp_train: Bad arguments for "
                     r"preprocessing op 'resize'"):
    _validate(c)


def test_the_benchmark_skips_the_input_check():
  c = _config()
  c.model.image_size = 35  # the benchmark's synthetic batches are made at the model's size
  _validate(c, check_input=False)


@pytest.mark.parametrize('patch', [(7,), (7, 7)])
def test_a_one_value_patch_size_is_square(patch):
  # --config.model.patch_size=7 on a tuple field gives (7,)
  c = _config()
  c.model.patch_size = patch
  _validate(c)
  assert models.create(c.model).patch_size == (7, 7)


@pytest.mark.parametrize('patch', [(7, 7, 7), (0, 7), (-7,), (7.5, 7)])
def test_a_bad_patch_size_is_named(patch):
  c = _config()
  c.model.patch_size = patch
  with pytest.raises(defaults.ConfigError, match=r'config.model: patch_size=.* must be one or '
                     r'two positive ints'):
    _validate(c)


@pytest.mark.parametrize('size', [-28, 0])
def test_a_non_positive_image_size_is_named(size):
  c = _config()
  c.model.image_size = size
  with pytest.raises(defaults.ConfigError, match=rf'config.model.image_size={size} must be a '
                     'positive int'):
    _validate(c)


def test_a_registered_name_on_another_architecture_is_warned_about(monkeypatch):
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *args: warnings.append(msg % args))
  c = _config()
  _validate(c)
  assert not warnings  # an unregistered name only labels the run
  c.model.name = 'ViT-S/16'
  _validate(c)
  assert len(warnings) == 1
  assert "config.model.name='ViT-S/16' is a registered model" in warnings[0]
  assert 'hidden_size=32 (ViT-S/16 has 384)' in warnings[0]
  assert 'patch_size=(7, 7) (ViT-S/16 has (16, 16))' in warnings[0]
  assert 'num_classes' not in warnings[0] and 'image_size' not in warnings[0]


def test_random_ops_in_the_evaluation_preprocessing_are_warned_about(monkeypatch):
  """A pp_eval with flip_lr was accepted without a word: every evaluation example gets
  the same fixed seed, so all images are flipped, or none."""
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *args: warnings.append(msg % args))
  c = _config()
  _validate(c)
  assert not warnings
  c.input.pp_eval = c.input.pp_eval.replace('decode|', 'decode|flip_lr|')
  _validate(c)
  assert len(warnings) == 1 and 'has random ops (flip_lr)' in warnings[0], warnings
  warnings.clear()
  c.input.pp_train = c.input.pp_train.replace('decode|', 'decode|flip_lr|')  # training: fine
  c.input.pp_eval = c.input.pp_eval.replace('flip_lr|', '')
  _validate(c)
  assert not warnings


def test_frozen_batch_norm_layers_that_still_update_are_warned_about(monkeypatch):
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *args: warnings.append(msg % args))
  c = defaults.default_config()
  c.model = models.get_config('ResNet-50')
  c.model.update(name='probe', num_classes=10, image_size=32, layers=(1, 1, 1, 1))
  c.input.pp_train = 'decode|resize(32)|value_range(-1, 1)|onehot(10)'
  c.input.pp_eval = c.input.pp_train
  c.batch_size, c.total_steps = 8, 10
  c.trainable = '^fc/'  # a linear probe
  _validate(c)
  assert len(warnings) == 1 and 'all BatchNorm layers' in warnings[0], warnings
  assert '--config.model.bn_frozen=True' in warnings[0]
  warnings.clear()
  c.trainable, c.freeze = '', '^layer1/'
  _validate(c)
  assert len(warnings) == 1 and '4 of the 17 BatchNorm layers' in warnings[0], warnings
  warnings.clear()
  c.model.bn_frozen = True
  _validate(c)
  assert not warnings
  c.model.bn_frozen, c.freeze = False, ''  # nothing frozen: nothing to say
  _validate(c)
  assert not warnings
  # Accumulation normalises each micro-batch on its own: not the big batch's step.
  c.accum_steps = 2
  _validate(c)
  assert len(warnings) == 1 and 'config.accum_steps=2 with BatchNorm' in warnings[0]
  assert 'each micro-batch of 4 normalises' in warnings[0], warnings
  warnings.clear()
  c.model.bn_frozen = True  # running statistics only: the same as one batch
  _validate(c)
  assert not warnings


def test_registered_configs_match_their_names():
  for name in models.list_models():
    assert models.differs_from_its_name(models.get_config(name)) == [], name
  c = models.get_config('ViT-B/16')
  c.patch_size = (16,)  # the same patches, as --config.model.patch_size=16 gives them
  c.num_classes, c.image_size, c.dropout_rate = 37, 384, 0.1  # what fine-tuning changes
  assert models.differs_from_its_name(c) == []
  c = models.get_config('Swin-T')
  c.depths = (2, 2, 2, 2)
  assert [d[0] for d in models.differs_from_its_name(c)] == ['depths']


def test_a_missing_init_from_says_what_it_takes_and_where_the_release_is():
  c = _config()
  c.init_from = '/nowhere/ViT-B_16.npz'
  with pytest.raises(defaults.ConfigError) as e:
    _validate(c)
  assert "config.init_from='/nowhere/ViT-B_16.npz' does not exist" in str(e.value)
  assert 'gs://vit_models/imagenet21k/ViT-B_16.npz' in str(e.value)
  c.init_from = '/nowhere/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz'
  with pytest.raises(defaults.ConfigError, match='gs://vit_models/augreg/B_16-i21k'):
    _validate(c)
  c.init_from = '/nowhere/BiT-M-R50x1.npz'
  with pytest.raises(defaults.ConfigError, match='gsutil cp gs://bit_models/BiT-M-R50x1.npz'):
    _validate(c)
  for path in ('/nowhere/workdir', '/nowhere/my_finetune.npz'):  # not the release's
    c.init_from = path
    with pytest.raises(defaults.ConfigError, match='a vit_jax workdir') as e:
      _validate(c)
    assert 'vit_models' not in str(e.value)
  _validate(c, resuming=True)  # a run resuming from its own checkpoint does not read it
  c.init_from = 'None'  # what --config.init_from=None gives (the field is a string)
  with pytest.raises(defaults.ConfigError, match="random initialisation: --config.init_from=''"):
    _validate(c)


def test_a_folder_with_the_tfds_source_is_named():
  """--config.input.folder alone used to train on the tfds dataset of config.input.name
  (or fail on it, unprepared), never mentioning the folder."""
  c = _config()
  c.input.folder = '/data/pets'
  with pytest.raises(defaults.ConfigError,
                     match=r"folder='/data/pets' is set, but .*--config.input.source=folder"):
    _validate(c)
  c.input.source = 'folder'
  _validate(c)


@pytest.mark.parametrize('field,value,message', [
    ('batch_size', 0, 'config.batch_size=0 must be a positive int'),
    ('batch_size', -32, 'config.batch_size=-32 must be a positive int'),
    ('log_every', 0, 'config.log_every=0 must be a positive int'),
    ('eval_every', -10, 'config.eval_every=-10 must be an int >= 0'),
    ('keep_checkpoints', 0, 'config.keep_checkpoints=0 must be a positive int'),
    ('total_steps', -5, 'config.total_steps=-5 must be a positive int, or None'),
    ('schedule.base_lr', -1.0, 'config.schedule.base_lr=-1.0 must be a number >= 0'),
    ('schedule.warmup_steps', -10, 'config.schedule.warmup_steps=-10 must be an int >= 0'),
    ('optimizer.grad_clip_norm', -1.0, 'config.optimizer.grad_clip_norm=-1.0 must be'),
    ('optimizer.b1', 1.5, 'config.optimizer.b1=1.5 must be in [0, 1)'),
    ('optimizer.mu_dtype', 'bf16',
     "config.optimizer.mu_dtype='bf16' must be 'float32' or 'bfloat16'"),
    ('mesh.model', 0, "each size must be a positive int or -1"),
    ('input.mixup_alpha', -0.2, 'config.input.mixup_alpha=-0.2 must be a number >= 0'),
    ('input.mix_switch_prob', 2.0, 'config.input.mix_switch_prob=2.0 must be in [0, 1]'),
    # These four used to pass, then fail in TensorFlow (a traceback) or run wrongly.
    ('input.shuffle_buffer', 0, 'config.input.shuffle_buffer=0 must be a positive int'),
    ('input.threads', -4, 'config.input.threads=-4 must be a positive int, or None'),
    ('input.source', 'folders', "config.input.source='folders' must be 'tfds' or 'folder'"),
    ('schedule.end_lr_fraction', 5.0, 'config.schedule.end_lr_fraction=5.0 must be in'),
    ('min_fsdp_size', -1, 'config.min_fsdp_size=-1 must be an int >= 0'),
])
def test_values_that_would_train_wrongly_or_fail_late_are_named(field, value, message):
  """Each of these used to run (a negative learning rate or clipping norm ascends the
  loss; an unknown mu_dtype was float32) or fail after compiling (a division by zero)."""
  c = _config()
  node, *rest = field.split('.')
  if rest:
    c[node][rest[0]] = value
  else:
    c[node] = value
  with pytest.raises(defaults.ConfigError, match=re.escape(message)):
    _validate(c)


def test_a_model_axis_spanning_processes_is_refused():
  """2 processes x 4 devices with data=1, model=8: both processes would fill the one batch
  shard, each with its own examples, and the run trained on half its batch without a
  word (and evaluated half the split). Now a ConfigError that gives a mesh that works."""
  c = _config()
  c.mesh.update(data=1, fsdp=1, model=8)
  with pytest.raises(defaults.ConfigError) as e:
    defaults.validate(c, num_devices=8, process_count=2)
  assert 'data=1 x fsdp=1 = 1 batch shard(s) cannot be split over the 2 processes' in str(
      e.value)
  assert '--config.mesh.data=2 --config.mesh.model=4' in str(e.value)
  c.mesh.update(data=2, fsdp=1, model=4)
  defaults.validate(c, num_devices=8, process_count=2)
  c.mesh.update(data=1, fsdp=2, model=4)
  defaults.validate(c, num_devices=8, process_count=2)
  c.mesh.update(data=1, fsdp=1, model=8)
  defaults.validate(c, num_devices=8, process_count=1)  # one process: fine


def test_preprocessing_that_leaves_the_size_to_the_image_fails_before_training(monkeypatch):
  """A pp_eval of resize_small(...) alone passed validation, trained, and stopped the run
  at its first evaluation (losing the interval since the last checkpoint). A spec that
  resizes nothing works on a dataset of one size (MNIST), so it only warns."""
  c = _config()
  c.input.pp_eval = 'decode|resize_small(36)|value_range(-1, 1)|onehot(10)'
  with pytest.raises(defaults.ConfigError, match=re.escape(
      "config.input.pp_eval='decode|resize_small(36)|value_range(-1, 1)|onehot(10)' does not "
      'give images of one size (its last size op, resize_small, keeps the aspect ratio): ')
                     + '.*at its first evaluation; add central_crop\\(28\\) or resize\\(28\\)'):
    _validate(c)
  c.model = models.get_config('ResNet-50')  # the CNNs take any size, but batches need one
  c.model.update(num_classes=10, image_size=28)
  with pytest.raises(defaults.ConfigError, match='does not give images of one size'):
    _validate(c)
  c = _config()
  c.input.pp_eval = 'decode|resize(28)|resize_small(28)|value_range(-1, 1)|onehot(10)'
  _validate(c)  # square, then resize_small: one size
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *args: warnings.append(msg % args))
  c.input.pp_train = 'decode|flip_lr|value_range(-1, 1)|onehot(10)'
  _validate(c)
  assert len(warnings) == 1, warnings
  assert ("config.input.pp_train='decode|flip_lr|value_range(-1, 1)|onehot(10)' resizes "
          'nothing: every image must already be 28x28') in warnings[0]
  assert 'stops the run at that step' in warnings[0]


def test_a_pixel_scale_that_differs_between_training_and_evaluation_is_named(monkeypatch):
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *args: warnings.append(msg % args))
  _validate(_config())
  assert not warnings
  c = _config()
  c.input.pp_eval = 'decode|resize(28)|value_range(0, 1)|onehot(10)'
  _validate(c)
  assert len(warnings) == 1 and 'pp_train scales pixels with value_range(' in warnings[0]
  assert 'vmin=-1, vmax=1' in warnings[0] and 'vmin=0, vmax=1' in warnings[0]
  warnings.clear()
  # The same scale written otherwise: no warning.
  c.input.pp_eval = 'decode|resize(28)|normalize(mean=(.5, .5, .5), std=(.5, .5, .5))|onehot(10)'
  _validate(c)
  c.input.pp_eval = 'decode|resize(28)|value_range(-1.0, 1.0)|onehot(10)'
  _validate(c)
  assert not warnings, warnings
  c.input.pp_train = 'decode|random_resized_crop(28)|onehot(10)'
  c.input.pp_eval = 'decode|resize(28)|onehot(10)'
  _validate(c)
  assert len(warnings) == 1 and 'pixels reach the model as 0..255' in warnings[0]


def test_an_image_size_the_patch_does_not_divide_names_sizes_that_fit():
  c = _config(image_size=30)  # patch (7, 7)
  c.input.pp_train = 'decode|resize(30)|value_range(-1, 1)|onehot(10)'
  c.input.pp_eval = c.input.pp_train
  with pytest.raises(defaults.ConfigError, match=re.escape(
      'config.model.image_size=30 is not divisible by the patch size (7, 7): e.g. '
      '--config.model.image_size=28 or 35')):
    _validate(c)


def test_mixing_labels_without_onehot_is_refused():
  c = _config()
  c.input.pp_train = 'decode|random_resized_crop(28)|value_range(-1, 1)'
  c.input.cutmix_alpha = 1.0
  with pytest.raises(defaults.ConfigError, match=re.escape(
      "has no onehot: the training and evaluation steps take one-hot labels, so end it "
      "with '|onehot(10)'")):
    _validate(c)


@pytest.mark.parametrize('batch,accum,devices,processes', [
    (32, 1, 3, 1),  # a run of batch 32 resumed on 3 devices
    (30, 1, 8, 1),
    (64, 3, 8, 1),
    (6, 1, 4, 2),
    (7, 1, 2, 1),
])
def test_every_fix_the_batch_error_suggests_validates(batch, accum, devices, processes):
  """The batch-size error used to suggest only another batch size, which a resumed run
  cannot take (its checkpoint counts steps of the old batch). Each suggested command-line
  change, applied alone, must pass; and some suggestion keeps the batch size."""
  c = _config()
  c.batch_size, c.accum_steps = batch, accum
  with pytest.raises(defaults.ConfigError) as e:
    defaults.validate(c, num_devices=devices, process_count=processes)
  message = str(e.value)
  assert f'config.batch_size={batch} must be divisible' in message
  suggestions = re.split(r' or |; to keep batch_size=\d+ \(as a resumed run must\): ',
                         message.split('e.g. ', 1)[1])
  assert any('--config.' in s and 'batch_size' not in s for s in suggestions), message
  for suggestion in suggestions:
    fixed = _config()
    fixed.batch_size, fixed.accum_steps = batch, accum
    for field, value in re.findall(r'--config\.([\w.]+)=(\d+)', suggestion):
      node = fixed
      *parents, leaf = field.split('.')
      for p in parents:
        node = node[p]
      node[leaf] = int(value)
    defaults.validate(fixed, num_devices=devices, process_count=processes)


def test_a_tie_between_accumulations_suggests_the_larger():
  """accum_steps=3 for a batch of 8 suggested 2, not 4: who raised accumulation did it
  for memory."""
  c = _config()
  c.batch_size, c.accum_steps = 8, 3
  with pytest.raises(defaults.ConfigError, match=r'--config\.accum_steps=4\b'):
    _validate(c)


def test_an_evaluation_spec_that_resizes_nothing_is_refused():
  """It used to only warn (fine on a dataset of one size), then end the run at its first
  evaluation: the padding of a last, partial batch needs the size before any image."""
  c = _config()
  c.input.pp_eval = 'decode|value_range(-1, 1)|onehot(10)'
  with pytest.raises(defaults.ConfigError, match=re.escape(
      "config.input.pp_eval='decode|value_range(-1, 1)|onehot(10)' resizes nothing: "
      'evaluation pads its last batch')):
    _validate(c)


def test_a_compilation_cache_that_is_a_file_is_refused(tmp_path):
  c = _config()
  (tmp_path / 'cache').write_text('x')
  c.compilation_cache_dir = str(tmp_path / 'cache')
  with pytest.raises(defaults.ConfigError, match='compilation_cache_dir=.* is a file'):
    _validate(c)
  c.compilation_cache_dir = str(tmp_path / 'new_folder')
  _validate(c)


def test_a_mesh_error_names_the_mesh_once():
  c = _config()
  c.mesh.model = 0
  with pytest.raises(defaults.ConfigError) as e:
    _validate(c)
  assert str(e.value).startswith('config.mesh {') and str(e.value).count('config.mesh') == 1


def test_a_fixed_axis_that_does_not_divide_the_devices_names_sizes_that_fit():
  """It said only '8 devices are not divisible by the fixed axes (3)'."""
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top
  with pytest.raises(sharding.MeshError) as e:
    sharding.mesh_shape({'data': -1, 'fsdp': 3, 'model': 1}, 8)
  assert 'sizes that fit: fsdp in {1, 2, 4, 8}' in str(e.value)
  for fit in (1, 2, 4, 8):  # each suggestion works
    assert sharding.mesh_shape({'data': -1, 'fsdp': fit, 'model': 1}, 8)[0] == 8 // fit
  with pytest.raises(sharding.MeshError, match=r'sizes that fit: model in \{1, 2, 4\} \('):
    sharding.mesh_shape({'data': -1, 'fsdp': 2, 'model': 3}, 8)
  # Every fixed axis is varied (the last one only before: no suggestion here).
  with pytest.raises(sharding.MeshError, match=r'sizes that fit: fsdp in \{1, 2, 4\} \('):
    sharding.mesh_shape({'data': -1, 'fsdp': 3, 'model': 2}, 8)
  with pytest.raises(sharding.MeshError,
                     match=r'sizes that fit: fsdp in \{1, 3\} or model in \{1, 3\} \('):
    sharding.mesh_shape({'data': -1, 'fsdp': 2, 'model': 2}, 6)


@pytest.mark.parametrize('decay', ['constant', 'rsqrt'])
def test_an_end_rate_for_a_schedule_without_an_end_is_refused(decay):
  """end_lr_fraction was accepted with decay='constant' or 'rsqrt' and had no effect."""
  from vit_jax.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  c = _config()
  c.schedule.update(decay=decay, end_lr_fraction=0.1, warmup_steps=0)
  with pytest.raises(defaults.ConfigError, match=rf"end_lr_fraction=0.1 has no effect with "
                     rf"decay='{decay}'.*use decay='linear' or 'cosine'"):
    _validate(c)
  schedule = optimizer_lib.learning_rate_schedule(c.schedule, 100)  # (what it was)
  c.schedule.end_lr_fraction = 0.0
  same = optimizer_lib.learning_rate_schedule(c.schedule, 100)
  assert float(schedule(99)) == float(same(99))
  _validate(c)


def test_cudnn_attention_off_a_gpu_is_named():
  """It was a traceback ("cuDNN is not detected") from tracing the model, after the input
  pipeline and timm (benchmark --compare) were built."""
  c = _config()
  c.model.attention_impl = 'cudnn'
  with pytest.raises(defaults.ConfigError, match=r"attention_impl='cudnn' needs an NVIDIA "
                     r"GPU; this run's backend is cpu: use None \(the default\) or 'xla'"):
    _validate(c)
  c.model.attention_impl = 'xla'
  _validate(c)


def test_decoded_channels_other_than_the_model_s_are_named():
  """decode(1) for a 3-channel model passed, then stopped the run at step 1 with a
  traceback (status 1: launch/until_done.sh retried it)."""
  c = _config()
  c.input.pp_train = 'decode(1)|resize(28)|value_range(-1, 1)|onehot(10)'
  with pytest.raises(defaults.ConfigError, match=(
      r'config.input.pp_train=.* decodes 1-channel images, but the model takes '
      r'config.model.in_channels=3: set --config.model.in_channels=1')):
    _validate(c)
  c.model.in_channels = 1
  c.input.pp_eval = 'decode(1)|resize(28)|value_range(-1, 1)|onehot(10)'
  _validate(c)
  assert preprocess_ops.decoded_channels('resize(28)') is None
  assert preprocess_ops.decoded_channels('decode|resize(28)') == 3


@pytest.mark.parametrize('field, value, message', [
    ('schedule.base_lr', float('inf'), 'must be a number >= 0'),
    ('optimizer.eps', float('inf'), 'must be a positive number'),
    ('schedule.warmup_epochs', float('nan'), 'must be a number >= 0'),
    ('num_epochs', float('inf'), 'must be a non-negative number'),
    ('seed', 2**64 + 1, 'must be an int of 64 bits'),
])
def test_infinite_nan_and_huge_values_fail_before_compiling(field, value, message):
  """inf and nan passed the range checks, then stopped the run late (base_lr=inf: a
  NonFiniteError after compiling; warmup_epochs=nan, num_epochs=inf, a seed past 64 bits:
  tracebacks, status 1) or trained nothing and exited 0 (optimizer.eps=inf)."""
  c = _config()
  node, *rest = field.split('.')
  if rest:
    c[node][rest[0]] = value
  else:
    c[node] = value
  with pytest.raises(defaults.ConfigError, match=rf'config.{field}=.* {message}'):
    _validate(c)
  c = _config()
  c.model.head_bias_init = float('nan')
  with pytest.raises(ValueError, match='head_bias_init'):
    _validate(c)


def test_a_config_file_s_misspelled_sub_field_is_named():
  """c.schedule.warmup_step = 100 in a config file was ignored: the run trained with
  warmup_steps=0 (overrides on the command line of unknown fields fail already)."""
  c = _config()
  c.schedule.warmup_step = 100
  with pytest.raises(defaults.ConfigError, match=(
      r'config.schedule.warmup_step is not a field of config.schedule \(did you mean '
      r'schedule.warmup_steps\?\); its fields: base_lr, ')):
    _validate(c)
  c = _config()
  c.input.pp_tarin = 'decode'
  with pytest.raises(defaults.ConfigError, match=r'did you mean input.pp_train\?'):
    _validate(c)


def test_a_value_range_of_one_value_is_refused():
  c = _config()
  c.input.pp_train = 'decode|resize(28)|value_range(0, 0)|onehot(10)'
  with pytest.raises(defaults.ConfigError, match='vmax must differ from vmin'):
    _validate(c)


def test_freezing_a_new_zero_head_warns_that_nothing_trains(monkeypatch):
  """--config.freeze=^head/ on a new (zero) head: loss ln(classes) to the end, eval top-1
  at chance, status 0, without a word."""
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *a: warnings.append(msg % a))
  c = _config()
  c.freeze = '^head/'
  _validate(c)
  assert any('freeze the head, which starts at zero' in w for w in warnings), warnings
  warnings.clear()
  c.freeze, c.trainable = None, '^head/'  # a linear probe: the head trains
  _validate(c)
  assert not any('freeze the head' in w for w in warnings), warnings


def test_training_in_float16_warns_of_underflow(monkeypatch):
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *a: warnings.append(msg % a))
  c = _config()
  c.model.dtype = 'float16'
  _validate(c)
  assert any("no loss scaling" in w and "use 'bfloat16'" in w for w in warnings), warnings


@pytest.mark.parametrize('spec, message', [
    ("decode|resize(28)|value_range(-1, 1)|onehot(10, key='labels')",
     r"onehot\(key='labels'\) reads a key the examples do not have"),
    ("decode|resize(28)|value_range(-1, 1)|onehot(10)|keep('image')",
     r"keep\(...\) loses 'label'"),
    ("decode|resize(28)|value_range(-1, 1)|onehot(10)|drop('label')",
     r"drop\(...\) loses 'label'"),
])
def test_preprocessing_that_loses_the_label_is_named(spec, message):
  """Each was a KeyError in the first batch (a traceback, status 1)."""
  c = _config()
  c.input.pp_train = spec
  with pytest.raises(defaults.ConfigError, match=message):
    _validate(c)


def test_a_keep_before_a_random_op_must_keep_the_rng():
  c = _config()
  c.input.pp_train = "keep('image', 'label')|decode|flip_lr|resize(28)|value_range(-1, 1)|onehot(10)"
  with pytest.raises(defaults.ConfigError, match="drops 'rng', which the random op flip_lr"):
    _validate(c)
  c.input.pp_train = ("keep('image', 'label', 'rng')|decode|flip_lr|resize(28)|"
                      'value_range(-1, 1)|onehot(10)')
  _validate(c)


def test_a_compilation_cache_that_cannot_be_written_is_refused(tmp_path):
  """/proc/nocache trained with one jax warning and cached nothing."""
  c = _config()
  c.compilation_cache_dir = '/proc/nocache'
  with pytest.raises(defaults.ConfigError, match="compilation_cache_dir='/proc/nocache' "
                     'cannot be written here'):
    _validate(c)
  c.compilation_cache_dir = str(tmp_path / 'new' / 'cache')  # created when first used
  _validate(c)
  assert not (tmp_path / 'new').exists()


@pytest.mark.parametrize('classifier', ['unpooled', 'token_unpooled'])
def test_training_an_unpooled_classifier_is_refused(classifier):
  """Per-token logits against one label an image: a broadcasting error in the first
  train step (status 1: launch/until_done.sh restarted it)."""
  c = _config()
  c.model.classifier = classifier
  with pytest.raises(defaults.ConfigError, match=f"classifier='{classifier}' gives an output "
                     'per token'):
    _validate(c)


def test_a_home_relative_init_from_is_found(tmp_path, monkeypatch):
  """--config.init_from=~/w was 'does not exist' (no shell expands ~ after '='), though
  load_checkpoint reads it."""
  monkeypatch.setenv('HOME', str(tmp_path))
  (tmp_path / 'w.npz').write_bytes(b'')
  c = _config()
  c.init_from = '~/w.npz'
  _validate(c)
  c.init_from = '~/gone.npz'
  with pytest.raises(defaults.ConfigError, match=r"init_from='~/gone.npz' does not exist"):
    _validate(c)


@pytest.mark.parametrize('field', ['train_split', 'eval_split'])
def test_an_empty_split_is_refused(field):
  """An empty split of an image folder read the folder's root: its split folders became
  the classes."""
  c = _config()
  c.input[field] = ''
  with pytest.raises(defaults.ConfigError, match=f"config.input.{field}='' must be a split "
                                                 'name'):
    _validate(c)


def test_a_home_relative_compilation_cache_is_in_the_home_folder(tmp_path, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax.train import loop  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('HOME', str(tmp_path))
  updates = {}
  monkeypatch.setattr(jax.config, 'update', lambda k, v: updates.__setitem__(k, v))
  c = _config()
  c.compilation_cache_dir = '~/xla_cache'
  _validate(c)
  loop.use_compilation_cache(c)
  assert updates == {'jax_compilation_cache_dir': str(tmp_path / 'xla_cache')}
  updates.clear()
  c.compilation_cache_dir = None
  loop.use_compilation_cache(c)
  assert not updates
