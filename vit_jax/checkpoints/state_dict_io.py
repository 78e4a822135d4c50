"""Reading and writing PyTorch-style state dicts (safetensors or torch files) as numpy."""

import os
import re
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
    if path.endswith('.index.json'):  # transformers' sharded weights (max_shard_size)
      return _load_shards(path)
    if path.endswith('.safetensors'):
      return _load_safetensors(path)
    source = _load_torch(path)
    source = _unwrapped(source)
  elif hasattr(source, 'state_dict') and callable(source.state_dict):
    source = source.state_dict()
  if not isinstance(source, Mapping):
    raise TypeError(f'expected a torch module, a state dict or a path, got {type(source)}')
  return _without_wrapper_prefix({k: to_numpy(v) for k, v in source.items()})


def _load_shards(index_path: str) -> dict[str, np.ndarray]:
  """The state dict of a sharded save (`model.safetensors.index.json` or
  `pytorch_model.bin.index.json` and the shard files its weight_map names)."""
  import json  # pylint: disable=g-import-not-at-top
  with open(index_path) as f:
    weight_map = json.load(f).get('weight_map')
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f'{index_path} has no weight_map (not a sharded transformers save)')
  folder = os.path.dirname(index_path)
  out = {}
  for shard in sorted(set(weight_map.values())):
    shard_path = os.path.join(folder, shard)
    if not os.path.exists(shard_path):
      raise FileNotFoundError(f'{index_path} names the shard {shard}, which is missing')
    out.update(read_state_dict(shard_path))
  missing = sorted(set(weight_map) - set(out))
  if missing:
    raise ValueError(f'{index_path}: its shards lack {len(missing)} of the weights it '
                     f'lists, e.g. {missing[:3]}')
  return out


# Where training scripts keep the weights in a checkpoint file: timm's train.py
# ('state_dict'), DeiT's and many others' ('model'), DDP-era scripts ('module').
_WEIGHT_KEYS = ('state_dict', 'model', 'module')


def _unwrapped(source):
  """The weights of a training checkpoint file ({'model': weights, 'optimizer': ...,
  'epoch': ...}); a plain state dict as it is."""
  if isinstance(source, Mapping) and not any(hasattr(v, 'shape') for v in source.values()):
    for key in _WEIGHT_KEYS:
      if isinstance(source.get(key), Mapping):
        return source[key]
  return source


def _without_wrapper_prefix(sd: dict) -> dict:
  """Keys without the prefix a wrapper adds to every one: DistributedDataParallel's
  'module.', torch.compile's '_orig_mod.'."""
  for prefix in ('module.', '_orig_mod.'):
    if sd and all(k.startswith(prefix) for k in sd):
      sd = {k[len(prefix):]: v for k, v in sd.items()}
  return sd


def _start(path: str) -> str:
  """What a file that is not what it should be starts with (its first bytes)."""
  with open(path, 'rb') as f:
    head = f.read(16)
  return f'it starts with {head!r}' if head else 'it is empty'


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return dict(load_file(path))
  except (SafetensorError, OSError) as e:
    raise ValueError(f'{path} is not a safetensors file safetensors can read ({e}; '
                     f'{_start(path)})') from e


def _torch_load_reason(e: Exception) -> str:
  """What torch.load found, in its first sentence, without its advice to load the file
  unsafely (weights_only off) or to allowlist what it holds."""
  text = str(e)
  found = re.search(r'WeightsUnpickler error:\s*([^\n]+)', text)
  if found:
    refused = found.group(1).split(' Please use')[0].rstrip('.')
    return f'the weights-only unpickler refused it: {refused}'
  if 'weights_only' in text:
    return type(e).__name__
  first = text.split('\n')[0].split('. ')[0].rstrip('.')
  return f'{type(e).__name__}: {first}' if first else type(e).__name__


def _load_torch(path: str) -> Mapping:
  """A torch file's dict of tensors, loaded with weights_only=True (never runs pickled code)."""
  torch = torch_import.torch()
  try:
    source = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    # torch raises many types here (UnpicklingError, RuntimeError, EOFError, KeyError, ...).
    raise ValueError(
        f'{path} is not a PyTorch checkpoint torch.load can read safely '
        f'({_torch_load_reason(e)}; {_start(path)}): expected a state dict '
        'of tensors written by torch.save, or a .safetensors file') from e
  if not isinstance(source, Mapping):
    raise ValueError(f'{path} holds a {type(source).__name__}, not a state dict (a dict '
                     'of tensor names to tensors)')
  return source


def read_metadata(path) -> dict[str, str]:
  """The `__metadata__` (str -> str) of a `.safetensors` file's header; {} for a torch file
  (torch.save files have no header) or a safetensors file without metadata."""
  path = os.fspath(path)
  if not path.endswith('.safetensors'):
    return {}
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    with safe_open(path, framework='np') as f:
      return dict(f.metadata() or {})
  except (SafetensorError, OSError) as e:
    raise ValueError(f'{path} is not a safetensors file safetensors can read ({e}; '
                     f'{_start(path)})') from e


def _umask() -> int:
  """The process's umask, read without setting it (os.umask sets it for every thread)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except OSError:
    pass
  return 0o022


def write_state_dict(state_dict: Mapping, path, *, metadata: Mapping[str, str] | None = None
                     ) -> None:
  """Writes a state dict of tensors or arrays to `.safetensors` (else torch.save).

  metadata: str -> str entries for the safetensors header's `__metadata__` (loaders of
    the tensors, timm's and torch's, ignore it). A torch file has no header: passing
    metadata for one raises ValueError (a reserved key would break a strict
    `load_state_dict`).
  """
  path = os.fspath(path)
  if path.endswith('.safetensors'):
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    bad = [k for k, v in (metadata or {}).items()
           if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
      raise ValueError(f'safetensors metadata maps str to str; not so for {bad}: '
                       'json.dumps the values')
    save_file({k: np.ascontiguousarray(to_numpy(v)) for k, v in state_dict.items()}, path,
              metadata=dict(metadata) if metadata else None)
    os.chmod(path, 0o666 & ~_umask())  # safetensors makes the file its owner's only
    return
  if metadata:
    raise ValueError(f'{path}: a torch file has no header for metadata '
                     f'({sorted(metadata)}); write a .safetensors file to keep it')
  torch = torch_import.torch()
  torch.save({k: v if hasattr(v, 'detach') else torch.from_numpy(np.asarray(v))
              for k, v in state_dict.items()}, path)


def as_torch(flat: Mapping[str, np.ndarray]):
  """{name: numpy} -> {name: torch.Tensor} (contiguous copies)."""
  torch = torch_import.torch()
  return {k: torch.from_numpy(np.array(v, order='C', copy=True)) for k, v in flat.items()}
