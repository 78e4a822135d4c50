"""Per-example preprocessing ops (TensorFlow, run inside `tf.data.Dataset.map`).

A preprocessing pipeline is written as a spec string and turned into one function by
`parse`:

    fn = parse('decode|inception_crop(224)|flip_lr|value_range(-1, 1)|onehot(1000)')
    ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)

An example is a dict of tensors:
  'image': an encoded image (tf.string scalar: JPEG, PNG, GIF, BMP, WebP) or a decoded
           uint8 / float32 HxWxC tensor;
  'label': int scalar, or (multi-label datasets) an int vector of label ids;
  'rng':   int64 [2], a stateless seed unique to the example.
Other keys pass through untouched. Ops never modify the dict they are given.

Randomness comes only from stateless TF random ops seeded from example['rng']: a random
op takes `seed, example['rng'] = stateless_split(example['rng'])`, so its result depends
only on the example's seed and the op's position in the spec (never on threads or
iteration order): the same rng gives the same output, bit for bit.

After any crop / resize / value op the image is float32 HxWx3; `decode` gives uint8.

Ops (the factory signatures are what a spec may pass):
  decode(channels=3)
  inception_crop(size, area_min=5, area_max=100, min_aspect=3/4, max_aspect=4/3,
                 method='bilinear', antialias=False)
  random_resized_crop(size, scale=(0.08, 1.0), ratio=(3/4, 4/3), method='bilinear',
                      antialias=True)
  resize(size, method='bilinear', antialias=True)
  resize_small(size, method='bilinear', antialias=True)
  central_crop(size)
  flip_lr(p=0.5)
  value_range(vmin=-1, vmax=1, in_min=0, in_max=255)
  normalize(mean='imagenet', std='imagenet')
  onehot(num_classes, label_smoothing=0.0, key='label', multi=False)
  randaugment(num_layers=2, magnitude=10, increasing=False)
  keep(*keys), drop(*keys)

`inception_crop` and `random_resized_crop` accept an encoded image directly; for a JPEG
they decode only the crop window (`tf.image.decode_and_crop_jpeg`). `parse` therefore
drops a `decode` (channels=3) that is immediately followed by one of them, so the usual
spec 'decode|inception_crop(224)|...' takes the window-only path.
"""

import ast
import difflib
import functools
import inspect
import math
import numbers
import operator
from typing import Callable

import tensorflow as tf

from vit_jax.data import randaugment as randaugment_lib

Example = dict[str, tf.Tensor]
Op = Callable[[Example], Example]

_REGISTRY: dict[str, Callable[..., Op]] = {}

_RESIZE_METHODS = ('bilinear', 'bicubic', 'nearest', 'area', 'lanczos3', 'lanczos5',
                   'gaussian', 'mitchellcubic')

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------
# Registry and spec parsing.

def register(name: str):
  """Decorator: registers an op factory `factory(*args, **kwargs) -> fn(example)`.

  The registered factory returns an op that works on a shallow copy of the example, so
  ops may assign to the dict they receive. The pipelines trace ops without AutoGraph
  (`traced.py`): an op branches on a tensor's value with `tf.cond`, not a Python `if`.
  """
  def decorator(factory):
    if name in _REGISTRY:
      raise ValueError(f'Preprocessing op {name!r} is already registered.')

    @functools.wraps(factory)
    def wrapped_factory(*args, **kwargs):
      fn = factory(*args, **kwargs)

      @functools.wraps(fn)
      def op(example):
        return fn(dict(example))
      op.accepts_encoded_jpeg = getattr(fn, 'accepts_encoded_jpeg', False)
      op.op_name = name
      return op

    _REGISTRY[name] = wrapped_factory
    return wrapped_factory
  return decorator


def registered() -> list[str]:
  """Names of all registered ops, sorted."""
  return sorted(_REGISTRY)


def parse(spec: str) -> Op:
  """'op1(args)|op2|...' -> one function applying the ops in order.

  Arguments are Python literals (numbers, strings, tuples, lists, dicts, None, booleans),
  positional or keyword; simple arithmetic on number literals (`3/4`, `-1`, `2*112`) is
  allowed too. Nothing is ever `eval`-ed.

  Raises:
    ValueError: for a syntax error, an unknown op (the message lists the known ops and
      the closest names) or arguments the op does not take (the message names the op
      and its signature).
  """
  ops = _build(spec)
  # `decode|inception_crop` -> `inception_crop` on the encoded image (window-only JPEG).
  fused = []
  for i, (name, bound, op) in enumerate(ops):
    if (name == 'decode' and bound.arguments.get('channels', 3) == 3
        and i + 1 < len(ops) and ops[i + 1][2].accepts_encoded_jpeg):
      continue
    fused.append(op)

  def fn(example: Example) -> Example:
    for op in fused:
      example = op(example)
    return example
  return fn


# The ops that set the image's height and width, from their `size` argument.
_SIZE_OPS = ('inception_crop', 'random_resized_crop', 'resize', 'central_crop')


def output_spec(spec: str) -> tuple[tuple[int, int] | None, str | None, int | None]:
  """What a spec makes of any image, read from its ops without running them:
  ((height, width), the op that sets them, the onehot op's num_classes).

  The size is None where the spec does not fix it (no resize or crop, or a
  `resize_small` of an image that is not known to be square); num_classes is None
  without an `onehot`.
  Raises ValueError as `parse` does.
  """
  size, size_op, num_classes = None, None, None
  for name, bound, _ in _build(spec):
    bound.apply_defaults()
    if name in _SIZE_OPS:
      s = bound.arguments['size']
      size, size_op = ((s, s) if isinstance(s, int) else tuple(s)), name
    elif name == 'resize_small':  # a square image stays square; another keeps its ratio
      s = bound.arguments['size']
      size = (s, s) if size is not None and size[0] == size[1] else None
      size_op = name
    elif name == 'onehot':
      num_classes = bound.arguments['num_classes']
  return size, size_op, num_classes


def decoded_channels(spec: str) -> int | None:
  """The channels the spec's `decode` gives (3 by default), None without one."""
  found = [int(args['channels']) for name, args in ops(spec) if name == 'decode']
  return found[-1] if found else None


# The ops that do not read the image's pixels (they may come before `decode`).
OPS_WITHOUT_PIXELS = ('decode', 'onehot', 'keep', 'drop')


def decode_problem(spec: str) -> str | None:
  """What keeps `spec` from taking encoded images (the sources' JPEG/PNG bytes): 'has
  no decode' or 'applies OP before decode'; None if it decodes first. Raises ValueError
  as `parse` does."""
  names = [name for name, _, _ in _build(spec)]
  if 'decode' not in names:
    return 'has no decode'
  first = next((n for n in names if n not in OPS_WITHOUT_PIXELS), None)
  if first is not None and names.index(first) < names.index('decode'):
    return f'applies {first} before decode'
  return None


def ops(spec: str) -> list[tuple[str, dict]]:
  """[(op name, its arguments with defaults)] of a spec, checked as `parse` checks it."""
  out = []
  for name, bound, _ in _build(spec):
    bound.apply_defaults()
    out.append((name, dict(bound.arguments)))
  return out


def pixel_mean_std(spec: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
  """(mean, std) on the 0..1 scale such that the spec's value op gives (x / 255 - mean)
  / std, as torchvision and transformers normalise; None without a value op."""
  found = None
  for name, args in ops(spec):
    if name == 'value_range':
      a = (args['vmax'] - args['vmin']) / (args['in_max'] - args['in_min'])
      b = args['vmin'] - args['in_min'] * a
      std = 1 / (255 * a)
      found = ((-b * std,) * 3, (std,) * 3)
    elif name == 'normalize':
      mean = IMAGENET_MEAN if args['mean'] == 'imagenet' else tuple(args['mean'])
      std = IMAGENET_STD if args['std'] == 'imagenet' else tuple(args['std'])
      found = (tuple(float(m) for m in mean), tuple(float(x) for x in std))
  return found


def _build(spec: str) -> list:
  """[(op name, its bound arguments, the op)] for each op of the spec, checked."""
  ops = []
  for piece in _split_top_level(spec):
    name, args, kwargs = _parse_call(piece, spec)
    if name not in _REGISTRY:
      close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.5)
      hint = f' Did you mean {", ".join(map(repr, close))}?' if close else ''
      raise ValueError(f'Unknown preprocessing op {name!r} in {spec!r}.{hint} '
                       f'Known ops: {", ".join(registered())}.')
    factory = _REGISTRY[name]
    signature = inspect.signature(factory)
    try:
      bound = signature.bind(*args, **kwargs)
      op = factory(*args, **kwargs)
    except (TypeError, ValueError, ArithmeticError) as e:  # (normalize with a std of 0)
      raise ValueError(f'Bad arguments for preprocessing op {name!r} in {piece!r}: {e}. '
                       f'It takes {name}{_plain(signature)}.') from e
    ops.append((name, bound, op))
  _check_order(spec, [name for name, _, _ in ops])
  return ops


# Ops that draw from example['rng'] (training augmentation): not for prediction.
RANDOM_OPS = ('inception_crop', 'random_resized_crop', 'flip_lr', 'randaugment')
# Ops on the label: prediction has none, so they are dropped from its preprocessing.
LABEL_OPS = ('onehot', 'keep', 'drop')

# Ops that take pixels in 0..255 (they clip there), and the ops that leave that range.
_NEEDS_PIXELS = ('randaugment',)
_RESCALES = ('value_range', 'normalize')


def _check_order(spec: str, names: list[str]) -> None:
  for i, name in enumerate(names):
    before = [n for n in names[:i] if n in _RESCALES]
    if name in _NEEDS_PIXELS and before:
      raise ValueError(
          f'{name} in {spec!r} comes after {before[0]}: it works on pixels in 0..255 (and '
          f'clips to them, which turned the rescaled image into two values); put it before '
          f'{before[0]}.')


def without_ops(spec: str, names) -> str:
  """`spec` with the ops called `names` removed, e.g. the label ops of an eval spec
  (`without_ops(pp_eval, ('onehot', 'keep', 'drop'))`) to preprocess bare images."""
  return '|'.join(p for p in _split_top_level(spec) if _parse_call(p, spec)[0] not in names)


def _plain(signature: inspect.Signature) -> inspect.Signature:
  """The signature without annotations: 'resize(size, method='bilinear', ...)'."""
  return signature.replace(
      parameters=[p.replace(annotation=inspect.Parameter.empty)
                  for p in signature.parameters.values()],
      return_annotation=inspect.Signature.empty)


def _split_top_level(spec: str) -> list[str]:
  """Splits on '|' outside brackets and quotes; strips blanks; rejects empty pieces."""
  pieces, depth, quote, start = [], 0, None, 0
  for i, ch in enumerate(spec):
    if quote:
      if ch == quote and spec[i - 1] != '\\':
        quote = None
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == '|' and depth == 0:
      pieces.append(spec[start:i])
      start = i + 1
  pieces.append(spec[start:])
  pieces = [p.strip() for p in pieces]
  if pieces == ['']:
    return []
  if any(not p for p in pieces):
    raise ValueError(f'Empty op in preprocessing spec {spec!r}.')
  return pieces


_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
               ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv,
               ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def _literal(node: ast.AST):
  """ast.literal_eval, plus + - * / // ** between number literals."""
  try:
    return ast.literal_eval(node)
  except ValueError:
    pass
  if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
    left, right = _literal(node.left), _literal(node.right)
    if _is_number(left) and _is_number(right):
      if isinstance(node.op, ast.Pow) and abs(right) > 64:
        raise ValueError('exponent too large')
      return _ARITHMETIC[type(node.op)](left, right)
  if isinstance(node, ast.UnaryOp) and type(node.op) in _ARITHMETIC:
    value = _literal(node.operand)
    if _is_number(value):
      return _ARITHMETIC[type(node.op)](value)
  raise ValueError(f'not a literal: {ast.unparse(node)!r}')


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _parse_call(piece: str, spec: str):
  """'name(1, b=2)' -> ('name', [1], {'b': 2}); 'name' -> ('name', [], {})."""
  try:
    node = ast.parse(piece, mode='eval').body
  except SyntaxError as e:
    raise ValueError(f'Cannot parse op {piece!r} in preprocessing spec {spec!r}: '
                     f'{e.msg}.') from e
  if isinstance(node, ast.Name):
    return node.id, [], {}
  if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
    raise ValueError(f'Op {piece!r} in preprocessing spec {spec!r} is not of the form '
                     'name or name(args).')
  name = node.func.id
  try:
    args = []
    for a in node.args:
      if isinstance(a, ast.Starred):
        raise ValueError('*args are not allowed')
      args.append(_literal(a))
    kwargs = {}
    for k in node.keywords:
      if k.arg is None:
        raise ValueError('**kwargs are not allowed')
      kwargs[k.arg] = _literal(k.value)
  except ValueError as e:
    raise ValueError(f'Bad arguments for preprocessing op {name!r} in {piece!r}: {e}. '
                     'Arguments must be Python literals.') from e
  return name, args, kwargs


# ----------------------------------------------------------------------------------------
# Helpers.

def _next_seed(example: Example, op_name: str) -> tf.Tensor:
  """Takes a seed for one op from example['rng'] and advances example['rng']."""
  if 'rng' not in example:
    raise ValueError(f"Preprocessing op {op_name!r} is random and needs example['rng'] "
                     '(an int64 [2] stateless seed); the example has keys '
                     f'{sorted(example)}.')
  seeds = tf.random.experimental.stateless_split(example['rng'], 2)
  seed, example['rng'] = tf.unstack(seeds)
  return seed


def _decoded(example: Example, op_name: str) -> tf.Tensor:
  """example['image'], which must be decoded already."""
  image = example['image']
  if image.dtype == tf.string:
    raise ValueError(f"Preprocessing op {op_name!r} needs a decoded image; put 'decode' "
                     'before it.')
  return image


def _check_method(method: str) -> str:
  if method not in _RESIZE_METHODS:
    raise ValueError(f'Unknown resize method {method!r}; one of {_RESIZE_METHODS}.')
  return method


def _hw(size) -> tuple[int, int]:
  """int -> (size, size); (h, w) -> (h, w); ValueError unless positive ints."""
  hw = (size, size) if isinstance(size, numbers.Integral) else tuple(size) if isinstance(
      size, (tuple, list)) else ()
  if len(hw) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                             and v > 0 for v in hw):
    raise ValueError(f'size must be a positive int or (height, width), got {size!r}')
  return int(hw[0]), int(hw[1])


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
  """HxWxC with C in 1..4 -> HxWx3 (gray repeated; alpha dropped)."""
  c = image.shape[-1]
  if c == 3:
    return image
  if c is not None:
    return tf.tile(image[..., :1], [1, 1, 3]) if c < 3 else image[..., :3]
  out = tf.cond(tf.shape(image)[-1] < 3, lambda: tf.tile(image[..., :1], [1, 1, 3]),
                lambda: image[..., :3])
  out.set_shape([None, None, 3])
  return out


# libjpeg's accurate integer IDCT: the same pixels as PIL (TF's default, INTEGER_FAST,
# differs by about 1 on average) and no slower.
_DCT_METHOD = 'INTEGER_ACCURATE'


def _webp_has_alpha(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(alpha, animated) bools of a WebP file, from its header: the VP8X chunk's flags
  (alpha 0x10, animation 0x02), a lossless (VP8L) image's alpha bit (bit 28 after the
  signature byte); a lossy (VP8) image has neither. For an animation the flag is what
  libwebp goes by; a still image may have alpha in an ALPH chunk with the flag clear."""
  # The first 32 bytes, padded for a short file (and no copy of the whole file).
  padded = tf.strings.join([tf.strings.substr(data, 0, 32), '\0' * 32])
  head = tf.io.decode_raw(tf.strings.substr(padded, 0, 32), tf.uint8)
  chunk = tf.strings.substr(padded, 12, 4)
  flags = tf.cast(head[20], tf.int32)
  vp8x = tf.equal(chunk, 'VP8X')
  alpha = tf.where(vp8x, tf.bitwise.bitwise_and(flags, 0x10) > 0,
                   tf.logical_and(tf.equal(chunk, 'VP8L'),
                                  tf.bitwise.bitwise_and(tf.cast(head[24], tf.int32),
                                                         0x10) > 0))
  return alpha, tf.logical_and(vp8x, tf.bitwise.bitwise_and(flags, 0x02) > 0)


def _decode_webp(data: tf.Tensor) -> tf.Tensor:
  """Encoded WebP -> uint8 HxWx3 (first frame of an animation, alpha dropped).

  TensorFlow's decoder takes only the channel count libwebp reports for the file
  (channels=3 fails on a WebP with alpha), so a still image is decoded with channels=0
  (its own count) and made RGB. An animation is decoded as RGBA, which needs the alpha
  flag set; one without it cannot be decoded at all (channels=0 corrupts the heap and
  kills the process), so it is refused first.
  """
  alpha, animated = _webp_has_alpha(data)
  check = tf.debugging.Assert(
      tf.logical_or(alpha, tf.logical_not(animated)),
      ['an animated WebP without alpha, which TensorFlow cannot decode: convert it to PNG '
       'or JPEG (e.g. PIL: Image.open(f).convert("RGB").save(...))'])
  with tf.control_dependencies([check]):
    data = tf.identity(data)
  image = tf.cond(
      animated, lambda: tf.io.decode_image(data, channels=4, expand_animations=False)[..., :3],
      lambda: _to_rgb(tf.io.decode_image(data, channels=0, expand_animations=False)))
  image.set_shape([None, None, 3])
  return image


def is_webp(data: tf.Tensor) -> tf.Tensor:
  """Whether encoded bytes are a WebP file (RIFF....WEBP)."""
  head = tf.strings.join([tf.strings.substr(data, 0, 12), ' ' * 12])  # short files too
  return tf.logical_and(tf.equal(tf.strings.substr(head, 0, 4), 'RIFF'),
                        tf.equal(tf.strings.substr(head, 8, 4), 'WEBP'))


def decode_other(data: tf.Tensor) -> tf.Tensor:
  """Encoded PNG/GIF/BMP/WebP -> uint8 HxWx3 (first frame of an animation)."""
  image = tf.cond(is_webp(data), lambda: _decode_webp(data),
                  lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
  image.set_shape([None, None, 3])
  return image


def _decode_rgb(data: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG/GIF/BMP/WebP -> uint8 HxWx3 (first frame of an animation)."""
  image = tf.cond(
      tf.io.is_jpeg(data),
      lambda: tf.io.decode_jpeg(data, channels=3, dct_method=_DCT_METHOD),
      lambda: decode_other(data))
  image.set_shape([None, None, 3])
  return image


def _crop(image: tf.Tensor, window_fn) -> tf.Tensor:
  """Crops image (encoded or decoded) to window_fn(shape) = (y, x, h, w); HxWx3 out.

  A JPEG is decoded only inside the window; another encoded format is decoded in full
  and sliced; a decoded image is sliced (uint8 stays uint8).
  """
  if image.dtype == tf.string:
    def jpeg():
      y, x, h, w = window_fn(tf.image.extract_jpeg_shape(image))
      return tf.image.decode_and_crop_jpeg(image, tf.stack([y, x, h, w]), channels=3,
                                           dct_method=_DCT_METHOD)

    def other():
      decoded = decode_other(image)
      y, x, h, w = window_fn(tf.shape(decoded))
      return tf.slice(decoded, [y, x, 0], [h, w, 3])

    out = tf.cond(tf.io.is_jpeg(image), jpeg, other)
    out.set_shape([None, None, 3])
    return out
  y, x, h, w = window_fn(tf.shape(image))
  return _to_rgb(tf.slice(image, [y, x, 0], [h, w, -1]))


def _resize(image: tf.Tensor, hw, method: str, antialias: bool) -> tf.Tensor:
  """Resizes to hw = (h, w) (ints or int32 tensors); float32 out, no clipping.

  A bilinear enlargement takes the plain kernel even with `antialias`: the antialiased
  one gives the same pixels (to 3e-5 on 0..255) at 2.5x the cost (CIFAR's 32 px to 224:
  3.0 ms against 1.2 ms an image). Other methods are resized as asked.
  """
  def resized(aa):
    return tf.cast(tf.image.resize(image, hw, method=method, antialias=aa), tf.float32)
  if not (antialias and method == 'bilinear'):
    return resized(antialias)
  target = tf.cast(tf.stack(hw) if isinstance(hw, (tuple, list)) else hw, tf.int32)
  shrinks = tf.reduce_any(target < tf.shape(image)[:2])
  return tf.cond(shrinks, lambda: resized(True), lambda: resized(False))


# ----------------------------------------------------------------------------------------
# Ops.

@register('decode')
def decode(channels: int = 3) -> Op:
  """Encoded image -> uint8 HxWxchannels (channels 3: RGB, or 1: grayscale).

  JPEG, PNG, GIF (first frame) and BMP. Grayscale is repeated to RGB, alpha is dropped
  (not composited), palettes are expanded, 16-bit PNGs are scaled to 8 bits (their high
  byte, x >> 8, within 1 of x / 257; PIL's convert('RGB') clips them instead). JPEGs use
  libjpeg's accurate integer IDCT and give the same pixels as PIL, CMYK JPEGs included
  (e.g. the 22 in ImageNet, or PIL's Adobe-inverted CMYK): TF's libjpeg path converts
  them to RGB itself (tested). Followed by inception_crop or random_resized_crop, a JPEG
  decodes only the crop window (much faster); with 4:2:0 chroma subsampling its last
  column can then differ from a whole decode by up to about 30/255 (where the window's
  edge falls on an even column), a negligible difference for training augmentation.
  An already decoded image only gets its channels fixed (1/2 -> 3 repeated, 4 -> 3).
  """
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels!r}')

  def fn(example):
    image = example['image']
    if image.dtype == tf.string:
      image = _decode_rgb(image)
    else:
      image = _to_rgb(image)
    if channels == 1:
      image = tf.image.rgb_to_grayscale(image)
    example['image'] = image
    return example
  return fn


@register('inception_crop')
def inception_crop(size, area_min: float = 5, area_max: float = 100,
                   min_aspect: float = 3 / 4, max_aspect: float = 4 / 3,
                   method: str = 'bilinear', antialias: bool = False) -> Op:
  """Inception-style random crop, resized to size x size; float32 [0, 255] out.

  The window comes from `tf.image.stateless_sample_distorted_bounding_box` (up to 100
  attempts; the whole image if none fits): area in [area_min, area_max] percent of the
  image, aspect ratio (width / height) in [min_aspect, max_aspect] (up to the rounding
  of the width to whole pixels). Encoded JPEGs are decoded only inside the window.
  """
  if not 0 < area_min <= area_max <= 100:
    raise ValueError(f'need 0 < area_min <= area_max <= 100, got {area_min}, {area_max}')
  if not 0 < min_aspect <= max_aspect:
    raise ValueError(f'need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}')
  hw = _hw(size)
  _check_method(method)

  def fn(example):
    seed = _next_seed(example, 'inception_crop')

    def window(shape):
      begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
          shape, tf.zeros([0, 0, 4], tf.float32), seed=seed,
          min_object_covered=0.0, aspect_ratio_range=(min_aspect, max_aspect),
          area_range=(area_min / 100, area_max / 100), max_attempts=100,
          use_image_if_no_bounding_boxes=True)
      return begin[0], begin[1], crop_size[0], crop_size[1]

    example['image'] = _resize(_crop(example['image'], window), hw, method, antialias)
    return example
  fn.accepts_encoded_jpeg = True
  return fn


def random_resized_crop_window(shape, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                               attempts: int = 10):
  """torchvision's RandomResizedCrop.get_params, vectorised with stateless randoms.

  All `attempts` draws are made at once: area = uniform(scale) * H * W, aspect =
  exp(uniform(log ratio)), w = round(sqrt(area * aspect)), h = round(sqrt(area /
  aspect)) (round half to even, as Python's round); the first draw with 0 < w <= W and
  0 < h <= H wins, placed uniformly (top in [0, H - h], left in [0, W - w]). If none
  fits: a central crop of the whole image clamped to the ratio range.
  Returns int32 scalars (top, left, h, w).
  """
  height, width = shape[0], shape[1]
  fh, fw = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  s_area, s_ratio, s_top, s_left = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  area = fh * fw * tf.random.stateless_uniform([attempts], s_area, scale[0], scale[1])
  aspect = tf.exp(tf.random.stateless_uniform(
      [attempts], s_ratio, math.log(ratio[0]), math.log(ratio[1])))
  ws = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  hs = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  h, w = hs[first], ws[first]
  # (maxval >= 1 keeps the draw valid when nothing fits; the fallback replaces it.)
  top = tf.random.stateless_uniform(
      [], s_top, 0, tf.maximum(height - h + 1, 1), dtype=tf.int32)
  left = tf.random.stateless_uniform(
      [], s_left, 0, tf.maximum(width - w + 1, 1), dtype=tf.int32)

  # Fallback: whole image, clamped to the ratio range, centred.
  lo, hi = min(ratio), max(ratio)
  in_ratio = fw / fh
  fb_w = tf.where(in_ratio > hi, tf.cast(tf.round(fh * hi), tf.int32), width)
  fb_h = tf.where(in_ratio < lo, tf.cast(tf.round(fw / lo), tf.int32), height)
  found = tf.reduce_any(fits)
  h = tf.where(found, h, fb_h)
  w = tf.where(found, w, fb_w)
  top = tf.where(found, top, (height - fb_h) // 2)
  left = tf.where(found, left, (width - fb_w) // 2)
  return top, left, h, w


@register('random_resized_crop')
def random_resized_crop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        method: str = 'bilinear', antialias: bool = True) -> Op:
  """torchvision RandomResizedCrop (see `random_resized_crop_window`); float32 out.

  Encoded JPEGs are decoded only inside the window. `antialias=True` matches
  torchvision (PIL always antialiases when downscaling).
  """
  if not 0 < scale[0] <= scale[1]:
    raise ValueError(f'need 0 < scale[0] <= scale[1], got {scale}')
  if not 0 < ratio[0] <= ratio[1]:
    raise ValueError(f'need 0 < ratio[0] <= ratio[1], got {ratio}')
  hw = _hw(size)
  _check_method(method)

  def fn(example):
    seed = _next_seed(example, 'random_resized_crop')
    window = lambda shape: random_resized_crop_window(shape, seed, scale, ratio)
    example['image'] = _resize(_crop(example['image'], window), hw, method, antialias)
    return example
  fn.accepts_encoded_jpeg = True
  return fn


@register('resize')
def resize(size, method: str = 'bilinear', antialias: bool = True) -> Op:
  """Resizes to size x size (int) or (h, w); float32 out (bicubic may overshoot)."""
  hw = _hw(size)
  _check_method(method)

  def fn(example):
    example['image'] = _resize(_decoded(example, 'resize'), hw, method, antialias)
    return example
  return fn


@register('resize_small')
def resize_small(size: int, method: str = 'bilinear', antialias: bool = True) -> Op:
  """Resizes the shorter side to `size`, keeping the aspect ratio; float32 out.

  The longer side becomes floor(size * long / short), exactly as torchvision's
  `Resize(size)` (big_vision rounds instead; the two differ by at most one pixel).
  """
  if not isinstance(size, int) or size <= 0:
    raise ValueError(f'size must be a positive int, got {size!r}')
  _check_method(method)

  def fn(example):
    image = _decoded(example, 'resize_small')
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    short = tf.minimum(h, w)
    new_h = tf.where(h <= w, size, size * h // short)
    new_w = tf.where(h <= w, size * w // short, size)
    example['image'] = _resize(image, tf.stack([new_h, new_w]), method, antialias)
    return example
  return fn


@register('central_crop')
def central_crop(size) -> Op:
  """Central size x size (int) or (h, w) crop; top = (H - h) // 2, left = (W - w) // 2.

  (torchvision's CenterCrop rounds (H - h) / 2 half to even instead: the same except
  for odd H - h, where it may sit one pixel lower.) Keeps the dtype.
  """
  ch, cw = _hw(size)

  def fn(example):
    image = _decoded(example, 'central_crop')
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    checks = [
        tf.debugging.assert_greater_equal(
            h, ch, message=f'central_crop({size}): image height is smaller than {ch}'),
        tf.debugging.assert_greater_equal(
            w, cw, message=f'central_crop({size}): image width is smaller than {cw}'),
    ]
    with tf.control_dependencies(checks):
      top, left = (h - ch) // 2, (w - cw) // 2
    image = tf.slice(image, [top, left, 0], [ch, cw, -1])
    example['image'] = image
    return example
  return fn


@register('flip_lr')
def flip_lr(p: float = 0.5) -> Op:
  """Flips the image left-right with probability p."""
  if not 0 <= p <= 1:
    raise ValueError(f'p must be in [0, 1], got {p!r}')

  def fn(example):
    image = _decoded(example, 'flip_lr')
    seed = _next_seed(example, 'flip_lr')
    flip = tf.random.stateless_uniform([], seed) < p
    example['image'] = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    return example
  return fn


@register('value_range')
def value_range(vmin: float = -1, vmax: float = 1, in_min: float = 0,
                in_max: float = 255) -> Op:
  """Maps [in_min, in_max] linearly to [vmin, vmax]: float32 x * a + b (no clipping).

  The released ViT checkpoints expect [-1, 1] (mean = std = 0.5).
  """
  if in_max == in_min:
    raise ValueError('in_max must differ from in_min')
  if vmax == vmin:  # (every pixel the same value: nothing to learn from)
    raise ValueError(f'vmax must differ from vmin (both {vmin}): e.g. value_range(-1, 1)')
  a = (vmax - vmin) / (in_max - in_min)
  b = vmin - in_min * a

  def fn(example):
    example['image'] = tf.cast(_decoded(example, 'value_range'), tf.float32) * a + b
    return example
  return fn


@register('normalize')
def normalize(mean='imagenet', std='imagenet') -> Op:
  """(x / 255 - mean) / std per channel, float32; 'imagenet' = torchvision's stats."""
  mean = IMAGENET_MEAN if mean == 'imagenet' else tuple(float(m) for m in mean)
  std = IMAGENET_STD if std == 'imagenet' else tuple(float(s) for s in std)
  if len(mean) != len(std):
    raise ValueError(f'mean and std must have the same length: {mean}, {std}')
  scale = tf.constant([1 / (255 * s) for s in std], tf.float32)
  offset = tf.constant([-m / s for m, s in zip(mean, std)], tf.float32)

  def fn(example):
    image = tf.cast(_decoded(example, 'normalize'), tf.float32)
    example['image'] = image * scale + offset
    return example
  return fn


@register('onehot')
def onehot(num_classes: int, label_smoothing: float = 0.0, key: str = 'label',
           multi: bool = False) -> Op:
  """Int label -> float32 [num_classes] one-hot; a vector of ids -> multi-hot.

  With label_smoothing s the on value is 1 - s + s/K and the off value s/K (a one-hot
  row still sums to 1). `multi=True`, or a label of rank 1, gives a multi-hot vector
  (ImageNet-21k style, for a sigmoid loss) with the same on/off values. A label outside
  [0, num_classes) fails at iteration time with an InvalidArgumentError naming it.
  """
  if not isinstance(num_classes, int) or num_classes <= 0:
    raise ValueError(f'num_classes must be a positive int, got {num_classes!r}')
  if not 0 <= label_smoothing < 1:
    raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing!r}')
  off = label_smoothing / num_classes
  on = 1.0 - label_smoothing + off

  def fn(example):
    label = example[key]
    message = f'onehot: {key!r} must be in [0, num_classes={num_classes})'
    checks = [
        tf.debugging.assert_non_negative(label, message=message, summarize=16),
        tf.debugging.assert_less(label, tf.cast(num_classes, label.dtype),
                                 message=message, summarize=16),
    ]
    with tf.control_dependencies(checks):
      label = tf.identity(label)
    if multi or label.shape.rank != 0:
      hot = tf.one_hot(tf.reshape(label, [-1]), num_classes)
      hot = tf.minimum(tf.reduce_sum(hot, axis=0), 1)   # (an empty list: all off)
      example[key] = hot * (on - off) + off
    else:
      example[key] = tf.one_hot(label, num_classes, on_value=on, off_value=off)
    return example
  return fn


@register('randaugment')
def randaugment(num_layers: int = 2, magnitude: float = 10,
                increasing: bool = False) -> Op:
  """RandAugment (AugReg / big_vision op set); see `randaugment.randaugment`."""
  if num_layers < 0:
    raise ValueError(f'num_layers must be >= 0, got {num_layers!r}')
  if magnitude < 0:
    raise ValueError(f'magnitude must be >= 0, got {magnitude!r}')

  def fn(example):
    image = _decoded(example, 'randaugment')
    seed = _next_seed(example, 'randaugment')
    example['image'] = randaugment_lib.randaugment(
        image, seed, num_layers=num_layers, magnitude=magnitude,
        increasing=increasing)
    return example
  return fn


@register('keep')
def keep(*keys: str) -> Op:
  """Keeps only the given keys (list 'rng' too if later ops are random)."""
  def fn(example):
    return {k: v for k, v in example.items() if k in keys}
  return fn


@register('drop')
def drop(*keys: str) -> Op:
  """Removes the given keys (missing keys are ignored)."""
  def fn(example):
    return {k: v for k, v in example.items() if k not in keys}
  return fn
