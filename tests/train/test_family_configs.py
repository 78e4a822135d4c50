"""Each architecture family trains through `python -m vit_jax.main` with its own config
(the `:mnist` variant: the bundled MNIST digits, offline), and a BatchNorm model resumes
bit-exactly with its running statistics."""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Shallower variants of each config's model (same block types) keep the test fast.
FAMILY_CONFIGS = {
    'resnet50': ['--config.model.layers=(1, 1, 1, 1)'],
    'resnext50': ['--config.model.layers=(1, 1, 1, 1)'],
    'res2net50': ['--config.model.layers=(1, 1, 1, 1)'],
    'bit_r50x1': ['--config.model.num_layers=(1, 1, 1, 1)'],
    'swin_t': ['--config.model.depths=(2, 1, 1, 1)'],  # block 2 of stage 1 is shifted
}
BATCH_NORM = {'resnet50', 'resnext50', 'res2net50'}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _run(config, workdir, data_dir, *extra):
  cmd = [sys.executable, '-m', 'vit_jax.main', f'--config=configs/{config}.py:mnist',
         f'--workdir={workdir}', f'--config.input.data_dir={data_dir}',
         '--config.batch_size=16', '--config.log_every=1', '--config.input.eval_split=test[:64]',
         *FAMILY_CONFIGS[config], *extra]
  env = subprocess_env.cpu_env(devices=1)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  return proc


def _state(workdir, step):
  return ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / 'checkpoints' / str(step)
                                            / 'state')


def _flat(tree):
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def _check_trained(config, workdir, steps):
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  losses = [r['loss'] for r in rows if 'loss' in r]
  evals = [r for r in rows if 'eval_top1' in r]
  assert len(losses) == steps and all(np.isfinite(losses))
  assert evals and evals[-1]['eval_examples'] == 64
  assert type(evals[-1]['eval_examples']) is int  # a count, not 64.0
  state = _state(workdir, steps)
  stats = _flat(state.get('model_state') or {})
  if config in BATCH_NORM:
    means = [v for k, v in stats.items() if k.endswith('/mean')]
    variances = [v for k, v in stats.items() if k.endswith('/var')]
    assert means and len(means) == len(variances)
    assert all(np.isfinite(v).all() for v in stats.values())
    assert any(np.abs(m).max() > 1e-3 for m in means)  # updated from their zero start
  else:
    assert not stats  # GroupNorm / LayerNorm models keep no statistics


# ResNet-50 runs in the resume test below, through the same Trainer path as every family
# (the step only differs by the model's mutable collections, none here); each family's
# training forward pass (dropout, drop path, BatchNorm updates) is tested in tests/models.
# The other families' runs are marked slow to keep CI under its time budget.
@pytest.mark.parametrize('config', [
    pytest.param('swin_t', marks=pytest.mark.slow),
    pytest.param('resnext50', marks=pytest.mark.slow),
    pytest.param('res2net50', marks=pytest.mark.slow),
    pytest.param('bit_r50x1', marks=pytest.mark.slow),
])
def test_family_config_trains_through_main(config, data_dir, tmp_path):
  _run(config, tmp_path, data_dir, '--config.total_steps=3',
       '--config.schedule.warmup_steps=1')
  _check_trained(config, tmp_path, 3)


def test_batch_norm_model_trains_through_main(data_dir, tmp_path):
  """ResNet-50's own config trains 3 steps through main; its statistics are saved."""
  _run('resnet50', tmp_path, data_dir, '--config.total_steps=3',
       '--config.schedule.warmup_steps=1')
  _check_trained('resnet50', tmp_path, 3)


# Slow (two runs): CI's budget. Restoring the train state (model_state included) is the
# same TrainCheckpointer path as the ViT preemption test in test_main_training.py.
@pytest.mark.slow
def test_batch_norm_model_trains_and_resumes_bit_exactly(data_dir, tmp_path):
  """ResNet-50's config trains 4 steps; a copy of its workdir cut back to the step-2
  checkpoint resumes to step 4 with the same parameters and running statistics."""
  fixed = ['--config.total_steps=4', '--config.schedule.warmup_steps=0',
           '--config.schedule.decay=constant', '--config.checkpoint_every=2',
           '--config.keep_checkpoints=2']
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  _run('resnet50', straight, data_dir, *fixed)
  _check_trained('resnet50', straight, 4)
  shutil.copytree(straight / 'checkpoints', resumed / 'checkpoints')
  shutil.rmtree(resumed / 'checkpoints' / '4')
  proc = _run('resnet50', resumed, data_dir, *fixed)
  assert 'from step 2' in proc.stderr
  a, b = _flat(_state(straight, 4)), _flat(_state(resumed, 4))
  assert set(a) == set(b) and any(k.startswith('model_state/batch_stats/') for k in a)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_swin_input_size_that_cannot_work_fails_before_compiling():
  from vit_jax.train import defaults  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('swin_t', ROOT / 'configs' / 'swin_t.py')
  config_file = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(config_file)
  config = config_file.get_config()
  config.model.image_size = 200  # 50 tokens a side: not a multiple of window 7
  with pytest.raises(defaults.ConfigError, match='image_size=200'):
    defaults.validate(config, num_devices=1, process_count=1)
  with pytest.raises(ValueError, match='unknown config argument'):
    config_file.get_config('imagenet21k')
