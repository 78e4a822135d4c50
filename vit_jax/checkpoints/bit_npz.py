"""The original BiT `.npz` release layout (gs://bit_models/BiT-M-R50x1.npz, ...).

The released files hold flat '/'-joined names under a 'resnet/' prefix:

    resnet/root_block/standardized_conv2d/kernel        (7, 7, 3, 64 w), HWIO
    resnet/block1/unit01/a/group_norm/{gamma,beta}      (C,)
    resnet/block1/unit01/a/standardized_conv2d/kernel
    resnet/block1/unit01/a/proj/standardized_conv2d/kernel
    resnet/group_norm/{gamma,beta}                      the pre-head GroupNorm
    resnet/head/conv2d/{kernel,bias}                    kernel (1, 1, features, classes)

vit_jax.models.bit uses these names without the prefix, so loading is a rename: strip
'resnet/', undo the numbered conv names a few files carry ('standardized_conv2d_3' ->
'standardized_conv2d') and flatten GroupNorm parameters stored as (1, 1, 1, C).
`save_bit_npz` writes the release layout, which timm's `ResNetV2.load_pretrained` (its
loader of the original files) and the original code read.
"""

import io
import re

import numpy as np

from vit_jax.checkpoints import npz
from vit_jax.checkpoints import tree

PREFIX = 'resnet/'
_NUMBERED_CONV = re.compile(r'/standardized_conv2d_\d+/')


def load_bit_npz(path) -> dict:
  """Reads a BiT release `.npz` (local or gs://) into the params tree of models.bit.

  Check it against a model with `tree.merge_into(params_of_the_model, loaded)` (or with
  drop_head=True for a new class count).
  """
  flat = npz._read_arrays(path)  # pylint: disable=protected-access
  if not any(k.endswith('root_block/standardized_conv2d/kernel') for k in flat):
    raise ValueError(f'{path} is not a BiT .npz checkpoint: it has no '
                     f'{PREFIX}root_block/standardized_conv2d/kernel (keys: '
                     f'{sorted(flat)[:5]} ...)')
  return params_from_flat(flat)


def params_from_flat(flat: dict) -> dict:
  """The params tree of models.bit from the {'/'-joined name: array} of a release file."""
  out = {}
  for k, v in flat.items():
    if k.startswith(PREFIX):
      k = k[len(PREFIX):]
    k = _NUMBERED_CONV.sub('/standardized_conv2d/', k)
    if k.endswith(('group_norm/gamma', 'group_norm/beta')) and v.ndim > 1:
      v = v.reshape(-1)
    out[k] = v
  return tree.unflatten(out)


def save_bit_npz(variables, path) -> None:
  """Writes {'params': ...} (or the params alone) of models.bit in the release layout."""
  params = variables.get('params', variables)
  out = {}
  for k, v in tree.flatten(params).items():
    v = np.asarray(v)
    if v.dtype not in (np.float32, np.float64, np.float16):
      v = v.astype(np.float32)  # bfloat16 is not a numpy type other readers know
    out[PREFIX + k] = v
  buf = io.BytesIO()
  np.savez(buf, **out)
  with npz._open(path, 'wb') as f:  # pylint: disable=protected-access
    f.write(buf.getvalue())
