"""vit_jax.visualize: attention rollout, class-token maps, position-embedding similarity,
the PNG writers and the command line.

Small random models (ViT-Ti/16 with 2 layers at 32 px: a 2x2 patch grid) built in
process; the CLI runs once in a subprocess on scikit-image photos written as PNG/JPEG.
References are independent numpy re-computations.
"""

import functools
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vit_jax import models
from vit_jax import visualize
from vit_jax.checkpoints import npz

IMG, GRID, HEADS, LAYERS, B = 32, (2, 2), 3, 2, 2


@functools.cache
def small(classifier='token', num_layers=LAYERS):
  module = models.create('ViT-Ti/16', num_layers=num_layers, image_size=IMG, num_classes=5,
                         classifier=classifier)
  return module, models.init_params(module, image_size=IMG)


@functools.cache
def model_attention(classifier='token'):
  module, params = small(classifier)
  images = np.random.default_rng(0).uniform(-1, 1, (B, IMG, IMG, 3)).astype(np.float32)
  return [np.asarray(a) for a in models.attention_maps(module, params, images)]


def random_attention(layers, batch, heads, tokens, seed=0):
  logits = np.random.default_rng(seed).normal(size=(layers, batch, heads, tokens, tokens))
  e = np.exp(logits * 2)
  return e / e.sum(-1, keepdims=True)


def numpy_rollout(attn, residual=True):
  """R = A_L ... A_1 per image with np.linalg.multi_dot; A = rownorm((mean_h + I) / 2)."""
  layers, batch, _, t, _ = attn.shape
  out = []
  for b in range(batch):
    mats = []
    for layer in range(layers):
      a = attn[layer, b].mean(axis=0)
      if residual:
        a = 0.5 * a + 0.5 * np.eye(t)
      mats.append(a / a.sum(axis=1, keepdims=True))
    rev = mats[::-1]
    out.append(rev[0] if len(rev) == 1 else np.linalg.multi_dot(rev))
  return np.stack(out)


# ---------------------------------------------------------------------------------------
# Rollout.

@pytest.mark.parametrize('classifier,tokens', [('token', 5), ('gap', 4)])
@pytest.mark.parametrize('fusion', visualize.HEAD_FUSIONS)
def test_rollout_rows_sum_to_one(classifier, tokens, fusion):
  attn = model_attention(classifier)
  assert attn[0].shape == (B, HEADS, tokens, tokens)
  for residual in (True, False):
    r = visualize.attention_rollout(attn, residual=residual, head_fusion=fusion)
    assert r.shape == (B, tokens, tokens)
    np.testing.assert_allclose(r.sum(-1), 1.0, atol=1e-5)
    assert (r >= 0).all()


def test_one_layer_without_residual_is_the_head_mean():
  attn = model_attention('token')[:1]
  r = visualize.attention_rollout(attn, residual=False)
  np.testing.assert_allclose(r, attn[0].mean(axis=1), atol=1e-6)
  # With the residual: (A + I) / 2, already row-stochastic.
  r = visualize.attention_rollout(attn, residual=True)
  np.testing.assert_allclose(r, (attn[0].mean(axis=1) + np.eye(5)) / 2, atol=1e-6)


@pytest.mark.parametrize('residual', [True, False])
def test_rollout_matches_numpy_three_layers(residual):
  attn = random_attention(3, 2, 4, 7, seed=1)
  want = numpy_rollout(attn, residual=residual)
  got = visualize.attention_rollout(list(attn), residual=residual)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  # Order matters (the matrices do not commute): A_1 A_2 A_3 is something else.
  assert not np.allclose(got, numpy_rollout(attn[::-1], residual=residual))


@pytest.mark.parametrize('classifier', ['token', 'gap'])
def test_rollout_of_a_model_matches_numpy(classifier):
  attn = np.stack(model_attention(classifier))
  np.testing.assert_allclose(visualize.attention_rollout(attn), numpy_rollout(attn),
                             atol=1e-6)


def test_rollout_errors():
  with pytest.raises(ValueError, match='head_fusion'):
    visualize.attention_rollout(random_attention(1, 1, 1, 3), head_fusion='median')
  with pytest.raises(ValueError, match='shape'):
    visualize.attention_rollout(np.ones((2, 3, 3)))


def test_rollout_mask():
  r = visualize.attention_rollout(model_attention('token'))
  np.testing.assert_allclose(visualize.rollout_mask(r, GRID), r[:, 0, 1:].reshape(B, 2, 2))
  r = visualize.attention_rollout(model_attention('gap'))
  np.testing.assert_allclose(visualize.rollout_mask(r, GRID), r.mean(1).reshape(B, 2, 2))
  with pytest.raises(ValueError, match='3x3'):
    visualize.rollout_mask(r, (3, 3))


# ---------------------------------------------------------------------------------------
# Class-token maps and position embeddings.

def test_cls_attention_maps():
  attn = model_attention('token')
  maps = visualize.cls_attention_maps(attn, GRID)
  assert maps.shape == (LAYERS, B, HEADS) + GRID
  for layer in range(LAYERS):
    np.testing.assert_allclose(maps[layer], attn[layer][:, :, 0, 1:].reshape(B, HEADS, 2, 2))
  # Row-major patch order: patch (0, 1) is token 2 (token 0 is the class token).
  np.testing.assert_allclose(maps[1, 0, 2, 0, 1], attn[1][0, 2, 0, 2])
  attn = model_attention('gap')  # no class token: mean over the queries
  maps = visualize.cls_attention_maps(attn, GRID)
  assert maps.shape == (LAYERS, B, HEADS) + GRID
  np.testing.assert_allclose(maps[0], attn[0].mean(axis=2).reshape(B, HEADS, 2, 2),
                             atol=1e-7)


def test_posemb_similarity_of_a_model():
  module, params = small('token')
  pe = visualize.pos_embedding(params)
  assert pe.shape == (1, 5, 192)
  sim = visualize.posemb_similarity(pe, GRID, visualize.num_prefix_tokens(module))
  assert sim.shape == GRID + GRID
  flat = sim.reshape(4, 4)
  np.testing.assert_allclose(np.diag(flat), 1.0, atol=1e-12)
  np.testing.assert_allclose(flat, flat.T, atol=1e-12)
  e = pe[0, 1:] / np.linalg.norm(pe[0, 1:], axis=-1, keepdims=True)
  np.testing.assert_allclose(flat, e @ e.T, atol=1e-6)


def test_posemb_similarity_one_hot_is_identity():
  gh, gw = 3, 4
  pe = np.concatenate([np.full((1, 16), 7.0), 5 * np.eye(12, 16)])  # class token + one-hot
  sim = visualize.posemb_similarity(pe, (gh, gw), num_prefix_tokens=1)
  np.testing.assert_allclose(sim.reshape(12, 12), np.eye(12), atol=1e-12)
  # Tile (i, j) is bright exactly at (i, j).
  assert sim[1, 2, 1, 2] == 1 and sim[1, 2].sum() == 1
  with pytest.raises(ValueError, match='prefix'):
    visualize.posemb_similarity(pe, (gh, gw), num_prefix_tokens=0)


def test_pos_embedding_missing():
  _, params = small('gap')
  params = dict(params)
  params['Transformer'] = {k: v for k, v in params['Transformer'].items()
                           if k != 'posembed_input'}
  with pytest.raises(ValueError, match='no learned position embedding'):
    visualize.pos_embedding(params)


# ---------------------------------------------------------------------------------------
# Rendering.

def test_overlay_is_aligned_and_sized(tmp_path):
  image = np.full((48, 64, 3), 128, np.uint8)
  mask = np.array([[1.0, 0.0], [0.0, 0.0]])  # the top-left token
  overlay, bare = visualize.save_rollout_overlay(image, mask, tmp_path / 'x_rollout.png')
  assert bare == str(tmp_path / 'x_rollout_mask.png')
  o, m = Image.open(overlay), Image.open(bare)
  assert o.size == m.size == (64, 48) and o.mode == 'RGB' and m.mode == 'L'
  m = np.asarray(m)
  assert m[0, 0] == 255 and m[-1, -1] == 0 and m[:24, :32].mean() > 3 * m[24:, 32:].mean()
  o = np.asarray(o).astype(int)
  # jet: top-left (mask 1) red, bottom-right (mask 0) blue.
  assert o[0, 0, 0] > o[0, 0, 2] and o[-1, -1, 2] > o[-1, -1, 0]


@pytest.mark.parametrize('pp, hw, want', [
    ('decode|resize(64)|value_range(-1, 1)', (300, 200), (0, 0, 300, 200)),
    # The shorter side to 64 (300x200 -> 96x64), then the central 64 rows of 96: 16..80.
    ('decode|resize_small(64)|central_crop(64)|value_range(-1, 1)', (300, 200),
     (50, 0, 250, 200)),
    ('decode|resize_small(64)|central_crop(64)', (200, 300), (0, 50, 200, 250)),
    ('decode|resize(256)|central_crop(224)|normalize', (512, 512), (32, 32, 480, 480)),
    ('decode|central_crop(100)|resize(32)', (300, 200), (100, 50, 200, 150)),
    ('decode', (30, 20), (0, 0, 30, 20)),
    # A side of one pixel (it used to give an empty window, and a ValueError that ended
    # the command line's run for every image).
    ('decode|resize(64)', (1, 1), (0, 0, 1, 1)),
    ('decode|resize(64)', (1, 300), (0, 0, 1, 300)),
])
def test_source_window_of_the_geometric_ops(pp, hw, want):
  np.testing.assert_allclose(visualize.source_window(pp, hw), want, atol=0.01)


def test_no_source_window_for_random_or_unknown_geometry():
  assert visualize.source_window('decode|inception_crop(64)', (300, 200)) is None
  assert visualize.source_window('decode|random_resized_crop(64)|flip_lr', (300, 200)) is None


def test_rollout_on_the_original_dims_what_the_model_did_not_see(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
  mask = rng.uniform(size=(4, 4))
  path = visualize.save_rollout_on_original(image, mask, (50, 0, 250, 200),
                                            tmp_path / 'o.png', alpha=0.5, outside=0.25)
  out = np.asarray(Image.open(path), np.float64)
  assert out.shape == image.shape
  for part in (np.s_[:50], np.s_[250:]):   # cut off by the crop: dimmed, no heat
    np.testing.assert_allclose(out[part], np.round(image[part] * 0.25), atol=0.51)
  # Inside: half the image, half the heat map of the mask stretched over the window.
  heat = visualize._colormap('jet')(visualize._normalize(
      visualize._upsample(mask, (200, 200))))[..., :3] * 255
  np.testing.assert_allclose(out[50:250], np.round(0.5 * image[50:250] + 0.5 * heat),
                             atol=0.51)


def test_rollout_on_the_original_with_a_window_of_fractional_edges(tmp_path):
  """A centre crop's window has fractional edges; a mask sized round(bottom - top) was
  one pixel short of the slice round(bottom) - round(top) and failed ("could not be
  broadcast") for most images under resize_small|central_crop."""
  image = np.full((512, 512, 3), 100, np.uint8)
  window = visualize.source_window('decode|resize_small(36)|central_crop(32)', (512, 512))
  top, _, bottom, _ = window
  assert round(bottom - top) < round(bottom) - round(top), window  # the kind that failed
  path = visualize.save_rollout_on_original(image, np.ones((2, 2)), window, tmp_path / 'o.png')
  assert np.asarray(Image.open(path)).shape == image.shape


def test_unique_stems_never_take_another_files_name():
  """a.png, a.jpg, a-2.png: a.jpg was named a-2 and its maps written over a-2.png's."""
  names = [pathlib.Path(n) for n in ('x/a.png', 'y/a.jpg', 'x/a-2.png', 'z/a.gif', 'b.png')]
  stems = visualize.unique_stems(names)
  assert stems == ['a', 'a-3', 'a-2', 'a-4', 'b']
  assert len(set(stems)) == len(stems)


def test_figures(tmp_path):
  maps = visualize.cls_attention_maps(model_attention('token'), GRID)[:, 0]
  p = visualize.save_layer_maps(maps, tmp_path / 'layers.png', title='t')
  assert Image.open(p).size == visualize.layer_maps_size(LAYERS, HEADS, GRID) == (400, 200)
  sim = visualize.posemb_similarity(np.eye(14 * 14, 32)[None], (14, 14), 0)
  p = visualize.save_posemb_grid(sim, tmp_path / 'posemb.png')
  assert Image.open(p).size == visualize.posemb_grid_size((14, 14))


# ---------------------------------------------------------------------------------------
# Command line.

def _cli(*args, cwd):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run([sys.executable, '-m', 'vit_jax.visualize', *map(str, args)],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
  import skimage.data  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp('photos')
  Image.fromarray(skimage.data.astronaut()).save(d / 'astronaut.png')
  (d / 'more').mkdir()
  Image.fromarray(skimage.data.chelsea()).save(d / 'more' / 'chelsea.jpg', quality=90)
  Image.fromarray(skimage.data.astronaut()[:, ::-1]).save(d / 'more' / 'astronaut.jpg')
  return d


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  _, params = small('token')
  path = tmp_path_factory.mktemp('ckpt') / 'tiny.npz'
  npz.save_npz(path, params)
  return path


def test_cli_writes_the_pngs(photos, checkpoint, tmp_path):
  out = tmp_path / 'maps'
  r = _cli(f'--checkpoint={checkpoint}', f'--out={out}', photos / 'astronaut.png',
           photos / 'more', cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  stems = ['astronaut', 'astronaut-2', 'chelsea']  # more/ sorted: astronaut.jpg, chelsea.jpg
  for stem in stems:
    assert Image.open(out / f'{stem}_rollout.png').size == (IMG, IMG)  # the input view
    mask = Image.open(out / f'{stem}_rollout_mask.png')
    assert mask.size == (IMG, IMG) and mask.mode == 'L'
    assert (Image.open(out / f'{stem}_attention_layers.png').size
            == visualize.layer_maps_size(LAYERS, HEADS, GRID))
    assert f'{out / stem}_rollout.png' in r.stdout
    assert f'{out / stem}_rollout_original.png' in r.stdout
  for stem, photo in (('astronaut', 'astronaut.png'), ('chelsea', 'more/chelsea.jpg')):
    assert (Image.open(out / f'{stem}_rollout_original.png').size
            == Image.open(photos / photo).size)   # the original's own size
  assert (Image.open(out / 'posemb_similarity.png').size
          == visualize.posemb_grid_size(GRID))
  assert sorted(p.name for p in out.iterdir()) == sorted(
      [f'{s}_{k}.png' for s in stems
       for k in ('rollout', 'rollout_mask', 'rollout_original', 'attention_layers')]
      + ['posemb_similarity.png'])
  tops = [line for line in r.stdout.splitlines() if ': top-1 ' in line]
  assert len(tops) == 3 and tops[0].startswith(str(photos / 'astronaut.png'))
  # The overlay blends the photo: the astronaut's white suit shows through.
  overlay = np.asarray(Image.open(out / 'astronaut_rollout.png'), np.float64)
  view = np.asarray(Image.open(photos / 'astronaut.png').resize((IMG, IMG)), np.float64)
  assert np.corrcoef(overlay.mean(-1).ravel(), view.mean(-1).ravel())[0, 1] > 0.3


def test_cli_errors(photos, checkpoint, tmp_path):
  r = _cli(f'--checkpoint={checkpoint}', tmp_path / 'nope.jpg', cwd=tmp_path)
  assert r.returncode == 2 and 'no such image file or folder' in r.stderr
  assert 'nope.jpg' in r.stderr and 'Traceback' not in r.stderr
  r = _cli(f'--checkpoint={tmp_path / "missing.npz"}', photos / 'astronaut.png',
           cwd=tmp_path)
  assert r.returncode == 2 and 'no such checkpoint' in r.stderr
  r = _cli(photos / 'astronaut.png', cwd=tmp_path)
  assert r.returncode == 2 and '--checkpoint is required' in r.stderr
  assert not (tmp_path / 'attention_maps').exists()
  # An unreadable file among readable ones is named and skipped; the others are drawn.
  (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8\xff' + b'\0' * 40)
  r = _cli(f'--checkpoint={checkpoint}', f'--out={tmp_path / "m"}', tmp_path / 'broken.jpg',
           photos / 'astronaut.png', cwd=tmp_path)
  assert r.returncode == 1 and f'skipping {tmp_path / "broken.jpg"}: ' in r.stderr, r.stderr
  assert (tmp_path / 'm' / 'astronaut_rollout.png').exists()
  assert not list((tmp_path / 'm').glob('broken*'))
  # --out naming a file: one line, not a FileExistsError traceback.
  (tmp_path / 'afile').write_text('x')
  r = _cli(f'--checkpoint={checkpoint}', f'--out={tmp_path / "afile"}',
           photos / 'astronaut.png', cwd=tmp_path)
  assert r.returncode == 2 and 'afile is a file: give a folder' in r.stderr, r.stderr
  assert 'Traceback' not in r.stderr
  # A 1x1 image is drawn with the others.
  Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(tmp_path / 'dot.png')
  r = _cli(f'--checkpoint={checkpoint}', f'--out={tmp_path / "d"}', tmp_path / 'dot.png',
           photos / 'astronaut.png', cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  assert (Image.open(tmp_path / 'd' / 'dot_rollout_original.png').size == (1, 1))
  assert (tmp_path / 'd' / 'astronaut_rollout_original.png').exists()


_COUNTING_READS = """
import runpy, sys
from vit_jax import inference
read = inference.ImageClassifier.read
def counted(self, images):
  images = list(images)
  print('READ', len(images), file=sys.stderr, flush=True)
  return read(self, images)
inference.ImageClassifier.read = counted
sys.argv = ['vit_jax.visualize'] + sys.argv[1:]
runpy.run_module('vit_jax.visualize', run_name='__main__', alter_sys=True)
"""


def test_cli_reads_and_draws_a_batch_at_a_time(photos, checkpoint, tmp_path):
  """It decoded every image into memory before drawing the first (and lost everything to a
  late failure); now one batch is read, drawn and written at a time."""
  (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8\xff' + b'\0' * 40)
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  out = tmp_path / 'm'
  r = subprocess.run(
      [sys.executable, '-c', _COUNTING_READS, f'--checkpoint={checkpoint}', f'--out={out}',
       '--batch_size=2', str(photos / 'astronaut.png'), str(tmp_path / 'broken.jpg'),
       str(photos / 'more')], cwd=tmp_path, env=env, capture_output=True, text=True,
      timeout=300)
  assert r.returncode == 1, r.stderr  # a skipped image
  reads = [int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith('READ')]
  assert reads == [2, 2], r.stderr  # 4 images, 2 at a time
  assert f'skipping {tmp_path / "broken.jpg"}' in r.stderr
  tops = [line for line in r.stdout.splitlines() if ': top-1 ' in line]
  assert len(tops) == 3
  for stem in ('astronaut', 'astronaut-2', 'chelsea'):
    assert (out / f'{stem}_rollout.png').exists() and (out / f'{stem}_rollout_original.png').exists()
  # None readable: one line, status 2, no folder made.
  r = _cli(f'--checkpoint={checkpoint}', f'--out={tmp_path / "none"}', tmp_path / 'broken.jpg',
           cwd=tmp_path)
  assert r.returncode == 2 and 'none of the 1 images could be read' in r.stderr, r.stderr
  assert not (tmp_path / 'none').exists()


def test_cli_checkpoint_without_position_embedding(photos, tmp_path):
  _, params = small('token')
  params = dict(params)
  params['Transformer'] = {k: v for k, v in params['Transformer'].items()
                           if k != 'posembed_input'}
  npz.save_npz(tmp_path / 'no_posemb.npz', params)
  r = _cli(f'--checkpoint={tmp_path / "no_posemb.npz"}', photos / 'astronaut.png',
           cwd=tmp_path)
  assert r.returncode == 2, r.stderr
  assert 'cannot load' in r.stderr and 'pos_embedding' in r.stderr
  assert 'Traceback' not in r.stderr


def test_cli_refuses_a_convolutional_model_by_its_family(photos, tmp_path):
  """A ResNet was refused for having "no learned position embedding"."""
  torch = pytest.importorskip('torch')  # noqa: F841
  timm = pytest.importorskip('timm')
  model = timm.create_model('resnet50', pretrained=False, num_classes=3, layers=[1, 1, 1, 1])
  from vit_jax import checkpoints  # pylint: disable=import-outside-toplevel
  checkpoints.write_state_dict({k: v.numpy() for k, v in model.state_dict().items()
                                if not k.endswith('num_batches_tracked')},
                               tmp_path / 'r.safetensors')
  r = _cli(f'--checkpoint={tmp_path / "r.safetensors"}', '--model=resnet50',
           photos / 'astronaut.png', cwd=tmp_path)
  assert r.returncode == 2 and 'is a resnet model: attention maps' in r.stderr, r.stderr


def test_cli_expands_home_skips_its_own_pngs_and_names_an_unwritable_out(photos, checkpoint,
                                                                          tmp_path):
  """'--out=~/maps' made a folder named '~' here (no shell expands '~' after '='); a
  second run with --out inside the image folder drew maps of its own maps; an --out it
  cannot write in was a traceback at the first PNG, after the model ran."""
  home = tmp_path / 'home'
  (home / 'imgs').mkdir(parents=True)
  Image.open(photos / 'astronaut.png').save(home / 'imgs' / 'astronaut.png')
  env_home = dict(os.environ, HOME=str(home))
  def run(*args):
    return subprocess.run([sys.executable, '-m', 'vit_jax.visualize', *map(str, args)],
                          cwd=tmp_path, env=dict(env_home, JAX_PLATFORMS='cpu',
                                                 TF_CPP_MIN_LOG_LEVEL='2'),
                          capture_output=True, text=True, timeout=300)
  for _ in range(2):
    r = run(f'--checkpoint={checkpoint}', '--out=~/imgs/maps', '~/imgs')
    assert r.returncode == 0, r.stderr[-2000:]
  assert not (tmp_path / '~').exists()
  assert (home / 'imgs' / 'maps' / 'astronaut_rollout.png').exists()
  assert "(not drawn: 5 of this tool's own PNGs in --out=" in r.stderr, r.stderr[-2000:]
  assert sorted(p.name for p in (home / 'imgs' / 'maps').iterdir()) == [  # 4 and the posemb
      'astronaut_attention_layers.png', 'astronaut_rollout.png', 'astronaut_rollout_mask.png',
      'astronaut_rollout_original.png', 'posemb_similarity.png']
  r = run(f'--checkpoint={checkpoint}', '--out=/proc/maps', photos / 'astronaut.png')
  assert r.returncode == 2, r.stderr[-2000:]
  assert '--out=/proc/maps: cannot create the folder or write in it' in r.stderr
  assert 'Traceback' not in r.stderr
