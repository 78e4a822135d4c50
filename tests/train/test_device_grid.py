"""The mesh's device layout (`sharding.device_grid`) on TPU topologies, with mock devices.

No TPU is needed: jax lays a TPU mesh out from each device's `coords`, `core_on_chip`,
`process_index` and `slice_index`, which the mock devices below give as a TPU v4 pod
would (hosts of 2x2x1 chips, `jax.devices()` in process order).
"""

import dataclasses
import itertools

from absl import logging
import jax
import numpy as np
import pytest

from vit_jax import sharding


@dataclasses.dataclass(frozen=True)
class MockTpu:
  id: int
  process_index: int
  coords: tuple[int, int, int]
  slice_index: int = 0
  core_on_chip: int = 0
  platform: str = 'tpu'
  device_kind: str = 'TPU v4'


def v4_pod(dims=(4, 4, 4), slices=1):
  """TPU v4 chips of `slices` slices of `dims`, in jax.devices() order (process-major)."""
  devices = []
  hosts_per_slice = (dims[0] // 2) * (dims[1] // 2) * dims[2]
  for s in range(slices):
    for host, (z, hy, hx) in enumerate(itertools.product(range(dims[2]), range(dims[1] // 2),
                                                         range(dims[0] // 2))):
      for y, x in itertools.product(range(2), range(2)):
        devices.append(MockTpu(id=len(devices), process_index=s * hosts_per_slice + host,
                               coords=(2 * hx + x, 2 * hy + y, z), slice_index=s))
  return devices


def torus_neighbours(a, b, dims):
  steps = [min(abs(p - q), n - abs(p - q)) for p, q, n in zip(a.coords, b.coords, dims)]
  return sum(steps) == 1


def rings_are_neighbours(grid, dims):
  """Every model-axis row is a ring of torus neighbours (wrapping around)."""
  rows = grid.reshape(-1, grid.shape[-1])
  return all(torus_neighbours(r[i], r[(i + 1) % len(r)], dims)
             for r in rows for i in range(len(r)))


def as_one_process(devices):
  return [dataclasses.replace(d, process_index=0) for d in devices]


def test_single_host_view_puts_the_model_axis_on_a_ring_of_neighbours():
  devices = as_one_process(v4_pod())
  grid = sharding.device_grid((4, 4, 4), devices)
  assert sorted(d.id for d in grid.flat) == list(range(64))
  assert rings_are_neighbours(grid, (4, 4, 4))
  # The devices' own order (what the mesh used before) does not: a host's 2x2 block
  # read in order is not a ring.
  assert not rings_are_neighbours(np.asarray(devices, dtype=object).reshape(4, 4, 4),
                                  (4, 4, 4))


def test_pure_data_and_fsdp_meshes_take_the_topology_aware_layout():
  devices = v4_pod()  # 16 processes of 4 chips
  grid = sharding.device_grid((16, 4, 1), devices)
  assert sorted(d.id for d in grid.flat) == list(range(64))
  fsdp_groups = grid[:, :, 0]
  # Each fsdp group of 4 is a ring along one torus axis (across two hosts: with no model
  # axis every batch shard is one device, so any process may feed it). In process order
  # a group was one host's 2x2 block, which read in order is not a ring.
  assert rings_are_neighbours(fsdp_groups, (4, 4, 4))
  assert not rings_are_neighbours(np.asarray(devices, dtype=object).reshape(16, 4),
                                  (4, 4, 4))
  grid = sharding.device_grid((4, 16, 1), devices)
  for group in grid[:, :, 0]:  # groups of 16: a compact 4x4 plane of the torus
    assert sorted(len({d.coords[k] for d in group}) for k in range(3)) == [1, 4, 4]


def test_model_axis_never_spans_two_processes():
  devices = v4_pod()  # 16 processes of 4 chips
  for shape in [(4, 4, 4), (8, 4, 2), (2, 8, 4), (16, 2, 2)]:
    grid = sharding.device_grid(shape, devices)
    assert sorted(d.id for d in grid.flat) == list(range(64))
    for row in grid.reshape(-1, shape[-1]):
      assert len({d.process_index for d in row}) == 1, (shape, row)


def test_model_axis_larger_than_a_process_is_refused_by_name():
  with pytest.raises(sharding.MeshError, match=r'model=8 .*divide each process'):
    sharding.device_grid((8, 1, 8), v4_pod())


def test_multi_slice_splits_the_data_axis_over_slices(monkeypatch):
  devices = v4_pod((2, 2, 2), slices=2)  # 2 slices x 8 chips
  grid = sharding.device_grid((2, 4, 2), devices)
  assert {d.slice_index for d in grid[0].flat} == {0}
  assert {d.slice_index for d in grid[1].flat} == {1}
  grid = sharding.device_grid((4, 2, 2), devices)
  assert {d.slice_index for d in grid[:2].flat} == {0}
  # data=1 (pure FSDP over both slices): one flat layout, with a warning.
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *args: warnings.append(msg % args))
  grid = sharding.device_grid((1, 16, 1), devices)
  assert sorted(d.id for d in grid.flat) == list(range(16))
  assert len(warnings) == 1 and 'data=1 is not a multiple of the 2 TPU slices' in warnings[0]


def test_gpu_hosts_are_not_taken_for_tpu_slices(monkeypatch):
  """XLA's GPU client gives each host's devices a slice_index of its own: 2 nodes x 8
  GPUs with data=1, fsdp=16 were refused as a 2-slice TPU mesh."""
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *args: warnings.append(msg % args))
  gpus = [MockTpu(id=i, process_index=i // 8, coords=(0, 0, 0), slice_index=i // 8,
                  platform='gpu', device_kind='NVIDIA H100 80GB HBM3') for i in range(16)]
  grid = sharding.device_grid((1, 16, 1), gpus)
  assert [d.id for d in grid.flat] == list(range(16)) and not warnings
  grid = sharding.device_grid((2, 4, 2), gpus)
  for row in grid.reshape(-1, 2):
    assert len({d.process_index for d in row}) == 1


def test_cpu_devices_keep_their_order():
  devices = jax.devices()
  grid = sharding.device_grid((len(devices), 1, 1), devices)
  assert list(grid.flat) == devices
