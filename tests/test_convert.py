"""`python -m vit_jax.convert`: weights between .npz, timm, transformers and Orbax.

Round trips go through the converter and are checked against an independent
implementation: the converted weights are loaded strictly into timm or into transformers
(`from_pretrained`) and their logits compared with the source model's on the same random
images, within TOL (fp32). Models are small and random, with LayerNorms and biases
perturbed away from 1 / 0 and a head scaled so that mean |logit| is about one (so the
absolute tolerance means something). One conversion and two errors go through the
command line (a subprocess); the rest call `convert.convert`.
"""

import json
import os
import shutil
import pathlib
import re
import subprocess
import sys
from unittest import mock

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
transformers = pytest.importorskip('transformers')
safetensors_torch = pytest.importorskip('safetensors.torch')
import torch_reference as torch_ref  # noqa: E402  pylint: disable=g-import-not-at-top

from vit_jax import checkpoints  # noqa: E402
from vit_jax import convert  # noqa: E402
from vit_jax import models  # noqa: E402
from vit_jax.checkpoints import pretrained  # noqa: E402
from vit_jax.checkpoints import train_state  # noqa: E402

TOL = 1e-5  # max |logit difference|, fp32
LOGIT_RANGE = (0.2, 5.0)  # mean |logit| of the reference
SIZE = 32   # 2 x 2 patches of 16
TIMM_KW = dict(depth=2, num_classes=5, img_size=SIZE)
HF_NAMES = ['cat', 'dog', 'bird']
ORBAX_NAMES = ['apple', 'pear', 'plum', 'fig']
PP_EVAL = 'decode|resize_small(40)|central_crop(32)|value_range(-1, 1)|onehot(4)'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(seed=0, batch=2):
  return torch_ref.random_images(SIZE, seed=seed, batch=batch)


def _perturb(model, seed):
  """Norms and biases perturbed (tests/torch_reference.py), the head N(0, 1 / sqrt(width))."""
  g = torch.Generator().manual_seed(seed)
  assert torch_ref.perturb_torch(model, generator=g) > 0
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name in ('head.weight', 'classifier.weight'):
        p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
  return model


def _timm_logits(model, x):
  return torch_ref.torch_logits(model, x)


def _hf_logits(model, x):
  return torch_ref.torch_logits(model, x, hf=True)


def _jax_logits(config, params, x):
  module = models.create(config)
  return np.asarray(jax.jit(lambda p, x: module.apply({'params': p}, x, train=False))(
      params, x))


def _close(got, want, name):
  assert got.shape == want.shape, (name, got.shape, want.shape)
  scale = float(np.mean(np.abs(want)))
  assert LOGIT_RANGE[0] < scale < LOGIT_RANGE[1], f'{name}: mean |logit| {scale}'
  diff = float(np.max(np.abs(got.astype(np.float64) - want)))
  print(f'[tolerance] {name}: max|diff|={diff:.2e} mean|logit|={scale:.2f}')
  assert diff <= TOL, f'{name}: max |logit diff| {diff} > {TOL}'


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'vit_jax.convert', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope='module')
def timm_file(tmp_path_factory):
  """(timm model, its .safetensors file): ViT-Ti/16 numerics, 2 layers, 5 classes."""
  torch.manual_seed(0)
  model = _perturb(timm.create_model('vit_tiny_patch16_224', pretrained=False, **TIMM_KW),
                   seed=1).eval()
  path = str(tmp_path_factory.mktemp('timm') / 'tiny.safetensors')
  safetensors_torch.save_file(model.state_dict(), path)
  return model, path


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """(transformers model, its save_pretrained directory) with class names."""
  torch.manual_seed(2)
  config = transformers.ViTConfig(
      hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
      image_size=SIZE, patch_size=8, num_labels=len(HF_NAMES),
      id2label=dict(enumerate(HF_NAMES)), label2id={n: i for i, n in enumerate(HF_NAMES)})
  model = _perturb(transformers.ViTForImageClassification(config), seed=3).eval()
  path = tmp_path_factory.mktemp('hf') / 'vit'
  model.save_pretrained(str(path))
  assert (path / 'model.safetensors').exists()
  return model, str(path)


def _vit_jax_params(seed, **overrides):
  """Random vit_jax params of a 2-layer ViT-Ti/16: LayerNorm scales 1 + N(0, 0.2), biases
  N(0, 0.05), other weights N(0, 0.05), the head N(0, 1 / sqrt(width))."""
  config = models.get_config('ViT-Ti/16')
  config.update(dict(dict(num_layers=2, image_size=SIZE, num_classes=len(ORBAX_NAMES)),
                     **overrides))
  shapes = models.abstract_params(models.create(config), SIZE)  # no compilation
  rng = np.random.default_rng(seed)
  flat = {}
  for k, v in checkpoints.flatten(shapes).items():
    noise = rng.normal(0, 1, v.shape).astype(np.float32)
    if k.endswith('/scale'):
      flat[k] = 1 + 0.2 * noise
    elif k.startswith(('head/', 'pre_logits/')) and k.endswith('kernel'):
      flat[k] = noise / np.float32(np.sqrt(v.shape[0]))
    else:
      flat[k] = 0.05 * noise
  return config, checkpoints.unflatten(flat)


@pytest.fixture(scope='module')
def orbax_run(tmp_path_factory):
  """A workdir as training leaves it: train state (with optimizer state) + meta."""
  config, params = _vit_jax_params(seed=4)
  workdir = tmp_path_factory.mktemp('orbax') / 'run'
  ckpt = train_state.TrainCheckpointer(workdir / 'checkpoints', async_save=False)
  state = {'step': np.int32(30), 'params': params, 'rng': np.zeros(2, np.uint32),
           'opt_state': {'mu': jax.tree.map(np.zeros_like, params)}}
  meta = {'step': 30, 'class_names': ORBAX_NAMES, 'model': config.to_dict(),
          'config': {'input': {'pp_eval': PP_EVAL}}}
  ckpt.save(30, state, json.loads(json.dumps(meta)))
  ckpt.close()
  return config, params, str(workdir)


def test_timm_to_npz_by_cli_and_back_to_timm(timm_file, tmp_path):
  model, path = timm_file
  npz = tmp_path / 'tiny.npz'
  proc = _cli(f'--input={path}', f'--output={npz}')
  assert proc.returncode == 0, proc.stderr
  first = proc.stdout.splitlines()[0]
  assert first.startswith('read timm ') and 'wrote npz to' in first, proc.stdout
  assert '2 layers x 192 wide, 3 heads' in first and 'MB)' in first
  assert 'Traceback' not in proc.stderr

  back = tmp_path / 'back.pth'
  assert convert.convert(npz, back) == 'timm'  # --to from the name
  restored = timm.create_model('vit_tiny_patch16_224', pretrained=False, **TIMM_KW).eval()
  restored.load_state_dict(torch.load(back, weights_only=True), strict=True)
  for k, v in model.state_dict().items():
    torch.testing.assert_close(restored.state_dict()[k], v, rtol=0, atol=0, msg=k)
  x = _images(0)
  _close(_timm_logits(restored, x), _timm_logits(model, x), 'timm -> npz -> timm')
  # The .npz read back with timm's numerics (--model) gives timm's logits in vit_jax too.
  ck = pretrained.load_checkpoint(str(npz), model='vit_tiny_patch16_224')
  _close(_jax_logits(ck.config, ck.params, x), _timm_logits(model, x), 'npz in vit_jax')


def test_timm_to_hf(timm_file, tmp_path):
  model, path = timm_file
  out = tmp_path / 'hf'
  assert convert.convert(path, out, to='hf') == 'hf'
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors',
                                     'preprocessor_config.json']
  hf = transformers.ViTForImageClassification.from_pretrained(str(out)).eval()
  assert hf.config.num_labels == 5 and hf.config.hidden_act == 'gelu'
  x = _images(1)
  _close(_hf_logits(hf, x), _timm_logits(model, x), 'timm -> hf')
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(out / 'model.safetensors').st_mode & 0o777 == 0o666 & ~umask
  # transformers' pipeline() reads the directory as it is: its image processor
  # preprocesses as vit_jax does ([-1, 1] at the model's size) and classifies alike.
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from vit_jax import inference  # pylint: disable=import-outside-toplevel
  photo = Image.fromarray(np.random.RandomState(3).randint(0, 256, (48, 40, 3), np.uint8))
  processor = transformers.AutoImageProcessor.from_pretrained(str(out))
  theirs = processor(photo, return_tensors='np')['pixel_values'][0].transpose(1, 2, 0)
  clf = inference.ImageClassifier.from_pretrained(out)
  ours = clf.preprocess(photo)[0]
  assert theirs.shape == ours.shape == (SIZE, SIZE, 3)
  assert np.abs(theirs - ours).mean() < 0.03  # PIL's and TensorFlow's bilinear resize
  top = transformers.pipeline('image-classification', model=str(out), top_k=5)(photo)
  want = clf.predict(photo)[0]
  assert [hf.config.label2id[t['label']] for t in top] == [p.index for p in want]
  np.testing.assert_allclose([t['score'] for t in top], [p.probability for p in want],
                             atol=0.02)


def test_hf_to_orbax_to_npz(hf_dir, tmp_path):
  model, path = hf_dir
  orbax_dir = tmp_path / 'ckpt'
  assert convert.convert(os.path.join(path, 'model.safetensors'), orbax_dir,
                         to='orbax') == 'orbax'
  ck = pretrained.load_checkpoint(str(orbax_dir))
  assert ck.kind == 'orbax' and ck.class_names == HF_NAMES
  assert ck.config.layernorm_eps == 1e-12 and not ck.config.gelu_approximate
  x = _images(2)
  ref = _hf_logits(model, x)
  _close(_jax_logits(ck.config, ck.params, x), ref, 'hf -> orbax (vit_jax)')
  # config.init_from reads it the same way.
  init = checkpoints.flatten(pretrained.load(str(orbax_dir), model_config=ck.config))
  for k, v in checkpoints.flatten(ck.params).items():
    np.testing.assert_array_equal(init[k], v, err_msg=k)

  npz = tmp_path / 'w.npz'
  result = convert.run(orbax_dir, npz)
  assert result.to == 'npz'
  # The class names cannot go into an .npz: said so, with where they can go.
  assert any(f'{len(HF_NAMES)} class names: an .npz holds arrays only' in n
             for n in result.notes), result.notes
  from_npz = pretrained.load_checkpoint(str(npz))
  flat = checkpoints.flatten(from_npz.params)
  assert flat.keys() == checkpoints.flatten(ck.params).keys()
  for k, v in checkpoints.flatten(ck.params).items():
    np.testing.assert_array_equal(flat[k], v, err_msg=k)
  # .npz keeps no numerics: with transformers' (from the Orbax meta) the logits match.
  _close(_jax_logits(ck.config, from_npz.params, x), ref, 'hf -> orbax -> npz')


def test_orbax_with_class_names_to_hf_and_orbax(orbax_run, tmp_path):
  config, params, workdir = orbax_run
  out = tmp_path / 'hf'
  assert convert.convert(workdir, out, to='hf') == 'hf'
  hf = transformers.ViTForImageClassification.from_pretrained(str(out)).eval()
  assert hf.config.id2label == dict(enumerate(ORBAX_NAMES))
  assert hf.config.label2id == {n: i for i, n in enumerate(ORBAX_NAMES)}
  assert hf.config.hidden_act == 'gelu_pytorch_tanh'  # the paper's tanh GELU
  x = _images(3)
  _close(_hf_logits(hf, x), _jax_logits(config, params, x), 'orbax -> hf')
  # ... and the transformers files read back with their class names.
  assert pretrained.load_checkpoint(str(out / 'model.safetensors')).class_names == ORBAX_NAMES

  # Orbax -> Orbax keeps only the params, with the model, class names and pp_eval.
  slim = tmp_path / 'slim'
  # Relative paths work too (Orbax itself wants absolute ones).
  assert convert.convert(os.path.relpath(workdir), os.path.relpath(slim),
                         to='orbax') == 'orbax'
  ck = pretrained.load_checkpoint(str(slim))
  assert ck.class_names == ORBAX_NAMES and ck.pp_eval == PP_EVAL
  assert ck.config.to_dict() == pretrained.load_checkpoint(workdir).config.to_dict()
  for k, v in checkpoints.flatten(params).items():
    np.testing.assert_array_equal(checkpoints.flatten(ck.params)[k], v, err_msg=k)
  # The prediction API reads it with its labels and evaluation preprocessing.
  from vit_jax import inference  # pylint: disable=g-import-not-at-top
  classifier = inference.ImageClassifier.from_pretrained(str(slim))
  assert classifier.class_names == ORBAX_NAMES and 'central_crop(32)' in classifier.pp
  np.testing.assert_allclose(classifier.logits(x), _jax_logits(config, params, x),
                             atol=TOL, rtol=0)


def _demo_like_run(tmp_path):
  """(config, params, workdir): an Orbax checkpoint of the demo's kind of model (BiT root
  stem, tanh GELU, the stem's own epsilons, 3 heads of 32) under an unregistered name."""
  from vit_jax.train import recipes  # pylint: disable=g-import-not-at-top
  config = recipes.small_hybrid_model('demo-like-ViT', image_size=SIZE, hidden_size=96,
                                      num_layers=2, num_heads=3, mlp_dim=192,
                                      num_classes=len(ORBAX_NAMES))
  params = torch_ref.perturb_jax_params(models.init_params(models.create(config), SIZE),
                                        seed=7, head_std=96 ** -0.5)
  workdir = tmp_path / 'demo_run'
  ckpt = train_state.TrainCheckpointer(workdir / 'checkpoints', async_save=False)
  meta = {'step': 1, 'class_names': ORBAX_NAMES, 'model': config.to_dict(),
          'config': {'input': {'pp_eval': PP_EVAL}}}
  ckpt.save(1, {'step': np.int32(1), 'params': params}, json.loads(json.dumps(meta)))
  ckpt.close()
  return config, params, str(workdir)


def test_unregistered_hybrid_to_safetensors_reads_back_as_itself(tmp_path, caplog):
  """The walk-through's bug: a timm export of the demo read back (no model given, as
  predict reads it) as a 1-head exact-GELU model. The .safetensors records the config."""
  config, params, workdir = _demo_like_run(tmp_path)
  out = tmp_path / 'ft.safetensors'
  result = convert.run(workdir, out)
  assert any("timm has no model of the architecture of 'demo-like-ViT'" in n and
             'recorded in the file' in n for n in result.notes), result.notes
  ck = pretrained.load_checkpoint(str(out))
  assert ck.config_recorded and ck.config.name == 'demo-like-ViT'
  assert ck.config.num_heads == 3 and ck.config.gelu_approximate
  assert ck.class_names == ORBAX_NAMES and ck.pp_eval == PP_EVAL
  x = _images(5)
  _close(_jax_logits(ck.config, ck.params, x), _jax_logits(config, params, x),
         'orbax -> safetensors (recorded config)')
  # Converted again (-> Orbax) it keeps its name, classes and numerics.
  convert.run(str(out), tmp_path / 'back', to='orbax')
  back = pretrained.load_checkpoint(str(tmp_path / 'back'))
  assert back.config.name == 'demo-like-ViT' and back.class_names == ORBAX_NAMES
  assert back.config.resnet.stdconv_eps == config.resnet.stdconv_eps
  # A torch file records nothing: the note says what a loader will guess instead (and
  # the loader's own warning, reading it back, named the hidden staging file).
  caplog.clear()
  notes = convert.run(workdir, tmp_path / 'ft.pth').notes
  assert not [r for r in caplog.records if '.convert-new-' in r.getMessage()], caplog.text
  assert any(n.startswith('ft.pth is a torch file, which records no model config') and
             'num_heads 1 (not 3), GELU exact (not tanh)' in n and
             'Write .safetensors to record it' in n for n in notes), notes
  pp = PP_EVAL.replace('|onehot(4)', '')
  assert any(n.startswith(f'the evaluation preprocessing {pp!r} is not recorded in ft.pth: '
                          "predict reads it back with 'decode|resize(32)|value_range(-1, 1)'")
             and f"--pp='{pp}'" in n for n in notes), notes
  assert all('\n' not in n for n in notes)


def test_registered_name_export_still_loads_in_timm(timm_file, tmp_path):
  """The recorded config lives in the safetensors header: timm loads the tensors
  strictly, and vit_jax reads the same logits back without a model name."""
  model, path = timm_file
  out = tmp_path / 'tiny.safetensors'
  result = convert.run(path, out, model='vit_tiny_patch16_224')
  note = next(n for n in result.notes if "timm.create_model('vit_tiny_patch16_224'" in n)
  # The note's call, as written, builds the model the tensors load into.
  call = re.search(r"timm\.create_model\('vit_tiny_patch16_224', ([^)]*)\)", note)
  assert eval(f'dict({call.group(1)})') == dict(TIMM_KW, num_heads=3)  # pylint: disable=eval-used
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(str(out), framework='pt') as f:
    recorded = json.loads(f.metadata()[pretrained.META_MODEL])
  assert recorded['name'] == 'vit_tiny_patch16_224' and recorded['num_heads'] == 3
  assert recorded['gelu_approximate'] is False  # timm's numerics, as read
  restored = timm.create_model('vit_tiny_patch16_224', pretrained=False, **TIMM_KW).eval()
  restored.load_state_dict(safetensors_torch.load_file(str(out)), strict=True)
  x = _images(6)
  want = _timm_logits(model, x)
  _close(_timm_logits(restored, x), want, 'timm -> safetensors -> timm')
  ck = pretrained.load_checkpoint(str(out))
  assert ck.config_recorded and not ck.config.gelu_approximate
  _close(_jax_logits(ck.config, ck.params, x), want, 'timm -> safetensors -> vit_jax')


def test_cli_takes_the_output_as_an_argument(timm_file, tmp_path):
  """`convert --input=X --to=hf DIR` (the README's form) writes DIR; a missing flag is
  one line naming it, with an example."""
  _, path = timm_file
  out = tmp_path / 'hf_dir'
  proc = _cli(f'--input={path}', '--to=hf', str(out))
  assert proc.returncode == 0, proc.stderr
  assert 'libtpu' not in proc.stderr  # absl INFO (jax's TPU probe): warnings only
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors',
                                     'preprocessor_config.json']
  proc = _cli(f'--input={path}', '--to=hf')
  assert proc.returncode == 2 and proc.stderr.startswith(
      'vit_jax.convert: error: --output is required: where to write (e.g. python -m '
      'vit_jax.convert '), proc.stderr
  assert 'Traceback' not in proc.stderr and 'FATAL' not in proc.stderr
  # The transformers directory is an input too.
  assert convert.convert(out, tmp_path / 'w.npz') == 'npz'


# ----------------------------------------------------------------------------- errors


def _raises(match, *args, **kwargs):
  with pytest.raises(convert.ConversionError, match=match):
    convert.convert(*args, **kwargs)


def test_output_exists_is_refused_unless_overwrite(timm_file, tmp_path):
  _, path = timm_file
  out = tmp_path / 'w.npz'
  out.write_bytes(b'old')
  _raises('already exists; pass --overwrite', path, out)
  assert out.read_bytes() == b'old'
  assert convert.convert(path, out, overwrite=True) == 'npz'
  assert checkpoints.load_npz(out)['head']['kernel'].shape == (192, 5)
  hf = tmp_path / 'hf'
  hf.mkdir()
  (hf / 'config.json').write_text('{}')
  _raises('config.json already exist', path, hf, to='hf')
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'notes.txt').write_text('keep me')
  _raises('already exists', path, other, to='orbax')
  _raises('not an Orbax checkpoint; refusing to delete', path, other, to='orbax',
          overwrite=True)
  assert (other / 'notes.txt').exists()
  _raises('the output is the input', path, path, overwrite=True)
  ckpt = tmp_path / 'ckpt'
  assert convert.convert(out, ckpt, to='orbax') == 'orbax'
  _raises('already exists', path, ckpt, to='orbax')
  assert convert.convert(path, ckpt, to='orbax', overwrite=True) == 'orbax'
  assert pretrained.load_checkpoint(str(ckpt)).config.name == 'timm_vit'  # replaced


def test_a_refused_or_failed_conversion_keeps_the_existing_output(orbax_run, tmp_path):
  """--overwrite used to delete the output before writing: a conversion refused after
  reading (a pre-logits ViT to timm) lost the user's file, and --output=WD/checkpoints --to=orbax
  replaced a run's own checkpoints (optimizer state, resume point) by a params-only step."""
  _, params = _vit_jax_params(seed=5, representation_size=32)  # timm has no pre_logits
  src = tmp_path / 'r.npz'
  checkpoints.save_npz(src, params)
  keep = tmp_path / 'keep.safetensors'
  keep.write_bytes(b'precious')
  _raises('cannot convert to timm', src, keep, overwrite=True)
  assert keep.read_bytes() == b'precious'
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []  # no leftovers
  # An Orbax output that a write fails half-way: the old checkpoint is still there.
  _, _, workdir = orbax_run
  out = tmp_path / 'ckpt'
  assert convert.convert(workdir, out, to='orbax') == 'orbax'
  before = sorted(str(p.relative_to(out)) for p in out.rglob('*'))
  with mock.patch.object(convert, '_write_orbax', side_effect=OSError('disk full')):
    with pytest.raises(OSError, match='disk full'):
      convert.convert(src, out, to='orbax', overwrite=True)
  assert sorted(str(p.relative_to(out)) for p in out.rglob('*')) == before
  assert pretrained.load_checkpoint(str(out)).class_names == ORBAX_NAMES
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []
  # The replacement itself: the new checkpoint, read back from its final place.
  assert convert.convert(src, out, to='orbax', overwrite=True)
  assert pretrained.load_checkpoint(str(out)).config.representation_size == 32
  # An output that is a link: what it points to is replaced, the link kept.
  (tmp_path / 'link').symlink_to(out)
  assert convert.convert(workdir, tmp_path / 'link', to='orbax', overwrite=True)
  assert (tmp_path / 'link').is_symlink()
  assert pretrained.load_checkpoint(str(out)).class_names == ORBAX_NAMES
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []
  # An Orbax output that holds the input or its checkpoints: refused, the run untouched
  # (also through a link to the workdir).
  steps = sorted(p.name for p in (pathlib.Path(workdir) / 'checkpoints').iterdir())
  (tmp_path / 'wd').symlink_to(workdir)
  for inp, output in ((workdir, f'{workdir}/checkpoints'),
                      (workdir, f'{tmp_path}/wd/checkpoints'),
                      (f'{workdir}/checkpoints/30', f'{workdir}/checkpoints')):
    _raises('holds the input', inp, output, to='orbax', overwrite=True)
  assert sorted(p.name for p in (pathlib.Path(workdir) / 'checkpoints').iterdir()) == steps
  # A folder beside the checkpoints is fine.
  assert convert.convert(workdir, f'{workdir}/export', to='orbax') == 'orbax'


def test_a_remote_output_is_written_there_not_staged_on_this_disk(tmp_path, monkeypatch):
  """A gs:// output was written under ./gs:/... on the local disk and reported written
  (the timm and transformers writers take local paths only). Checked on TensorFlow's
  ram:// file system, which tf.io.gfile reaches as it reaches gs://."""
  tf = pytest.importorskip('tensorflow')
  _, params = _vit_jax_params(seed=7)
  checkpoints.save_npz(tmp_path / 'w.npz', params)
  monkeypatch.chdir(tmp_path)
  for output, to, files in (('ram://bucket/out/x.npz', None, ['x.npz']),
                            ('ram://bucket/out/x.safetensors', None, ['x.safetensors']),
                            ('ram://bucket/out/hf', 'hf', [convert.HF_CONFIG,
                                                           convert.HF_WEIGHTS])):
    result = convert.run(str(tmp_path / 'w.npz'), output, to=to)
    assert result.output == output and result.written_bytes > 1000
    folder = output if to == 'hf' else output.rsplit('/', 1)[0]
    assert set(files) <= set(tf.io.gfile.listdir(folder)), tf.io.gfile.listdir(folder)
    _raises('already exist', tmp_path / 'w.npz', output, to=to)  # no silent replacement
  back = tmp_path / 'back.safetensors'
  tf.io.gfile.copy('ram://bucket/out/x.safetensors', str(back))
  np.testing.assert_array_equal(
      checkpoints.flatten(pretrained.load_checkpoint(str(back)).params)['head/kernel'],
      checkpoints.flatten(params)['head/kernel'])
  assert not (tmp_path / 'ram:').exists()


def test_an_output_linked_to_the_input_is_the_input(tmp_path):
  """A link named .safetensors to the input .npz: the input was rewritten as a torch file
  (the staged file was named after the link's target, and the paths compared unresolved)."""
  _, params = _vit_jax_params(seed=8)
  checkpoints.save_npz(tmp_path / 'w.npz', params)
  before = (tmp_path / 'w.npz').read_bytes()
  for name in ('link.safetensors', 'link.npz'):
    (tmp_path / name).symlink_to(tmp_path / 'w.npz')
    _raises('the output is the input', tmp_path / 'w.npz', tmp_path / name, overwrite=True)
  assert (tmp_path / 'w.npz').read_bytes() == before
  # A link to another file of another extension: written in the link's format.
  (tmp_path / 'blob').write_bytes(b'old')
  (tmp_path / 'x.safetensors').symlink_to(tmp_path / 'blob')
  assert convert.convert(tmp_path / 'w.npz', tmp_path / 'x.safetensors', overwrite=True) == 'timm'
  assert (tmp_path / 'x.safetensors').is_symlink()
  assert pretrained.load_checkpoint(str(tmp_path / 'x.safetensors')).kind == 'timm'


@pytest.mark.parametrize('output,to,match', [
    ('x.onnx', 'onnx', "unknown --to='onnx'"),
    ('out', None, 'cannot tell the output format'),
    ('x.npz', 'timm', '--to=timm writes a state dict file'),
    ('x.safetensors', 'npz', 'does not end in .npz'),
    ('x.safetensors', 'hf', '--to=hf writes a directory'),
])
def test_output_format_errors(timm_file, tmp_path, output, to, match):
  _raises(match, timm_file[1], tmp_path / output, to=to)


def test_unreadable_inputs(tmp_path):
  out = tmp_path / 'out.npz'
  _raises('does not exist', tmp_path / 'missing.safetensors', out)
  (tmp_path / 'junk.safetensors').write_bytes(b'not a safetensors file')
  _raises('cannot read .*junk.safetensors', tmp_path / 'junk.safetensors', out)
  (tmp_path / 'junk.npz').write_bytes(b'not a zip')
  _raises('cannot read .*junk.npz', tmp_path / 'junk.npz', tmp_path / 'o.safetensors')
  (tmp_path / 'w.h5').write_bytes(b'x')
  _raises('cannot tell what kind of checkpoint', tmp_path / 'w.h5', out)
  (tmp_path / 'empty').mkdir()
  _raises('no Orbax checkpoint under', tmp_path / 'empty', out)
  other = tmp_path / 'other.safetensors'
  safetensors_torch.save_file({'fc.weight': torch.zeros(2, 2)}, str(other))
  _raises('cannot read .*other.safetensors', other, out)
  assert not out.exists()


def test_unknown_model_name(timm_file, tmp_path):
  _raises("--model: unknown model name 'vit_tiny_patch16'", timm_file[1],
          tmp_path / 'w.npz', model='vit_tiny_patch16')
  _raises("'num_hedas' is not a field", timm_file[1], tmp_path / 'w.npz',
          model='num_hedas=3')


@pytest.mark.parametrize('spec', ['num_heads=3', 'vit_tiny_patch16_224,num_heads=3'])
def test_model_with_fields_is_taken_as_predict_takes_it(timm_file, tmp_path, spec):
  """The forms the flag's help and the heads warning suggest used to be refused as
  'unknown model name'."""
  out = tmp_path / 'w.npz'
  assert convert.convert(timm_file[1], out, model=spec) == 'npz'
  assert checkpoints.load_npz(out)['Transformer']['encoderblock_0'][
      'MultiHeadDotProductAttention_0']['query']['kernel'].shape[1] == 3


def test_conversions_the_target_cannot_represent(tmp_path):
  _, params = _vit_jax_params(seed=5, representation_size=32)  # an ImageNet-21k style head
  checkpoints.save_npz(tmp_path / 'r.npz', params)
  _raises('cannot convert to timm: timm VisionTransformer has no pre_logits',
          tmp_path / 'r.npz', tmp_path / 'r.safetensors')
  _raises('cannot convert to transformers: .*no pre_logits', tmp_path / 'r.npz',
          tmp_path / 'hf', to='hf')
  _, gap = _vit_jax_params(seed=6, classifier='gap')
  checkpoints.save_npz(tmp_path / 'gap.npz', gap)
  _raises("transformers ViT pools the class token; classifier 'gap'", tmp_path / 'gap.npz',
          tmp_path / 'hf', to='hf')
  assert not (tmp_path / 'r.safetensors').exists() and not (tmp_path / 'hf').exists()


def test_cli_errors_are_one_message_without_traceback(tmp_path):
  _, params = _vit_jax_params(seed=5, representation_size=32)
  checkpoints.save_npz(tmp_path / 'r.npz', params)
  proc = _cli(f'--input={tmp_path / "r.npz"}', f'--output={tmp_path / "r.safetensors"}')
  assert proc.returncode == 2
  assert proc.stderr.startswith('vit_jax.convert: error: cannot convert to timm: timm VisionTransformer has '
                                'no pre_logits'), proc.stderr
  assert 'Traceback' not in proc.stderr and not proc.stdout
  proc = _cli(f'--input={tmp_path / "r.npz"}', f'--output={tmp_path / "x"}', '--to=onnx')
  assert proc.returncode != 0
  assert 'value should be one of <npz|timm|hf|orbax>' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_batch_norm_model_timm_to_orbax_to_timm_keeps_running_statistics(tmp_path):
  """A timm ResNet (random weights and running statistics) -> Orbax -> timm: the state
  dict comes back equal, BatchNorm statistics included; .npz and transformers exports
  are refused with the formats that work."""
  timm = pytest.importorskip('timm')
  torch = pytest.importorskip('torch')
  model = timm.create_model('resnet50', pretrained=False, num_classes=4)
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
  src = tmp_path / 'r50.safetensors'
  checkpoints.write_state_dict({k: v.numpy() for k, v in model.state_dict().items()
                                if not k.endswith('num_batches_tracked')}, src)
  convert.run(str(src), str(tmp_path / 'orbax'), to='orbax', model='resnet50')
  loaded = pretrained.load_checkpoint(str(tmp_path / 'orbax'))
  assert 'batch_stats' in loaded.model_state
  convert.run(str(tmp_path / 'orbax'), str(tmp_path / 'back.safetensors'), to='timm')
  back = checkpoints.read_state_dict(str(tmp_path / 'back.safetensors'))
  fresh = timm.create_model('resnet50', pretrained=False, num_classes=4)
  fresh.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in back.items()},
                        strict=True)
  for k, v in model.state_dict().items():
    if not k.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(np.asarray(back[k]), v.numpy(), err_msg=k)
  # The export records its (ResNet) config, and reads back with no model given.
  again = pretrained.load_checkpoint(str(tmp_path / 'back.safetensors'))
  assert again.config_recorded and again.config.get('family') == 'resnet'
  assert again.config.num_classes == 4 and 'batch_stats' in again.model_state
  for to, output in (('npz', 'x.npz'), ('hf', 'hf_dir')):
    with pytest.raises(convert.ConversionError, match='--to=timm or --to=orbax'):
      convert.run(str(tmp_path / 'orbax'), str(tmp_path / output), to=to)


def test_a_resnet_of_another_depth_goes_to_orbax_and_back_to_timm_by_the_cli(tmp_path):
  """A ResNet with one block per stage (no registered name has that shape), read with no
  --model: the CLI wrote the Orbax output then crashed on its ViT-only summary, and no
  non-ViT config without a registered twin could go to timm (a workdir's paper-named
  config failed too: its JSON lists never equalled the registry's tuples)."""
  timm = pytest.importorskip('timm')
  model = timm.create_model('resnet50', pretrained=False, num_classes=3, layers=[1, 1, 1, 1])
  src = tmp_path / 'r_small.safetensors'
  checkpoints.write_state_dict({k: v.numpy() for k, v in model.state_dict().items()
                                if not k.endswith('num_batches_tracked')}, src)
  proc = _cli(f'--input={src}', f'--output={tmp_path / "orbax"}', '--to=orbax')
  assert proc.returncode == 0, proc.stderr
  assert 'resnet family' in proc.stdout + proc.stderr
  proc = _cli(f'--input={tmp_path / "orbax"}', f'--output={tmp_path / "back.safetensors"}')
  assert proc.returncode == 0, proc.stderr
  back = checkpoints.read_state_dict(str(tmp_path / 'back.safetensors'))
  fresh = timm.create_model('resnet50', pretrained=False, num_classes=3, layers=[1, 1, 1, 1])
  fresh.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in back.items()},
                        strict=True)
  for k, v in model.state_dict().items():
    if not k.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(np.asarray(back[k]), v.numpy(), err_msg=k)
  from vit_jax import models  # pylint: disable=import-outside-toplevel
  from vit_jax.checkpoints import timm_format  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  as_in_a_workdir = ml_collections.ConfigDict(
      json.loads(models.get_config('ResNet-50').to_json()))  # layers as a list
  assert timm_format.timm_name(as_in_a_workdir) == 'resnet50'


@pytest.mark.parametrize('classifier', ['gap', 'map'])
def test_the_timm_note_builds_pooled_and_custom_width_models(classifier, tmp_path):
  """A GAP or MAP ViT of no registered shape (64 wide, 4 heads, patch 8) exported to a
  torch file: the note's timm.create_model call, as written, builds the model the state
  dict loads into strictly, and create_timm_model gives the same logits. The note used to
  leave out the pooling (no class token: the load failed), and create_timm_model refused
  any unregistered shape."""
  config = models.get_config('ViT-Ti/16')
  config.update(name='custom', classifier=classifier, hidden_size=64, num_heads=4, mlp_dim=128,
                num_layers=2, patch_size=(8, 8), image_size=SIZE, num_classes=5,
                gelu_approximate=False, layernorm_eps=1e-6)
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32),
                        models.abstract_variables(models.create(config), SIZE)['params'])
  source = tmp_path / 'custom.safetensors'
  safetensors_torch.save_file(
      {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
       checkpoints.to_timm(config, params).items()}, str(source),
      metadata=pretrained.state_dict_metadata(config))
  result = convert.run(str(source), str(tmp_path / 'custom.pth'))
  note = next(n for n in result.notes if 'timm.create_model(' in n)
  start = note.index('timm.create_model(') + len('timm.create_model(')
  depth, end = 1, start
  while depth:  # the call's closing parenthesis (its arguments hold tuples)
    depth += {'(': 1, ')': -1}.get(note[end], 0)
    end += 1
  name, kwargs = eval(f'(lambda name, **kw: (name, kw))({note[start:end]}')  # pylint: disable=eval-used
  assert 'global_pool' in kwargs and 'num_heads' in kwargs, kwargs
  model = timm.create_model(name, pretrained=False, **kwargs).eval()
  model.load_state_dict(torch.load(str(tmp_path / 'custom.pth')), strict=True)
  x = _images(7)
  want = _jax_logits(config, params, x)
  built = checkpoints.create_timm_model(config, params)
  diff = float(np.max(np.abs(_timm_logits(built, x) - want)))
  assert diff < 1e-4, diff
  np.testing.assert_allclose(_timm_logits(model, x), _timm_logits(built, x), atol=1e-4)


def test_a_timm_hybrid_through_npz_reads_back_with_timm_s_stem(tmp_path):
  """A timm R26+S/32 (weight standardisation eps 1e-8 inside the square root, GroupNorm
  eps 1e-5) converted to .npz: the note names the stem's numerics, and reading the file
  with the model name it suggests gives timm's logits. The stem used to stay at the
  release's numerics (4.6e-4 off timm) and no note mentioned it."""
  torch.manual_seed(0)
  model = timm.create_model('vit_small_r26_s32_224', pretrained=False, num_classes=5,
                            img_size=64, depth=2).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.02)
  source = tmp_path / 'r26.safetensors'
  safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                              str(source))
  notes = convert.run(str(source), str(tmp_path / 'r26.npz'),
                      model='vit_small_r26_s32_224').notes
  assert any('a ResNet stem with stdconv_eps 1e-08 (inside the square root) and GroupNorm '
             'eps 1e-05' in n and '--model=vit_small_r26_s32_224' in n for n in notes), notes
  ck = pretrained.load_checkpoint(str(tmp_path / 'r26.npz'), model='vit_small_r26_s32_224')
  x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    want = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  _close(_jax_logits(ck.config, ck.params, x), want, 'timm R26+S/32 -> npz -> vit_jax')


def test_leftovers_of_a_killed_conversion_are_cleared(timm_file, tmp_path):
  """A conversion killed with kill -9 left its hidden staging file (a whole model's size)
  beside the output for good; an old output it had set aside was lost from view."""
  import socket  # pylint: disable=g-import-not-at-top
  host = socket.gethostname()
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  pid = int(dead.stdout)  # a process that has ended
  out = tmp_path / 'm.safetensors'
  staged = tmp_path / f'.convert-new-{pid}@{host}-m.safetensors'
  staged.write_bytes(b'half a model')
  kept = [tmp_path / f'.convert-new-{pid}@{host}-other.safetensors',  # another output's
          tmp_path / f'.convert-new-{os.getppid()}@{host}-m.safetensors',  # running
          tmp_path / f'.convert-new-{pid}@another-host-m.safetensors']  # another host's
  for path in kept:
    path.write_bytes(b'x')
  convert.convert(timm_file[1], out, to='timm')
  assert out.exists() and not staged.exists() and all(p.exists() for p in kept)
  # Killed between setting the old output aside and moving the new one in: put back.
  out.unlink()
  aside = tmp_path / f'.convert-old-{pid}@{host}-m.safetensors'
  aside.write_bytes(b'precious')
  _raises('already exists', timm_file[1], out, to='timm')
  assert out.read_bytes() == b'precious' and not aside.exists()


def test_an_output_it_cannot_write_is_named(timm_file, tmp_path):
  """Was a traceback naming the hidden staged file, after the conversion had run."""
  _raises(r'--output=/proc/z.npz: cannot write in /proc', timm_file[1], '/proc/z.npz')


def test_an_output_inside_a_run_s_checkpoints_is_refused(orbax_run, tmp_path):
  """--output=WD/checkpoints/5 was written; the run then took it for its newest step,
  found it unreadable and set it aside as 5.unreadable."""
  _, _, workdir = orbax_run
  run = tmp_path / 'run'
  shutil.copytree(workdir, run)
  for output, to in ((run / 'checkpoints' / '5', 'orbax'),
                     (run / 'checkpoints' / 'w.npz', None),
                     (run / 'checkpoints' / '30' / 'w.safetensors', None)):
    _raises(r'is inside the Orbax checkpoint folder .*: a training run there would take it '
            'for one of its own steps', workdir, output, to=to)
    assert not os.path.exists(output)
  assert sorted(os.listdir(run / 'checkpoints')) == ['30']
