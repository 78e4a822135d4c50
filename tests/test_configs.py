"""Every config file loads, names its source, and passes validation."""

import importlib.util
import json
import pathlib

import pytest

from vit_jax.train import defaults

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / 'configs').glob('*.py'))


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('path', CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_validates(path, tmp_path):
  module = _load(path)
  assert 'Source' in module.__doc__, 'each config names its source in its docstring'
  if path.stem == 'from_workdir':  # --config=configs/from_workdir.py:WORKDIR
    with pytest.raises(ValueError, match='name the workdir after a colon'):
      module.get_config()
    recorded = _load(path.with_name('demo.py')).get_config()
    (tmp_path / 'config.json').write_text(recorded.to_json_best_effort(indent=2))
    config = module.get_config(str(tmp_path))
    assert json.loads(config.to_json_best_effort()) == json.loads(recorded.to_json_best_effort())
  else:
    config = module.get_config()
  if path.stem == 'model_summary':
    assert 'batch_size' not in config  # summary only
    return
  if path.stem.startswith('finetune_'):
    assert config.init_from.endswith('.npz')  # must be pointed at real weights
    with pytest.raises(defaults.ConfigError, match='config.init_from'):
      defaults.validate(config, num_devices=1, process_count=1)
    config.init_from = None
  if config.input.source == 'folder' and not config.input.get('folder'):
    # (the ImageNet-21k recipes: the user points them at the folder)
    with pytest.raises(defaults.ConfigError, match='needs config.input.folder'):
      defaults.validate(config, num_devices=1, process_count=1)
    config.input.folder = str(tmp_path)
  defaults.validate(config, num_devices=1, process_count=1)
  assert set(config.keys()) == set(defaults.FIELD_DOCS)


def test_paper_recipe_values():
  b16 = _load(CONFIGS[[p.stem for p in CONFIGS].index('vit_b16')]).get_config()
  assert (b16.batch_size, b16.schedule.base_lr, b16.optimizer.weight_decay) == (4096, 1e-3, 0.03)
  assert b16.schedule.warmup_steps == 10_000 and b16.schedule.decay == 'linear'
  assert b16.model.representation_size == 768 and b16.model.dropout_rate == 0.1
  ft = _load(CONFIGS[[p.stem for p in CONFIGS].index('finetune_imagenet_384')]).get_config()
  assert (ft.optimizer.name, ft.optimizer.momentum, ft.schedule.base_lr) == ('sgd', 0.9, 0.03)
  assert (ft.total_steps, ft.batch_size, ft.model.image_size) == (20_000, 512, 384)
  assert ft.schedule.warmup_steps == 500 and ft.optimizer.grad_clip_norm == 1.0


def test_finetuning_configs_take_another_architecture():
  path = CONFIGS[[p.stem for p in CONFIGS].index('finetune_pets')]
  config = _load(path).get_config('ViT-S/16')  # --config=configs/finetune_pets.py:ViT-S/16
  assert (config.model.hidden_size, config.model.num_classes) == (384, 37)
  assert config.model.image_size == 384 and config.schedule.warmup_steps == 50
  config.init_from = None
  defaults.validate(config, num_devices=1, process_count=1)


@pytest.mark.parametrize('name,scaling', [
    ('ResNet-50', 'normalize'), ('resnet50', 'normalize'), ('Swin-T/384', 'normalize'),
    ('ResNeXt-50 32x4d', 'normalize'), ('Res2Net-50 26w4s', 'normalize'),
    ('BiT-R50x1', 'value_range(-1, 1)'), ('R50+ViT-B/16', 'value_range(-1, 1)')])
def test_finetuning_configs_take_every_family(name, scaling):
  """Every family but ViT used to fail (the recipe set ViT-only fields: 'unknown resnet
  model config field(s) [scan_layers]'), and the pixels were scaled to [-1, 1] for timm
  weights that expect the ImageNet mean and std."""
  path = CONFIGS[[p.stem for p in CONFIGS].index('finetune_cifar10')]
  config = _load(path).get_config(name)
  assert f'|{scaling}|onehot(10)' in config.input.pp_train
  assert f'|{scaling}|onehot(10)' in config.input.pp_eval
  assert config.model.num_classes == 10 and config.model.image_size == 384
  config.init_from = None
  defaults.validate(config, num_devices=1, process_count=1)


def test_a_recorded_config_takes_command_line_overrides(tmp_path):
  """Fields recorded as None (total_steps of an epoch-based run, representation_size)
  could not be overridden: ml_collections refuses a None field that is not typed."""
  import subprocess
  import sys
  import subprocess_env
  root = pathlib.Path(__file__).resolve().parents[1]
  recorded = _load(root / 'configs' / 'demo.py').get_config()
  assert recorded.total_steps is None and recorded.model.representation_size is None
  (tmp_path / 'config.json').write_text(recorded.to_json_best_effort(indent=2))
  counts = []
  for extra in ([], ['--config.model.representation_size=8']):
    proc = subprocess.run(
        [sys.executable, '-m', 'vit_jax.main', f'--config=configs/from_workdir.py:{tmp_path}',
         '--config.total_steps=100', '--config.input.threads=2', *extra,
         f'--workdir={tmp_path / "run"}', '--summary_only'],
        cwd=root, env=subprocess_env.cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, subprocess_env.failure(proc)
    counts += [l for l in proc.stdout.splitlines() if l.startswith('parameters')]
  assert len(counts) == 2 and counts[0] != counts[1]   # the override added pre_logits


def test_the_21k_recipe_starts_with_a_small_sigmoid_loss():
  """With 21,843 sigmoids at bias 0 the first loss was 21,843 x ln 2 = 15,140 an image
  (big_vision starts the head's bias at -10); the model the recipe builds, at init."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  from vit_jax.train import step  # pylint: disable=g-import-not-at-top
  config = _load(CONFIGS[[p.stem for p in CONFIGS].index('vit_b16')]).get_config()
  config.model.update(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, image_size=32)
  module = models.create(config.model)
  params = models.init_params(module, 32, seed=0)
  images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
  labels = np.zeros((4, 21843), np.float32)
  labels[np.arange(4), [0, 5, 700, 21842]] = 1
  logits = jax.jit(lambda p, x: module.apply({'params': p}, x, train=False))(params, images)
  loss = step.loss_fn_for(config.loss)(logits, labels)
  assert loss.shape == (4,) and float(loss.max()) < 12.0, loss


def test_the_imagenet1k_recipe_evaluates_every_5_epochs_at_any_batch():
  """eval_every was computed from the recipe's batch of 1024: with --config.batch_size=256
  the run evaluated every 1.25 epochs (and the rate and warmup followed the batch)."""
  resnet = _load(CONFIGS[[p.stem for p in CONFIGS].index('resnet50')]).get_config()
  epoch = 1_281_167 * 0.99
  assert resnet.eval_every * resnet.batch_size == pytest.approx(5 * epoch, rel=1e-3)
  resnet.batch_size = 256
  assert resnet.eval_every * 256 == pytest.approx(5 * epoch, rel=1e-3)
  assert isinstance(resnet.eval_every, int)
  defaults.validate(resnet, num_devices=1, process_count=1, check_input=False)
  resnet.eval_every = 500  # given on the command line: as given
  assert resnet.eval_every == 500 and resnet.batch_size == 256
