"""Parameter layouts of the encoder: one subtree per block, or one stacked subtree.

    Transformer/encoderblock_{i}/...  (unrolled; the original checkpoints' layout)
    Transformer/encoderblock/...      (scan_layers=True: every leaf has a leading
                                       num_layers axis)

Checkpoint readers and converters work on the unrolled layout; `stack_layers` and
`unstack_layers` move between the two (numpy or jax arrays; other subtrees, and trees
without an encoder, unchanged).
"""

from collections.abc import Mapping
import re

import numpy as np

_BLOCK = re.compile(r'^encoderblock_(\d+)$')


def is_stacked(params) -> bool:
  return 'encoderblock' in params.get('Transformer', {})


def _stack(trees):
  if isinstance(trees[0], Mapping):
    return {k: _stack([t[k] for t in trees]) for k in trees[0]}
  xp = np if isinstance(trees[0], np.ndarray) else _jnp()
  return xp.stack(trees)


def _unstack(tree, i):
  if isinstance(tree, Mapping):
    return {k: _unstack(v, i) for k, v in tree.items()}
  return tree[i]


def _jnp():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp


def _on_params(fn, tree):
  """fn on a ViT params tree, or on the 'params' of a variables dict ({'params': ...})."""
  if 'Transformer' not in tree and isinstance(tree.get('params'), Mapping):  # FrozenDict too
    return dict(tree, params=_on_params(fn, tree['params']))
  if 'Transformer' not in tree:  # no encoder (another family): nothing to convert
    return tree
  return fn(tree)


def stack_layers(params) -> dict:
  """Unrolled -> scanned layout (a no-op on scanned params). Takes the params tree or
  the variables ({'params': ...})."""
  return _on_params(_stack_layers, params)


def unstack_layers(params) -> dict:
  """Scanned -> unrolled layout (a no-op on unrolled params). Takes the params tree or
  the variables ({'params': ...})."""
  return _on_params(_unstack_layers, params)


def _stack_layers(params) -> dict:
  if is_stacked(params):
    return params
  enc = dict(params['Transformer'])
  indices = sorted(int(m.group(1)) for k in enc for m in [_BLOCK.match(k)] if m)
  if indices != list(range(len(indices))) or not indices:
    raise ValueError(f'encoder blocks are not numbered 0..n-1: {indices}')
  blocks = [enc.pop(f'encoderblock_{i}') for i in indices]
  enc['encoderblock'] = _stack(blocks)
  return dict(params, Transformer=enc)


def _unstack_layers(params) -> dict:
  if not is_stacked(params):
    return params
  enc = dict(params['Transformer'])
  stacked = enc.pop('encoderblock')
  first = stacked
  while isinstance(first, Mapping):
    first = next(iter(first.values()))
  for i in range(first.shape[0]):
    enc[f'encoderblock_{i}'] = _unstack(stacked, i)
  return dict(params, Transformer=enc)
