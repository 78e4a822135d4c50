"""The device mesh and how parameters, optimizer state and batches are laid out on it.

Mesh axes: `data` (pure data parallel: parameters replicated), `fsdp` (data parallel
with parameters and optimizer state sharded, gathered per layer by XLA) and `model`
(tensor parallel over attention heads and the MLP hidden units). Batches are split over
('data', 'fsdp'). Sizes come from `config.mesh`; -1 takes the remaining devices.

Parameter rules: arrays smaller than `min_fsdp_size` elements are replicated; a larger
array is sharded over `fsdp` along its largest dimension that the fsdp size divides
(if none does, it stays replicated). With a model axis, MLP and attention kernels are
also split Megatron-style along their hidden/head dimension. Stacked blocks
(scan_layers=True) follow the same rules one dimension further in; their layer axis is
never split.

Device placement (`device_grid`): topology-aware where jax knows the interconnect (TPU
torus, multi-slice TPU with the data axis over slices, GPU numbering); the model axis
always inside one process, since each process feeds its own examples.
"""

import collections
import re
from typing import Any

from absl import logging
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp', 'model')
BATCH_AXES = ('data', 'fsdp')

# Logical activation axes used in the model (nn.with_logical_constraint) -> mesh axes.
LOGICAL_RULES = (('batch', BATCH_AXES), ('length', None), ('embed', None), ('mlp', 'model'),
                 ('heads', 'model'))

# (regex on the 'a/b/c' parameter path, dimension split over 'model')
_MODEL_RULES = (
    (r'MlpBlock_0/Dense_0/kernel$', 1),
    (r'MlpBlock_0/Dense_0/bias$', 0),
    (r'MlpBlock_0/Dense_1/kernel$', 0),
    (r'MultiHeadDotProductAttention_0/(query|key|value)/kernel$', 1),
    (r'MultiHeadDotProductAttention_0/(query|key|value)/bias$', 0),
    (r'MultiHeadDotProductAttention_0/out/kernel$', 0),
)


# Stacked encoder blocks (scan_layers=True): every array has a leading layer axis, which
# shifts the dimensions above by one and is never sharded (the scan slices it per layer).
_STACKED = re.compile(r'(^|/)encoderblock/')


class MeshError(ValueError):
  """A mesh shape that does not fit the devices."""


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, model) sizes; one of them may be -1 (the rest of the devices)."""
  sizes = [mesh_config.get(a, 1) for a in AXES]
  if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and (s >= 1 or s == -1)
             for s in sizes):
    raise MeshError(f'config.mesh {dict(zip(AXES, sizes))}: each size must be a positive int '
                    'or -1 (the remaining devices)')
  if sizes.count(-1) > 1:
    raise MeshError(f'config.mesh {dict(zip(AXES, sizes))}: at most one axis may be -1')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      # Each fixed axis's sizes that fit with the other fixed axes kept as they are.
      fixed = [(a, s) for a, s in zip(AXES, sizes) if s not in (-1, 1)]
      options = []
      for a, s in fixed:
        ok = [d for d in range(1, num_devices + 1)
              if num_devices % d == 0 and (num_devices // d) % (known // s) == 0]
        if ok:
          options.append(f'{a} in {{{", ".join(map(str, ok))}}}')
      fits = ' or '.join(options)
      raise MeshError(f'config.mesh {dict(zip(AXES, sizes))}: {num_devices} devices are not '
                      f'divisible by the fixed axes ({known}), so the -1 axis has no size'
                      + (f'; sizes that fit: {fits}' if fits else '')
                      + ' (the fixed axes\' product must divide the device count)')
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise MeshError(f'config.mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} '
                    f'devices but {num_devices} are available; set the sizes so their '
                    'product is the device count, or one of them to -1')
  return tuple(sizes)


def _batch_shards_within_processes(grid: np.ndarray) -> bool:
  """Whether every batch shard's devices (one row of the model axis) are one process's.

  Each process feeds its own examples to the batch shards of its devices
  (`jax.make_array_from_process_local_data`), so a shard whose model-axis replicas lived
  on two processes would get different examples in its "replicas".
  """
  rows = grid.reshape(-1, grid.shape[-1])
  return all(len({d.process_index for d in row}) == 1 for row in rows)


def _by_process(devices, shape) -> np.ndarray:
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  return np.asarray(ordered, dtype=object).reshape(shape)


def device_grid(shape: tuple[int, int, int], devices) -> np.ndarray:
  """The devices as a (data, fsdp, model) array, laid out for the interconnect.

  Where jax knows the topology (TPU slices: a torus; GPUs: XLA's global numbering), the
  grid comes from `jax.experimental.mesh_utils`, which puts the innermost axes (model,
  then fsdp) on physical neighbours; elsewhere (CPU) it is the devices' order. Several
  TPU slices (multi-slice, joined by the data-center network) split the data axis over
  the slices, so that only the data-parallel all-reduce crosses the slow network (a data
  axis that is not a multiple of the slice count gets a warning and one flat layout).

  With several processes, the model axis must stay inside one process (each process
  reads its own examples); a topology-aware grid that would spread a batch shard over
  two hosts is replaced by the devices in process order.
  """
  from jax.experimental import mesh_utils
  devices = list(devices)
  # TPU slices only: XLA's GPU client gives each host's devices a slice_index of its own.
  slices = sorted({getattr(d, 'slice_index', 0) or 0 for d in devices}
                  if devices[0].platform == 'tpu' else {0})
  grid = None
  if len(slices) > 1 and shape[0] % len(slices) == 0:
    n = len(slices)
    grid = mesh_utils.create_hybrid_device_mesh(
        (shape[0] // n, shape[1], shape[2]), (n, 1, 1), devices,
        allow_split_physical_axes=True)
  else:
    if len(slices) > 1:
      logging.warning(
          'config.mesh data=%d is not a multiple of the %d TPU slices: the fsdp or model '
          'axis spans the slower network between slices. Make data a multiple of %d to '
          'keep only the data-parallel all-reduce on it.', shape[0], len(slices),
          len(slices))
    for split in (False, True):
      try:
        grid = mesh_utils.create_device_mesh(shape, devices,
                                             allow_split_physical_axes=split)
        break
      except (ValueError, NotImplementedError, AssertionError):
        continue
    if grid is None:  # a topology jax cannot map this shape onto: the devices' order
      grid = np.asarray(devices, dtype=object).reshape(shape)
  if len({d.process_index for d in devices}) > 1 and not _batch_shards_within_processes(grid):
    grid = _by_process(devices, shape)
    if not _batch_shards_within_processes(grid):
      local = collections.Counter(d.process_index for d in devices)
      raise MeshError(
          f'config.mesh model={shape[2]} does not fit inside one process (devices per '
          f'process: {sorted(set(local.values()))}): every process reads its own examples, '
          f'so the model axis must divide each process\'s device count')
  return grid


def create_mesh(mesh_config, devices=None) -> Mesh:
  """The (data, fsdp, model) mesh of `config.mesh` over `devices` (default: all)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(device_grid(shape, devices), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _path_str(path) -> str:
  parts = []
  for k in path:
    key = getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))
    parts.append(str(key))
  return '/'.join(parts)


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh,
               min_fsdp_size: int = 2**18) -> P:
  """PartitionSpec of one parameter (or optimizer-state array mirroring one)."""
  spec: list[Any] = [None] * len(shape)
  layer_axis = 1 if _STACKED.search(path) and shape else 0
  model = mesh.shape['model']
  if model > 1:
    for pattern, dim in _MODEL_RULES:
      dim += layer_axis
      if re.search(pattern, path) and dim < len(shape) and shape[dim] % model == 0:
        spec[dim] = 'model'
        break
  fsdp = mesh.shape['fsdp']
  if fsdp > 1 and int(np.prod(shape, dtype=np.int64)) >= min_fsdp_size:
    for dim in sorted(range(layer_axis, len(shape)), key=lambda d: -shape[d]):
      if spec[dim] is None and shape[dim] % fsdp == 0:
        spec[dim] = 'fsdp'
        break
  return P(*spec)


def model_axis_problem(tree, mesh: Mesh) -> str | None:
  """What the mesh's model axis fails to split among the params `tree` (arrays or shape
  structs), as a warning; None where it splits all it can, or has one device.

  A parameter whose model dimension the axis does not divide stays whole on every device
  of that axis (`param_spec`), and only a ViT's attention and MLP kernels are split at
  all: a model axis of 8 over a 3-head model, or over a ResNet, ran as 8 replicas of the
  same computation without a word.
  """
  model = mesh.shape['model']
  if model == 1:
    return None
  matched, whole = 0, []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name, shape = _path_str(path), tuple(getattr(leaf, 'shape', ()))
    layer_axis = 1 if _STACKED.search(name) and shape else 0
    for pattern, dim in _MODEL_RULES:
      if re.search(pattern, name) and dim + layer_axis < len(shape):
        matched += 1
        if shape[dim + layer_axis] % model:
          whole.append(f'{name} {shape}')
        break
  if not matched:
    return (f'config.mesh.model={model}: no parameter of this model is split on the model '
            'axis (only a ViT\'s attention and MLP kernels are), so each group of '
            f'{model} devices computes the same thing; give the devices to '
            '--config.mesh.data or --config.mesh.fsdp instead')
  if whole:
    return (f'config.mesh.model={model} does not divide the split dimension of {len(whole)} '
            f'of the {matched} parameters it would split, which stay whole on each device '
            f'of the axis (e.g. {", ".join(whole[:2])}); use a model axis that divides '
            'num_heads (the attention is split by heads) and mlp_dim')
  return None


def fsdp_axis_problem(tree, mesh: Mesh, min_fsdp_size: int = 2**18) -> str | None:
  """What the mesh's fsdp axis leaves whole among the params `tree` (arrays or shape
  structs), as a warning; None where it shards every parameter of `min_fsdp_size`
  elements or more, or has one device.

  A parameter stays whole on every device of the axis when it is under min_fsdp_size or
  no dimension of it is divisible by the axis (`param_spec`): fsdp=8 over a small model,
  or over kernels of width 12, kept a full copy on each device without a word. (The
  batch is still split over the axis, as over data.)
  """
  fsdp = mesh.shape['fsdp']
  if fsdp == 1:
    return None
  total = sharded = 0
  whole = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name, shape = _path_str(path), tuple(getattr(leaf, 'shape', ()))
    size = int(np.prod(shape, dtype=np.int64))
    total += size
    if 'fsdp' in tuple(param_spec(name, shape, mesh, min_fsdp_size)):
      sharded += size
    elif size >= min_fsdp_size:
      whole.append((size, f'{name} {shape}'))
  if not sharded:
    return (f'config.mesh.fsdp={fsdp} shards none of the {total:,} parameter elements '
            f'(each is under config.min_fsdp_size={min_fsdp_size:,} or has no dimension '
            f'divisible by {fsdp}), so every device holds all of them; lower '
            'config.min_fsdp_size to shard them, or give the devices to config.mesh.data')
  if whole:
    whole.sort(reverse=True)
    return (f'config.mesh.fsdp={fsdp} leaves {len(whole)} parameters of '
            f'config.min_fsdp_size={min_fsdp_size:,} elements or more whole on every '
            f'device, as no dimension of theirs is divisible by {fsdp} (e.g. '
            f'{", ".join(w for _, w in whole[:2])}); {sharded / total:.0%} of the '
            'parameter elements are sharded. Use an fsdp size that divides the model\'s '
            'widths (hidden_size, mlp_dim)')
  return None


def tree_shardings(tree, mesh: Mesh, min_fsdp_size: int = 2**18):
  """NamedShardings for every array of a tree (params, or an optimizer state)."""
  def one(path, leaf):
    shape = tuple(getattr(leaf, 'shape', ()))
    return NamedSharding(mesh, param_spec(_path_str(path), shape, mesh, min_fsdp_size))
  return jax.tree_util.tree_map_with_path(one, tree)
