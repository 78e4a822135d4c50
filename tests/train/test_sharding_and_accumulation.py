"""The same training on 1 device, data=8 and data=2 x fsdp=4; accumulation = big batch."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import subprocess_env

HERE = pathlib.Path(__file__).resolve().parent
TOL = 2e-5  # float32 reductions are ordered differently on different meshes


def _run(tmp_path, data, fsdp, accum, model=1, layout='unrolled'):
  out = tmp_path / f'run_{data}_{fsdp}_{accum}_{model}_{layout}.npz'
  env = subprocess_env.cpu_env(devices=8)
  proc = subprocess.run([sys.executable, str(HERE / 'sharded_run.py'), str(data), str(fsdp),
                         str(accum), str(out), str(model), layout], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  result = dict(np.load(out))
  meta = json.loads(pathlib.Path(str(out) + '.json').read_text())
  return result, meta


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('sharded')
  return {key: _run(tmp, *key) for key in [(1, 1, 1), (8, 1, 1), (2, 4, 1), (4, 1, 1, 2),
                                            (1, 1, 1, 1, 'scan'), (2, 2, 1, 2, 'scan')]}


def _compare(a, b):
  np.testing.assert_allclose(a['losses'], b['losses'], atol=TOL, rtol=TOL)
  keys = [k for k in a if k.startswith('param:')]
  assert keys and set(keys) == {k for k in b if k.startswith('param:')}
  worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in keys)
  print(f'[tolerance] max |param diff| = {worst:.2e}')
  assert worst < TOL


@pytest.mark.parametrize('mesh', [(8, 1, 1), (2, 4, 1)], ids=['data8', 'data2_fsdp4'])
def test_sharded_training_equals_one_device(runs, mesh):
  single, _ = runs[(1, 1, 1)]
  sharded, meta = runs[mesh]
  assert meta['devices'] == mesh[0] * mesh[1]
  assert not np.allclose(single['losses'][0], single['losses'][-1])  # it does train
  _compare(single, sharded)


@pytest.mark.parametrize('mesh, single', [((4, 1, 1, 2), (1, 1, 1)),
                                          ((2, 2, 1, 2, 'scan'), (1, 1, 1, 1, 'scan'))],
                         ids=['data4_model2', 'data2_fsdp2_model2_stacked'])
def test_tensor_parallel_training_equals_one_device(runs, mesh, single):
  """A model axis (Megatron-style heads and MLP split), in both block layouts."""
  sharded, meta = runs[mesh]
  assert meta['devices'] == 8
  _compare(runs[single][0], sharded)


def test_the_model_axis_splits_heads_and_mlp_units_in_both_layouts(runs):
  """Stacked blocks (scan_layers=True) are split along the same dimensions as unrolled
  ones, one further in; the layer axis is never split. Before, the rules' dimension
  indices were applied unchanged, splitting the embedding and the layer axes instead."""
  unrolled, stacked = runs[(4, 1, 1, 2)][1]['specs'], runs[(2, 2, 1, 2, 'scan')][1]['specs']
  want = {'MlpBlock_0/Dense_0/kernel': "(None, 'model')",
          'MlpBlock_0/Dense_0/bias': "('model'",
          'MlpBlock_0/Dense_1/kernel': "('model',",
          'MultiHeadDotProductAttention_0/query/kernel': "(None, 'model', None)",
          'MultiHeadDotProductAttention_0/out/kernel': "('model',"}
  for name, spec in want.items():
    assert unrolled[f'Transformer/encoderblock_0/{name}'].startswith('P' + spec), (
        name, unrolled[f'Transformer/encoderblock_0/{name}'])
    got = stacked[f'Transformer/encoderblock/{name}'].replace("'fsdp'", 'None')  # fsdp=2
    assert got.startswith('P(None, ' + spec[1:]), (name, got)
  assert all(s.startswith('P(None') or s == 'P()'
             for k, s in stacked.items() if '/encoderblock/' in k)


def test_fsdp_really_shards_parameters(runs):
  _, meta = runs[(2, 4, 1)]
  specs = meta['specs']
  assert 'fsdp' in specs['Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel']
  assert 'fsdp' in specs['Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel']
  assert 'fsdp' not in specs['Transformer/encoder_norm/scale']  # small: replicated
  _, data_only = runs[(8, 1, 1)]
  assert all('fsdp' not in s for s in data_only['specs'].values())


@pytest.mark.parametrize('mix', [None, (0.8, 1.0)], ids=['plain', 'mixup_cutmix'])
def test_gradient_accumulation_equals_the_big_batch(mix):
  """accum_steps=4 at batch 16 gives the update of one step at batch 16 (no dropout);
  with mixup/cutmix too, since the whole batch is mixed before it is split."""
  import jax
  import jax.numpy as jnp
  from vit_jax import models
  from vit_jax.train import batch_mix
  from vit_jax.train import step as step_lib
  import optax

  mix = mix and batch_mix.MixConfig(mixup_alpha=mix[0], cutmix_alpha=mix[1])

  module = models.create('ViT-Ti/16', image_size=16, patch_size=4, hidden_size=32,
                         num_layers=2, num_heads=2, mlp_dim=64, num_classes=5)
  params = models.init_params(module, 16)
  rng = np.random.default_rng(1)
  batch = {'image': rng.uniform(-1, 1, (16, 16, 16, 3)).astype(np.float32),
           'label': np.eye(5, dtype=np.float32)[rng.integers(0, 5, 16)]}
  # SGD, not Adam: Adam turns float noise in theoretically-zero gradients (key bias) into
  # full-size updates, which would hide what this test compares.
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
  results = {}
  for accum in (1, 4):
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=opt.init(params), rng=jax.random.PRNGKey(0))
    fn = jax.jit(step_lib.make_train_step(module, opt, loss='softmax_xent', accum_steps=accum,
                                          mix=mix))
    for _ in range(3):
      state, metrics = fn(state, batch)
    results[accum] = (float(metrics['loss']), float(metrics['grad_norm']), state.params)
  assert abs(results[1][0] - results[4][0]) < 1e-5
  assert abs(results[1][1] - results[4][1]) < 1e-5
  diff = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                      results[1][2], results[4][2]))
  print(f'[tolerance] accumulation max |param diff| = {max(diff):.2e}')
  assert max(diff) < 1e-5


def test_activations_are_constrained_to_the_batch_axes():
  code = """
import jax, numpy as np, sys
sys.path.insert(0, %r)
import sharded_run
t = sharded_run.trainer_on_mesh(sharded_run.config_for(2, 4, 1))
spec = lambda shape: jax.ShapeDtypeStruct(shape, np.float32, sharding=t.batch_sharding)
text = t.lower_train_step(t.abstract_state(),
                          {'image': spec((16, 16, 16, 3)), 'label': spec((16, 5))}).as_text()
lines = [l for l in text.splitlines() if 'sharding_constraint' in l]
print(len([l for l in lines if '[{"data", "fsdp"}, {}, {}]' in l]))
""" % str(HERE)
  env = subprocess_env.cpu_env(devices=8)
  proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  # Token activations (batch, length, embed) are pinned to the batch axes: after the
  # embedding and after each of the 2 blocks, in the forward pass at least.
  assert int(proc.stdout.strip().splitlines()[-1]) >= 3


def test_many_independent_sharded_eval_steps_on_cpu_do_not_hang():
  """400 steps with an FSDP all-gather on 2 CPU devices, summed as the evaluation sums
  them: run at once, XLA:CPU's collectives deadlock until the rendezvous times out (the
  script sets 20 s) and the process aborts; one at a time, the sum is exact."""
  env = subprocess_env.cpu_env()  # the script asks for its 2 devices itself
  proc = subprocess.run([sys.executable, str(HERE / 'eval_collectives_run.py')], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  got, expected = (float(v) for v in proc.stdout.split()[1::2])
  assert got == pytest.approx(expected, rel=1e-4)
