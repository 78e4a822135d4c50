r"""Attention rollout, per-layer attention maps and position-embedding similarity as PNGs.

    python -m vit_jax.visualize --checkpoint=ViT-B_16-224.npz --out=maps cat.jpg dog.png

For each image (a folder stands for the images in it) the command writes into --out:

  <stem>_rollout.png           attention rollout (Abnar & Zuidema, 2020) of the output
                               token over the patches, as a heat map blended over the image
  <stem>_rollout_mask.png      the same rollout alone, 8-bit grey (white = most attended)
  <stem>_rollout_original.png  the rollout over the original image, at its own size, on
                               the part the model saw; the part a centre crop cut off is
                               dimmed (written where the preprocessing is decode, resize,
                               resize_small and central_crop, as evaluation's usually is)
  <stem>_attention_layers.png  class-token attention to the patches: one row per block,
                               one column per head and a last column with the head mean

and once `posemb_similarity.png`: the cosine similarity of every patch position's learned
embedding with every other one (Dosovitskiy et al., 2021, Fig. 7 centre). It prints the
written paths and the top-1 prediction of each image, a batch (--batch_size) at a time,
so memory holds one batch and what is done is written before a later image fails. Images
that cannot be read are named on stderr and skipped (the exit status is then 1).

The `_rollout` and `_rollout_mask` PNGs have the model's input resolution (the
`_rollout_original` one the original's): they show the image as the model sees it, i.e. the checkpoint's evaluation preprocessing (or --pp) with its pixel-value
ops (`value_range`, `normalize`) left out, so crops and resizes line up exactly with
the token grid (each token is `module.total_stride()` pixels). Images whose stems repeat
get `-2`, `-3`, ... appended, in the order given, counting the images that cannot be read
(a name does not depend on which files are readable). The checkpoint is anything `vit_jax.predict` takes (a
workdir of this project, an original `.npz`, timm or transformers weights).

Library use (numpy in, numpy out; attention weights from
`vit_jax.models.attention_maps`, a list of (batch, heads, tokens, tokens) arrays):

    attn = models.attention_maps(module, params, images)
    rollout = attention_rollout(attn)                 # (batch, tokens, tokens)
    masks = rollout_mask(rollout, grid)               # (batch, gh, gw)
    maps = cls_attention_maps(attn, grid)             # (layers, batch, heads, gh, gw)
    sim = posemb_similarity(pos_embedding(params), grid, num_prefix_tokens=1)

Token convention: the tokens are any prefix tokens (the class token of
`classifier='token'`) followed by the gh * gw patch tokens in row-major order; the
prefix length is read off as tokens - gh * gw. Without a prefix token (`gap` and `map`
classifiers) "the class token's attention" is replaced by the mean over all query
tokens, i.e. the attention an average token pays to each patch, which is what a
mean-pooling head sees (a MAP head's own pooling attention is not included).
"""

import math
import os
import pathlib
import re
import sys
import tempfile
from collections.abc import Sequence

import numpy as np

from vit_jax import cli_flags
from vit_jax import cli_inputs
from vit_jax import image_files
from vit_jax import tensorflow_startup

HEAD_FUSIONS = ('mean', 'max', 'min')
POSEMB_PATH = ('Transformer', 'posembed_input', 'pos_embedding')
# Ops that change pixel values only; without them the preprocessing gives the image as
# the model sees it (same crop and size) in 0..255.
_VALUE_OPS = ('value_range', 'normalize', 'onehot', 'keep', 'drop')


# ----------------------------------------------------------------------------------------
# Pure functions.

def _stack(attentions) -> np.ndarray:
  """A list of (batch, heads, T, T) arrays, or one (layers, ...) array -> float64."""
  if isinstance(attentions, (list, tuple)):
    if not attentions:
      raise ValueError('no attention maps (a model with 0 layers?)')
    arrays = [np.asarray(a, np.float64) for a in attentions]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
      raise ValueError(f'attention maps of different shapes {sorted(shapes)}')
    a = np.stack(arrays)
  else:
    a = np.asarray(attentions, np.float64)
  if a.ndim != 5 or a.shape[-1] != a.shape[-2]:
    raise ValueError('expected attention weights of shape (layers, batch, heads, tokens, '
                     f'tokens) or a list of (batch, heads, tokens, tokens), got {a.shape}')
  return a


def _prefix(tokens: int, grid) -> int:
  gh, gw = (int(g) for g in grid)
  prefix = tokens - gh * gw
  if prefix < 0:
    raise ValueError(f'{tokens} tokens cannot hold a {gh}x{gw} patch grid')
  return prefix


def attention_rollout(attentions, *, residual: bool = True,
                      head_fusion: str = 'mean') -> np.ndarray:
  """Attention rollout (Abnar & Zuidema, 2020): (batch, tokens, tokens), float64.

  attentions: the blocks' attention weights in order, a list of (batch, heads, T, T)
    arrays or one (layers, batch, heads, T, T) array; row q holds query q's attention
    to the keys (rows sum to 1), as `vit_jax.models.attention_maps` returns them.
  head_fusion: how the heads of a block are combined: 'mean' (the paper's), 'max' or
    'min' (elementwise over heads).
  residual: replace each fused matrix A by (A + I) / 2, accounting for the skip
    connection around the attention.

  Each block's fused matrix is then renormalised so that its rows sum to 1 (a no-op for
  'mean' without residual), and the rollout is R = A_L @ ... @ A_2 @ A_1 (first block
  rightmost). Row i of R is how much output token i draws on each input token; the
  rows sum to 1.
  """
  if head_fusion not in HEAD_FUSIONS:
    raise ValueError(f'head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}')
  a = _stack(attentions)
  fused = getattr(np, head_fusion)(a, axis=2)  # (layers, batch, T, T)
  if residual:
    fused = (fused + np.eye(fused.shape[-1])) / 2
  fused = fused / np.maximum(fused.sum(axis=-1, keepdims=True), np.finfo(np.float64).tiny)
  rollout = fused[0]
  for layer in fused[1:]:
    rollout = layer @ rollout
  return rollout


def rollout_mask(rollout, grid) -> np.ndarray:
  """The rollout of the model's output over the patches: (batch, gh, gw).

  With a class token (tokens = 1 + gh * gw) its row; without one the mean of all rows,
  the rollout of a mean-pooled output. Prefix columns are dropped, the rest is not
  rescaled (values are shares of the whole row).
  """
  r = np.asarray(rollout)
  if r.ndim != 3 or r.shape[-1] != r.shape[-2]:
    raise ValueError(f'expected a rollout of shape (batch, tokens, tokens), got {r.shape}')
  prefix = _prefix(r.shape[-1], grid)
  rows = r[:, 0] if prefix else r.mean(axis=1)
  return rows[:, prefix:].reshape(r.shape[0], *grid)


def cls_attention_maps(attentions, grid) -> np.ndarray:
  """Attention of the class token to the patches: (layers, batch, heads, gh, gw).

  attentions as for `attention_rollout`; grid = (gh, gw) patch tokens. The class token
  is the first token when there are prefix tokens (tokens = prefix + gh * gw); models
  without one (gap, map) get the mean over all query tokens instead (the attention an
  average token pays to each patch). The values are the raw softmax weights: the class
  token's attention to itself (and to other prefix tokens) is dropped, not redistributed.
  """
  a = _stack(attentions)
  gh, gw = (int(g) for g in grid)
  prefix = _prefix(a.shape[-1], grid)
  rows = a[:, :, :, 0, prefix:] if prefix else a.mean(axis=3)[..., prefix:]
  return rows.reshape(a.shape[:3] + (gh, gw))


def pos_embedding(params) -> np.ndarray:
  """The learned position embedding (1, tokens, D) of a ViT parameter tree."""
  node = params
  for key in POSEMB_PATH:
    if not hasattr(node, 'keys') or key not in node:
      raise ValueError('the parameters have no learned position embedding (expected '
                       f'{"/".join(POSEMB_PATH)}); nothing to compare')
    node = node[key]
  return np.asarray(node)


def posemb_similarity(pos_embedding, grid, num_prefix_tokens: int) -> np.ndarray:
  """Cosine similarity of every patch position's embedding with every other one.

  pos_embedding: (1, prefix + gh * gw, D) or (prefix + gh * gw, D); the first
  num_prefix_tokens rows (the class token's) are left out. Returns (gh, gw, gh, gw):
  sim[i, j] is the (gh, gw) map of the similarities of position (i, j) with all
  positions (1 on the diagonal, symmetric). An all-zero embedding row has similarity 0
  with everything, itself included.
  """
  e = np.asarray(pos_embedding, np.float64)
  if e.ndim == 3:
    if e.shape[0] != 1:
      raise ValueError(f'expected a position embedding of shape (1, tokens, D), got {e.shape}')
    e = e[0]
  if e.ndim != 2:
    raise ValueError(f'expected a position embedding of shape (1, tokens, D), got {e.shape}')
  gh, gw = (int(g) for g in grid)
  if e.shape[0] != num_prefix_tokens + gh * gw:
    raise ValueError(f'the position embedding has {e.shape[0]} tokens, not '
                     f'{num_prefix_tokens} prefix + {gh}x{gw} patch tokens')
  e = e[num_prefix_tokens:]
  norm = np.linalg.norm(e, axis=-1, keepdims=True)
  e = e / np.maximum(norm, np.finfo(np.float64).tiny)
  sim = np.clip(e @ e.T, -1.0, 1.0)
  return sim.reshape(gh, gw, gh, gw)


# ----------------------------------------------------------------------------------------
# Rendering. Figures are matplotlib `Figure`s drawn by the Agg canvas (no pyplot, no
# global backend state); sizes are exact pixel counts (dpi 100), laid out by hand so a
# heat-map pixel is a screen pixel.

_DPI = 100


def _normalize(x) -> np.ndarray:
  """Min-max to [0, 1]; a constant array -> zeros."""
  x = np.asarray(x, np.float64)
  lo, hi = np.nanmin(x), np.nanmax(x)
  return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _upsample(mask, size) -> np.ndarray:
  """(gh, gw) -> (H, W) float32 by bilinear interpolation (pixel centres aligned)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = size
  img = Image.fromarray(np.ascontiguousarray(mask, np.float32))
  return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), np.float32)


def _colormap(name):
  import matplotlib  # pylint: disable=g-import-not-at-top
  return matplotlib.colormaps[name]


def _check_image(image) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (3, 4):
    raise ValueError(f'expected an HxWx3 image, got shape {image.shape}')
  if image.dtype != np.uint8:
    raise ValueError(f'expected uint8 pixels, got {image.dtype}')
  return image[..., :3]


def save_rollout_overlay(image_uint8, mask_grid, path, *, mask_path=None,
                         alpha: float = 0.5, cmap: str = 'jet') -> tuple[str, str]:
  """Writes the mask as a heat map over the image, and the bare mask.

  image_uint8: (H, W, 3) uint8, the image the mask refers to (the model's input view).
  mask_grid: (gh, gw) rollout (e.g. a row of `rollout_mask`); it is upsampled
    bilinearly to (H, W) and scaled to [0, 1] by its min and max.
  path: the overlay PNG, (H, W) RGB: (1 - alpha) * image + alpha * cmap(mask).
  mask_path: the bare mask, (H, W) 8-bit grey; default `path` with `_mask` added to
    the stem.
  Returns (path, mask_path).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = _check_image(image_uint8)
  mask_grid = np.asarray(mask_grid)
  if mask_grid.ndim != 2:
    raise ValueError(f'expected a (gh, gw) mask, got shape {mask_grid.shape}')
  if not 0 <= alpha <= 1:
    raise ValueError(f'alpha must be in [0, 1], got {alpha}')
  path = pathlib.Path(path)
  mask_path = (pathlib.Path(mask_path) if mask_path is not None
               else path.with_name(f'{path.stem}_mask{path.suffix}'))
  mask = _normalize(_upsample(mask_grid, image.shape[:2]))
  heat = _colormap(cmap)(mask)[..., :3] * 255.0
  blend = (1 - alpha) * image.astype(np.float64) + alpha * heat
  Image.fromarray(np.clip(np.round(blend), 0, 255).astype(np.uint8)).save(path)
  Image.fromarray(np.round(mask * 255).astype(np.uint8)).save(mask_path)
  return str(path), str(mask_path)


def _tile_scale(grid, target: int) -> int:
  """Integer upsampling of a (gh, gw) map so that its longer side is >= target px."""
  return max(1, math.ceil(target / max(grid)))


def _mosaic(tiles: np.ndarray, gap: int, fill: float) -> np.ndarray:
  """(rows, cols, h, w, ...) -> (rows*h + (rows-1)*gap, cols*w + (cols-1)*gap, ...)."""
  rows, cols, h, w = tiles.shape[:4]
  out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap) + tiles.shape[4:], fill,
                tiles.dtype)
  for r in range(rows):
    for c in range(cols):
      out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tiles[r, c]
  return out


def _figure(width: int, height: int):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
  FigureCanvasAgg(fig)
  return fig


def _axes_px(fig, left, bottom, width, height):
  """Axes placed in pixels from the bottom-left corner."""
  w, h = fig.get_size_inches() * _DPI
  return fig.add_axes((left / w, bottom / h, width / w, height / h))


# Layer-maps layout (pixels).
_LAYER_TILE, _LAYER_GAP = 56, 4
_LAYER_MARGINS = dict(left=64, right=12, top=72, bottom=12)
_MIN_WIDTH = 400  # room for two title lines


def layer_maps_size(num_layers: int, num_heads: int, grid) -> tuple[int, int]:
  """(width, height) in pixels of the `save_layer_maps` PNG."""
  s = _tile_scale(grid, _LAYER_TILE)
  cols = num_heads + 1
  w = cols * (grid[1] * s + _LAYER_GAP) - _LAYER_GAP
  h = num_layers * (grid[0] * s + _LAYER_GAP) - _LAYER_GAP
  m = _LAYER_MARGINS
  return max(m['left'] + w + m['right'], _MIN_WIDTH), m['top'] + h + m['bottom']


def save_layer_maps(maps, path, *, title: str | None = None, cmap: str = 'viridis') -> str:
  """One PNG: rows = blocks (first at the top), columns = heads and their mean.

  maps: (layers, heads, gh, gw) for one image, e.g. `cls_attention_maps(...)[:, i]`.
  Each tile is scaled to its own min..max (attention in later blocks is far more
  peaked than in early ones, a shared scale would leave most tiles flat), so colours
  compare positions within a tile, not tiles. title: up to two lines (default: what the
  tiles show). Returns the path.
  """
  maps = np.asarray(maps, np.float64)
  if maps.ndim != 4:
    raise ValueError(f'expected maps of shape (layers, heads, gh, gw), got {maps.shape}')
  layers, heads, gh, gw = maps.shape
  tiles = np.concatenate([maps, maps.mean(axis=1, keepdims=True)], axis=1)
  lo = tiles.min(axis=(2, 3), keepdims=True)
  hi = tiles.max(axis=(2, 3), keepdims=True)
  tiles = np.where(hi > lo, (tiles - lo) / np.where(hi > lo, hi - lo, 1), 0.0)
  s = _tile_scale((gh, gw), _LAYER_TILE)
  tiles = np.repeat(np.repeat(tiles, s, axis=2), s, axis=3)
  rgb = _colormap(cmap)(tiles)[..., :3]
  mosaic = _mosaic(rgb, _LAYER_GAP, 1.0)
  width, height = layer_maps_size(layers, heads, (gh, gw))
  m = _LAYER_MARGINS
  fig = _figure(width, height)
  left = m['left'] + (width - m['left'] - mosaic.shape[1] - m['right']) // 2  # centred
  ax = _axes_px(fig, left, m['bottom'], mosaic.shape[1], mosaic.shape[0])
  ax.imshow(mosaic, interpolation='nearest', aspect='auto')
  th, tw = gh * s + _LAYER_GAP, gw * s + _LAYER_GAP
  ax.set_xticks([c * tw + (tw - _LAYER_GAP) / 2 - 0.5 for c in range(heads + 1)])
  ax.set_xticklabels([f'head {h}' for h in range(heads)] + ['mean'], fontsize=8)
  ax.set_yticks([r * th + (th - _LAYER_GAP) / 2 - 0.5 for r in range(layers)])
  ax.set_yticklabels([f'block {r}' for r in range(layers)], fontsize=8)
  ax.xaxis.tick_top()
  ax.tick_params(length=0)
  for spine in ax.spines.values():
    spine.set_visible(False)
  fig.text(0.5, 1 - 6 / height, title or 'class-token attention to patches',
           ha='center', va='top', fontsize=9)
  fig.savefig(path, dpi=_DPI)
  return str(path)


# Position-embedding grid layout (pixels).
_POSEMB_TARGET, _POSEMB_MAX_TILE, _POSEMB_GAP = 720, 96, 2
_POSEMB_MARGINS = dict(left=64, right=96, top=40, bottom=56)


def _posemb_scale(grid) -> int:
  """Pixels per similarity value: the mosaic near _POSEMB_TARGET px, tiles at most
  _POSEMB_MAX_TILE px (1 for grids above ~27)."""
  g = max(grid)
  return max(1, min(round(_POSEMB_TARGET / g ** 2), _POSEMB_MAX_TILE // g))


def posemb_grid_size(grid) -> tuple[int, int]:
  """(width, height) in pixels of the `save_posemb_grid` PNG."""
  gh, gw = grid
  s = _posemb_scale(grid)
  w = gw * (gw * s + _POSEMB_GAP) - _POSEMB_GAP
  h = gh * (gh * s + _POSEMB_GAP) - _POSEMB_GAP
  m = _POSEMB_MARGINS
  return m['left'] + w + m['right'], m['top'] + h + m['bottom']


def save_posemb_grid(sim, path, *, title: str | None = None, cmap: str = 'viridis') -> str:
  """A gh x gw grid of gh x gw tiles: tile (i, j) is `sim[i, j]`, the similarity of
  patch position (i, j) with every position; colours span [-1, 1], with a colour bar.
  Rows and columns are numbered from 1 as in the paper's figure. Returns the path."""
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  from matplotlib import cm  # pylint: disable=g-import-not-at-top
  sim = np.asarray(sim, np.float64)
  if sim.ndim != 4 or sim.shape[:2] != sim.shape[2:]:
    raise ValueError(f'expected similarities of shape (gh, gw, gh, gw), got {sim.shape}')
  gh, gw = sim.shape[:2]
  s = _posemb_scale((gh, gw))
  norm = colors.Normalize(vmin=-1.0, vmax=1.0)
  tiles = np.repeat(np.repeat(sim, s, axis=2), s, axis=3)
  rgb = _colormap(cmap)(norm(tiles))[..., :3]
  mosaic = _mosaic(rgb, _POSEMB_GAP, 1.0)
  width, height = posemb_grid_size((gh, gw))
  m = _POSEMB_MARGINS
  fig = _figure(width, height)
  ax = _axes_px(fig, m['left'], m['bottom'], mosaic.shape[1], mosaic.shape[0])
  ax.imshow(mosaic, interpolation='nearest', aspect='auto')
  th, tw = gh * s + _POSEMB_GAP, gw * s + _POSEMB_GAP
  every_c, every_r = max(1, math.ceil(gw / 16)), max(1, math.ceil(gh / 16))
  cols, rows = range(0, gw, every_c), range(0, gh, every_r)  # 1, 3, 5, ... past 16
  ax.set_xticks([c * tw + (tw - _POSEMB_GAP) / 2 - 0.5 for c in cols])
  ax.set_xticklabels([str(c + 1) for c in cols], fontsize=8)
  ax.set_yticks([r * th + (th - _POSEMB_GAP) / 2 - 0.5 for r in rows])
  ax.set_yticklabels([str(r + 1) for r in rows], fontsize=8)
  ax.tick_params(length=0)
  for spine in ax.spines.values():
    spine.set_visible(False)
  ax.set_xlabel('Input patch column', fontsize=9)
  ax.set_ylabel('Input patch row', fontsize=9)
  cax = _axes_px(fig, m['left'] + mosaic.shape[1] + 14, m['bottom'], 14, mosaic.shape[0])
  bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=_colormap(cmap)), cax=cax)
  bar.set_label('Cosine similarity', fontsize=9)
  bar.ax.tick_params(labelsize=8)
  fig.text(0.5, 1 - 8 / height, title or 'Position embedding similarity', ha='center',
           va='top', fontsize=10)
  fig.savefig(path, dpi=_DPI)
  return str(path)


# ----------------------------------------------------------------------------------------
# Models and images.

def num_prefix_tokens(module) -> int:
  """1 for models with a class token, else 0."""
  return 1 if module.classifier in ('token', 'token_unpooled') else 0


def token_grid(module, image_hw) -> tuple[int, int]:
  """(gh, gw) patch tokens of an input of image_hw = (H, W) pixels."""
  sh, sw = module.total_stride()
  return image_hw[0] // sh, image_hw[1] // sw


def model_view(clf, images) -> np.ndarray:
  """The images as `clf` feeds them to the model, before pixel-value scaling: uint8
  (N, H, W, 3) at the input resolution (the preprocessing without value_range and
  normalize, so the same decode, crop and resize)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from vit_jax.data import preprocess_ops  # pylint: disable=g-import-not-at-top
  op = preprocess_ops.parse(preprocess_ops.without_ops(clf.pp, _VALUE_OPS))
  out = []
  for image in images:
    data = image_files.read_image(image)
    pixels = np.asarray(op({'image': tf.constant(data)})['image'], np.float64)
    if pixels.ndim == 2:
      pixels = pixels[..., None]
    if pixels.shape[-1] == 1:
      pixels = np.repeat(pixels, 3, axis=-1)
    out.append(np.clip(np.round(pixels[..., :3]), 0, 255).astype(np.uint8))
  return np.stack(out)


# Ops whose output pixel at (i, j) comes from an original position that is linear in
# (i, j): a crop of a resize. Only these let the maps be drawn on the original image.
_GEOMETRIC_OPS = ('decode', 'resize', 'resize_small', 'central_crop')


def traces_back(pp: str) -> bool:
  """Whether `source_window` can trace `pp`'s geometry back to the original image."""
  from vit_jax.data import preprocess_ops  # pylint: disable=g-import-not-at-top
  names = [name for name, _ in preprocess_ops.ops(preprocess_ops.without_ops(pp, _VALUE_OPS))]
  return bool(names) and all(n in _GEOMETRIC_OPS for n in names)


def source_window(pp: str, image_hw) -> tuple[float, float, float, float] | None:
  """(top, left, bottom, right): the part of an original image of image_hw = (H, W)
  pixels that the preprocessing `pp` (its pixel-value ops left out) turns into the model's
  input, in the original's pixel coordinates (edges, not centres). None where `pp` has
  other ops than decode, resize, resize_small and central_crop (a random crop, say).

  Found by preprocessing an image whose pixels are their own coordinates: a resize
  interpolates them, a crop keeps some, so each output pixel holds where it came from.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from vit_jax.data import preprocess_ops  # pylint: disable=g-import-not-at-top
  if not traces_back(pp):
    return None
  spec = preprocess_ops.without_ops(pp, _VALUE_OPS)
  h, w = image_hw
  rows, cols = np.meshgrid(np.arange(h, dtype=np.float32) + 0.5,
                           np.arange(w, dtype=np.float32) + 0.5, indexing='ij')
  coords = np.stack([rows, cols, np.zeros_like(rows)], axis=-1)
  spec = preprocess_ops.without_ops(spec, ('decode',))
  out = (np.asarray(preprocess_ops.parse(spec)({'image': tf.constant(coords)})['image'],
                    np.float64) if spec else coords.astype(np.float64))

  def edges(values, n):
    # Output centres i + 0.5 -> original positions, fitted away from the borders (where
    # an antialiased shrink clamps); the window's edges are the fit at 0 and n.
    i = np.arange(n) + 0.5
    inner = slice(1, n - 1) if n > 4 else slice(None)
    slope, offset = np.polyfit(i[inner], values[inner], 1)
    return offset, slope * n + offset

  # A side of one pixel gives one coordinate everywhere (no slope to fit): all of it.
  top, bottom = (0.0, 1.0) if h == 1 else edges(out[:, out.shape[1] // 2, 0], out.shape[0])
  left, right = (0.0, 1.0) if w == 1 else edges(out[out.shape[0] // 2, :, 1], out.shape[1])
  return float(top), float(left), float(bottom), float(right)


def save_rollout_on_original(original_uint8, mask_grid, window, path, *,
                             alpha: float = 0.5, cmap: str = 'jet',
                             outside: float = 0.35) -> str:
  """Writes the mask as a heat map over the part of the original image the model saw
  (`window`, from `source_window`); the rest of the image, which the model did not see
  (cut off by a centre crop), is dimmed to `outside` of its brightness. Returns path."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = _check_image(original_uint8).astype(np.float64)
  h, w = image.shape[:2]
  top, left, bottom, right = window
  t, l = max(int(round(top)), 0), max(int(round(left)), 0)
  b, r = min(int(round(bottom)), h), min(int(round(right)), w)
  if b <= t or r <= l:
    raise ValueError(f'window {window} lies outside the {h}x{w} image')
  # The mask covers the whole window; only its part inside the image is drawn.
  # (From the rounded edges, as the slices below: round(bottom - top) can be one less
  # than round(bottom) - round(top), which failed for most images under a centre crop.)
  full_h = max(int(round(bottom)) - int(round(top)), 1)
  full_w = max(int(round(right)) - int(round(left)), 1)
  mask = _normalize(_upsample(np.asarray(mask_grid), (full_h, full_w)))
  oy, ox = t - int(round(top)), l - int(round(left))
  mask = mask[oy:oy + b - t, ox:ox + r - l]
  heat = _colormap(cmap)(mask)[..., :3] * 255.0
  out = image * outside
  out[t:b, l:r] = (1 - alpha) * image[t:b, l:r] + alpha * heat
  Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8)).save(path)
  return str(path)


def attention_fn(module):
  """jitted fn(params, pixels) -> (logits (N, classes), attention weights
  (layers, N, heads, T, T)) of preprocessed images, in one forward pass."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def fn(params, pixels):
    logits, state = module.apply({'params': params}, pixels, train=False,
                                 capture_attention=True, mutable=['intermediates'])
    blocks = state['intermediates']['Transformer']
    return logits, jnp.stack([blocks[f'encoderblock_{i}']['attention_weights'][0]
                              for i in range(module.num_layers)])
  return jax.jit(fn)


# ----------------------------------------------------------------------------------------
# Command line.

_FLAGS = {}


def _define_flags():
  """Defined when run as a program only, so importing this module (tests, notebooks,
  next to vit_jax.predict) adds no global absl flags."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  _FLAGS.update(
      checkpoint=flags.DEFINE_string('checkpoint', None, 'Checkpoint file or workdir.'),
      model=flags.DEFINE_string(
          'model', None, 'Registered model name, for what the file does not record (the '
          "numerics of an .npz, the heads of a timm state dict); 'NAME,num_heads=8' or "
          "'num_heads=8' changes fields."),
      labels=flags.DEFINE_string('labels', None, 'Text file of class names, one per line.'),
      pp=flags.DEFINE_string('pp', None, "Preprocessing ops overriding the checkpoint's."),
      out=flags.DEFINE_string('out', 'attention_maps', 'Folder for the PNGs (created).'),
      head_fusion=flags.DEFINE_enum('head_fusion', 'mean', list(HEAD_FUSIONS),
                                    'How the rollout combines the heads of a block.'),
      residual=flags.DEFINE_bool('residual', True, 'Rollout with (A + I) / 2 per block '
                                 '(the skip connections).'),
      alpha=flags.DEFINE_float('alpha', 0.5, 'Heat-map opacity of the overlay.'),
      batch_size=flags.DEFINE_integer('batch_size', 8, 'Images per jitted batch.'),
  )


def _fail(message: str) -> None:
  cli_inputs.fail('vit_jax.visualize', message)


def unique_stems(paths: Sequence[pathlib.Path]) -> list[str]:
  """File stems, with -2, -3, ... appended to repeats; a name made so is never another
  file's stem (`a.png`, `a.jpg` and `a-2.png` give a, a-3 and a-2)."""
  taken, count, out = {p.stem for p in paths}, {}, []
  used = set()
  for p in paths:
    stem = p.stem
    if stem in used:
      n = count.get(stem, 1)
      while True:
        n += 1
        stem = f'{p.stem}-{n}'
        if stem not in taken and stem not in used:
          break
      count[p.stem] = n
    used.add(stem)
    out.append(stem)
  return out


def _rollout_on_original(pp, path, mask, out_path, alpha) -> str:
  """The rollout drawn on the original image (decoded as the 'decode' op does)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from vit_jax.data import preprocess_ops  # pylint: disable=g-import-not-at-top
  original = preprocess_ops.parse('decode')({'image': tf.constant(
      image_files.read_image(str(path)))})['image'].numpy()
  return save_rollout_on_original(original, mask, source_window(pp, original.shape[:2]),
                                  out_path, alpha=alpha)



def main(argv):
  from absl import logging  # pylint: disable=g-import-not-at-top
  tensorflow_startup.leave_keras_out()
  tensorflow_startup.quiet_native_logs()
  logging.set_verbosity(logging.WARNING)
  f = {k: v.value for k, v in _FLAGS.items()}
  if not 0 <= f['alpha'] <= 1:
    _fail(f'--alpha must be in [0, 1], got {f["alpha"]}')
  if f['batch_size'] < 1:
    _fail(f'--batch_size must be positive, got {f["batch_size"]}')
  paths, clf = cli_inputs.images_and_classifier(
      'vit_jax.visualize', argv[1:], f['checkpoint'], model=f['model'], labels=f['labels'],
      pp=f['pp'])

  from vit_jax.models import registry  # pylint: disable=g-import-not-at-top
  family = registry.family_of(clf.config) if clf.config is not None else 'vit'
  if family != 'vit':
    _fail(f'{f["checkpoint"]} is a {family} model: attention maps and position embeddings '
          'are drawn for ViTs (and the hybrid R50+ViT) only')
  module = clf.module
  try:
    posemb = pos_embedding(clf.params)
  except ValueError as e:
    _fail(f'{f["checkpoint"]}: {e}')
  prefix = num_prefix_tokens(module)

  out = pathlib.Path(os.path.expanduser(f['out']))  # ('--out=~/maps': no shell expands it)
  if out.exists() and not out.is_dir():
    _fail(f'--out={out} is a file: give a folder for the PNGs (it is created)')
  # This tool's own drawings in --out, when --out is inside a folder given: a second run
  # drew maps of the maps.
  ours = re.compile(r'.*_(rollout|rollout_mask|rollout_original|attention_layers)\.png$|'
                    r'posemb_similarity\.png$')
  mine = [p for p in paths if ours.match(p.name) and p.parent.resolve() == out.resolve()]
  if mine:
    print(f'(not drawn: {len(mine)} of this tool\'s own PNGs in --out={out})', file=sys.stderr)
    paths = [p for p in paths if p not in mine]
    if not paths:
      _fail(f'no images to draw besides this tool\'s own PNGs in --out={out}')
  fn = attention_fn(module)
  stems = unique_stems(paths)
  on_original_ok = traces_back(clf.pp)
  what = 'class-token attention' if prefix else 'mean attention over query tokens'
  bs, total = f['batch_size'], len(paths)
  grid, skipped, drawn = None, False, 0
  # A batch at a time: memory holds one batch of images and maps, not every image, and
  # what is drawn is written before a later image fails.
  for begin in range(0, total, bs):
    group = paths[begin:begin + bs]
    try:
      pixels, errors = clf.read([str(p) for p in group])
    except ValueError as e:
      _fail(f'cannot preprocess the images: {e}')
    for i, error in sorted(errors.items()):
      print(f'vit_jax.visualize: skipping {group[i]}: {error}', file=sys.stderr, flush=True)
    skipped = skipped or bool(errors)
    if not len(pixels):
      continue
    readable = [(p, stems[begin + i]) for i, p in enumerate(group) if i not in errors]
    try:
      views = model_view(clf, [str(p) for p, _ in readable])
    except Exception as e:  # pylint: disable=broad-except
      _fail(f'cannot preprocess the images: {type(e).__name__}: {e}')
    if grid is None:  # the first batch read: what every batch shares
      grid = token_grid(module, pixels.shape[1:3])
      if posemb.shape[1] != prefix + grid[0] * grid[1]:
        _fail(f'the preprocessing ({clf.pp!r}) gives {pixels.shape[1]}x{pixels.shape[2]} '
              f'images, i.e. a {grid[0]}x{grid[1]} token grid, but the position embedding '
              f'holds {posemb.shape[1] - prefix} patch positions: make the preprocessing '
              'end at the model resolution (--pp)')
      if views.shape[1:3] != pixels.shape[1:3]:
        _fail(f'cannot show the images as the model sees them: {clf.pp!r} without its '
              f'value ops gives {views.shape[1:3]} pixels, not {pixels.shape[1:3]}')
      try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # (a folder it cannot write: a traceback
          pass                                 # at the first PNG, after the model ran)
      except OSError as e:
        _fail(f'--out={out}: cannot create the folder or write in it ({e})')
      if not on_original_ok:
        print(f'(no *_rollout_original.png: the preprocessing {clf.pp!r} has ops besides '
              'decode, resize, resize_small and central_crop, whose geometry is not traced '
              'back to the original image)', file=sys.stderr)
    real = len(pixels)
    chunk = pixels
    if total > bs and real < bs:  # the batch's shape (one compilation for every batch)
      chunk = np.concatenate([pixels, np.zeros((bs - real,) + pixels.shape[1:],
                                               pixels.dtype)])
    try:
      logits, attn = fn(clf.params, chunk)
    except Exception as e:  # pylint: disable=broad-except
      _fail(f'cannot run the model: {type(e).__name__}: {e}')
    probs = clf.probs(logits[:real])
    attn = np.asarray(attn[:, :real])
    masks = rollout_mask(attention_rollout(attn, residual=f['residual'],
                                           head_fusion=f['head_fusion']), grid)
    maps = cls_attention_maps(attn, grid)
    for j, (path, stem) in enumerate(readable):
      top = int(np.argmax(probs[j]))
      overlay, mask = save_rollout_overlay(views[j], masks[j],
                                           out / f'{stem}_rollout.png', alpha=f['alpha'])
      try:
        on_original = on_original_ok and _rollout_on_original(
            clf.pp, path, masks[j], out / f'{stem}_rollout_original.png', f['alpha'])
      except ValueError as e:  # this drawing only: the image's other maps are written
        print(f'{path}: no rollout on the original image ({e})', file=sys.stderr)
        on_original, skipped = None, True  # exit status 1 at the end, as for a skip
      layers = save_layer_maps(
          maps[:, j], out / f'{stem}_attention_layers.png',
          title=f'{path.name}, top-1: {clf.label(top)} ({probs[j, top]:.3f})\n'
              f'{what} to the {grid[0]}x{grid[1]} patches')
      print(f'{path}: top-1 {clf.label(top)} ({top}) p={probs[j, top]:.4f}', flush=True)
      for written in (overlay, mask, on_original, layers):
        if written:
          print(f'  {written}')
    drawn += real
  if not drawn:
    _fail(f'none of the {total} images could be read')
  sim = posemb_similarity(posemb, grid, prefix)
  print(save_posemb_grid(sim, out / 'posemb_similarity.png'))
  if skipped:
    sys.exit(1)  # the readable images are drawn above; the others are named


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main, flags_parser=lambda argv: cli_flags.parse_flags(argv, bad_flag_status=2))
