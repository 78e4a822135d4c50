"""The main job's model summary, run as a user runs it."""

import json
import pathlib
import subprocess
import sys

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


def test_a_misspelled_override_is_one_line_naming_the_flag_and_the_field(tmp_path):
  proc = _run(['--config=configs/demo.py', '--config.batch_size=32',
               '--config.model.hiden_size=3'], tmp_path)
  assert proc.returncode == 1
  assert ('FATAL Flags parsing error: --config.model.hiden_size names no config field: '
          "'hiden_size'\nDid you mean \"hidden_size\"") in proc.stderr, proc.stderr
  assert 'Traceback' not in proc.stderr and "\\'" not in proc.stderr


def test_an_error_inside_a_config_file_keeps_its_traceback(tmp_path):
  config_file = tmp_path / 'mine.py'
  config_file.write_text("import os\n\ndef get_config():\n  return os.environ['MY_DATA_DIR_NOT_SET']\n")
  proc = _run([f'--config={config_file}'], tmp_path)
  assert proc.returncode != 0
  assert 'Traceback' in proc.stderr and "KeyError: 'MY_DATA_DIR_NOT_SET'" in proc.stderr
  assert 'names no config field' not in proc.stderr
