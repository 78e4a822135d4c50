"""The original `.npz` layout: files written by `save_npz` load in timm's own `.npz`
loader (`timm.models.vision_transformer._load_weights`) and back in `load_npz`.

The params come from a timm model (random weights, perturbed norms and biases, a
non-zero head) through `from_timm`; the file is then read by timm into a fresh timm
model of the same arguments, which must reproduce both the vit_jax logits and (bit for
bit) the original timm model.
"""

import dataclasses
import os
import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
from timm.models.vision_transformer import _load_weights as timm_load_npz  # noqa: E402

from vit_jax import checkpoints  # noqa: E402
from vit_jax import models  # noqa: E402

# max |logit difference| of the timm model loaded from the .npz vs the timm model the
# params came from: same framework, same weights, so this is (bit) exact in practice.
TOL_NPZ = 1e-6
# ... and vs the vit_jax model: two fp32 implementations (JAX vs PyTorch) differ by
# ~1e-6 at logits of order one, as in test_timm.py.
TOL_PLAIN = 1e-5
TOL_HYBRID = 5e-5
LOGIT_RANGE = (0.2, 5.0)
PRE_LINEN = ('MultiHeadDotProductAttention_1', 'LayerNorm_2', 'MlpBlock_3')
LINEN_ONLY = ('MultiHeadDotProductAttention_0', 'LayerNorm_1', 'MlpBlock_0')


@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  name: str
  kwargs: dict
  classifier: str
  hybrid: bool = False


CASES = [
    Case('ti16_token', 'vit_tiny_patch16_224', dict(depth=2, num_classes=5), 'token'),
    Case('ti16_gap', 'vit_tiny_patch16_224',
         dict(depth=2, num_classes=5, global_pool='avg', class_token=False, fc_norm=False),
         'gap'),
    Case('r26_s32', 'vit_small_r26_s32_224', dict(depth=1, num_classes=5), 'token', True),
]


def _build_timm(case, seed):
  torch.manual_seed(seed)
  return timm.create_model(case.name, pretrained=False, **case.kwargs).eval()


@pytest.fixture(scope='module', params=CASES, ids=[c.id for c in CASES])
def npz(request, ck, tmp_path_factory):
  case = request.param
  model = _build_timm(case, seed=10)
  assert ck.perturb_torch(model, seed=11) > 0
  x = ck.random_images(224, seed=12)
  ck.set_torch_head(model, model.head, ck.to_nchw(x), seed=13)
  ref = ck.torch_logits(model, x)
  config, params = checkpoints.from_timm(model)
  assert config.classifier == case.classifier
  out = ck.jax_logits(models.create(config), params, x)
  path = os.path.join(tmp_path_factory.mktemp(case.id), 'params.npz')
  checkpoints.save_npz(path, params)
  return dict(case=case, model=model, x=x, ref=ref, config=config, params=params, out=out,
              path=path)


def test_timm_npz_loader_reproduces_logits(npz, ck):
  case = npz['case']
  fresh = _build_timm(case, seed=99)
  assert np.abs(ck.torch_logits(fresh, npz['x']) - npz['ref']).max() > 1e-3
  timm_load_npz(fresh, npz['path'])
  logits = ck.torch_logits(fresh, npz['x'])
  assert LOGIT_RANGE[0] < np.abs(npz['ref']).mean() < LOGIT_RANGE[1]
  d_jax = ck.max_diff(logits, npz['out'], f'save_npz({case.id}) -> timm _load_weights vs vit_jax',
                      reference=npz['ref'])
  d_timm = ck.max_diff(logits, npz['ref'], f'save_npz({case.id}) -> timm _load_weights vs timm')
  assert d_timm < TOL_NPZ
  assert d_jax < (TOL_HYBRID if case.hybrid else TOL_PLAIN)


def test_timm_npz_loader_sets_every_weight(npz):
  """timm's loader skips what it does not find (e.g. a head of another size) silently:
  check that every tensor it set equals the original model's."""
  fresh = _build_timm(npz['case'], seed=99)
  timm_load_npz(fresh, npz['path'])
  ref = npz['model'].state_dict()
  got = fresh.state_dict()
  assert set(got) == set(ref)
  differ = [k for k in ref if not torch.equal(got[k], ref[k])]
  assert not differ, f'not loaded from the .npz: {differ}'


def test_load_npz_round_trip_is_exact(npz):
  back = checkpoints.flatten(checkpoints.load_npz(npz['path']))
  want = checkpoints.flatten(npz['params'])
  assert set(back) == set(want), set(back) ^ set(want)
  for k, v in want.items():
    assert back[k].dtype == np.float32, k
    np.testing.assert_array_equal(back[k], np.asarray(v), err_msg=k)
  # ... and the tree fits the model as is.
  module = models.create(npz['config'])
  merged = checkpoints.merge_into(models.abstract_params(module, 224), back)
  assert jax.tree.structure(merged) == jax.tree.structure(npz['params'])


def test_npz_uses_pre_linen_names(npz):
  with np.load(npz['path']) as f:
    keys = list(f.files)
    shapes = {k: f[k].shape for k in keys}
  for name in PRE_LINEN:
    assert any(f'encoderblock_0/{name}/' in k for k in keys), name
  for name in LINEN_ONLY:
    assert not any(f'/{name}/' in k for k in keys if 'encoderblock_' in k), name
  assert 'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel' in keys
  assert 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel' in keys
  assert 'Transformer/encoderblock_0/LayerNorm_0/scale' in keys  # the first keeps its name
  assert shapes['Transformer/encoder_norm/scale'] == (npz['config'].hidden_size,)
  assert ('cls' in keys) == (npz['case'].classifier == 'token')


def test_npz_stores_group_norm_as_1x1x1xC(npz):
  with np.load(npz['path']) as f:
    gn = {k: f[k].shape for k in f.files if re.search(r'(^|/)gn_?\w*/(scale|bias)$', k)}
  if not npz['case'].hybrid:
    assert not gn
    return
  assert 'gn_root/scale' in gn and 'block1/unit1/gn_proj/bias' in gn
  for k, shape in gn.items():
    assert len(shape) == 4 and shape[:3] == (1, 1, 1), (k, shape)
  assert gn['gn_root/scale'] == (1, 1, 1, npz['model'].patch_embed.backbone.stem.norm.num_channels)


def test_load_npz_strips_opt_target_prefix(npz, tmp_path):
  with np.load(npz['path']) as f:
    arrays = {'opt/target/' + k: f[k] for k in f.files}
  path = os.path.join(tmp_path, 'with_prefix.npz')
  np.savez(path, **arrays)
  back = checkpoints.flatten(checkpoints.load_npz(path))
  want = checkpoints.flatten(npz['params'])
  assert set(back) == set(want), set(back) ^ set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(back[k], np.asarray(v), err_msg=k)


def test_big_vision_stacked_checkpoint_is_refused(tmp_path):
  path = os.path.join(tmp_path, 'big_vision.npz')
  np.savez(path, **{
      'params/embedding/kernel': np.zeros((16, 16, 3, 8), np.float32),
      'params/Transformer/encoderblock/LayerNorm_0/scale': np.ones((2, 8), np.float32),
  })
  with pytest.raises(ValueError, match='big_vision'):
    checkpoints.load_npz(path)
  path = os.path.join(tmp_path, 'big_vision_no_prefix.npz')
  np.savez(path, **{'Transformer/encoderblock/LayerNorm_0/scale': np.ones((2, 8), np.float32)})
  with pytest.raises(ValueError, match='stacked'):
    checkpoints.load_npz(path)
