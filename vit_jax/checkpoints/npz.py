"""The original Google ViT `.npz` checkpoint layout.

The released `.npz` files predate Flax linen and number the submodules of an encoder
block by position: `LayerNorm_0`, `MultiHeadDotProductAttention_1`, `LayerNorm_2`,
`MlpBlock_3`; in memory (linen) they are `LayerNorm_0`, `MultiHeadDotProductAttention_0`,
`LayerNorm_1`, `MlpBlock_0`. Some files carry an `opt/target/` prefix, and GroupNorm
scales and biases of hybrids are stored as (1, 1, 1, C). `load_npz` undoes all of this;
`save_npz` writes the released layout, so files written here load in the original code
and in timm's `.npz` loader.
"""

import io
import os
import re
import zipfile

import numpy as np

from vit_jax.checkpoints import tree

_TO_LINEN = {
    'LayerNorm_0': 'LayerNorm_0',
    'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0',
    'LayerNorm_2': 'LayerNorm_1',
    'MlpBlock_3': 'MlpBlock_0',
}
_TO_NPZ = {v: k for k, v in _TO_LINEN.items()}
_BLOCK = re.compile(r'^(Transformer/encoderblock_\d+/)([^/]+)(/.*)$')
_GN = re.compile(r'(^|/)gn_?\w*/(scale|bias)$')
_PREFIXES = ('opt/target/', 'params/')


def _rename_block_child(key: str, table: dict) -> str:
  m = _BLOCK.match(key)
  if not m or m.group(2) not in table:
    return key
  return m.group(1) + table[m.group(2)] + m.group(3)


def _open(path, mode):
  path = os.fspath(path)
  if path.startswith('gs://'):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.io.gfile.GFile(path, mode)
  return open(path, mode)


# An .npz is a zip archive: a local file header, or the end record of an empty archive.
_ZIP_MAGIC = (b'PK\x03\x04', b'PK\x05\x06')


def _read_arrays(path) -> dict[str, np.ndarray]:
  """{name: array} of an `.npz`; ValueError naming the file if it is not one of arrays."""
  with _open(path, 'rb') as f:
    raw = f.read()
  if not raw.startswith(_ZIP_MAGIC):
    found = f'it starts with {raw[:16]!r}' if raw else 'it is empty'
    raise ValueError(f'{path} is not a NumPy .npz archive (a zip of arrays written by '
                     f'numpy.savez; {found})')
  try:
    data = np.load(io.BytesIO(raw), allow_pickle=False)
    return {k: data[k] for k in data.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    # Object arrays would need unpickling, which can run code: never done for weights.
    reason = ('it holds Python objects, not numeric arrays' if 'pickle' in str(e)
              else f'{type(e).__name__}: {e}')
    raise ValueError(f'{path} is not a NumPy .npz archive of arrays vit_jax can read '
                     f'({reason})') from e


def load_npz(path) -> dict:
  """Reads an original-layout `.npz` (local or gs://) into a linen-named params tree."""
  flat = _read_arrays(path)
  for prefix in _PREFIXES:
    if flat and all(k.startswith(prefix) for k in flat):
      flat = {k[len(prefix):]: v for k, v in flat.items()}
  if 'Transformer/encoderblock/LayerNorm_0/scale' in flat:
    raise ValueError(f'{path} holds stacked (scanned) blocks, as big_vision writes them '
                     'and a scan_layers=True model holds them; it is not the original ViT '
                     '.npz layout. For a tree of this project, save it with '
                     'vit_jax.checkpoints.save_npz (which writes one block per layer), or '
                     'read the arrays with numpy and unstack them with '
                     'vit_jax.models.unstack_layers')
  out = {}
  for k, v in flat.items():
    k = _rename_block_child(k, _TO_LINEN)
    if _GN.search(k) and v.ndim == 4:
      v = v.reshape(-1)
    out[k] = v
  return tree.unflatten(out)


def save_npz(path, params) -> None:
  """Writes params in the original release's `.npz` layout (local or gs:// path)."""
  out = {}
  # Blocks unrolled (the release's layout), bfloat16 as float32 (which other readers know).
  for k, v in tree.flatten_for_export(params).items():
    if _GN.search(k) and v.ndim == 1:
      v = v.reshape(1, 1, 1, -1)
    out[_rename_block_child(k, _TO_NPZ)] = v
  buf = io.BytesIO()
  np.savez(buf, **out)
  with _open(path, 'wb') as f:
    f.write(buf.getvalue())
