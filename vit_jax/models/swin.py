"""Swin Transformer (Liu et al. 2021): shifted-window attention on a pyramid of stages.

Layout (NHWC throughout; parameter names mirror timm's `SwinTransformer`, with timm's
`layers.{i}` / `blocks.{j}` as `layers_{i}` / `blocks_{j}`, `weight` as `kernel` or
`scale` and `head.fc` as `head`):

  patch_embed/proj         conv patch x patch, stride patch, to embed_dim   (timm patch_embed.proj)
  patch_embed/norm         LayerNorm                                        (patch_embed.norm)
  layers_{i}/downsample    stages i > 0 start with patch merging: each 2x2 neighbourhood
                           concatenated to 4C channels, LayerNorm `norm`, bias-free Dense
                           `reduction` to 2C                               (layers.{i}.downsample)
  layers_{i}/blocks_{j}    norm1, attn/{qkv, proj, relative_position_bias_table}, norm2,
                           mlp/{fc1, fc2}                                   (layers.{i}.blocks.{j})
  norm                     final LayerNorm, then a global average pool      (norm)
  head                     Dense to num_classes                             (head.fc)

Numerics follow timm 1.0.31 exactly: exact GELU, LayerNorm epsilon 1e-5, q scaled by
head_dim**-0.5 before q.k, the relative position bias added to the logits, and in odd
blocks a cyclic shift by window // 2 with a mask that adds -100 to the logits of token
pairs from different regions of the shifted image. Patch merging concatenates the 2x2
neighbours in timm's order: (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1).

Windows and shifts are fixed per stage from the static input shape (numpy at trace time):
a stage whose resolution along an axis is at most the window uses a window of that
resolution and no shift along that axis (timm's rule), so e.g. Swin-T at 224 has an
unshifted 7x7 last stage. The relative position bias table of a block therefore has
(2 wh - 1)(2 ww - 1) rows for the window it actually uses. Every other stage must be a
multiple of its window, and stages that are merged must have an even size; inputs that
would need timm's zero padding are refused with a ValueError (`stage_plan`).

`resample_relative_position_bias` and `resample_window_params` move the bias tables to a
new window (fine-tuning 224 px / window 7 -> 384 px / window 12) with timm's resampling
(`timm.layers.resize_rel_pos_bias_table`: linear interpolation on the geometric grid of
BEiT, not a bicubic resize).
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax.models import attention as attention_lib
from vit_jax.models import common
from vit_jax.models import dense_matmul
from vit_jax.models import remat as remat_lib

FAMILY = 'swin'

FIELD_DOCS = {
    'name': 'registered name the config came from',
    'family': "model family: 'swin'",
    'image_size': 'default input resolution in pixels: int (square) or (height, width)',
    'num_classes': 'classifier outputs; 0 or None returns the pooled features',
    'in_channels': 'input channels',
    'dtype': "compute dtype: 'float32' or 'bfloat16'",
    'param_dtype': "parameter dtype: 'float32' (recommended) or 'bfloat16'",
    'patch_size': 'side of the square patches of the patch embedding, in pixels',
    'embed_dim': 'channels of the first stage; doubled by the patch merging of every stage',
    'depths': 'number of blocks of each stage, e.g. (2, 2, 6, 2)',
    'num_heads': 'attention heads of each stage, e.g. (3, 6, 12, 24)',
    'window_size': 'attention window side (tokens): int for all stages or one int per stage',
    'mlp_ratio': 'MLP hidden width / block width',
    'drop_rate': 'dropout on the pooled features before the head',
    'proj_drop_rate': 'dropout after the attention projection and after each MLP layer',
    'attn_drop_rate': 'dropout on the attention weights',
    'drop_path_rate': 'stochastic depth of the last block (linear from 0 at the first)',
    'layernorm_eps': 'LayerNorm epsilon (1e-5 original and timm)',
    'remat_policy': "what each block keeps for the backward pass: None (everything, the "
                    "default), 'full', 'dots', 'dots_no_batch', 'auto' ('dots_no_batch' on "
                    'CPU; vit_jax/models/remat.py)',
    'custom_vjp': 'True: the Dense matmuls and the CPU window attention use hand-written '
                  'backward passes; False: plain autodiff, which forward mode (jax.jvp) needs',
}
# Fields that configs written by earlier versions lack, with the value they meant.
_OPTIONAL_FIELDS = {'custom_vjp': True}

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
_MASK_VALUE = -100.0  # added to the logits of token pairs from different shifted regions


# ----------------------------------------------------------------------------------------
# Static geometry: stage sizes, windows, shifts, masks and relative position indices.


def pair(v) -> tuple[int, int]:
  """int or (height, width) -> (height, width)."""
  if isinstance(v, (int, np.integer)):
    return int(v), int(v)
  v = tuple(int(a) for a in v)
  if len(v) != 2:
    raise ValueError(f'expected an int or (height, width), got {v}')
  return v


def stage_windows(window_size, num_stages: int) -> tuple[int, ...]:
  """The configured window of every stage (before clamping to the stage size)."""
  if isinstance(window_size, (int, np.integer)):
    return (int(window_size),) * num_stages
  windows = tuple(int(w) for w in window_size)
  if len(windows) != num_stages:
    raise ValueError(f'window_size={tuple(window_size)!r} has {len(windows)} entries but '
                     f'there are {num_stages} stages: pass an int or one int per stage')
  return windows


def _stage_problems(size: int, patch: int, windows: Sequence[int]) -> list[str]:
  """Why an input side of `size` pixels does not fit (empty when it fits)."""
  if size % patch:
    return [f'{size} is not a multiple of the patch size {patch}']
  res, problems = size // patch, []
  for i, w in enumerate(windows):
    if i > 0:
      if res % 2:
        problems.append(f'stage {i} merges 2x2 patches of an odd size {res}')
        break
      res //= 2
    if res > w and res % w:
      problems.append(f'stage {i} has size {res}, not a multiple of its window {w}')
  return problems


def _sizes_that_fit(size: int, patch: int, windows: Sequence[int]) -> list[int]:
  """The nearest input sides below and above `size` that fit."""
  step = patch * 2 ** (len(windows) - 1)
  found = []
  below = [s for s in range(size - size % step, 0, -step)
           if not _stage_problems(s, patch, windows)][:1]
  found += below
  for s in range(size - size % step + step, 64 * step * max(windows) + size, step):
    if not _stage_problems(s, patch, windows):
      found.append(s)
      break
  return found


def stage_plan(image_hw, patch_size: int, depths: Sequence[int], window_size):
  """Per stage: ((H, W) tokens, (wh, ww) window, (sh, sw) shift of the odd blocks).

  Raises ValueError naming the sizes and nearby input sizes that work when the input does
  not fit (not a multiple of the patch, an odd size before a patch merging, or a stage
  larger than its window but not a multiple of it).
  """
  h, w = pair(image_hw)
  windows = stage_windows(window_size, len(depths))
  problems = {}
  for axis, size in (('height', h), ('width', w)):
    p = _stage_problems(size, patch_size, windows)
    if p:
      problems[axis] = (size, p)
  if problems:
    msg = []
    for axis, (size, p) in problems.items():
      fit = _sizes_that_fit(size, patch_size, windows)
      msg.append(f'{axis} {size}: ' + '; '.join(p) + f' (sizes that work near {size}: '
                 + ', '.join(map(str, fit)) + ')')
    raise ValueError(
        f'Swin cannot take a {h}x{w} input with patch {patch_size} and windows '
        f'{windows}: ' + ' | '.join(msg) + '. Every stage must be a multiple of its '
        'window or at most the window, and even before each patch merging.')
  plan = []
  res = (h // patch_size, w // patch_size)
  for i, win in enumerate(windows):
    if i > 0:
      res = (res[0] // 2, res[1] // 2)
    window = tuple(min(r, win) for r in res)
    shift = tuple(0 if r <= win else win // 2 for r in res)
    plan.append((res, window, shift))
  return plan


def relative_position_index(window) -> np.ndarray:
  """(N, N) int index into the flattened (2 wh - 1, 2 ww - 1) bias table, N = wh * ww."""
  wh, ww = pair(window)
  rows, cols = np.meshgrid(np.arange(wh), np.arange(ww), indexing='ij')
  rows, cols = rows.reshape(-1), cols.reshape(-1)
  d_row = rows[:, None] - rows[None, :] + wh - 1
  d_col = cols[:, None] - cols[None, :] + ww - 1
  return (d_row * (2 * ww - 1) + d_col).astype(np.int32)


def _region_labels(n: int, window: int, shift: int) -> np.ndarray:
  """Region of every row (or column) of the shifted image: the later slice wins."""
  labels = np.zeros(n, np.int32)
  for label, (a, b) in enumerate(((0, -window), (-window, -shift), (-shift, None))):
    labels[slice(a, b)] = label
  return labels


def shift_mask(resolution, window, shift) -> np.ndarray | None:
  """(num_windows, N, N) additive mask of the shifted blocks (0 or -100), None if no shift."""
  (h, w), (wh, ww), (sh, sw) = pair(resolution), pair(window), pair(shift)
  if not (sh or sw):
    return None
  region = (_region_labels(h, wh, sh)[:, None] * 3 + _region_labels(w, ww, sw)[None, :])
  windows = _partition(region[None, :, :, None], wh, ww)[0, :, :, 0]  # (nW, N)
  differ = windows[:, None, :] != windows[:, :, None]
  return np.where(differ, _MASK_VALUE, 0.0).astype(np.float32)


def _partition(x, wh: int, ww: int):
  """(B, H, W, C) -> (B, num_windows, wh * ww, C), windows in row-major order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def _unpartition(x, wh: int, ww: int, h: int, w: int):
  """Inverse of `_partition`."""
  b, _, _, c = x.shape
  x = x.reshape(b, h // wh, w // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def drop_path_rates(drop_path_rate: float, depths: Sequence[int]) -> list[list[float]]:
  """Stochastic depth of every block: linear from 0 to `drop_path_rate` over all blocks."""
  rates = np.linspace(0.0, drop_path_rate, sum(depths), dtype=np.float32).tolist()
  out, start = [], 0
  for d in depths:
    out.append(rates[start:start + d])
    start += d
  return out


# ----------------------------------------------------------------------------------------
# Modules.

_dense_init = nn.initializers.truncated_normal(stddev=0.02)


class DropPath(nn.Module):
  """Drops the whole residual branch of a sample with probability `rate` (train only)."""
  rate: float

  @nn.compact
  def __call__(self, x, *, train: bool):
    if not train or self.rate == 0.0:
      return x
    return common.drop_path(x, self.rate, self.make_rng('dropout'))


class WindowAttention(nn.Module):
  """Multi-head self-attention within windows, with a learned relative position bias.

  Input (B, num_windows, N, C); `window` is the (wh, ww) the windows were cut with and
  `mask` the optional (num_windows, N, N) additive shift mask.
  """
  num_heads: int
  window: tuple[int, int]
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  custom_vjp: bool = True

  @nn.compact
  def __call__(self, x, mask, *, train: bool):
    b, nw, n, c = x.shape
    head_dim = c // self.num_heads
    wh, ww = self.window
    table = self.param('relative_position_bias_table', _dense_init,
                       ((2 * wh - 1) * (2 * ww - 1), self.num_heads), self.param_dtype)
    dense = lambda features, name: nn.Dense(  # noqa: E731
        features, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_dense_init,
        dot_general=dense_matmul.dot_general_fn(self.dtype, custom_vjp=self.custom_vjp),
        name=name)
    qkv = dense(3 * c, 'qkv')(x).reshape(b, nw, n, 3, self.num_heads, head_dim)
    q, k, v = (qkv[:, :, :, i] for i in range(3))  # (B, nW, N, heads, head_dim)
    index = relative_position_index(self.window).reshape(-1)
    bias = jnp.asarray(table, jnp.float32)[index].reshape(n, n, self.num_heads)
    bias = bias.transpose(2, 0, 1)  # (heads, N, N)
    heads_major = (attention_lib.resolve_implementation(None) == 'heads_major'
                   and self.custom_vjp)
    if heads_major and train and not self.attn_drop_rate:
      # CPU training: the windows folded into the batch, the bias per (window, head); the
      # backward matmuls in row-major layouts (vit_jax/models/attention.py). Swin-T's
      # float32 train step: 1.15 s against 1.21 s with the einsums below, which infer
      # faster (29.6 against 27.1 images/s; 2-core EPYC, batch 8).
      if mask is not None:
        bias = (jnp.asarray(mask, jnp.float32)[:, None] + bias).reshape(-1, n, n)
      fold = lambda t: t.reshape(b * nw, n, self.num_heads, head_dim)  # noqa: E731
      y = attention_lib.heads_major_attention(fold(q), fold(k), fold(v), bias)
      y = y.reshape(b, nw, n, c)
    else:
      q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
      logits = jnp.einsum('bwqhd,bwkhd->bwhqk', q, k).astype(jnp.float32) + bias
      if mask is not None:
        logits = logits + jnp.asarray(mask)[None, :, None]
      weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
      weights = nn.Dropout(self.attn_drop_rate, deterministic=not train)(weights)
      y = jnp.einsum('bwhqk,bwkhd->bwqhd', weights, v).reshape(b, nw, n, c)
    y = dense(c, 'proj')(y)
    return nn.Dropout(self.proj_drop_rate, deterministic=not train)(y)


class Mlp(nn.Module):
  """fc1, exact GELU, dropout, fc2, dropout."""
  hidden: int
  drop_rate: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  custom_vjp: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_dense_init,
              dot_general=dense_matmul.dot_general_fn(self.dtype, custom_vjp=self.custom_vjp))
    y = nn.gelu(nn.Dense(self.hidden, name='fc1', **kw)(x), approximate=False)
    y = nn.Dropout(self.drop_rate, deterministic=not train)(y)
    y = nn.Dense(x.shape[-1], name='fc2', **kw)(y)
    return nn.Dropout(self.drop_rate, deterministic=not train)(y)


class SwinBlock(nn.Module):
  """Pre-norm block: (shifted) window attention and MLP, each with a residual."""
  num_heads: int
  window: tuple[int, int]
  shift: tuple[int, int] = (0, 0)
  mlp_ratio: float = 4.0
  proj_drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  layernorm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  custom_vjp: bool = True

  def _norm(self, name):
    return nn.LayerNorm(epsilon=self.layernorm_eps, use_fast_variance=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x, train: bool):  # train positional: static under nn.remat
    _, h, w, c = x.shape
    (wh, ww), (sh, sw) = self.window, self.shift
    drop_path = DropPath(self.drop_path_rate)
    y = self._norm('norm1')(x)
    if sh or sw:
      y = jnp.roll(y, (-sh, -sw), axis=(1, 2))
    mask = shift_mask((h, w), self.window, self.shift)
    y = WindowAttention(self.num_heads, self.window, self.attn_drop_rate, self.proj_drop_rate,
                        dtype=self.dtype, param_dtype=self.param_dtype,
                        custom_vjp=self.custom_vjp, name='attn')(
                            _partition(y, wh, ww), mask, train=train)
    y = _unpartition(y, wh, ww, h, w)
    if sh or sw:
      y = jnp.roll(y, (sh, sw), axis=(1, 2))
    x = x + drop_path(y, train=train)
    y = Mlp(int(c * self.mlp_ratio), self.proj_drop_rate, dtype=self.dtype,
            param_dtype=self.param_dtype, custom_vjp=self.custom_vjp, name='mlp')(self._norm('norm2')(x), train=train)
    return x + drop_path(y, train=train)


class PatchMerging(nn.Module):
  """2x2 neighbours -> 4C channels (timm's order), LayerNorm, bias-free Dense to `features`."""
  features: int
  layernorm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    # (B, H/2, row, W/2, col, C) -> (B, H/2, W/2, col, row, C): col-major neighbour order.
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)
    x = x.reshape(b, h // 2, w // 2, 4 * c)
    x = nn.LayerNorm(epsilon=self.layernorm_eps, use_fast_variance=False, dtype=self.dtype,
                     param_dtype=self.param_dtype, name='norm')(x)
    return nn.Dense(self.features, use_bias=False, dtype=self.dtype,
                    param_dtype=self.param_dtype, kernel_init=_dense_init,
                    name='reduction')(x)


class PatchEmbed(nn.Module):
  """Non-overlapping patches -> embed_dim channels (conv `proj`), LayerNorm `norm`."""
  patch_size: int
  embed_dim: int
  layernorm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                param_dtype=self.param_dtype, name='proj')(x)
    return nn.LayerNorm(epsilon=self.layernorm_eps, use_fast_variance=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name='norm')(x)


class SwinStage(nn.Module):
  """Optional patch merging (`downsample`) to `features`, then `blocks_{j}`.

  Even blocks use plain windows, odd blocks windows shifted by `shift`.
  """
  features: int
  num_heads: int
  window: tuple[int, int]
  shift: tuple[int, int]
  drop_path_rates: Sequence[float]
  downsample: bool
  mlp_ratio: float = 4.0
  proj_drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  layernorm_eps: float = 1e-5
  remat_policy: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  custom_vjp: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool):
    kw = dict(layernorm_eps=self.layernorm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.downsample:
      x = PatchMerging(self.features, name='downsample', **kw)(x)
    block_cls = SwinBlock
    if remat_lib.resolve(self.remat_policy) is not None:  # same names, recomputed in backward
      block_cls = nn.remat(SwinBlock, policy=remat_lib.policy(self.remat_policy),
                           static_argnums=(2,))
    for j, rate in enumerate(self.drop_path_rates):
      x = block_cls(self.num_heads, self.window, self.shift if j % 2 else (0, 0),
                    mlp_ratio=self.mlp_ratio, proj_drop_rate=self.proj_drop_rate,
                    attn_drop_rate=self.attn_drop_rate, drop_path_rate=rate,
                    custom_vjp=self.custom_vjp, name=f'blocks_{j}', **kw)(x, train)
    return x


class SwinTransformer(nn.Module):
  """Swin Transformer classifier; `__call__(x, train=...)` takes NHWC images.

  Any input size accepted by `stage_plan` works; the relative position bias tables are
  sized for the (clamped) windows of the size the parameters were initialised with.
  """
  num_classes: int | None = 1000
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: Any = 7  # int, or one int per stage
  mlp_ratio: float = 4.0
  drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  layernorm_eps: float = 1e-5
  remat_policy: str | None = None
  in_channels: int = 3
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  custom_vjp: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    common.check_nhwc(x, self.in_channels)
    common.check_train_apply(self, train, dict(
        drop_rate=self.drop_rate, proj_drop_rate=self.proj_drop_rate,
        attn_drop_rate=self.attn_drop_rate, drop_path_rate=self.drop_path_rate))
    plan = stage_plan(x.shape[1:3], self.patch_size, self.depths, self.window_size)
    kw = dict(layernorm_eps=self.layernorm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    x = PatchEmbed(self.patch_size, self.embed_dim, name='patch_embed', **kw)(x)
    rates = drop_path_rates(self.drop_path_rate, self.depths)
    for i, (heads, (_, window, shift)) in enumerate(zip(self.num_heads, plan)):
      x = SwinStage(self.embed_dim * 2 ** i, heads, window, shift, tuple(rates[i]),
                    downsample=i > 0, mlp_ratio=self.mlp_ratio,
                    proj_drop_rate=self.proj_drop_rate, attn_drop_rate=self.attn_drop_rate,
                    remat_policy=self.remat_policy, custom_vjp=self.custom_vjp,
                    name=f'layers_{i}', **kw)(x, train=train)
    x = nn.LayerNorm(epsilon=self.layernorm_eps, use_fast_variance=False, dtype=self.dtype,
                     param_dtype=self.param_dtype, name='norm')(x)
    x = jnp.mean(x, axis=(1, 2))
    if not self.num_classes:
      return x.astype(jnp.float32)  # float32 features in mixed precision, as the ViT's
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=nn.initializers.zeros,
                      dot_general=dense_matmul.dot_general_fn(self.dtype,
                                                              custom_vjp=self.custom_vjp),
                      name='head')(x)
    return logits.astype(jnp.float32)  # float32 logits in mixed precision, as the ViT's


# ----------------------------------------------------------------------------------------
# Window resampling (fine-tuning at another window size).


def _bisect_ratio(src: int, dst: int) -> float:
  """Ratio q of the geometric grid whose src // 2 steps from 0 span about dst // 2."""
  lo, hi = 1.01, 1.5
  q = lo
  while hi - lo > 1e-6:
    q = (lo + hi) / 2.0
    span = (1.0 - q ** (src // 2)) / (1.0 - q)
    if span > dst // 2:
      hi = q
    else:
      lo = q
  return q  # the last midpoint tried, as in timm


def _geometric_grid(src: int, dst: int) -> np.ndarray:
  """Positions of the `src` source offsets, spaced geometrically from the centre."""
  q = _bisect_ratio(src, dst)
  steps, pos = [], 1.0
  for i in range(src // 2):
    steps.append(pos)
    pos += q ** (i + 1)
  return np.asarray([-s for s in reversed(steps)] + [0.0] + steps, np.float32)


def _interp_matrix(points: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """(len(targets), len(points)) linear interpolation weights, constant beyond the ends."""
  n = len(points)
  right = np.clip(np.searchsorted(points, targets, side='left'), None, n - 1)
  left = np.clip(right - 1, 0, n - 1)
  d_left = np.maximum(targets - points[left], 0).astype(np.float32)
  d_right = np.maximum(points[right] - targets, 0).astype(np.float32)
  both_zero = (d_left == 0) & (d_right == 0)
  d_left[both_zero] = 1.0
  d_right[both_zero] = 1.0
  total = d_left + d_right
  m = np.zeros((len(targets), n), np.float64)
  rows = np.arange(len(targets))
  np.add.at(m, (rows, left), d_right / total)
  np.add.at(m, (rows, right), d_left / total)
  return m


def resample_relative_position_bias(table, new_window, old_window=None) -> np.ndarray:
  """Resamples a ((2 wh - 1)(2 ww - 1), heads) bias table to another window.

  Reproduces timm's `resize_rel_pos_bias_table` (the BEiT scheme): the source offsets
  are laid on a grid whose spacing grows geometrically away from 0 so that it spans the
  new offsets, and the new offsets are interpolated linearly on it (clamped beyond the
  ends). `new_window` / `old_window`: int or (wh, ww); without `old_window` the source
  window is taken as square, or as the new window when the table already has its size.
  """
  table = np.asarray(table)
  if table.ndim != 2:
    raise ValueError(f'expected a (positions, heads) table, got shape {table.shape}')
  nh, nw = pair(new_window)
  dst = (2 * nh - 1, 2 * nw - 1)
  if old_window is not None:
    oh, ow = pair(old_window)
    src = (2 * oh - 1, 2 * ow - 1)
    if src[0] * src[1] != table.shape[0]:
      raise ValueError(f'a table for window {(oh, ow)} has {src[0] * src[1]} rows, this one '
                       f'has {table.shape[0]}')
  else:
    side = math.isqrt(table.shape[0])
    if side * side == table.shape[0]:
      src = (side, side)
    elif table.shape[0] == dst[0] * dst[1]:
      src = dst
    else:
      raise ValueError(f'cannot tell the window of a table of {table.shape[0]} rows: pass '
                       'old_window')
  if src == dst:
    return table
  targets = [np.arange(-(d // 2), d // 2 + 0.1, 1.0, dtype=np.float32) for d in dst]
  m_rows = _interp_matrix(_geometric_grid(src[0], dst[0]), targets[0])
  m_cols = _interp_matrix(_geometric_grid(src[1], dst[1]), targets[1])
  grid = table.astype(np.float64).reshape(src[0], src[1], -1)
  out = np.einsum('ir,rch,jc->ijh', m_rows, grid, m_cols)
  return out.reshape(dst[0] * dst[1], -1).astype(table.dtype)


def resample_window_params(params, config, image_size=None):
  """Params tree with every bias table resampled to the windows of `config`.

  The target window of each stage is that of `config.window_size` at `image_size`
  (default `config.image_size`), clamped to the stage size as the model does. Source
  windows are inferred as in timm's checkpoint loading (square tables). Returns a new
  nested dict; other leaves are passed through unchanged. E.g. Swin-B 224 px / window 7
  params -> `resample_window_params(params, get_config('Swin-B/384'))`.
  """
  image_size = config.image_size if image_size is None else image_size
  plan = stage_plan(image_size, config.patch_size, config.depths, config.window_size)

  def visit(node, path):
    out = {}
    for k, v in node.items():
      if isinstance(v, Mapping):
        out[k] = visit(v, path + (k,))
      elif k == 'relative_position_bias_table':
        stage = [p for p in path if p.startswith('layers_')]
        if not stage:
          raise ValueError(f'cannot tell the stage of {"/".join(path + (k,))}')
        window = plan[int(stage[0][len('layers_'):])][1]
        out[k] = resample_relative_position_bias(np.asarray(v), window)
      else:
        out[k] = v
    return out

  return visit(params, ())


# ----------------------------------------------------------------------------------------
# Configs.

_SIZES = {  # embed_dim, depths, num_heads, paper drop_path_rate
    'T': ('tiny', 96, (2, 2, 6, 2), (3, 6, 12, 24), 0.2),
    'S': ('small', 96, (2, 2, 18, 2), (3, 6, 12, 24), 0.3),
    'B': ('base', 128, (2, 2, 18, 2), (4, 8, 16, 32), 0.5),
    'L': ('large', 192, (2, 2, 18, 2), (6, 12, 24, 48), 0.2),
}
# timm ships these (size, window, resolution) combinations.
_TIMM = (('T', 7, 224), ('S', 7, 224), ('B', 7, 224), ('B', 12, 384), ('L', 7, 224),
         ('L', 12, 384))
_TIMM_DROP_PATH = 0.1  # timm's SwinTransformer default


def _config(name, size, window, image_size, drop_path_rate):
  _, embed, depths, heads, _ = _SIZES[size]
  c = common.base_config(name, FAMILY, image_size)
  c.patch_size = 4
  c.embed_dim = embed
  c.depths = depths
  c.num_heads = heads
  c.window_size = window
  c.mlp_ratio = 4.0
  c.drop_rate = 0.0
  c.proj_drop_rate = 0.0
  c.attn_drop_rate = 0.0
  c.drop_path_rate = drop_path_rate
  c.layernorm_eps = 1e-5
  c.remat_policy = None  # measured: Swin-T trains 7% faster on CPU without remat
  c.custom_vjp = True
  assert set(c.keys()) == set(FIELD_DOCS)
  return c


def timm_name(size: str, window: int, image_size: int) -> str:
  return f'swin_{_SIZES[size][0]}_patch4_window{window}_{image_size}'


def named_configs() -> dict[str, ml_collections.ConfigDict]:
  """Paper names ('Swin-T', 'Swin-T/384', ...) and timm names -> fresh configs.

  Paper names use the paper's stochastic depth (T 0.2, S 0.3, B 0.5 on ImageNet-1k; L 0.2
  from its ImageNet-22k pre-training); timm names timm's default 0.1. Both use window 7
  at 224 px and window 12 at 384 px.
  """
  out = {}
  for size, (_, _, _, _, dpr) in _SIZES.items():
    out[f'Swin-{size}'] = _config(f'Swin-{size}', size, 7, 224, dpr)
    out[f'Swin-{size}/384'] = _config(f'Swin-{size}/384', size, 12, 384, dpr)
  for size, window, res in _TIMM:
    name = timm_name(size, window, res)
    out[name] = _config(name, size, window, res, _TIMM_DROP_PATH)
  return out


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _int_tuple(config, field) -> tuple[int, ...]:
  v = config[field]
  if not isinstance(v, Sequence) or isinstance(v, str) or not v or not all(
      _is_int(a) and a > 0 for a in v):
    raise ValueError(f'{field}={v!r} must be a non-empty sequence of positive ints')
  return tuple(int(a) for a in v)


def from_config(config) -> SwinTransformer:
  """Builds the module of a config with exactly the FIELD_DOCS fields.

  Raises ValueError naming the field and its allowed values for anything that cannot
  work (including an `image_size` that does not fit the windows).
  """
  keys = set(config.keys())
  if keys - set(FIELD_DOCS) or set(FIELD_DOCS) - set(_OPTIONAL_FIELDS) - keys:
    raise ValueError(f'swin config fields: unknown {sorted(keys - set(FIELD_DOCS))}, '
                     f'missing {sorted(set(FIELD_DOCS) - set(_OPTIONAL_FIELDS) - keys)}; '
                     f'valid fields: {sorted(FIELD_DOCS)}')
  if config.family != FAMILY:
    raise ValueError(f'family={config.family!r}: this builder takes {FAMILY!r}')
  for field in ('patch_size', 'embed_dim', 'in_channels'):
    if not _is_int(config[field]) or config[field] < 1:
      raise ValueError(f'{field}={config[field]!r} must be a positive int')
  nc = config.num_classes
  if nc is not None and (not _is_int(nc) or nc < 0):
    raise ValueError(f'num_classes={nc!r} must be a non-negative int or None')
  depths = _int_tuple(config, 'depths')
  heads = _int_tuple(config, 'num_heads')
  if len(heads) != len(depths):
    raise ValueError(f'num_heads={heads} must have one entry per stage ({len(depths)}, '
                     f'as depths={depths})')
  for i, h in enumerate(heads):
    dim = config.embed_dim * 2 ** i
    if dim % h:
      raise ValueError(f'num_heads[{i}]={h} does not divide the width {dim} of stage {i} '
                       f'(embed_dim={config.embed_dim} * 2**{i})')
  window = config.window_size
  if _is_int(window):
    if window < 1:
      raise ValueError(f'window_size={window} must be a positive int')
  else:
    window = _int_tuple(config, 'window_size')
    if len(window) != len(depths):
      raise ValueError(f'window_size={window} must be an int or one int per stage '
                       f'({len(depths)} stages)')
  if not isinstance(config.mlp_ratio, (int, float)) or int(
      config.embed_dim * config.mlp_ratio) < 1:
    raise ValueError(f'mlp_ratio={config.mlp_ratio!r} must be a positive number')
  for field in ('drop_rate', 'proj_drop_rate', 'attn_drop_rate', 'drop_path_rate'):
    if not isinstance(config[field], (int, float)) or not 0.0 <= config[field] < 1.0:
      raise ValueError(f'{field}={config[field]!r} must be in [0, 1)')
  if not isinstance(config.layernorm_eps, (int, float)) or config.layernorm_eps <= 0:
    raise ValueError(f'layernorm_eps={config.layernorm_eps!r} must be positive')
  if config.remat_policy not in remat_lib.POLICIES:
    raise ValueError(f'remat_policy={config.remat_policy!r} is not one of '
                     f'{remat_lib.POLICIES}')
  custom_vjp = config.get('custom_vjp', _OPTIONAL_FIELDS['custom_vjp'])
  if not isinstance(custom_vjp, (bool, np.bool_)):  # (the string 'False' was True)
    raise ValueError(f'custom_vjp={custom_vjp!r} ({type(custom_vjp).__name__}): the field '
                     'takes a bool, e.g. custom_vjp=False')
  dtypes = {}
  for field in ('dtype', 'param_dtype'):
    if config[field] not in _DTYPES:
      raise ValueError(f'{field}={config[field]!r} is not one of {sorted(_DTYPES)}')
    dtypes[field] = _DTYPES[config[field]]
  try:
    stage_plan(config.image_size, config.patch_size, depths, window)
  except ValueError as e:
    raise ValueError(f'image_size={config.image_size!r} does not fit: {e}') from None
  return SwinTransformer(
      num_classes=nc, patch_size=config.patch_size, embed_dim=config.embed_dim,
      depths=depths, num_heads=heads, window_size=window, mlp_ratio=float(config.mlp_ratio),
      drop_rate=float(config.drop_rate), proj_drop_rate=float(config.proj_drop_rate),
      attn_drop_rate=float(config.attn_drop_rate),
      drop_path_rate=float(config.drop_path_rate),
      layernorm_eps=float(config.layernorm_eps), remat_policy=config.remat_policy,
      in_channels=config.in_channels,
      custom_vjp=bool(custom_vjp), **dtypes)
