"""Array layout conversions between PyTorch modules and Flax linen parameters.

PyTorch Linear: weight (out, in); Flax Dense: kernel (in, out).
PyTorch Conv2d: weight (out, in, kh, kw); Flax Conv: kernel (kh, kw, in, out).
Flax attention: query/key/value kernel (D, heads, D/heads), bias (heads, D/heads);
out kernel (heads, D/heads, D).
"""

import numpy as np


def conv_to_flax(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))


def conv_from_flax(k: np.ndarray) -> np.ndarray:
  return np.transpose(k, (3, 2, 0, 1))


def linear_to_dense(prefix: str, w: np.ndarray, b: np.ndarray | None) -> dict:
  out = {f'{prefix}/kernel': w.T}
  if b is not None:
    out[f'{prefix}/bias'] = b
  return out


def dense_to_linear(flat: dict, prefix: str) -> tuple[np.ndarray, np.ndarray]:
  return flat[f'{prefix}/kernel'].T, flat[f'{prefix}/bias']


def linear_to_heads(w: np.ndarray, b: np.ndarray, num_heads: int) -> tuple:
  """One of q/k/v as a Linear (D_out, D_in) -> Flax (D_in, H, Dh) kernel, (H, Dh) bias."""
  d_out, d_in = w.shape
  if num_heads < 1 or d_out % num_heads:
    raise ValueError(f'an attention width of {d_out} does not split into num_heads={num_heads} '
                     'heads: give the number of heads the model was trained with (its width '
                     'divided by the head size, often 64)')
  return w.T.reshape(d_in, num_heads, d_out // num_heads), b.reshape(num_heads, -1)


def heads_to_linear(kernel: np.ndarray, bias: np.ndarray) -> tuple:
  d_in = kernel.shape[0]
  return kernel.reshape(d_in, -1).T, bias.reshape(-1)


def out_linear_to_heads(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Attention output Linear (D, D_in) -> Flax (H, Dh, D)."""
  d_out, d_in = w.shape
  return w.T.reshape(num_heads, d_in // num_heads, d_out)


def out_heads_to_linear(kernel: np.ndarray) -> np.ndarray:
  return kernel.reshape(-1, kernel.shape[-1]).T


def attention_from_linears(prefix: str, q, k, v, o, num_heads: int) -> dict:
  """q, k, v, o: (weight, bias) pairs of Linears -> flat Flax attention params."""
  out = {}
  for name, (w, b) in (('query', q), ('key', k), ('value', v)):
    kernel, bias = linear_to_heads(w, b, num_heads)
    out[f'{prefix}/{name}/kernel'] = kernel
    out[f'{prefix}/{name}/bias'] = bias
  out[f'{prefix}/out/kernel'] = out_linear_to_heads(o[0], num_heads)
  out[f'{prefix}/out/bias'] = o[1]
  return out


def attention_to_linears(flat: dict, prefix: str) -> dict:
  """Flat Flax attention params -> {'q'|'k'|'v'|'o': (weight, bias)}."""
  out = {}
  for short, name in (('q', 'query'), ('k', 'key'), ('v', 'value')):
    out[short] = heads_to_linear(flat[f'{prefix}/{name}/kernel'], flat[f'{prefix}/{name}/bias'])
  out['o'] = (out_heads_to_linear(flat[f'{prefix}/out/kernel']), flat[f'{prefix}/out/bias'])
  return out
