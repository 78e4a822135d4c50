"""Reading and writing PyTorch-style state dicts (safetensors or torch files) as numpy."""

import os
from collections.abc import Mapping

import numpy as np

from vit_jax import torch_import


def to_numpy(value) -> np.ndarray:
  """A torch tensor (any dtype, any device) or array-like -> numpy (bf16 -> float32)."""
  if hasattr(value, 'detach'):
    value = value.detach().cpu()
    if str(value.dtype) in ('torch.bfloat16', 'torch.float16'):
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def read_state_dict(source) -> dict[str, np.ndarray]:
  """A torch module, a state dict, or a path to a `.safetensors` / torch file."""
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if not os.path.exists(path):
      raise FileNotFoundError(f'no state dict at {path}')
    if path.endswith('.safetensors'):
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      return dict(load_file(path))
    torch = torch_import.torch()
    source = torch.load(path, map_location='cpu', weights_only=True)
    if 'state_dict' in source and isinstance(source['state_dict'], Mapping):
      source = source['state_dict']
  elif hasattr(source, 'state_dict') and callable(source.state_dict):
    source = source.state_dict()
  if not isinstance(source, Mapping):
    raise TypeError(f'expected a torch module, a state dict or a path, got {type(source)}')
  return {k: to_numpy(v) for k, v in source.items()}


def write_state_dict(state_dict: Mapping, path) -> None:
  """Writes a state dict of tensors or arrays to `.safetensors` (else torch.save)."""
  path = os.fspath(path)
  if path.endswith('.safetensors'):
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file({k: np.ascontiguousarray(to_numpy(v)) for k, v in state_dict.items()}, path)
    return
  torch = torch_import.torch()
  torch.save({k: v if hasattr(v, 'detach') else torch.from_numpy(np.asarray(v))
              for k, v in state_dict.items()}, path)


def as_torch(flat: Mapping[str, np.ndarray]):
  """{name: numpy} -> {name: torch.Tensor} (contiguous copies)."""
  torch = torch_import.torch()
  return {k: torch.from_numpy(np.array(v, order='C', copy=True)) for k, v in flat.items()}
