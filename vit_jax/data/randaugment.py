"""RandAugment (Cubuk et al. 2019, arXiv:1909.13719) in TensorFlow, stateless.

The op set, magnitude mapping and application rule are those of the RandAugment used
for ViT in "How to train your ViT?" (AugReg, Steiner et al. 2021): big_vision's `randaug`
op, i.e. the TF/TPU `distort_image_with_randaugment`. For each of `num_layers` layers
one of 16 ops is picked uniformly and applied with probability 1/2 (AugReg draws the
probability from U(0.2, 0.8) and then a coin against it, which is the same thing:
P = E[U(0.2, 0.8)] = 1/2). Geometric ops fill with 128 and sample with NEAREST.

Magnitude: the paper's integer scale, 10 = the AutoAugment maximum, larger values
extrapolate linearly (AugReg uses 10, 15 or 20). With m = magnitude / 10:

  op            augreg (default)                increasing=True
  AutoContrast, Equalize, Invert                 (no magnitude)
  Rotate        +-30 m degrees                   same
  ShearX/Y      +-0.3 m                          same
  TranslateX/Y  +-100 m pixels                   same
  Cutout        square of side 2 * int(40 m)     same
  SolarizeAdd   + int(110 m) below 128           same
  Posterize     keep int(4 m) bits               keep 8 - int(4 m) bits
  Solarize      threshold int(256 m)             threshold 256 - int(256 m)
  Color, Contrast, Brightness, Sharpness
                factor 0.1 + 1.8 m (no sign)     factor 1 +- 0.9 m
(+- : a random sign per application.) The augreg mapping is the AugReg one, quirks
included: at magnitude 0 the geometric ops, Cutout and SolarizeAdd are the identity, but
the enhance ops blend with factor 0.1, Posterize keeps 0 bits (black) and Solarize
inverts everything; stronger magnitudes make those three weaker. `increasing=True`
(timm's "increasing" variants) makes every op with a magnitude the identity at 0 and
stronger as the magnitude grows. Bits are clamped to [0, 8], thresholds to [0, 256].

The ops follow PIL's semantics (ImageOps.autocontrast / equalize / invert / posterize /
solarize, ImageEnhance.Color / Contrast / Brightness / Sharpness, Image.rotate and
Image.transform(AFFINE, NEAREST) with pixel centres at +0.5), and the tests compare
them with PIL. (The TF/TPU Contrast op averages the histogram counts instead of the
intensities; this module uses PIL's mean grey level.)

Inputs: uint8 or float [0, 255] HxWx3 of any size; the result has the same shape and
dtype (float inputs are rounded to uint8 for the ops and cast back).
"""

import math

import tensorflow as tf

FILL = 128
_TIE_EPS = 2.0**-14

OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color',
       'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX',
       'TranslateY', 'Cutout', 'SolarizeAdd')


# ----------------------------------------------------------------------------------------
# Pointwise and histogram ops on uint8 HxWx3.

def _lut(image: tf.Tensor, table: tf.Tensor) -> tf.Tensor:
  """image[y, x, c] -> table[image] (table [256]) or table[c, image] (table [3, 256])."""
  table = tf.cast(table, tf.uint8)
  index = tf.cast(image, tf.int32)
  if table.shape.rank == 2:
    index += tf.constant([0, 256, 512], tf.int32)
    table = tf.reshape(table, [-1])
  return tf.gather(table, index)


def _histograms(image: tf.Tensor) -> tf.Tensor:
  """Per-channel 256-bin histograms, int32 [3, 256]."""
  index = tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32)
  counts = tf.math.bincount(tf.reshape(index, [-1]), minlength=768, maxlength=768)
  return tf.reshape(counts, [3, 256])


def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """PIL ImageOps.autocontrast (cutoff 0): each channel stretched to [0, 255]."""
  lo = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float64)[:, None]
  hi = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float64)[:, None]
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  values = tf.range(256, dtype=tf.float64)[None, :]
  table = tf.clip_by_value(tf.floor(values * scale - lo * scale), 0.0, 255.0)
  table = tf.where(hi > lo, table, values)
  return _lut(image, table)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """PIL ImageOps.equalize, per channel."""
  hist = _histograms(image)
  bins = tf.range(256)[None, :]
  last_nonzero = tf.reduce_max(tf.where(hist > 0, bins, -1), axis=1, keepdims=True)
  last_count = tf.reduce_sum(tf.where(bins == last_nonzero, hist, 0), axis=1,
                             keepdims=True)
  step = (tf.reduce_sum(hist, axis=1, keepdims=True) - last_count) // 255
  before = tf.cumsum(hist, axis=1, exclusive=True)
  table = tf.clip_by_value((step // 2 + before) // tf.maximum(step, 1), 0, 255)
  table = tf.where(step > 0, table, bins)
  return _lut(image, table)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - tf.convert_to_tensor(image)


def posterize(image: tf.Tensor, bits) -> tf.Tensor:
  """Keeps the `bits` most significant bits (PIL ImageOps.posterize)."""
  bits = tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
  mask = 256 - tf.bitwise.left_shift(1, 8 - bits)
  return _lut(image, tf.bitwise.bitwise_and(tf.range(256), mask))


def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
  """Inverts the values >= threshold (PIL ImageOps.solarize)."""
  values = tf.range(256)
  below = values < tf.cast(threshold, tf.int32)
  return _lut(image, tf.where(below, values, 255 - values))


def solarize_add(image: tf.Tensor, addition, threshold=128) -> tf.Tensor:
  """Adds `addition` (clipped to [0, 255]) to the values below threshold."""
  values = tf.range(256)
  added = tf.clip_by_value(values + tf.cast(addition, tf.int32), 0, 255)
  return _lut(image, tf.where(values < tf.cast(threshold, tf.int32), added, values))


# ----------------------------------------------------------------------------------------
# Enhance ops: PIL Image.blend(degenerate, image, factor), truncated to uint8.

def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  degenerate = tf.cast(degenerate, tf.float32)
  image = tf.cast(image, tf.float32)
  out = degenerate + tf.cast(factor, tf.float32) * (image - degenerate)
  return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def _grey(image: tf.Tensor) -> tf.Tensor:
  """PIL convert('L'): (19595 R + 38470 G + 7471 B + 2**15) >> 16, int32 HxW."""
  rgb = tf.cast(image, tf.int32)
  weighted = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471
  return tf.bitwise.right_shift(weighted + 32768, 16)


def color(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Color: blend with the grey image."""
  return _blend(tf.repeat(_grey(image)[..., None], 3, axis=-1), image, factor)


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Contrast: blend with the mean grey level (rounded)."""
  mean = tf.floor(tf.reduce_mean(tf.cast(_grey(image), tf.float64)) + 0.5)
  return _blend(tf.fill(tf.shape(image), tf.cast(mean, tf.float32)), image, factor)


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Brightness: blend with black."""
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """PIL ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH (borders unfiltered)."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  x = tf.cast(image, tf.float32)[None]
  smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], padding='VALID')[0]
  smooth = tf.clip_by_value(tf.round(smooth), 0.0, 255.0)
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  shape = tf.shape(image)
  interior = tf.pad(tf.ones(shape - [2, 2, 0], tf.bool), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(interior, smooth, tf.cast(image, tf.float32))
  return _blend(degenerate, image, factor)


# ----------------------------------------------------------------------------------------
# Geometric ops: PIL's affine convention (output -> input, pixel centres at +0.5).

def affine(image: tf.Tensor, matrix, fill=FILL) -> tf.Tensor:
  """NEAREST affine warp; matrix = (a, b, c, d, e, f) maps each output point (x, y) to
  the input point (a x + b y + c, d x + e y + f), in PIL's continuous coordinates (pixel
  (i, j) covers [j, j + 1) x [i, i + 1)), like PIL's Image.transform(AFFINE). Points
  outside the image take `fill`.
  """
  a, b, c, d, e, f = [tf.cast(v, tf.float32) for v in matrix]
  # PIL samples input pixel floor(x_in). TF's NEAREST rounds index coordinates (pixel
  # centres at integers, x_i = x - 0.5) half away from zero, so floor(x_in) =
  # round(x_in - 0.5 + eps): the small eps keeps exact ties (x_in an integer, e.g. on the
  # diagonal of a 45 degree rotation) on PIL's side despite float32 rounding.
  shift = _TIE_EPS - 0.5
  transform = tf.stack([a, b, c + 0.5 * (a + b) + shift,
                        d, e, f + 0.5 * (d + e) + shift, 0.0, 0.0])
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform[None], output_shape=tf.shape(image)[:2],
      fill_value=tf.cast(fill, tf.float32), interpolation='NEAREST', fill_mode='CONSTANT')
  return out[0]


def rotate(image: tf.Tensor, degrees, fill=FILL) -> tf.Tensor:
  """Counter-clockwise rotation about the centre, as PIL Image.rotate(degrees)."""
  theta = -tf.cast(degrees, tf.float32) * (math.pi / 180)
  cos, sin = tf.cos(theta), tf.sin(theta)
  shape = tf.cast(tf.shape(image), tf.float32)
  cx, cy = shape[1] / 2, shape[0] / 2
  return affine(image, (cos, sin, cx - cos * cx - sin * cy,
                        -sin, cos, cy + sin * cx - cos * cy), fill)


def shear_x(image: tf.Tensor, level, fill=FILL) -> tf.Tensor:
  """Output (x, y) <- input (x + level * y, y)."""
  return affine(image, (1.0, level, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(image: tf.Tensor, level, fill=FILL) -> tf.Tensor:
  """Output (x, y) <- input (x, y + level * x)."""
  return affine(image, (1.0, 0.0, 0.0, level, 1.0, 0.0), fill)


def translate_x(image: tf.Tensor, pixels, fill=FILL) -> tf.Tensor:
  """Moves the content `pixels` to the right."""
  return affine(image, (1.0, 0.0, -tf.cast(pixels, tf.float32), 0.0, 1.0, 0.0), fill)


def translate_y(image: tf.Tensor, pixels, fill=FILL) -> tf.Tensor:
  """Moves the content `pixels` down."""
  return affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, -tf.cast(pixels, tf.float32)), fill)


def cutout(image: tf.Tensor, pad_size, seed, fill=FILL) -> tf.Tensor:
  """Fills rows [cy - pad, cy + pad) x cols [cx - pad, cx + pad) (clipped) with `fill`;
  the centre (cy, cx) is uniform over the pixels."""
  shape = tf.shape(image)
  s_y, s_x = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  cy = tf.random.stateless_uniform([], s_y, 0, shape[0], dtype=tf.int32)
  cx = tf.random.stateless_uniform([], s_x, 0, shape[1], dtype=tf.int32)
  rows, cols = tf.range(shape[0]), tf.range(shape[1])
  inside = (((rows >= cy - pad_size) & (rows < cy + pad_size))[:, None, None]
            & ((cols >= cx - pad_size) & (cols < cx + pad_size))[None, :, None])
  return tf.where(inside, tf.cast(fill, image.dtype), image)


# ----------------------------------------------------------------------------------------
# The policy.

def _layer_branches(image, m: float, sign, seed, increasing: bool):
  """One zero-argument function per op in OPS (then the identity), each -> uint8."""
  enhance = (lambda: 1.0 + sign * 0.9 * m) if increasing else (lambda: 0.1 + 1.8 * m)
  posterize_bits = 8 - int(4 * m) if increasing else int(4 * m)
  solarize_threshold = 256 - int(256 * m) if increasing else int(256 * m)
  branches = {
      'AutoContrast': lambda: autocontrast(image),
      'Equalize': lambda: equalize(image),
      'Invert': lambda: invert(image),
      'Rotate': lambda: rotate(image, sign * 30.0 * m),
      'Posterize': lambda: posterize(image, min(max(posterize_bits, 0), 8)),
      'Solarize': lambda: solarize(image, min(max(solarize_threshold, 0), 256)),
      'Color': lambda: color(image, enhance()),
      'Contrast': lambda: contrast(image, enhance()),
      'Brightness': lambda: brightness(image, enhance()),
      'Sharpness': lambda: sharpness(image, enhance()),
      'ShearX': lambda: shear_x(image, sign * 0.3 * m),
      'ShearY': lambda: shear_y(image, sign * 0.3 * m),
      'TranslateX': lambda: translate_x(image, sign * 100.0 * m),
      'TranslateY': lambda: translate_y(image, sign * 100.0 * m),
      'Cutout': lambda: cutout(image, int(40 * m), seed),
      'SolarizeAdd': lambda: solarize_add(image, int(110 * m)),
  }
  return [branches[name] for name in OPS] + [lambda: image]


def apply_op(image: tf.Tensor, name: str, magnitude: float, seed, sign=1.0,
             increasing: bool = False) -> tf.Tensor:
  """Applies one RandAugment op by name at `magnitude` (sign +-1 for signed ops).

  For tests and visualisation; same dtype and shape handling as `randaugment`.
  """
  def run(x):
    return _layer_branches(x, magnitude / 10, tf.constant(sign, tf.float32),
                           seed, increasing)[OPS.index(name)]()
  return _as_uint8(image, run)


def _as_uint8(image: tf.Tensor, fn) -> tf.Tensor:
  """Runs fn on image as uint8 HxWx3 and returns the input's dtype."""
  image = tf.convert_to_tensor(image)
  dtype = image.dtype
  x = image if dtype == tf.uint8 else tf.cast(
      tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0, 255), tf.uint8)
  out = fn(x)
  out.set_shape(image.shape)
  return out if dtype == tf.uint8 else tf.cast(out, dtype)


def randaugment(image: tf.Tensor, seed, num_layers: int = 2, magnitude: float = 10,
                increasing: bool = False) -> tf.Tensor:
  """Applies `num_layers` random ops (each with probability 1/2) at `magnitude`.

  `seed` is a stateless seed (int [2]); the result depends only on it.
  """
  m = float(magnitude) / 10

  def run(x):
    layer_seed = seed
    for _ in range(num_layers):
      layer_seed, s_op, s_apply, s_sign, s_op_rng = tf.unstack(
          tf.random.experimental.stateless_split(layer_seed, 5))
      op = tf.random.stateless_uniform([], s_op, 0, len(OPS), dtype=tf.int32)
      apply = tf.random.stateless_uniform([], s_apply) < 0.5
      sign = tf.where(tf.random.stateless_uniform([], s_sign) < 0.5, -1.0, 1.0)
      branches = _layer_branches(x, m, sign, s_op_rng, increasing)
      x = tf.switch_case(tf.where(apply, op, len(OPS)), branches)
    return x
  return _as_uint8(image, run)
