"""`python -m vit_jax.predict` and `vit_jax.inference` on real photographs.

Photos: scikit-image's bundled images, written as files by the tests. Checkpoints: a
workdir trained by `vit_jax.main` (class names from its metadata), a timm model with
random weights saved as safetensors (probabilities compared with timm's on the same
preprocessed pixels), a transformers model (id2label; its file and its save_pretrained
directory), an `.npz`, and the workdir's model exported by `vit_jax.convert` to
.safetensors (the same predictions as the workdir).
"""

import json
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
skdata = pytest.importorskip('skimage.data')
import torch_reference as torch_ref  # pylint: disable=g-import-not-at-top,wrong-import-position

from vit_jax import inference  # pylint: disable=g-import-not-at-top
from vit_jax import labels as labels_lib  # pylint: disable=g-import-not-at-top
from vit_jax.checkpoints import npz  # pylint: disable=g-import-not-at-top
import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = subprocess_env.cpu_env()
CLASSES = ['astronaut', 'chelsea', 'coffee', 'rocket', 'camera', 'horse']
PROB_TOL = 1e-4  # the tolerance against timm, fp32


def _photo(name):
  image = getattr(skdata, name)()
  if image.dtype == bool:
    image = image.astype(np.uint8) * 255
  return image


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
  """astronaut (PNG, RGB), chelsea (JPEG), camera (grayscale PNG), logo (RGBA PNG)."""
  d = tmp_path_factory.mktemp('photos')
  paths = []
  for name, ext in [('astronaut', 'png'), ('chelsea', 'jpg'), ('camera', 'png'),
                    ('logo', 'png')]:
    p = d / f'{name}.{ext}'
    Image.fromarray(_photo(name)).save(p)
    paths.append(p)
  return paths


def _predict_cli(*args, timeout=300):
  return subprocess.run([sys.executable, '-m', 'vit_jax.predict', *map(str, args)], cwd=ROOT,
                        env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  """A tiny model trained for 3 steps by vit_jax.main on crops of six named photos."""
  data = tmp_path_factory.mktemp('photo_classes')
  rng = np.random.RandomState(0)
  for split in ('train', 'test'):
    for name in CLASSES:
      image = _photo(name)
      d = data / split / name
      d.mkdir(parents=True)
      for i in range(4):
        h, w = image.shape[:2]
        y, x = rng.randint(0, h // 4), rng.randint(0, w // 4)
        Image.fromarray(image[y:y + 3 * h // 4, x:x + 3 * w // 4]).save(d / f'{i}.png')
  workdir = tmp_path_factory.mktemp('workdir')
  pp = 'decode|resize(32)|value_range(-1, 1)'
  proc = subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', '--config=configs/demo.py', f'--workdir={workdir}',
       '--config.input.source=folder', f'--config.input.folder={data}',
       f'--config.input.pp_train={pp}|onehot(6)', f'--config.input.pp_eval={pp}|onehot(6)',
       '--config.model.image_size=32', '--config.model.num_classes=6',
       '--config.model.num_layers=1', '--config.model.hidden_size=32',
       '--config.model.num_heads=2', '--config.model.mlp_dim=64', '--config.batch_size=8',
       '--config.total_steps=3', '--config.schedule.warmup_steps=1', '--config.eval_every=0'],
      cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  return workdir


def test_cli_on_a_trained_workdir_prints_top5_with_its_class_names(trained_workdir, photos,
                                                                   tmp_path):
  proc = _predict_cli(f'--checkpoint={trained_workdir}', *photos)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  blocks = proc.stdout.strip().split('\n')
  assert len(blocks) == len(photos) * 6, proc.stdout
  for i, path in enumerate(photos):
    assert blocks[6 * i] == str(path)
    rows = [line.split() for line in blocks[6 * i + 1:6 * i + 6]]
    probs = [float(r[0]) for r in rows]
    names = [r[1] for r in rows]
    assert len(set(names)) == 5 and set(names) <= set(CLASSES)
    assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-4
    assert probs == sorted(probs, reverse=True)
  # --json, and a folder argument stands for its images (sorted).
  proc = _predict_cli(f'--checkpoint={trained_workdir}', '--json', '--top_k=6',
                      photos[0].parent)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  rows = [json.loads(l) for l in proc.stdout.strip().split('\n')]
  assert [r['image'] for r in rows] == sorted(str(p) for p in photos)
  for r in rows:  # all six classes: probabilities sum to 1
    assert abs(sum(t['probability'] for t in r['top_k']) - 1) < 1e-4
  # An unreadable file among readable ones is named and skipped; the rest are classified.
  mixed = tmp_path / 'mixed'
  mixed.mkdir()
  (mixed / 'a_truncated.jpg').write_bytes(b'\xff\xd8\xff' + b'\0' * 40)
  (mixed / 'b.png').write_bytes(photos[0].read_bytes())
  # (--model, which only files that record no config take, is said to be unused here.)
  proc = _predict_cli(f'--checkpoint={trained_workdir}', '--json', '--top_k=6',
                      '--model=num_heads=1', mixed)
  assert proc.returncode == 1, subprocess_env.failure(proc)
  assert f'--model=num_heads=1 is not used: {trained_workdir} records the model' in (
      proc.stderr)
  assert f'skipping {mixed / "a_truncated.jpg"}: ' in proc.stderr
  assert [json.loads(l)['image'] for l in proc.stdout.strip().split('\n')] == [
      str(mixed / 'b.png')]
  alone = json.loads(proc.stdout)['top_k']
  assert rows[0]['image'] == str(photos[0])  # the same image, classified in the folder
  assert [t['label'] for t in alone] == [t['label'] for t in rows[0]['top_k']]
  np.testing.assert_allclose([t['probability'] for t in alone],
                             [t['probability'] for t in rows[0]['top_k']], atol=1e-5)


def test_cli_on_a_safetensors_export_of_the_workdir_prints_the_same(trained_workdir, photos,
                                                                    tmp_path):
  """The workdir's model (the demo's: BiT stem, tanh GELU, 2 heads of 16, an unregistered
  name) exported by `vit_jax.convert` to .safetensors predicts what the workdir does:
  the file records the config, class names and preprocessing (no 1-head guess)."""
  export = tmp_path / 'ft.safetensors'
  proc = subprocess.run([sys.executable, '-m', 'vit_jax.convert', f'--input={trained_workdir}',
                         f'--output={export}'], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  assert "note: timm has no model of the architecture of 'demo-ViT'" in proc.stdout
  rows = {}
  for checkpoint in (trained_workdir, export):
    proc = _predict_cli(f'--checkpoint={checkpoint}', '--json', '--top_k=6', *photos)
    assert proc.returncode == 0, subprocess_env.failure(proc)
    rows[checkpoint] = [json.loads(l) for l in proc.stdout.strip().split('\n')]
  assert len(rows[export]) == len(photos)
  for want, got in zip(rows[trained_workdir], rows[export]):
    assert got['image'] == want['image']
    assert [t['label'] for t in got['top_k']] == [t['label'] for t in want['top_k']]
    assert {t['label'] for t in got['top_k']} == set(CLASSES)
    np.testing.assert_allclose([t['probability'] for t in got['top_k']],
                               [t['probability'] for t in want['top_k']], atol=1e-5)
  # What the export used to give (a torch file records no config: a guess) differs by
  # more than that tolerance, even for this 3-step model's near-uniform probabilities.
  from vit_jax import convert  # pylint: disable=import-outside-toplevel
  convert.run(str(trained_workdir), str(tmp_path / 'ft.pth'))
  guessed = inference.ImageClassifier.from_pretrained(tmp_path / 'ft.pth')
  assert guessed.config.num_heads == 1
  right = inference.ImageClassifier.from_pretrained(export).predict_proba(photos)
  assert float(np.max(np.abs(guessed.predict_proba(photos) - right))) > 5e-5


def test_api_uses_the_runs_eval_preprocessing_and_batches(trained_workdir, photos):
  clf = inference.ImageClassifier.from_pretrained(trained_workdir, batch_size=3)
  assert clf.class_names == sorted(CLASSES)
  assert clf.pp == 'decode|resize(32)|value_range(-1, 1)'  # onehot dropped
  pixels = clf.preprocess(photos + [_photo('coffee'), Image.open(photos[1])])
  # antialiased resizing may overshoot [-1, 1] slightly (no clipping, as in evaluation)
  assert pixels.shape == (6, 32, 32, 3) and pixels.min() >= -1.01 and pixels.max() <= 1.01
  # Two batches of 3 (the second padded) equal one unbatched forward pass.
  direct = np.asarray(clf.module.apply({'params': clf.params}, pixels, train=False))
  np.testing.assert_allclose(clf.logits(pixels), direct, atol=1e-5)
  # A PIL image and its file give the same pixels.
  np.testing.assert_allclose(pixels[1], pixels[5], atol=1e-6)
  # One image, in any form, is one image (a path string is not a list of characters, an
  # HxWx3 array not a list of rows); an NxHxWx3 array is N images.
  array = np.asarray(Image.open(photos[1]).convert('RGB'))
  for single in (str(photos[1]), pathlib.Path(photos[1]), Image.open(photos[1]), array):
    one = clf.preprocess(single)
    assert one.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(one[0], pixels[1], atol=1e-6)
  assert len(clf.predict(array)) == 1
  assert clf.preprocess(np.stack([array, array])).shape == (2, 32, 32, 3)
  gray = np.stack([array[..., 0]] * 5)  # N x H x W: five grayscale images
  assert clf.preprocess(gray).shape == (5, 32, 32, 3)
  # An iterator is read once: the unreadable image is still named.
  with pytest.raises(inference.UnreadableImageError, match='no_such.png'):
    clf.predict(p for p in [photos[0], photos[0].parent / 'no_such.png'])


def test_a_sigmoid_trained_workdir_gives_sigmoid_probabilities(trained_workdir, photos,
                                                               tmp_path):
  softmax = inference.ImageClassifier.from_pretrained(trained_workdir)
  assert softmax.probabilities == 'softmax'
  logits = softmax.logits(softmax.preprocess(photos))
  np.testing.assert_allclose(softmax.predict_proba(photos).sum(-1), 1.0, atol=1e-5)
  # The same run, recorded as trained with the sigmoid loss (as the ImageNet-21k recipe).
  copy = tmp_path / 'workdir'
  shutil.copytree(trained_workdir, copy)
  (meta_file,) = copy.glob('checkpoints/*/meta/metadata')
  meta = json.loads(meta_file.read_text())
  meta['config']['loss'] = 'sigmoid_xent'
  meta_file.write_text(json.dumps(meta))
  sigmoid = inference.ImageClassifier.from_pretrained(copy)
  assert sigmoid.probabilities == 'sigmoid'
  np.testing.assert_allclose(sigmoid.predict_proba(photos), 1 / (1 + np.exp(-logits)),
                             rtol=1e-5)
  with pytest.raises(ValueError, match='top_k=-3 must be at least 1'):
    sigmoid.predict(photos[0], top_k=-3)  # it printed 7 labels
  top = sigmoid.predict(photos[0], top_k=1)[0][0]
  assert top.probability == pytest.approx(1 / (1 + np.exp(-logits[0].max())), rel=1e-5)


def _random_timm_model(num_classes):
  torch.manual_seed(0)
  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=num_classes,
                            depth=2, img_size=64).eval()
  g = torch.Generator().manual_seed(1)
  assert torch_ref.perturb_torch(model, generator=g) > 0
  with torch.no_grad():
    model.head.weight.normal_(0, 0.2, generator=g)
  return model


def test_timm_checkpoint_probabilities_equal_timms(tmp_path, photos):
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  model = _random_timm_model(num_classes=1000)
  path = tmp_path / 'vit_tiny.safetensors'
  save_file(model.state_dict(), str(path))
  clf = inference.ImageClassifier.from_pretrained(path)
  assert clf.config.image_size == 64 and clf.num_classes == 1000
  pixels = clf.preprocess(photos)
  with torch.no_grad():
    want = torch.softmax(model(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())),
                         -1).numpy()
  got = clf.predict_proba(photos)
  assert float(np.max(want)) > 0.01  # not a uniform distribution
  np.testing.assert_allclose(got, want, atol=PROB_TOL)
  # A 1000-class head gets the ImageNet-1k names; the CLI prints the same numbers.
  top = clf.predict(photos[:1], top_k=5)[0]
  names = labels_lib.imagenet1k_names()
  assert [p.label for p in top] == [names[int(i)] for i in np.argsort(-want[0])[:5]]
  assert labels_lib.imagenet1k_names()[0].startswith('tench')
  proc = _predict_cli(f'--checkpoint={path}', '--json', *photos[:2])
  assert proc.returncode == 0, subprocess_env.failure(proc)
  for row, expected in zip([json.loads(l) for l in proc.stdout.split('\n') if l], want):
    for t in row['top_k']:
      assert abs(t['probability'] - expected[t['index']]) < PROB_TOL
      assert t['label'] == names[t['index']]


def test_transformers_checkpoint_takes_names_from_id2label(tmp_path, photos):
  transformers = pytest.importorskip('transformers')
  config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, num_labels=6,
                                  id2label={i: n for i, n in enumerate(CLASSES)},
                                  label2id={n: i for i, n in enumerate(CLASSES)})
  torch.manual_seed(0)
  model = transformers.ViTForImageClassification(config).eval()
  model.save_pretrained(tmp_path / 'hf')
  path = next((tmp_path / 'hf').glob('*.safetensors'))
  clf = inference.ImageClassifier.from_pretrained(path)
  assert clf.class_names == CLASSES
  pixels = clf.preprocess(photos[:2])
  with torch.no_grad():
    want = torch.softmax(model(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).logits,
                         -1).numpy()
  np.testing.assert_allclose(clf.predict_proba(photos[:2]), want, atol=PROB_TOL)
  # The save_pretrained directory (as `vit_jax.convert --to=hf DIR` writes it) works too.
  proc = _predict_cli(f'--checkpoint={tmp_path / "hf"}', '--json', '--top_k=6', *photos[:2])
  assert proc.returncode == 0, subprocess_env.failure(proc)
  for row, expected in zip([json.loads(l) for l in proc.stdout.split('\n') if l], want):
    assert {t['label'] for t in row['top_k']} == set(CLASSES)
    for t in row['top_k']:
      assert abs(t['probability'] - expected[t['index']]) < PROB_TOL


def test_npz_checkpoint_infers_its_architecture_and_a_label_file(tmp_path, photos):
  from vit_jax import models  # pylint: disable=import-outside-toplevel
  module = models.create('ViT-Ti/16', num_layers=2, image_size=48, num_classes=6,
                         classifier='gap')
  params = models.init_params(module, image_size=48)
  params = dict(params, head={'kernel': np.random.RandomState(0).normal(
      0, 0.3, params['head']['kernel'].shape).astype(np.float32), 'bias': params['head']['bias']})
  npz.save_npz(tmp_path / 'w.npz', params)
  label_file = tmp_path / 'names.txt'
  label_file.write_text('\n'.join(c.upper() for c in CLASSES) + '\n')
  clf = inference.ImageClassifier.from_pretrained(tmp_path / 'w.npz', labels=label_file)
  assert clf.config.classifier == 'gap' and clf.config.image_size == 48
  assert clf.config.num_layers == 2 and clf.config.num_heads == 3
  pixels = clf.preprocess(photos)
  np.testing.assert_allclose(clf.logits(pixels),
                             module.apply({'params': params}, pixels, train=False), atol=1e-5)
  assert {p.label for p in clf.predict(photos[:1])[0]} <= {c.upper() for c in CLASSES}
  # Errors that name the problem.
  with pytest.raises(ValueError, match='5 class names for a head of 6 classes'):
    inference.ImageClassifier.from_pretrained(tmp_path / 'w.npz', labels=CLASSES[:5])
  with pytest.raises(inference.UnreadableImageError, match='missing.jpg: .*no image file'):
    clf.predict([photos[0], tmp_path / 'missing.jpg'])
  # The library takes arrays, already decoded and sized: a pp without decode or size op
  # is right for them.
  arrays = np.stack([np.asarray(Image.open(p).convert('RGB').resize((48, 48))) for p in
                     photos[:2]])
  bare = inference.ImageClassifier.from_pretrained(tmp_path / 'w.npz',
                                                   pp='value_range(-1, 1)')
  np.testing.assert_allclose(bare.logits(bare.preprocess(arrays)), module.apply(
      {'params': params}, arrays.astype(np.float32) / 127.5 - 1, train=False), atol=1e-4)
  # On the command line (files), a pp that cannot work, a batch size of 0 and a missing
  # label file are named as the flag's fault before any image is read (a pp without decode
  # used to be reported as every image being unreadable, a typo in it as the checkpoint's).
  from vit_jax import cli_inputs  # pylint: disable=import-outside-toplevel
  for pp, message in [('resize(48)|value_range(-1, 1)', "has no decode: image files are "
                       "encoded, so start it with 'decode|'"),
                      ('decode|value_range(-1, 1)', 'does not fix the image size'),
                      ('decode|resize(32)', 'makes 32x32 images, but the model takes 48x48'),
                      ('decode|resise(48)', "Unknown preprocessing op 'resise'")]:
    assert message in cli_inputs.pp_problem(pp, clf.config)
  assert cli_inputs.pp_problem('decode|resize(48)|value_range(-1, 1)', clf.config) is None
  # A --pp that scales pixels otherwise than the weights' preprocessing is warned about
  # (without value_range the model was fed 0..255, silently).
  assert clf.weights_pp == 'decode|resize(48)|value_range(-1, 1)'
  note = cli_inputs.pixel_scale_note('decode|resize(48)', clf.weights_pp)
  assert note.startswith('gives pixels in 0..255 (no value_range or normalize op), but the '
                         "weights come with 'decode|resize(48)|value_range(-1, 1)' (pixels "
                         'in -1..1)'), note
  assert 'in 0..1' in cli_inputs.pixel_scale_note('decode|resize(48)|value_range(0, 1)',
                                                  clf.weights_pp)
  assert cli_inputs.pixel_scale_note('decode|resize_small(56)|central_crop(48)|'
                                     'value_range(-1, 1)', clf.weights_pp) is None
  # An .npz records no preprocessing: the default is a guess, and the note says so.
  assert not clf.weights_pp_recorded
  assert 'which record no preprocessing' in cli_inputs.pixel_scale_note(
      'decode|resize(48)|normalize', clf.weights_pp, recorded=clf.weights_pp_recorded)
  # A random augmentation is named once (it was "needs example['rng']" for every image).
  assert 'random_resized_crop is a random training augmentation' in cli_inputs.pp_problem(
      'decode|random_resized_crop(48)|value_range(-1, 1)', clf.config)
  # A workdir's pp_eval as --pp: its label ops are dropped (they were a KeyError 'label').
  labelled = inference.ImageClassifier.from_pretrained(
      tmp_path / 'w.npz', pp='decode|resize(48)|value_range(-1, 1)|onehot(6)|keep("image")')
  assert labelled.pp == 'decode|resize(48)|value_range(-1, 1)'
  np.testing.assert_allclose(labelled.logits(labelled.preprocess(photos)), clf.logits(pixels),
                             atol=1e-6)
  # A label file as Notepad writes it (byte-order mark, CRLF), and one of the wrong length
  # named as the file's fault.
  bom = tmp_path / 'bom.txt'
  bom.write_bytes(('\r\n'.join(c.upper() for c in CLASSES) + '\r\n').encode('utf-8-sig'))
  assert inference.ImageClassifier.from_pretrained(
      tmp_path / 'w.npz', labels=bom).class_names == [c.upper() for c in CLASSES]
  short = tmp_path / 'short.txt'
  short.write_text('a\nb\n')
  with pytest.raises(ValueError, match=f'2 class names for a head of 6 classes \\(the labels '
                     f'file {re.escape(str(short))}\\)'):
    inference.ImageClassifier.from_pretrained(tmp_path / 'w.npz', labels=short)
  proc = _predict_cli(f'--checkpoint={tmp_path / "w.npz"}', '--pp=decode|resise(48)',
                      photos[0], timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert ("vit_jax.predict: --pp='decode|resise(48)': Unknown preprocessing op 'resise'"
          in proc.stderr), proc.stderr
  proc = _predict_cli(f'--checkpoint={tmp_path / "w.npz"}', '--batch_size=0', photos[0],
                      timeout=120)
  assert proc.returncode == 2 and '--batch_size=0 must be a positive int' in proc.stderr
  proc = _predict_cli(f'--checkpoint={tmp_path / "w.npz"}', f'--labels={tmp_path / "no.txt"}',
                      photos[0], timeout=120)
  assert proc.returncode == 2 and f'--labels={tmp_path / "no.txt"}: no such file' in (
      proc.stderr)


def test_cli_errors_are_one_line_messages(tmp_path, photos):
  proc = _predict_cli('--checkpoint=/no/such/workdir', photos[0], timeout=120)
  assert proc.returncode == 2 and 'cannot load /no/such/workdir' in proc.stderr
  proc = _predict_cli('--checkpoint=/no/such/workdir', tmp_path / 'nope.jpg', timeout=120)
  assert proc.returncode == 2 and f'no such image file or folder: {tmp_path / "nope.jpg"}' in (
      proc.stderr)
  proc = _predict_cli(photos[0], timeout=120)
  assert proc.returncode == 2 and '--checkpoint is required' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_checkpoint_of_a_sharded_scanned_run_loads_on_one_device(tmp_path, photos):
  """A run on 2 devices with FSDP-sharded, layer-stacked (scan_layers) params is read in a
  1-device process with the unrolled layout."""
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', '--config=configs/demo.py', f'--workdir={workdir}',
       f'--config.input.data_dir={tmp_path / "tfds"}', '--config.model.num_layers=2',
       '--config.model.scan_layers=True', '--config.mesh.fsdp=2', '--config.min_fsdp_size=1000',
       '--config.batch_size=16', '--config.total_steps=2', '--config.schedule.warmup_steps=1',
       '--config.eval_every=0'],
      cwd=ROOT, env=subprocess_env.cpu_env(devices=2),
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, subprocess_env.failure(proc)
  clf = inference.ImageClassifier.from_pretrained(workdir)
  assert set(clf.params['Transformer']) >= {'encoderblock_0', 'encoderblock_1'}
  assert not clf.config.scan_layers and clf.class_names == [str(i) for i in range(10)]
  probs = clf.predict_proba(photos)
  assert probs.shape == (len(photos), 10)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_timm_weights_of_a_convolutional_family_get_timms_evaluation_preprocessing(tmp_path):
  """A timm ResNet file records no preprocessing: it is fed as timm evaluates it (resize,
  central crop, ImageNet mean/std), not the ViT release's [-1, 1]."""
  model = timm.create_model('resnet50', pretrained=False, num_classes=3, layers=[1, 1, 1, 1])
  from vit_jax import checkpoints  # pylint: disable=import-outside-toplevel
  checkpoints.write_state_dict({k: v.numpy() for k, v in model.state_dict().items()
                                if not k.endswith('num_batches_tracked')},
                               tmp_path / 'r.safetensors')
  clf = inference.ImageClassifier.from_pretrained(tmp_path / 'r.safetensors', model='resnet50')
  assert clf.pp == 'decode|resize_small(256)|central_crop(224)|normalize'
  assert inference.default_pp(224, 'bit') == inference.default_pp(224) == (
      'decode|resize(224)|value_range(-1, 1)')
  photo = np.random.RandomState(0).randint(0, 256, (300, 260, 3), np.uint8)
  pixels = clf.preprocess(photo)
  assert pixels.shape == (1, 224, 224, 3) and pixels.min() < -1.5  # ImageNet-normalised


def test_predict_streams_batches_with_progress_and_skips_unreadable_files(trained_workdir,
                                                                          photos, tmp_path):
  """predict decoded every image into one array before the first forward pass (1 GB for
  1,000 images at 224 px), printed nothing until all were classified and lost every
  result to a late failure. Now one batch at a time, printed as it is done, with
  progress (images/s, time left) on stderr."""
  import io  # pylint: disable=import-outside-toplevel
  from vit_jax import cli_inputs  # pylint: disable=import-outside-toplevel
  clf = inference.ImageClassifier.from_pretrained(trained_workdir, batch_size=3)
  broken = tmp_path / 'broken.png'
  broken.write_bytes(b'not a png')
  paths = [photos[0], photos[1], broken, photos[2], photos[3], photos[0], photos[1]]
  reads, shapes = [], []
  read, logits = clf.read, clf.logits
  clf.read = lambda images: (reads.append(len(images)), read(images))[1]
  clf.logits = lambda pixels: (shapes.append(len(pixels)), logits(pixels))[1]
  emitted, err = [], io.StringIO()
  classified, skipped = cli_inputs.predict_files(
      clf, paths, 2, lambda path, preds: emitted.append((path, preds)), progress_every=0,
      err=err)
  assert (classified, skipped) == (6, 1)
  assert reads == [3, 3, 1] and shapes == [3, 3, 3]  # one batch in memory; one shape
  readable = [p for p in paths if p != broken]
  assert [p for p, _ in emitted] == readable
  expected = read([str(p) for p in readable])[0]
  want = clf.top_k(logits(expected), 2)
  for (_, got), ref in zip(emitted, want):
    assert [g.index for g in got] == [r.index for r in ref]
    np.testing.assert_allclose([g.probability for g in got], [r.probability for r in ref],
                               atol=1e-5)
  lines = err.getvalue().splitlines()
  assert lines[0].startswith(f'vit_jax.predict: skipping {broken}: ')
  assert re.fullmatch(r'vit_jax\.predict: 3/7 images, [\d.]+ images/s, \d+s left', lines[1])
  assert re.fullmatch(r'vit_jax\.predict: 6/7 images, [\d.]+ images/s, \d+s left', lines[2])
  assert len(lines) == 3


def test_image_and_checkpoint_arguments_a_shell_left_alone(tmp_path, photos, monkeypatch,
                                                           capsys):
  """'~' after '=', a quoted glob, a URL and a labels file that is not UTF-8: 'no such
  file', or a UnicodeDecodeError blamed on the checkpoint."""
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  from vit_jax import cli_inputs  # pylint: disable=import-outside-toplevel
  from vit_jax import image_files  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv('HOME', str(photos[0].parent))
  assert image_files.paths_from_args(['~/astronaut.png']) == [photos[0]]
  assert image_files.paths_from_args([str(photos[0].parent / '*.png')]) == sorted(
      p for p in photos if p.suffix == '.png')
  with pytest.raises(ValueError, match=r'images are read from local files: download '
                     r'https://example.com/cat.jpg first'):
    image_files.paths_from_args(['https://example.com/cat.jpg'])
  save_file(_random_timm_model(num_classes=3).state_dict(), str(tmp_path / 'w.safetensors'))
  (tmp_path / 'labels.txt').write_bytes(b'caf\xe9\nb\nc\n')
  for checkpoint, labels, message in (
      ('https://example.com/w.safetensors', None, 'checkpoints are read from local paths or '
                                                  'gs://'),
      (str(tmp_path / 'w.safetensors'), str(tmp_path / 'labels.txt'),
       f'--labels={tmp_path / "labels.txt"}: not UTF-8 text')):
    with pytest.raises(SystemExit) as exit_:
      cli_inputs.images_and_classifier('predict', [str(photos[0])], checkpoint,
                                       model='vit_tiny_patch16_224', labels=labels)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
