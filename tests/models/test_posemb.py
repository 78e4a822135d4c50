"""vit_jax.models.resample_posemb against independent reference implementations.

References:
- bilinear: scipy.ndimage.zoom(order=1) on the (rows, cols, D) grid (the original ViT
  repository's method);
- bicubic: torch.nn.functional.interpolate(mode='bicubic', antialias=True,
  align_corners=False) and timm.layers.resample_abs_pos_embed (timm's default).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import torch

from vit_jax import models

ATOL = 1e-5  # absolute, on float32 values drawn from N(0, 1)
WIDTH = 8
# (old side, new side): up-sampling and down-sampling.
RESIZES = [(7, 12), (14, 24), (24, 14), (12, 7)]


def _posemb(grid, with_cls, seed=0, width=WIDTH):
  rows, cols = (grid, grid) if isinstance(grid, int) else grid
  rng = np.random.default_rng(seed)
  return rng.standard_normal((1, int(with_cls) + rows * cols, width)).astype(np.float32)


def _scipy_bilinear(posemb, old, new, prefix):
  """Reference: scipy zoom (order=1) of the grid, prefix tokens kept aside."""
  (gh, gw), (nh, nw) = old, new
  grid = posemb[0, prefix:].reshape(gh, gw, -1)
  out = scipy.ndimage.zoom(grid, (nh / gh, nw / gw, 1), order=1)
  assert out.shape == (nh, nw, grid.shape[-1])
  return np.concatenate([posemb[:, :prefix], out.reshape(1, nh * nw, -1)], axis=1)


def _torch_bicubic(posemb, old, new, prefix):
  """Reference: torch bicubic antialiased interpolation of the NCHW grid."""
  (gh, gw), (nh, nw) = old, new
  grid = torch.from_numpy(posemb[0, prefix:].reshape(gh, gw, -1)).permute(2, 0, 1)[None]
  out = torch.nn.functional.interpolate(grid.double(), size=(nh, nw), mode='bicubic',
                                        antialias=True, align_corners=False)
  out = out[0].permute(1, 2, 0).reshape(1, nh * nw, -1).numpy().astype(np.float32)
  return np.concatenate([posemb[:, :prefix], out], axis=1)


@pytest.mark.parametrize('old,new', RESIZES)
@pytest.mark.parametrize('with_cls', [False, True])
@pytest.mark.parametrize('backend', ['numpy', 'jax'])
def test_bilinear_matches_scipy_zoom(old, new, with_cls, backend):
  posemb = _posemb(old, with_cls)
  expected = _scipy_bilinear(posemb, (old, old), (new, new), int(with_cls))
  inp = posemb if backend == 'numpy' else jnp.asarray(posemb)
  out = models.resample_posemb(inp, new, 'bilinear')
  if backend == 'numpy':
    assert isinstance(out, np.ndarray)
  else:
    assert isinstance(out, jnp.ndarray) and not isinstance(out, np.ndarray)
  assert out.dtype == np.float32
  assert out.shape == (1, int(with_cls) + new * new, WIDTH)
  np.testing.assert_allclose(np.asarray(out), expected, atol=ATOL, rtol=0)
  if with_cls:  # the class token is passed through unchanged, bit for bit
    np.testing.assert_array_equal(np.asarray(out)[:, 0], posemb[:, 0])


def test_bilinear_is_default_method():
  posemb = _posemb(7, True)
  expected = _scipy_bilinear(posemb, (7, 7), (12, 12), 1)
  np.testing.assert_allclose(models.resample_posemb(posemb, 12), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize('old,new', RESIZES)
@pytest.mark.parametrize('with_cls', [False, True])
@pytest.mark.parametrize('backend', ['numpy', 'jax'])
def test_bicubic_matches_torch_antialias(old, new, with_cls, backend):
  posemb = _posemb(old, with_cls, seed=1)
  expected = _torch_bicubic(posemb, (old, old), (new, new), int(with_cls))
  inp = posemb if backend == 'numpy' else jnp.asarray(posemb)
  out = models.resample_posemb(inp, (new, new), 'bicubic')
  assert isinstance(out, np.ndarray) == (backend == 'numpy')
  assert out.shape == (1, int(with_cls) + new * new, WIDTH)
  np.testing.assert_allclose(np.asarray(out), expected, atol=ATOL, rtol=0)


def test_bicubic_differs_from_bilinear():
  # Guards against both methods silently sharing one implementation.
  posemb = _posemb(7, False)
  a = models.resample_posemb(posemb, 12, 'bilinear')
  b = models.resample_posemb(posemb, 12, 'bicubic')
  assert np.max(np.abs(a - b)) > 1e-3


@pytest.mark.parametrize('old,new', RESIZES)
def test_bicubic_matches_timm_resample_abs_pos_embed(old, new):
  timm_layers = pytest.importorskip('timm.layers')
  posemb = _posemb(old, True, seed=2, width=16)
  expected = timm_layers.resample_abs_pos_embed(
      torch.from_numpy(posemb), new_size=(new, new), num_prefix_tokens=1).numpy()
  out = models.resample_posemb(jnp.asarray(posemb), new, 'bicubic')
  assert out.shape == expected.shape
  np.testing.assert_allclose(np.asarray(out), expected, atol=ATOL, rtol=0)


def test_same_grid_is_identity():
  posemb = _posemb(7, True)
  for method in ('bilinear', 'bicubic'):
    np.testing.assert_allclose(models.resample_posemb(posemb, 7, method), posemb,
                               atol=ATOL, rtol=0)


def test_non_square_old_grid_with_old_grid_argument():
  old, new = (6, 10), (9, 4)
  for with_cls in (False, True):
    posemb = _posemb(old, with_cls, seed=3)
    expected = _scipy_bilinear(posemb, old, new, int(with_cls))
    out = models.resample_posemb(posemb, new, 'bilinear', old_grid=old)
    assert out.shape == (1, int(with_cls) + 36, WIDTH)
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=0)
    out = models.resample_posemb(jnp.asarray(posemb), new, 'bicubic', old_grid=old)
    np.testing.assert_allclose(
        np.asarray(out), _torch_bicubic(posemb, old, new, int(with_cls)), atol=ATOL, rtol=0)


def test_unknown_method_raises():
  with pytest.raises(ValueError, match='nearest'):
    models.resample_posemb(_posemb(7, True), 12, 'nearest')


@pytest.mark.parametrize('ntok', [3, 7, 51])  # neither g*g nor g*g + 1
def test_uninferrable_token_count_raises(ntok):
  posemb = np.zeros((1, ntok, WIDTH), np.float32)
  with pytest.raises(ValueError, match=str(ntok)):
    models.resample_posemb(posemb, 4)


def test_old_grid_not_matching_token_count_raises():
  with pytest.raises(ValueError):
    models.resample_posemb(_posemb(7, True), 4, old_grid=(5, 5), num_prefix_tokens=1)


def test_bad_rank_raises():
  with pytest.raises(ValueError, match='shape'):
    models.resample_posemb(np.zeros((49, WIDTH), np.float32), 4)


@pytest.mark.parametrize('grid', [0, -2, 2.5, (3, 0), (2, 2, 2), True, 'x'])
def test_a_bad_grid_is_named(grid):
  """0 failed inside numpy ('cannot reshape array of size 0'), -2 with 'negative
  dimensions', 2.5 with "'float' object is not iterable"."""
  posemb = np.zeros((1, 17, 4), np.float32)
  with pytest.raises(ValueError, match='a grid is a positive int or'):
    models.resample_posemb(posemb, grid)
  assert models.resample_posemb(posemb, np.int64(2)).shape == (1, 5, 4)
  assert models.resample_posemb(posemb, [3, 2]).shape == (1, 7, 4)
