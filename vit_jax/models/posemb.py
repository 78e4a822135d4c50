"""Resampling a learned position embedding to a new token grid (new resolution).

Both methods are separable linear maps, built here as explicit (new, old) matrices per
axis so the result is exact, deterministic and independent of any image library:

- `bilinear`: the original ViT repository's method, `scipy.ndimage.zoom(order=1)`, which
  aligns the corner samples (PyTorch's `align_corners=True`).
- `bicubic`: timm's default, `torch.nn.functional.interpolate(mode='bicubic',
  antialias=True, align_corners=False)`: a Keys cubic (a = -0.5) whose support widens by
  the scale factor when downsampling, weights normalised per output sample, no samples
  taken outside the grid (the same filter as PIL's bicubic resize).

Prefix tokens (the class token) are kept aside unchanged.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ('bilinear', 'bicubic')


def _bilinear_align_corners(n_in: int, n_out: int) -> np.ndarray:
  m = np.zeros((n_out, n_in), np.float64)
  if n_in == 1 or n_out == 1:
    m[:, 0] = 1.0
    return m
  src = np.arange(n_out) * (n_in - 1) / (n_out - 1)
  lo = np.clip(np.floor(src).astype(int), 0, n_in - 2)
  frac = src - lo
  m[np.arange(n_out), lo] += 1.0 - frac
  m[np.arange(n_out), lo + 1] += frac
  return m


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  x = np.abs(x)
  return np.where(
      x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
      np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _bicubic_antialias(n_in: int, n_out: int) -> np.ndarray:
  scale = n_in / n_out
  support_scale = max(scale, 1.0)
  support = 2.0 * support_scale
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    center = (i + 0.5) * scale
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), n_in)
    j = np.arange(lo, hi)
    w = _cubic((j - center + 0.5) / support_scale)
    m[i, lo:hi] = w / w.sum()
  return m


def resize_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
  """The (n_out, n_in) matrix that resamples one axis with `method`."""
  if method == 'bilinear':
    return _bilinear_align_corners(n_in, n_out)
  if method == 'bicubic':
    return _bicubic_antialias(n_in, n_out)
  raise ValueError(f'unknown resampling method {method!r}; choose one of {METHODS}')


def _as_grid(grid) -> tuple[int, int]:
  """(rows, cols) of a grid given as an int or a pair of positive ints; a ValueError
  naming the value otherwise (0 or 2.5 failed inside numpy's reshape)."""
  is_int = lambda g: isinstance(g, (int, np.integer)) and not isinstance(g, bool)  # noqa: E731
  pair = (grid, grid) if is_int(grid) else (
      tuple(grid) if isinstance(grid, (tuple, list, np.ndarray)) else None)
  if pair is None or len(pair) != 2 or not all(is_int(g) and g > 0 for g in pair):
    raise ValueError(f'a grid is a positive int or (rows, cols) of positive ints, got '
                     f'{grid!r}')
  return (int(pair[0]), int(pair[1]))


def resample_posemb(posemb, new_grid, method: str = 'bilinear', *,
                    num_prefix_tokens: int | None = None, old_grid=None):
  """Resamples posemb (1, prefix + rows * cols, width) to `new_grid` (int or (rows, cols)).

  `num_prefix_tokens` (class token) is inferred when omitted: 0 if the token count is a
  perfect square, 1 if it is one more than a square. `old_grid` is needed only for a
  non-square grid. Returns an array of posemb's type (numpy or jax) and dtype.
  """
  if method not in METHODS:
    raise ValueError(f'unknown resampling method {method!r}; choose one of {METHODS}')
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f'expected a position embedding of shape (1, tokens, width), '
                     f'got {tuple(posemb.shape)}')
  ntok = posemb.shape[1]
  if num_prefix_tokens is None:
    if old_grid is not None:
      gh, gw = _as_grid(old_grid)
      num_prefix_tokens = ntok - gh * gw
    elif math.isqrt(ntok) ** 2 == ntok:
      num_prefix_tokens = 0
    elif math.isqrt(ntok - 1) ** 2 == ntok - 1:
      num_prefix_tokens = 1
    else:
      raise ValueError(f'cannot infer the grid of a position embedding with {ntok} tokens; '
                       'pass old_grid=(rows, cols) and num_prefix_tokens')
  if old_grid is None:
    side = math.isqrt(ntok - num_prefix_tokens)
    old_grid = (side, side)
  gh, gw = _as_grid(old_grid)
  if gh * gw + num_prefix_tokens != ntok:
    raise ValueError(f'old grid {(gh, gw)} plus {num_prefix_tokens} prefix tokens does not '
                     f'match {ntok} tokens')
  nh, nw = _as_grid(new_grid)

  prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  mh = resize_matrix(gh, nh, method)
  mw = resize_matrix(gw, nw, method)
  if isinstance(posemb, np.ndarray):
    out = np.einsum('ih,jw,hwc->ijc', mh, mw, grid.reshape(gh, gw, -1).astype(np.float64))
    out = out.reshape(1, nh * nw, -1).astype(posemb.dtype)
    return np.concatenate([prefix, out], axis=1)
  grid = grid.reshape(gh, gw, -1).astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  out = jnp.einsum('ih,hwc->iwc', jnp.asarray(mh, jnp.float32), grid, precision=hi)
  out = jnp.einsum('jw,iwc->ijc', jnp.asarray(mw, jnp.float32), out, precision=hi)
  out = out.reshape(1, nh * nw, -1).astype(posemb.dtype)
  return jnp.concatenate([prefix, out], axis=1)
