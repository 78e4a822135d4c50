"""Per-example preprocessing ops against independent references (PIL, numpy, torchvision).

Real photographs from scikit-image (astronaut 512x512, chelsea 300x451, coffee 400x600)
are written as files and decoded by the ops, eagerly and inside tf.data (graph mode).
Tolerances found here:
  decode vs PIL's convert('RGB'): exact for PNG / GIF / BMP / palette / RGBA / LA /
    grayscale, and for JPEG (RGB, grayscale, CMYK) with the accurate integer IDCT.
  resize (antialias) vs PIL resize, rounded to uint8: bilinear mean abs diff < 0.25
    (found 0.08-0.22), max 1; bicubic mean < 0.25, >= 99% within 1 (PIL rounds and clips
    its first, horizontal pass to uint8, so overshooting edge pixels differ by up to ~14).
  JPEG window-only decode vs full decode + crop: mean abs diff < 0.05 (found 0.001-0.01),
    > 99% of values within 1 (libjpeg's cropped decode differs along the window edges).
  random_resized_crop vs torchvision's resized_crop on the same window, rounded: mean
    abs diff < 0.25 (found ~0.17), max 1 (a few more at the edges of a JPEG window).
  central_crop, flip_lr, value_range: exact; normalize: 1e-6.
"""

import io
import sys

import numpy as np
import pytest

# torchvision imports torch._dynamo, which imports triton, and importing triton after
# TensorFlow segfaults (their bundled LLVMs clash; triton 3.8, TF 2.21). So torchvision is
# imported before TensorFlow, and if TensorFlow is loaded already triton is hidden from
# torch (nothing here needs it).
if 'tensorflow' in sys.modules and 'triton' not in sys.modules:
  sys.modules['triton'] = None
try:
  import torch
  from torchvision import transforms as tv_transforms
  from torchvision.transforms import functional as tvf
except ImportError:
  torch = tv_transforms = tvf = None

import tensorflow as tf  # pylint: disable=g-import-not-at-top,g-bad-import-order
from PIL import Image  # pylint: disable=g-bad-import-order

from vit_jax.data import preprocess_ops as pp
from vit_jax.data import traced

skimage_data = pytest.importorskip('skimage.data')

RNG = (12, 34)


@pytest.fixture(scope='module')
def photos():
  return {'astronaut': skimage_data.astronaut(), 'chelsea': skimage_data.chelsea(),
          'coffee': skimage_data.coffee()}


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt, **kwargs)
  return buf.getvalue()


def _write(tmp_path, name, data: bytes) -> bytes:
  """Writes the file and reads it back (the ops see what a dataset on disk holds)."""
  path = tmp_path / name
  path.write_bytes(data)
  return path.read_bytes()


def _example(image, rng=RNG, label=0):
  return {'image': tf.constant(image), 'label': tf.constant(label, tf.int64),
          'rng': tf.constant(rng, tf.int64)}


def _run(spec_or_op, example):
  fn = pp.parse(spec_or_op) if isinstance(spec_or_op, str) else spec_or_op
  return {k: v.numpy() for k, v in fn(example).items()}


def _graph_run(spec, examples, autograph=True, **constants):
  """Runs `spec` with tf.data (graph mode) over a list of example dicts; `constants`
  are added to every example (inside the graph). autograph=False: traced as the
  training pipeline maps it (`traced.without_autograph`)."""
  ds = tf.data.Dataset.from_tensor_slices(
      {k: np.stack([e[k] for e in examples]) for k in examples[0]})
  constants = {k: tf.constant(v) for k, v in constants.items()}
  ds = ds.map(lambda e: dict(e, **constants))
  fn = pp.parse(spec)
  ds = ds.map(fn if autograph else traced.without_autograph(fn), num_parallel_calls=2,
              deterministic=True)
  return [{k: v.numpy() for k, v in e.items()} for e in ds]


# ----------------------------------------------------------------------------------------
# decode

def _formats(rgb: np.ndarray):
  im = Image.fromarray(rgb)
  alpha = np.random.RandomState(0).randint(0, 256, rgb.shape[:2], dtype=np.uint8)
  rgba = Image.fromarray(np.dstack([rgb, alpha]))
  return {
      'png': _encode(im, 'PNG'),
      'jpeg': _encode(im, 'JPEG', quality=90),
      'grey_png': _encode(im.convert('L'), 'PNG'),
      'grey_jpeg': _encode(im.convert('L'), 'JPEG'),
      'rgba_png': _encode(rgba, 'PNG'),
      'la_png': _encode(rgba.convert('LA'), 'PNG'),
      'palette_png': _encode(im.convert('P'), 'PNG'),
      'palette_png_transparent': _encode(im.convert('P'), 'PNG', transparency=0),
      'gif': _encode(im.convert('P'), 'GIF'),
      'bmp': _encode(im, 'BMP'),
      'rgba_bmp': _encode(rgba, 'BMP'),
      'cmyk_jpeg': _encode(im.convert('CMYK'), 'JPEG', quality=95),
      'webp': _encode(im, 'WEBP', quality=90),
      'lossless_webp': _encode(im, 'WEBP', lossless=True),
      'rgba_lossless_webp': _encode(rgba, 'WEBP', lossless=True),
      'rgba_webp': _encode(rgba, 'WEBP', quality=90),
      'grey_webp': _encode(im.convert('L'), 'WEBP', lossless=True),
  }


@pytest.mark.parametrize('fmt', ['png', 'jpeg', 'grey_png', 'grey_jpeg', 'rgba_png',
                                 'la_png', 'palette_png', 'palette_png_transparent',
                                 'gif', 'bmp', 'rgba_bmp', 'cmyk_jpeg', 'webp',
                                 'lossless_webp', 'rgba_lossless_webp', 'rgba_webp',
                                 'grey_webp'])
def test_decode_matches_pil(photos, tmp_path, fmt):
  data = _write(tmp_path, f'image.{fmt}', _formats(photos['chelsea'])[fmt])
  ref = np.array(Image.open(io.BytesIO(data)).convert('RGB')).astype(np.int32)
  out = _run('decode', _example(data))['image']
  assert out.dtype == np.uint8 and out.shape == ref.shape
  diff = np.abs(out.astype(np.int32) - ref)
  if 'jpeg' in fmt:
    # Exact with the accurate integer IDCT (found here, CMYK included); a small margin
    # for a different libjpeg-turbo build. (TF's default fast IDCT: mean ~1, max ~6.)
    assert diff.mean() < 0.1 and diff.max() <= 2
  elif fmt in ('webp', 'rgba_webp'):
    # Lossy WebP: PIL's libwebp and TensorFlow's may upsample the chroma differently.
    assert diff.mean() < 1 and diff.max() <= 8
  else:
    assert diff.max() == 0


def test_decode_animated_webp_first_frame_or_a_clear_error(tmp_path):
  """WebP was not read at all (TensorFlow's decoder refuses channels=3 for a file with
  alpha). An animation with alpha gives its first frame; one without alpha, which
  TensorFlow cannot decode (channels=0 corrupted the heap and killed the process), is
  refused with a message that says what to do."""
  frames = [np.dstack([np.full((8, 10, 3), v, np.uint8), np.full((8, 10), 128, np.uint8)])
            for v in (10, 200)]
  buf = io.BytesIO()
  Image.fromarray(frames[0]).save(buf, 'WEBP', save_all=True, lossless=True,
                                  append_images=[Image.fromarray(f) for f in frames[1:]])
  out = _run('decode', _example(_write(tmp_path, 'anim.webp', buf.getvalue())))['image']
  np.testing.assert_array_equal(out, frames[0][..., :3])
  buf = io.BytesIO()
  rgb = [Image.fromarray(f[..., :3]) for f in frames]
  rgb[0].save(buf, 'WEBP', save_all=True, append_images=rgb[1:])
  with pytest.raises(tf.errors.InvalidArgumentError, match='animated WebP without alpha'):
    _run('decode', _example(_write(tmp_path, 'anim_rgb.webp', buf.getvalue())))
  for crop in ('inception_crop(4)', 'central_crop(4)'):  # the window-only path too
    with pytest.raises(tf.errors.InvalidArgumentError, match='animated WebP without alpha'):
      _run(f'decode|{crop}' if crop.startswith('central') else crop,
           _example(buf.getvalue()))


def test_decode_a_webp_whose_alpha_is_not_flagged(photos):
  """libwebp counts an ALPH chunk as alpha even with the VP8X flag clear, and TensorFlow
  refused channels=3 for it ('Number of channels requested does not match input')."""
  rgba = np.dstack([photos['coffee'][:16, :20],
                    np.full((16, 20), 100, np.uint8)])
  data = bytearray(_encode(Image.fromarray(rgba), 'WEBP', quality=90))
  assert data[12:16] == b'VP8X' and data[20] & 0x10
  data[20] &= ~0x10  # the flag cleared, the ALPH chunk kept
  ref = np.array(Image.open(io.BytesIO(bytes(data))).convert('RGB')).astype(np.int32)
  decode = pp.parse('decode')
  graph = tf.function(lambda x: decode({'image': x})['image'])  # (numpy's bytes arrays,
  for out in (_run('decode', _example(bytes(data)))['image'],  # _graph_run's, drop a
              graph(tf.constant(bytes(data))).numpy()):  # trailing NUL of the file)
    assert out.shape == ref.shape and np.abs(out.astype(np.int32) - ref).max() <= 8


def test_decode_animated_gif_first_frame(tmp_path):
  frames = [Image.fromarray(np.full((8, 10, 3), v, np.uint8)) for v in (10, 200)]
  buf = io.BytesIO()
  frames[0].save(buf, 'GIF', save_all=True, append_images=frames[1:])
  out = _run('decode', _example(_write(tmp_path, 'anim.gif', buf.getvalue())))['image']
  assert out.shape == (8, 10, 3)
  np.testing.assert_array_equal(
      out, np.array(Image.open(io.BytesIO(buf.getvalue())).convert('RGB')))


def test_decode_in_graph_mode_and_grey_and_decoded(photos):
  data = _formats(photos['coffee'])
  out = _graph_run('decode', [{'image': data['png']}])
  np.testing.assert_array_equal(out[0]['image'], photos['coffee'])
  grey = _run('decode(channels=1)', _example(data['png']))['image']
  ref = np.array(Image.fromarray(photos['coffee']).convert('L'))
  assert grey.shape == ref.shape + (1,)
  assert np.abs(grey[..., 0] - ref.astype(int)).max() <= 1
  # Already decoded: 1 channel repeated, alpha dropped.
  one = photos['coffee'][..., :1]
  np.testing.assert_array_equal(_run('decode', _example(one))['image'],
                                np.repeat(one, 3, axis=-1))
  four = np.dstack([photos['coffee'], photos['coffee'][..., :1]])
  np.testing.assert_array_equal(_run('decode', _example(four))['image'], photos['coffee'])


# ----------------------------------------------------------------------------------------
# resize, resize_small, central_crop, flip, value_range, normalize

@pytest.mark.parametrize('method', ['bilinear', 'bicubic'])
@pytest.mark.parametrize('name,size', [('chelsea', (224, 224)), ('astronaut', (150, 200)),
                                       ('coffee', (97, 131)), ('chelsea', (400, 500))])
def test_resize_matches_pil(photos, method, name, size):
  image = photos[name]
  pil_method = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}[method]
  ref = np.array(Image.fromarray(image).resize(size[::-1], pil_method)).astype(np.float64)
  out = _run(f'resize({size}, method={method!r})', _example(image))['image']
  assert out.dtype == np.float32 and out.shape == size + (3,)
  diff = np.abs(np.clip(np.round(out), 0, 255) - ref)
  assert diff.mean() < 0.25
  if method == 'bilinear':
    assert diff.max() <= 1
  else:
    assert np.mean(diff <= 1) > 0.99


def test_bilinear_resize_antialiases_only_when_it_shrinks(photos):
  """An enlargement takes the plain bilinear kernel (2.5x faster), which gives the
  antialiased kernel's pixels; any shrunk axis keeps the antialiased one. Checked eagerly
  and in tf.data without AutoGraph, as training maps it, against tf.image.resize with
  antialias=True."""
  image = photos['chelsea']  # 300 x 451
  for size in [(600, 700), (300, 451), (150, 200), (400, 224), (32, 900)]:
    ref = tf.image.resize(image, size, antialias=True).numpy()
    out = _run(f'resize({size})', _example(image))['image']
    assert out.shape == size + (3,)
    np.testing.assert_allclose(out, ref, atol=1e-3, err_msg=str(size))
    (graph,) = _graph_run(f'resize({size})', [_example(image)], autograph=False)
    np.testing.assert_allclose(graph['image'], ref, atol=1e-3, err_msg=str(size))
  tiny = np.random.RandomState(0).randint(0, 256, (32, 32, 3)).astype(np.uint8)
  out = _run('resize(224)', _example(tiny))['image']
  plain = tf.image.resize(tiny, (224, 224), antialias=False).numpy()
  np.testing.assert_array_equal(out, plain)  # the fast kernel, bit for bit


needs_torchvision = pytest.mark.skipif(tvf is None, reason='needs torchvision')


@needs_torchvision
def test_resize_small_matches_torchvision_size_and_pil_pixels(photos):
  for name in ('chelsea', 'coffee'):
    for image in (photos[name], photos[name].transpose(1, 0, 2)):   # wide and tall
      pil = Image.fromarray(image)
      ref = tvf.resize(pil, 256, interpolation=tvf.InterpolationMode.BILINEAR)
      out = _run('resize_small(256)', _example(image))['image']
      assert out.shape[:2] == (ref.height, ref.width)
      assert min(out.shape[:2]) == 256
      assert np.abs(np.round(out) - np.array(ref)).mean() < 0.25


def test_central_crop_flip_value_range_normalize_exact(photos):
  image = photos['chelsea']   # 300 x 451: odd difference in width
  out = _run('central_crop(224)', _example(image))['image']
  np.testing.assert_array_equal(out, image[38:262, 113:337])
  out = _run('central_crop((101, 50))', _example(image))['image']
  np.testing.assert_array_equal(out, image[99:200, 200:250])
  with pytest.raises(tf.errors.InvalidArgumentError, match='smaller than 400'):
    _run('central_crop(400)', _example(image))

  x = image.astype(np.float32)
  out = _run('value_range(-1, 1)', _example(image))['image']
  np.testing.assert_array_equal(out, x * np.float32(2 / 255) + np.float32(-1))
  ends = _run('value_range(-1, 1)', _example(np.array([[[0, 128, 255]]], np.uint8)))
  np.testing.assert_allclose(ends['image'], [[[-1, 1 / 255, 1]]], atol=1e-6)
  out = _run('value_range(0, 1, 10, 20)', _example(x))['image']
  np.testing.assert_allclose(out, (x - 10) / 10, rtol=1e-6, atol=1e-6)
  out = _run('normalize', _example(image))['image']
  ref = (x / 255 - np.array(pp.IMAGENET_MEAN)) / np.array(pp.IMAGENET_STD)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  out = _run('normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))', _example(image))['image']
  np.testing.assert_allclose(out, x / 127.5 - 1, atol=1e-6)


def test_flip_lr(photos):
  image = photos['coffee'][::8, ::8]
  outs = [_run('flip_lr', _example(image, rng=(s, 0)))['image'] for s in range(40)]
  flipped = [bool(np.array_equal(o, image[:, ::-1])) for o in outs]
  assert all(f or np.array_equal(o, image) for f, o in zip(flipped, outs))
  assert 8 <= sum(flipped) <= 32
  for s in range(10):
    np.testing.assert_array_equal(_run('flip_lr(p=0)', _example(image, (s, 1)))['image'],
                                  image)
    np.testing.assert_array_equal(_run('flip_lr(1.0)', _example(image, (s, 1)))['image'],
                                  image[:, ::-1])


# ----------------------------------------------------------------------------------------
# inception_crop and random_resized_crop

def _coordinate_image(height, width):
  """float32 HxWx3: channel 0 = row, channel 1 = column, channel 2 = 0."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  return np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.float32)


def _recover_window(out, size):
  """(top, left, h, w) from a bilinear (no antialias) resize of a coordinate image.

  Output pixel i samples top + (i + 0.5) h / size - 0.5, so when h >= size the first
  and last rows read first = top + (h / size - 1) / 2, last = top + h - 1 - (same).
  """
  def axis(first, last):
    n = (last - first) * size / (size - 1)
    return first - (n / size - 1) / 2, n
  top, h = axis(out[0, 0, 0], out[-1, 0, 0])
  left, w = axis(out[0, 0, 1], out[0, -1, 1])
  window = np.array([top, left, h, w])
  np.testing.assert_allclose(window, np.round(window), atol=0.02)
  return np.round(window).astype(int)


@pytest.mark.parametrize('kwargs,area,aspect', [
    ('', (0.05, 1.0), (3 / 4, 4 / 3)),
    (', area_min=30, area_max=60, min_aspect=1/2, max_aspect=1', (0.3, 0.6), (0.5, 1.0)),
])
def test_inception_crop_window_statistics(kwargs, area, aspect):
  height, width, size = 256, 320, 16
  image = _coordinate_image(height, width)
  examples = [{'rng': np.array([s, 99], np.int64)} for s in range(100)]
  outs = _graph_run(f'inception_crop({size}{kwargs}, antialias=False)', examples,
                    image=image)
  windows = np.array([_recover_window(o['image'], size) for o in outs])
  top, left, h, w = windows.T
  assert all(o['image'].shape == (size, size, 3) for o in outs)
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  frac = h * w / (height * width)
  assert (frac >= area[0] - 1e-6).all() and (frac <= area[1] + 1e-6).all()
  # The width is rounded to whole pixels: aspect within the range up to 0.5 / h.
  ratio = w / h
  assert (ratio >= aspect[0] - 0.5 / h - 1e-6).all()
  assert (ratio <= aspect[1] + 0.5 / h + 1e-6).all()
  assert len({tuple(x) for x in windows}) > 90     # different seeds, different crops
  assert frac.max() - frac.min() > (area[1] - area[0]) / 2


def test_inception_crop_jpeg_window_decode_equals_full_decode(photos, tmp_path):
  image = photos['astronaut']
  jpeg = _write(tmp_path, 'a.jpg', _encode(Image.fromarray(image), 'JPEG', quality=90))
  png = _write(tmp_path, 'a.png', _encode(Image.fromarray(image), 'PNG'))
  for s in range(8):
    ex = _example(jpeg, rng=(s, 5))
    window_only = _run(pp.inception_crop(224), ex)
    full = _run(lambda e: pp.inception_crop(224)(pp.decode()(e)), ex)
    assert window_only['image'].shape == (224, 224, 3)
    # libjpeg's cropped decode differs from the full decode only along the window's
    # edges (chroma upsampling): mean abs diff ~0.001-0.01, > 99% within 1 (max ~10).
    diff = np.abs(window_only['image'] - full['image'])
    assert diff.mean() < 0.05 and np.mean(diff < 1) > 0.99
    np.testing.assert_array_equal(window_only['rng'], full['rng'])
    # parse() fuses 'decode|inception_crop' into the window-only path.
    fused = _run('decode|inception_crop(224)', ex)
    np.testing.assert_array_equal(fused['image'], window_only['image'])
    # Encoded PNG: decoded in full, then the same crop as the decoded image.
    from_png = _run('inception_crop(224)', _example(png, rng=(s, 5)))['image']
    from_array = _run('inception_crop(224)', _example(image, rng=(s, 5)))['image']
    np.testing.assert_array_equal(from_png, from_array)
    assert np.abs(from_png - full['image']).mean() < 3   # PNG vs JPEG (quality 90) pixels


@needs_torchvision
def test_random_resized_crop_window_matches_torchvision_statistics():
  stats = pytest.importorskip('scipy.stats')
  height, width, n = 300, 451, 400
  windows = tf.stack([tf.stack(pp.random_resized_crop_window(
      tf.constant([height, width, 3]), tf.constant([s, 3], tf.int64))) for s in range(n)])
  top, left, h, w = windows.numpy().T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  torch.manual_seed(0)
  ref = np.array([tv_transforms.RandomResizedCrop.get_params(
      torch.empty(3, height, width), (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)])
  for ours, theirs in [(h * w, ref[:, 2] * ref[:, 3]),
                       (np.log(w / h), np.log(ref[:, 3] / ref[:, 2])),
                       (top / (height - h + 1), ref[:, 0] / (height - ref[:, 2] + 1))]:
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3

  # No draw fits a 20 x 400 image at scale >= 0.99: torchvision's central fallback.
  tall = pp.random_resized_crop_window(tf.constant([20, 400, 3]),
                                       tf.constant([1, 2], tf.int64), scale=(0.99, 1.0))
  ref = tv_transforms.RandomResizedCrop.get_params(torch.empty(3, 20, 400), (0.99, 1.0),
                                                (3 / 4, 4 / 3))
  assert [int(v) for v in tall] == list(ref)


@needs_torchvision
def test_random_resized_crop_pixels_match_torchvision(photos, tmp_path):
  image = photos['coffee']
  jpeg = _write(tmp_path, 'c.jpg', _encode(Image.fromarray(image), 'JPEG', quality=95))
  decoded = np.array(Image.open(io.BytesIO(jpeg)).convert('RGB'))
  for s in range(4):
    ex = _example(jpeg, rng=(s, 8))
    out = _run('decode|random_resized_crop(224)', ex)['image']
    seed = tf.random.experimental.stateless_split(ex['rng'], 2)[0]
    window = pp.random_resized_crop_window(tf.shape(decoded), seed)
    top, left, h, w = [int(v) for v in window]
    ref = tvf.resized_crop(Image.fromarray(decoded), top, left, h, w, [224, 224],
                           interpolation=tvf.InterpolationMode.BILINEAR)
    diff = np.abs(np.round(out) - np.array(ref))   # (JPEG window edges: a few > 1)
    assert diff.mean() < 0.25 and np.mean(diff <= 1) > 0.999


# ----------------------------------------------------------------------------------------
# determinism

TRAIN_SPEC = ('decode|inception_crop(64)|flip_lr|randaugment(2, 15)|value_range(-1, 1)'
              '|onehot(10, label_smoothing=0.1)')


def test_determinism_eager_and_tf_data(photos, tmp_path):
  jpeg = _write(tmp_path, 'c.jpg', _encode(Image.fromarray(photos['chelsea']), 'JPEG'))
  examples = [{'image': jpeg, 'label': np.int64(s % 10),
               'rng': np.array([s, 1], np.int64)} for s in range(6)]
  eager = [_run(TRAIN_SPEC, {k: tf.constant(v) for k, v in e.items()}) for e in examples]
  again = [_run(TRAIN_SPEC, {k: tf.constant(v) for k, v in e.items()}) for e in examples]
  graph = _graph_run(TRAIN_SPEC, examples)
  for a, b, c in zip(eager, again, graph):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
      np.testing.assert_array_equal(a[k], c[k])
  for i in range(1, len(eager)):
    assert not np.array_equal(eager[0]['image'], eager[i]['image'])
  # The rng advances once per random op (inception_crop, flip_lr, randaugment).
  seed = tf.constant([0, 1], tf.int64)
  for _ in range(3):
    seed = tf.random.experimental.stateless_split(seed, 2)[1]
  np.testing.assert_array_equal(eager[0]['rng'], seed.numpy())


# Every registered op at least once, in an order where each gets the input it expects;
# `decode` is not followed by a crop, which `parse` would let crop the encoded image.
EVERY_OP_SPEC = ('decode|flip_lr(0.5)|inception_crop(96)|random_resized_crop(80)|'
                 'randaugment(2, 15)|resize_small(72)|central_crop(64)|resize((48, 40))|'
                 'value_range(-1, 1)|normalize|onehot(10, label_smoothing=0.1)|'
                 'keep("image", "label", "rng")|drop("rng")')


def test_every_op_spec_names_every_registered_op():
  assert {pp._parse_call(p, EVERY_OP_SPEC)[0]  # pylint: disable=protected-access
          for p in EVERY_OP_SPEC.split('|')} == set(pp.registered())


@pytest.mark.parametrize('spec,fmt,shape', [
    (EVERY_OP_SPEC, 'PNG', (48, 40, 3)),
    # The crops on the encoded JPEG (`decode` fused into them: window-only decoding).
    ('decode|inception_crop(40)|value_range(-1, 1)|onehot(10)', 'JPEG', (40, 40, 3)),
    ('decode|random_resized_crop(40)|value_range(-1, 1)|onehot(10)', 'JPEG', (40, 40, 3)),
])
def test_ops_traced_without_autograph_give_their_eager_results(photos, tmp_path, spec, fmt,
                                                                shape):
  """The pipelines map ops without AutoGraph (vit_jax/data/traced.py): an op that
  branched on a tensor with a Python `if` would fail to trace, or differ, here."""
  data = _write(tmp_path, f'a.{fmt.lower()}',
                _encode(Image.fromarray(photos['astronaut']), fmt))
  examples = [{'image': data, 'label': np.int64(s), 'rng': np.array([s, 7], np.int64)}
              for s in range(8)]
  eager = [_run(spec, {k: tf.constant(v) for k, v in e.items()}) for e in examples]
  traced_results = _graph_run(spec, examples, autograph=False)
  for e, t in zip(eager, traced_results):
    assert e.keys() == t.keys() and {'image', 'label'} <= e.keys()
    for k in e:
      np.testing.assert_array_equal(t[k], e[k], err_msg=k)
  assert eager[0]['image'].shape == shape
  assert len({e['image'].tobytes() for e in eager}) == len(eager)  # random ops differ


def test_missing_rng_or_decode_is_a_clear_error(photos):
  with pytest.raises(ValueError, match="flip_lr.*needs example\\['rng'\\]"):
    pp.parse('flip_lr')({'image': tf.constant(photos['chelsea'])})
  with pytest.raises(ValueError, match="'resize_small' needs a decoded image"):
    pp.parse('resize_small(256)')({'image': tf.constant(b'not decoded')})


# ----------------------------------------------------------------------------------------
# onehot, keep, drop

def test_onehot_and_label_smoothing():
  out = _run('onehot(5)', _example(np.zeros((2, 2, 3), np.uint8), label=3))['label']
  np.testing.assert_array_equal(out, [0, 0, 0, 1, 0])
  out = _run('onehot(5, label_smoothing=0.1)', _example(np.zeros((1, 1, 3)), label=0))
  np.testing.assert_allclose(out['label'], [0.92, 0.02, 0.02, 0.02, 0.02], atol=1e-7)
  assert abs(out['label'].sum() - 1) < 1e-6
  multi = {'label': tf.constant([1, 3, 3], tf.int64)}
  np.testing.assert_array_equal(_run('onehot(5)', multi)['label'], [0, 1, 0, 1, 0])
  np.testing.assert_allclose(_run('onehot(4, label_smoothing=0.2)', multi)['label'],
                             [0.05, 0.85, 0.05, 0.85], atol=1e-7)
  out = _run('onehot(3, multi=True)', {'label': tf.constant(2, tf.int64)})
  np.testing.assert_array_equal(out['label'], [0, 0, 1])
  np.testing.assert_array_equal(
      _run('onehot(3)', {'label': tf.zeros([0], tf.int64)})['label'], [0, 0, 0])
  out = _run('onehot(3, key="y")', {'y': tf.constant(1), 'label': tf.constant(7)})
  np.testing.assert_array_equal(out['y'], [0, 1, 0])
  assert out['label'] == 7


@pytest.mark.parametrize('label', [12, -1])
def test_onehot_out_of_range_label_is_a_clear_error(label):
  ds = tf.data.Dataset.from_tensor_slices({'label': np.array([1, label], np.int64)})
  ds = ds.map(pp.parse('onehot(10)'))
  it = iter(ds)
  next(it)
  with pytest.raises(tf.errors.InvalidArgumentError) as err:
    next(it)
  assert 'num_classes=10' in str(err.value) and str(label) in str(err.value)


def test_keep_drop():
  ex = {'image': tf.zeros([2, 2, 3]), 'label': tf.constant(1), 'rng': tf.constant([1, 2])}
  assert set(_run('keep("image", "label")', ex)) == {'image', 'label'}
  assert set(_run('drop("rng", "missing")', ex)) == {'image', 'label'}
  assert set(ex) == {'image', 'label', 'rng'}   # the input dict is never modified


# ----------------------------------------------------------------------------------------
# parse

def test_parse_literals_and_arithmetic(photos):
  image = photos['chelsea']
  a = _run('inception_crop((32, 48), min_aspect=3/4, max_aspect=4 / 3)', _example(image))
  b = _run('inception_crop([32, 48], min_aspect=0.75, max_aspect=1.3333333333333333)',
           _example(image))
  np.testing.assert_array_equal(a['image'], b['image'])
  assert a['image'].shape == (32, 48, 3)
  out = _run(' value_range( -1 , 1 ) | keep("image") ', _example(np.zeros((1, 1, 3))))
  assert set(out) == {'image'} and out['image'].min() == -1
  assert set(_run('', _example(image))) == {'image', 'label', 'rng'}
  assert 'flip_lr' in pp.registered() and 'randaugment' in pp.registered()


@pytest.mark.parametrize('spec,match', [
    ('decode|flip_rl', r"Unknown preprocessing op 'flip_rl'.*Did you mean 'flip_lr'.*"
                       r'Known ops: .*central_crop'),
    ('resize(224, methd="bicubic")', r"op 'resize'.*It takes resize\(size, method="),
    ('central_crop()', r"op 'central_crop'.*It takes central_crop\(size\)"),
    ('flip_lr(0.5, 0.2)', r"op 'flip_lr'.*It takes flip_lr\(p"),
    ('resize(224, method="cubic")', r"op 'resize'.*Unknown resize method 'cubic'"),
    ('resize(foo)', r"op 'resize'.*not a literal: 'foo'"),
    ('resize(__import__("os").getcwd())', r"op 'resize'.*not a literal"),
    ('resize(*[224])', r'\*args are not allowed'),
    ('resize(224', r'Cannot parse op'),
    ('decode||flip_lr', r'Empty op'),
    ('decode.x', r'not of the form name or name\(args\)'),
    ('onehot(10, label_smoothing=1.5)', r"op 'onehot'.*label_smoothing must be in"),
])
def test_parse_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    pp.parse(spec)


@pytest.mark.parametrize('spec, mean, std', [
    ('decode|resize(8)|value_range(-1, 1)', (0.5,) * 3, (0.5,) * 3),
    ('decode|value_range(0, 1)', (0.0,) * 3, (1.0,) * 3),
    ('decode|normalize', pp.IMAGENET_MEAN, pp.IMAGENET_STD),
])
def test_pixel_mean_std_reproduces_the_value_op(spec, mean, std):
  """(x / 255 - mean) / std, as transformers' and torchvision's processors compute it,
  equals what the op gives."""
  got_mean, got_std = pp.pixel_mean_std(spec)
  np.testing.assert_allclose(got_mean, mean, atol=1e-7)
  np.testing.assert_allclose(got_std, std, atol=1e-7)
  x = np.arange(0, 256, 17, dtype=np.uint8).reshape(1, -1, 1).repeat(3, axis=-1)
  out = pp.parse(pp.without_ops(spec, ('resize',)))(
      {'image': tf.constant(x)})['image'].numpy()
  np.testing.assert_allclose(out, (x / 255 - np.array(mean)) / np.array(std), atol=1e-5)
  assert pp.pixel_mean_std('decode|resize(8)') is None


def test_hf_image_processor_config_is_exact_for_a_resize_and_says_so_otherwise():
  from vit_jax.checkpoints import hf_format  # pylint: disable=import-outside-toplevel
  config, note = hf_format.image_processor_config(
      'decode|resize(32)|value_range(-1, 1)|onehot(4)', 32)
  assert note is None and config['size'] == {'height': 32, 'width': 32}
  assert config['image_mean'] == config['image_std'] == [0.5] * 3
  config, note = hf_format.image_processor_config(
      'decode|resize_small(40)|central_crop(32)|normalize|onehot(4)', 32)
  assert config['image_mean'] == list(pp.IMAGENET_MEAN)
  assert 'resizes to 32x32' in note and 'central_crop(32)' in note
  config, note = hf_format.image_processor_config(None, 32)  # nothing recorded: said so
  assert config['image_mean'] == [0.5] * 3 and 'image_mean and image_std edited' in note


def test_randaugment_after_the_rescaling_is_refused_by_name():
  """It clipped the [-1, 1] image to [0, 255]: two values, no error."""
  with pytest.raises(ValueError, match=r"randaugment in .* comes after value_range: it works "
                     r'on pixels in 0..255.*put it before value_range'):
    pp.parse('decode|resize(64)|value_range(-1, 1)|randaugment(2, 10)')
  with pytest.raises(ValueError, match='comes after normalize'):
    pp.output_spec('decode|resize(64)|normalize|randaugment')
  pp.parse('decode|resize(64)|randaugment(2, 10)|value_range(-1, 1)')  # the right order


@pytest.mark.parametrize('spec', ['decode|resize(-28)', 'decode|central_crop(0)',
                                  'decode|inception_crop((32, 0))',
                                  'decode|random_resized_crop(2.5)', 'decode|resize((1, 2, 3))'])
def test_a_size_that_is_not_positive_is_a_bad_argument(spec):
  """resize(-28) used to pass (and the config check suggested image_size=-28)."""
  with pytest.raises(ValueError, match='size must be a positive int or \\(height, width\\)'):
    pp.parse(spec)


def test_random_ops_are_exactly_the_ops_that_draw_from_the_rng():
  """RANDOM_OPS (what predict and visualize refuse in --pp) lists every op that needs
  example['rng'] and no other; a new registered op must be added to this table."""
  args = {'inception_crop': '(8)', 'random_resized_crop': '(8)', 'resize': '(8)',
          'resize_small': '(8)', 'central_crop': '(8)', 'onehot': '(3)',
          'keep': "('image', 'label')", 'drop': "('label')"}
  image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  needs_rng = []
  for name in pp.registered():
    example = _example(image)
    del example['rng']
    try:
      _run(f'{name}{args.get(name, "")}', example)
    except ValueError as e:
      assert 'is random and needs' in str(e), (name, e)
      needs_rng.append(name)
  assert sorted(needs_rng) == sorted(pp.RANDOM_OPS)
