"""The main job's model summary, run as a user runs it."""

import json
import pathlib
import subprocess
import sys

import pytest
import subprocess_env
from vit_jax import models

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
  return subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', '--summary_only', *args, f'--workdir={tmp_path}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_summary_of_configured_model(tmp_path):
  proc = _run(['--config=configs/vit_b16.py', '--config.model.num_layers=2'], tmp_path)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  summary = json.loads((tmp_path / 'model_summary.json').read_text())
  # Independent count: the registry model with the same overrides as the config file.
  module = models.create('ViT-B/16', num_layers=2, num_classes=21843, representation_size=768)
  expected = models.param_count(models.abstract_params(module, 224))
  assert summary['parameters'] == expected
  assert f'{expected:,}' in proc.stdout
  assert summary['output_shape_per_image'] == [21843]
  # XLA's FLOPs agree with the analytic matmul count of the transformer within 5%.
  ratio = summary['forward_gflops_per_image'] / summary['analytic_transformer_gflops_per_image']
  assert 0.95 < ratio < 1.05, ratio
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['model']['num_layers'] == 2
  # keep_host_memory=None: applied before jax starts, on this CPU-only glibc machine.
  assert config['keep_host_memory'] is None
  if sys.platform.startswith('linux'):
    assert 'keep_host_memory: glibc malloc keeps freed memory' in proc.stderr


def test_keep_host_memory_off(tmp_path):
  proc = _run(['--config=configs/vit_b16.py', '--config.model.num_layers=1',
               '--config.keep_host_memory=False'], tmp_path)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  assert 'keep_host_memory' not in proc.stderr


def test_named_model_and_hybrid(tmp_path):
  proc = _run(['--config=configs/model_summary.py:R26+ViT-S/32', '--config.model.num_layers=1'],
              tmp_path)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  summary = json.loads((tmp_path / 'model_summary.json').read_text())
  assert summary['model'] == 'R26+ViT-S/32'
  assert summary['output_shape_per_image'] == [1000]
  # The ResNet stem adds FLOPs the transformer count does not include.
  assert summary['forward_gflops_per_image'] > summary['analytic_transformer_gflops_per_image']


def test_bad_override_fails_with_message(tmp_path):
  proc = _run(['--config=configs/vit_b16.py', '--config.model.classifier=avg'], tmp_path)
  assert proc.returncode != 0
  assert "classifier='avg'" in proc.stderr
  proc = _run(['--config=configs/model_summary.py:ViT-B/17'], tmp_path)
  assert proc.returncode != 0
  assert 'ViT-B/16' in proc.stderr  # closest names are suggested


def test_a_bad_model_value_is_one_message_without_traceback(tmp_path):
  proc = _run(['--config=configs/vit_b16.py', '--config.model.classifier=avg'], tmp_path)
  assert proc.returncode == 3  # main.EXIT_USER_ERROR: a restart would fail again
  assert "error (ConfigError): config.model: classifier='avg' is not one of" in proc.stderr
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]


def test_fields_of_more_than_one_type_take_every_type_on_the_command_line(tmp_path):
  # ml_collections types an override by the field's value: an int field refused None, a
  # None field refused everything (--config.model.attention_impl=xla was not accepted).
  proc = _run(['--config=configs/vit_b16.py', '--config.model.num_layers=1',
               '--config.model.representation_size=None', '--config.model.attention_impl=xla',
               '--config.model.remat_policy=full'], tmp_path)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  config = json.loads((tmp_path / 'config.json').read_text())['model']
  assert (config['representation_size'], config['attention_impl'],
          config['remat_policy']) == (None, 'xla', 'full')
  summary = json.loads((tmp_path / 'model_summary.json').read_text())
  module = models.create('ViT-B/16', num_layers=1, num_classes=21843)  # no pre_logits
  assert summary['parameters'] == models.param_count(models.abstract_params(module, 224))
  # The other way: the fine-tuning recipe has none, the command line gives it one.
  # (and a config that sets steps goes back to epochs: total_steps was int-typed)
  proc = _run(['--config=configs/finetune_cifar10.py', '--config.model.num_layers=1',
               '--config.model.representation_size=768', '--config.total_steps=None'],
              tmp_path)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  written = json.loads((tmp_path / 'config.json').read_text())
  assert written['model']['representation_size'] == 768 and written['total_steps'] is None
  proc = _run(['--config=configs/vit_b16.py', '--config.model.representation_size=wide'],
              tmp_path)
  assert proc.returncode == 3  # main.EXIT_USER_ERROR: a restart would fail again
  assert "representation_size='wide' must be a positive int" in proc.stderr, proc.stderr[-2000:]


def test_a_hybrid_goes_without_its_stem_on_the_command_line(tmp_path):
  """--config.model.resnet=None was "Failed to parse 'None' as a ConfigDict" (ml_collections
  parses an override of a sub-config as a dict)."""
  proc = _run(['--config=configs/r50_vit_b16.py', '--config.model.num_layers=1',
               '--config.model.resnet=None', "--config.model.patch_size=(16, 16)"], tmp_path)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  assert json.loads((tmp_path / 'config.json').read_text())['model']['resnet'] is None
  summary = json.loads((tmp_path / 'model_summary.json').read_text())
  module = models.create('ViT-B/16', num_layers=1, num_classes=21843, representation_size=768)
  assert summary['parameters'] == models.param_count(models.abstract_params(module, 224))
  proc = _run(['--config=configs/swin_t.py', '--config.model.resnet=None'], tmp_path)
  assert proc.returncode == 3 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert '--config.model.resnet names no config field' in proc.stderr
  # A field of the stem given too would be dropped without a word: refused.
  proc = _run(['--config=configs/r50_vit_b16.py', '--config.model.resnet', 'None',
               '--config.model.resnet.num_layers=(3, 4, 9)'], tmp_path)
  assert proc.returncode == 3, proc.stderr[-2000:]
  assert ('--config.model.resnet=None removes config.model.resnet, so '
          '--config.model.resnet.num_layers has nothing to set') in proc.stderr


def test_the_21k_recipe_representation_layer_follows_a_shrunk_width(tmp_path):
  proc = _run(['--config=configs/vit_b16.py', '--config.model.num_layers=1',
               '--config.model.hidden_size=64', '--config.model.num_heads=2'], tmp_path)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  config = json.loads((tmp_path / 'config.json').read_text())['model']
  assert (config['hidden_size'], config['representation_size']) == (64, 64)


def test_swin_takes_one_window_per_stage_on_the_command_line(tmp_path):
  proc = _run(['--config=configs/swin_t.py:mnist', '--config.model.window_size=(4, 4, 2, 1)'],
              tmp_path)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  assert json.loads((tmp_path / 'config.json').read_text())['model']['window_size'] == [4, 4, 2, 1]


def test_a_misspelled_override_is_one_line_naming_the_flag_and_the_field(tmp_path):
  proc = _run(['--config=configs/demo.py', '--config.batch_size=32',
               '--config.model.hiden_size=3'], tmp_path)
  assert proc.returncode == 3  # main.EXIT_USER_ERROR: a restart would fail again
  assert ('FATAL Flags parsing error: --config.model.hiden_size names no config field: '
          "'hiden_size'\nDid you mean \"hidden_size\"") in proc.stderr, proc.stderr
  assert 'Traceback' not in proc.stderr and "\\'" not in proc.stderr


def test_a_misspelled_group_in_an_override_is_one_line_too(tmp_path):
  """A typo before the last dot used to escape as a KeyError traceback (exit 1)."""
  proc = _run(['--config=configs/demo.py', '--config.modle.image_size=28'], tmp_path)
  assert proc.returncode == 3, subprocess_env.failure(proc)
  assert ('FATAL Flags parsing error: --config.modle.image_size names no config field: '
          "'modle'\nDid you mean \"model\"") in proc.stderr, proc.stderr
  assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('args,message', [
    (['--config=configs/nope.py'], '--config=configs/nope.py: no such file'),
    (['--config=configs/demo.py:bogus'], 'configs/demo.py takes no argument after ":"'),
    (['--config=configs/finetune_cifar10.py:vit_tiny_patch16'],  # was a traceback too
     "--config=configs/finetune_cifar10.py:vit_tiny_patch16: unknown model name "
     "'vit_tiny_patch16'. Closest: vit_tiny_patch16_"),
    (['--config=configs/from_workdir.py:/no/such/run'],  # was a traceback, exit 1
     '/no/such/run holds no config.json (it takes the --workdir of a run of vit_jax.main)'),
    (['--config=configs/demo.py', '--config.model=ViT-B/16'],
     '--config=configs/model_summary.py:ViT-B/16'),
    # An argument get_config refuses, and from_workdir.py without its workdir: were
    # ml_collections' loader traceback before the message.
    (['--config=configs/resnet50.py:mnst'],
     "--config=configs/resnet50.py:mnst: unknown config argument 'mnst': use none or "
     '"mnist" (raised at configs/'),
    (['--config=configs/from_workdir.py'],
     '--config=configs/from_workdir.py: name the workdir after a colon'),
])
def test_config_file_mistakes_are_one_line(tmp_path, args, message):
  proc = _run(args, tmp_path)
  assert proc.returncode == 3  # main.EXIT_USER_ERROR: a restart would fail again
  assert message in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr[-2000:]


def test_an_error_inside_a_config_file_keeps_its_traceback(tmp_path):
  config_file = tmp_path / 'mine.py'
  config_file.write_text("import os\n\ndef get_config():\n  return os.environ['MY_DATA_DIR_NOT_SET']\n")
  proc = _run([f'--config={config_file}'], tmp_path)
  assert proc.returncode != 0
  assert 'Traceback' in proc.stderr and "KeyError: 'MY_DATA_DIR_NOT_SET'" in proc.stderr
  assert 'names no config field' not in proc.stderr
  # A ValueError raised below the config file keeps the traceback that shows where; it
  # is not cut to one line naming a frame of another file.
  (tmp_path / 'helper_mod.py').write_text("def parse(text):\n  raise ValueError('deep')\n")
  config_file.write_text("import sys\nsys.path.insert(0, %r)\nimport helper_mod\n\n"
                         "def get_config():\n  return helper_mod.parse('x')\n" % str(tmp_path))
  proc = _run([f'--config={config_file}'], tmp_path)
  assert proc.returncode != 0 and 'Traceback' in proc.stderr, proc.stderr[-2000:]
  assert 'helper_mod.py' in proc.stderr and '(raised at' not in proc.stderr


def test_from_workdir_expands_a_home_folder(tmp_path, monkeypatch):
  """'--config=configs/from_workdir.py:~/run': '~/run holds no config.json'."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  (tmp_path / 'run').mkdir()
  spec = importlib.util.spec_from_file_location('fw', ROOT / 'configs' / 'from_workdir.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  demo = importlib.util.spec_from_file_location('demo', ROOT / 'configs' / 'demo.py')
  demo_module = importlib.util.module_from_spec(demo)
  demo.loader.exec_module(demo_module)
  (tmp_path / 'run' / 'config.json').write_text(
      demo_module.get_config().to_json_best_effort())
  monkeypatch.setenv('HOME', str(tmp_path))
  assert module.get_config('~/run').batch_size == demo_module.get_config().batch_size


def test_a_damaged_recorded_config_is_named(tmp_path):
  """A cut-short config.json was "JSONDecodeError.__init__() missing 2 required
  positional arguments" (ml_collections re-raising the error)."""
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'config.json').write_text('{"batch_size": ')
  proc = _run([f'--config=configs/from_workdir.py:{tmp_path / "run"}'], tmp_path)
  assert proc.returncode == 3, proc.stderr[-2000:]
  assert f'{tmp_path / "run" / "config.json"} is not valid JSON' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_a_config_file_that_cannot_load_and_lone_process_flags_are_one_line(tmp_path):
  """A syntax error in a config file, or a file without get_config, was ml_collections'
  traceback with status 1 (launch/until_done.sh restarted it); --num_processes=2
  without a coordinator trained as one process on all the data, without a word."""
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config(:\n  pass\n')
  proc = _run([f'--config={broken}'], tmp_path)
  assert proc.returncode == 3, subprocess_env.failure(proc)
  assert f'--config={broken}: a Python syntax error at line 1' in proc.stderr
  assert 'Traceback' not in proc.stderr
  empty = tmp_path / 'empty.py'
  empty.write_text('X = 1\n')
  proc = _run([f'--config={empty}'], tmp_path)
  assert proc.returncode == 3 and 'the file defines no get_config()' in proc.stderr
  proc = _run(['--config=configs/demo.py', '--num_processes=2', '--process_id=0'], tmp_path)
  assert proc.returncode == 3, subprocess_env.failure(proc)
  assert 'a multi-process run needs --coordinator_address=HOST:PORT' in proc.stderr


def test_a_collective_failed_by_a_lost_process_is_one_paragraph(monkeypatch):
  """A 2-process run whose other process was killed ended with a traceback through the
  train step ending in 'Gloo all-reduce failed: ... Connection reset by peer'."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import main  # pylint: disable=g-import-not-at-top
  lost = jax.errors.JaxRuntimeError(
      'UNKNOWN: Gloo all-reduce failed: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] '
      'Read error [127.0.0.1]:47950: Connection reset by peer\nmore detail')
  other = jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 4 GiB')
  assert main.lost_process_message(lost, '/runs/a') is None  # one process: not a lost peer
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  message = main.lost_process_message(lost, '/runs/a')
  assert message.startswith('\nerror (lost process): UNKNOWN: Gloo all-reduce failed')
  assert 'more detail' not in message
  assert 'resumes from the newest checkpoint in /runs/a/checkpoints' in message
  assert main.lost_process_message(other, '/runs/a') is None
  assert main.lost_process_message(ValueError('Connection reset'), '/runs/a') is None


def test_none_on_the_command_line_sets_any_field_to_none(tmp_path):
  """'None' was refused for a number or a bool ("could not convert string to float"), and
  taken as the string 'None' by a path or regex field (input.data_dir=None prepared the
  dataset in ./None/, trainable=None 'matches no parameter')."""
  proc = _run(['--config=configs/vit_b16.py', '--config.model.num_layers=1',
               '--config.optimizer.grad_clip_norm=None', '--config.input.data_dir=None',
               '--config.trainable=none', '--config.keep_host_memory=None',
               '--config.input.threads', 'None', '--config.compilation_cache_dir=None',
               '--config.eval_every=None'], tmp_path)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['optimizer']['grad_clip_norm'] is None
  assert config['input']['data_dir'] is None and config['input']['threads'] is None
  assert config['trainable'] is None and config['keep_host_memory'] is None
  assert config['compilation_cache_dir'] is None and config['eval_every'] is None
  assert config['optimizer']['b1'] == 0.9  # the rest as the config file gives it
  proc = _run(['--config=configs/vit_b16.py', '--config.optimizer.clip=None'], tmp_path)
  assert proc.returncode == 3, proc.stderr[-2000:]
  assert '--config.optimizer.clip names no config field' in proc.stderr


def test_num_epochs_alone_is_refused_where_the_config_sets_total_steps(tmp_path):
  """The fine-tuning recipes set total_steps: --config.num_epochs=3 trained their 10,000
  steps without a word."""
  proc = _run(['--config=configs/finetune_cifar10.py', '--config.num_epochs=3'], tmp_path)
  assert proc.returncode == 3, proc.stderr[-2000:]
  assert ('--config.num_epochs=3.0 is not read: the config sets config.total_steps=10000'
          in proc.stderr), proc.stderr[-2000:]
  assert 'add --config.total_steps=None' in proc.stderr
  proc = _run(['--config=configs/finetune_cifar10.py', '--config.num_epochs=3',
               '--config.total_steps=None', '--config.model.num_layers=1'], tmp_path)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['total_steps'] is None and config['num_epochs'] == 3
