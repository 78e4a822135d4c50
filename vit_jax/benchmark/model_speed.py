"""Speed of the real train step (or inference) of a model, its FLOPs and MFU, optionally
next to timm (PyTorch eager and `torch.compile`) in the same process.

The train mode builds the step `vit_jax.main` runs (`train.loop.Trainer`: the config's
optimizer, global-norm clipping, gradient accumulation, donated sharded state) on random
images and labels already on the devices, so it measures the model and the optimizer,
not the input pipeline (`--mode=input` measures that). Each timed step is synchronised
(`block_until_ready`) to get a distribution; the median is the figure reported.

FLOPs: the model's forward FLOPs per image from XLA's cost analysis of the inference
function, checked against the analytic matmul count; a training step counts 3x the
forward (forward + backward), the usual MFU convention, and XLA's count of the whole
compiled step is recorded too. MFU = model FLOPs / step time / peak, where the peak is
the datasheet figure of a GPU/TPU for the compute dtype, or on a CPU a large matmul
measured in the same run (`train.hardware`). A shared CPU's speed drifts by 10 to 20%
within seconds, so on a CPU the matmul is measured before the first timed step and after
each one: a step's MFU is against the mean of the two probes around it, and the MFU
reported is the median over the steps (`mfu_of_best_peak`, against the best of those
peaks, is its lower bound). For the same reason, frameworks compared run their steps in
turn (`run_interleaved`: one step of each per round), so that their ratio is taken at the
same machine speed.

Memory: `compiled_memory` is what XLA's buffer assignment gives the compiled step per
device (arguments, temporaries, outputs beyond the donated arguments), on every backend;
`peak_memory_bytes` is the device's peak over the process where the runtime reports it
(GPU, TPU).
"""

import dataclasses
import functools
import itertools
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models
from vit_jax.benchmark import overrides as overrides_lib
from vit_jax.benchmark import step_profile
from vit_jax.train import hardware

NUM_CLASSES = overrides_lib.NUM_CLASSES


def _summary(times) -> dict:
  """Median, min, max and the 10th and 90th percentiles (numpy's linear interpolation
  between the sorted times: with 10 steps, p90 lies between the 9th and the slowest)."""
  times = sorted(times)
  q = lambda f: float(np.quantile(times, f))  # noqa: E731
  return {'median_s': statistics.median(times), 'min_s': times[0], 'max_s': times[-1],
          'p10_s': q(0.1), 'p90_s': q(0.9), 'steps': len(times)}


def _timed(fn, steps: int, warmup: int, probe=None) -> tuple[list[float], list[float]]:
  """Step times; with a `probe`, also the device peak measured before the first step and
  after each one (steps + 1 values)."""
  for _ in range(warmup):
    fn()
  times, probes = [], []
  if probe:
    probes.append(probe())
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
    if probe:
      probes.append(probe())
  return times, probes


def _peak_probe(dtype):
  """None where the datasheet gives the peak; on a CPU, a matmul probe (`hardware`)."""
  if hardware.datasheet_peak(jax.devices()[0], dtype) is not None:
    return None
  return hardware.matmul_probe(jnp.dtype(dtype).name)


def _per_step_peaks(probes: list[float]) -> list[float]:
  """The peak at each step: the mean of the probes just before and just after it."""
  return [(a + b) / 2 for a, b in zip(probes, probes[1:])]


def _speed_per_peak(batch: int, times, peaks) -> float | None:
  """Median over the steps of images/s per TFLOP/s of the peak at that step: the speed
  with the drift of a shared machine's speed taken out, to compare runs of vit_jax made
  one after the other. Not across frameworks: the probes around PyTorch's steps read 2 to
  5% lower than those around vit_jax's in the same rounds (timm train step, ViT-B/16),
  so frameworks are compared by their step times, taken in turn (`run_interleaved`)."""
  if not peaks:
    return None
  return statistics.median(batch / t / (p / 1e12) for t, p in zip(times, peaks))


def paired_ratio(times_a, times_b, offset: float = 0.0) -> dict:
  """B's step time over A's, one ratio per round: median, min, max and the ratios.

  B's step i ran `offset` of a round after A's step i (0 <= offset < 1; with steps taken
  in turn, B's position in the round over the number of steps in it). A's step time at
  that moment is interpolated geometrically between its steps i and i + 1 (step i alone
  in the last round), so that a machine whose speed drifts steadily through a round
  affects A and B alike, wherever B sits in it.
  """
  if not 0 <= offset < 1:
    raise ValueError(f'offset={offset} is not in [0, 1)')
  ratios = []
  for i, b in enumerate(times_b):
    a = times_a[i]
    if offset and i + 1 < len(times_a):
      a = a ** (1 - offset) * times_a[i + 1] ** offset
    ratios.append(b / a)
  return {'median': statistics.median(ratios), 'min': min(ratios), 'max': max(ratios),
          'rounds': len(ratios), 'ratios': ratios}


def _cost_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def _peak_memory() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def compiled_memory(compiled) -> dict | None:
  """What XLA's buffer assignment gives a compiled step, per device (any backend, CPU
  included, where the runtime reports no peak): its arguments, outputs (less those that
  reuse a donated argument's buffer), temporaries, and their sum, the memory one step
  needs while it runs: the footprint of this one executable, not of the process (which
  also holds other steps' state, generated code and libraries' scratch memory). None
  where the backend gives no analysis."""
  try:
    m = compiled.memory_analysis()
    out = {'argument_bytes': m.argument_size_in_bytes, 'output_bytes': m.output_size_in_bytes,
           'alias_bytes': m.alias_size_in_bytes, 'temp_bytes': m.temp_size_in_bytes}
  except (NotImplementedError, AttributeError) as e:  # no analysis, or another API
    print(f'no memory analysis of the compiled step: {type(e).__name__}: {e}', flush=True)
    return None
  out['step_bytes'] = (out['argument_bytes'] + out['output_bytes'] - out['alias_bytes']
                       + out['temp_bytes'])
  return out


def train_config(model: str, *, batch: int, resolution: int, dtype: str,
                 accum_steps: int = 1, overrides: dict | None = None,
                 num_classes: int = NUM_CLASSES):
  """The training config benchmarked: the model as registered (a ViT's blocks stacked,
  scan_layers=True, as the ViT training recipes run them), 1000 classes (`num_classes`),
  Adam with weight decay and clipping at 1 (the pretraining recipe's optimizer).

  `overrides` (FIELD -> value, see `overrides.py`) are set last, over these settings; a
  field that names nothing, or that the benchmark sets from its own flags, is a
  `defaults.ConfigError` naming it.
  """
  from vit_jax.train import defaults  # pylint: disable=g-import-not-at-top
  from vit_jax.train import recipes  # pylint: disable=g-import-not-at-top
  config = defaults.default_config()
  config.model = models.get_config(model)
  config.model.update(image_size=resolution, num_classes=num_classes, dtype=dtype)
  if models.family_of(config.model) == 'vit':
    config.model.scan_layers = recipes.STACKED_BLOCKS  # as the ViT training recipes
  config.batch_size = batch
  config.accum_steps = accum_steps
  config.total_steps = 10_000
  config.optimizer.update(name='adam', weight_decay=0.03, grad_clip_norm=1.0)
  config.schedule.update(base_lr=1e-3, warmup_steps=100, decay='linear')
  overrides_lib.apply(config, overrides)
  return config


def run_vit_jax(*, model='ViT-B/16', mode='train', batch=8, resolution=224, dtype='float32',
                steps=10, warmup=2, accum_steps=1, overrides=None) -> dict:
  """Times vit_jax; returns the record (see the module docstring)."""
  return run_interleaved(
      [prepare_vit_jax(model=model, mode=mode, batch=batch, resolution=resolution,
                       dtype=dtype, accum_steps=accum_steps, overrides=overrides)],
      steps=steps, warmup=warmup, dtype=dtype)[0]


def check_config(*, model='ViT-B/16', mode='train', batch=8, resolution=224,
                 dtype='float32', accum_steps=1, overrides=None):
  """The config `prepare_vit_jax` would build, validated (`defaults.ConfigError` names a
  bad field) without compiling anything."""
  from vit_jax.train import defaults  # pylint: disable=g-import-not-at-top
  overrides_lib.check_for_mode(overrides, mode)  # the same config for both modes
  config = train_config(model, batch=batch, resolution=resolution, dtype=dtype,
                        accum_steps=accum_steps, overrides=overrides)
  defaults.validate(config, num_devices=jax.device_count(), process_count=1,
                    check_input=False)
  check_compute_dtype(config.model.dtype)
  return config


MEASURED_DTYPES = ('float32', 'bfloat16')


def check_compute_dtype(dtype) -> None:
  """A ValueError for a compute dtype whose MFU the benchmark cannot give: the peaks it
  knows (the datasheet's, the probes') are float32's and bfloat16's; a float16 step
  would be held against the float32 peak (15x too high an MFU on an H100)."""
  if dtype is None:
    return
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    return  # not a dtype: the model config's check names it
  if name not in MEASURED_DTYPES:
    raise ValueError(
        f'config.model.dtype={name!r}: the benchmark knows the peak FLOP/s of float32 and '
        'bfloat16 only, so it would report a wrong MFU; use --dtype=float32 or '
        '--dtype=bfloat16')


def timm_model_name(model: str, resolution: int) -> str:
  """The timm model that a comparison runs for `model` at `resolution`; a ValueError
  where timm has none."""
  from vit_jax.checkpoints import timm_format  # pylint: disable=g-import-not-at-top
  config = models.get_config(model)
  config.image_size = resolution
  return timm_format.timm_name(config)


def prepare_vit_jax(*, model='ViT-B/16', mode='train', batch=8, resolution=224,
                    dtype='float32', accum_steps=1, overrides=None,
                    config=None) -> 'Prepared':
  """Builds and compiles vit_jax's step; `Prepared.finish` makes the record. `config`: what
  `check_config` returned for these arguments, if the caller has it (checked once)."""
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top
  from vit_jax.train import loop  # pylint: disable=g-import-not-at-top
  if config is None:
    config = check_config(model=model, batch=batch, resolution=resolution, dtype=dtype,
                          accum_steps=accum_steps, overrides=overrides)
  mesh = sharding.create_mesh(config.mesh)
  trainer = loop.Trainer(config, mesh, config.total_steps)
  module = trainer.module
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (batch, resolution, resolution, 3)).astype(np.float32)
  labels = np.eye(NUM_CLASSES, dtype=np.float32)[rng.integers(0, NUM_CLASSES, batch)]
  data = jax.device_put({'image': images, 'label': labels}, trainer.batch_sharding)
  state = trainer.init_state()
  jax.block_until_ready(state)

  start = time.perf_counter()
  if mode == 'train':
    compiled = trainer.lower_train_step(state, data).compile()
  else:
    infer = jax.jit(lambda v, x: module.apply(v, x, train=False),
                    in_shardings=(trainer.state_sharding.variables(), trainer.batch_sharding))
    with jax.set_mesh(mesh):
      compiled = infer.lower(state.variables(), data['image']).compile()
  compile_s = time.perf_counter() - start
  step_flops_xla = _cost_flops(compiled)

  # Inference holds the variables only, not the optimizer state.
  holder = {'state': state} if mode == 'train' else {'variables': state.variables()}
  del state
  if mode == 'train':
    def step():
      holder['state'], metrics = compiled(holder['state'], data)
      jax.block_until_ready(metrics)
  else:
    def step():
      jax.block_until_ready(compiled(holder['variables'], data['image']))
  memory = compiled_memory(compiled)
  return Prepared(step, functools.partial(
      _vit_jax_record, module=module, model=model, mode=mode, batch=batch,
      resolution=resolution, dtype=dtype, accum_steps=accum_steps, overrides=overrides,
      compile_s=compile_s, step_flops_xla=step_flops_xla, mesh=dict(mesh.shape),
      memory=memory),
      profile=lambda: step_profile.xla_breakdown(step, compiled.as_text()), memory=memory)


def mfu_spread(r: dict) -> str:
  """Where the MFU (the median of each step's MFU against the peak probed next to it)
  is more than 10% off achieved / median peak, the latter too: on a machine whose speed
  varied during the run the two differ, and the line showed 0.163 next to 2.5 of 59.0
  GFLOP/s without a word."""
  if not (r['mfu'] and r['peak_flops_per_sec'] and r['peak_flops_per_sec_per_step']):
    return ''
  plain = r['achieved_flops_per_sec'] / r['peak_flops_per_sec']
  if abs(plain - r['mfu']) <= 0.1 * r['mfu']:
    return ''
  return (f" (the median of each step's MFU against its own peak; achieved / median peak "
          f"is {plain:.3f}: the machine's speed varied during the run, time more --steps)")


def _vit_jax_record(times, peaks, *, module, model, mode, batch, resolution, dtype,
                    accum_steps, overrides, compile_s, step_flops_xla, mesh,
                    memory) -> dict:
  forward = models.forward_flops(module, resolution)
  is_vit = isinstance(module, models.VisionTransformer)
  scanned = is_vit and (module.scan_layers or module.layer_loop == 'scan')
  analytic = models.analytic_flops(module, resolution) if is_vit else None
  # A hybrid's analytic count is of its transformer part only (not the ResNet stem): no
  # check of XLA's count of the whole model.
  hybrid = is_vit and module.resnet_layers is not None
  model_flops = (3 if mode == 'train' else 1) * forward
  summary = _summary(times)
  ips = batch / summary['median_s']
  name = jnp.dtype(module.dtype).name
  probed = jnp.dtype(dtype).name  # the probes' dtype (the run's --dtype)
  mfu_of_best_peak = per_peak = None
  if peaks and name != probed:
    # A --set/--variant of the model's dtype: no peak of its compute dtype was measured.
    peak = mfu = None
    peak_source = f'none: the matmul peak was probed in {probed}, the model computes in {name}'
  elif peaks:
    # A shared CPU's speed drifts by 10-20% within seconds: each step's MFU is against
    # the peak measured next to it, and the run's MFU is their median. The probe uses
    # every core, which the CPU devices share: it is the whole host's peak.
    peak = statistics.median(peaks)
    mfu = statistics.median(model_flops * batch / t / p for t, p in zip(times, peaks))
    peak_source = (f'measured {name} 2048^3 matmul next to each step: median of '
                   f'{min(peaks) / 1e9:.0f} to {max(peaks) / 1e9:.0f} GFLOP/s')
    # Against the best peak of the run's steps: a lower bound of the MFU.
    mfu_of_best_peak = model_flops * ips / max(peaks)
    per_peak = _speed_per_peak(batch, times, peaks)
  else:
    peak = hardware.datasheet_peak(jax.devices()[0], module.dtype) * jax.device_count()
    mfu = mfu_of_best_peak = model_flops * ips / peak
    peak_source = f'datasheet ({jax.devices()[0].device_kind}, {name})'
  return {
      'framework': 'vit_jax', 'model': model, 'mode': mode, 'batch': batch,
      'resolution': resolution, 'dtype': name, 'accum_steps': accum_steps,
      'overrides': dict(overrides or {}),
      'images_per_sec': ips, 'step_time': summary, 'step_times_s': times,
      'compile_s': compile_s,
      'forward_flops_per_image_xla': forward,
      'forward_flops_per_image_analytic': analytic,
      'analytic_vs_xla': analytic / forward if analytic and not hybrid else None,
      'model_flops_per_image': model_flops,
      # XLA's cost analysis counts a loop body once, whatever its trip count: its count of
      # a step whose ViT blocks run as a scan, or that accumulates gradients over
      # micro-batches (a scan over accum_steps), is not the step's. Nor is it accum_steps
      # times the count: the optimizer update and clipping run once, outside the loop
      # (measured: a scan of 1, 2, 4 bodies counts 271k, 140k, 74k FLOPs). The model FLOPs
      # above come from the unrolled forward.
      'xla_step_flops_per_image': (step_flops_xla / batch
                                   if step_flops_xla and not scanned and accum_steps == 1
                                   else None),
      'achieved_flops_per_sec': model_flops * ips,
      'peak_flops_per_sec': peak, 'peak_source': peak_source,
      'peak_flops_per_sec_per_step': peaks,
      'mfu': mfu,
      'mfu_of_best_peak': mfu_of_best_peak,
      'images_per_sec_per_peak_tflops': per_peak,
      # The device's peak over the process so far (every step built), not this step's.
      'peak_memory_bytes': _peak_memory(),
      'compiled_memory': memory,  # per device, from XLA's buffer assignment
      'device': jax.devices()[0].device_kind, 'device_count': jax.device_count(),
      'mesh': mesh,  # axis sizes (data, fsdp, model)
      'host_cpu': hardware.host_cpu(),
      'backend': jax.default_backend(), 'jax_version': jax.__version__,
  }


def run_timm(*, model='ViT-B/16', mode='train', batch=8, resolution=224, dtype='float32',
             steps=10, warmup=2, compile_model=False) -> dict:
  """The same model, batch and optimizer (AdamW, clipping at 1) in timm; bf16 = autocast."""
  prepared = prepare_timm(model=model, mode=mode, batch=batch, resolution=resolution,
                          dtype=dtype, compile_model=compile_model)
  return run_interleaved([prepared], steps=steps, warmup=max(warmup - 1, 0), dtype=dtype)[0]


def prepare_timm(*, model='ViT-B/16', mode='train', batch=8, resolution=224,
                 dtype='float32', compile_model=False, overrides=None,
                 accum_steps=1) -> 'Prepared':
  """timm's step, run once (torch.compile compiles then); `Prepared.finish` makes the
  record. `overrides` are vit_jax's, followed where timm can (`overrides.timm_kwargs`);
  a train step accumulates gradients over `accum_steps` micro-batches, as vit_jax's."""
  from vit_jax import torch_import  # pylint: disable=g-import-not-at-top
  model_kwargs = overrides_lib.timm_kwargs(model, overrides)
  torch = torch_import.torch()
  timm = torch_import.module('timm')
  torch.set_num_threads(os.cpu_count() or 1)
  config = models.get_config(model)
  name = timm_model_name(model, resolution)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  size_kwargs = ({'img_size': resolution} if models.fixed_input_size(models.family_of(config))
                 else {})
  net = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES,
                          **size_kwargs, **model_kwargs).to(device)
  bf16 = dtype == 'bfloat16'
  x = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
  y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
  fn = torch.compile(net) if compile_model else net
  autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  if mode == 'train':
    net.train()
    # The fused CUDA kernel on GPUs: timm at its fastest.
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.03,
                            fused=device == 'cuda')

    micro_batches = list(zip(x.chunk(accum_steps), y.chunk(accum_steps)))

    def step():
      for xs, ys in micro_batches:  # gradients add up over the micro-batches
        with autocast():
          loss = torch.nn.functional.cross_entropy(fn(xs), ys) / accum_steps
        loss.backward()
      torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)
      sync()
  else:
    net.eval()

    def step():
      with torch.inference_mode(), autocast():
        fn(x)
      sync()
  start = time.perf_counter()
  step()  # the first call compiles (torch.compile) / warms up
  first_s = time.perf_counter() - start
  library_probe = torch_matmul_probe(torch, dtype, device)
  return Prepared(step, functools.partial(
      _timm_record, library_probe=library_probe, library_peak_before=library_probe(),
      library_peak_matmul_size=library_probe.n,
      framework='timm ' + ('torch.compile' if compile_model else 'eager'),
      timm_model=name, timm_kwargs=model_kwargs, mode=mode, batch=batch,
      accum_steps=accum_steps if mode == 'train' else 1, resolution=resolution, dtype=dtype,
      first_step_s=first_s, device=device, torch_version=torch.__version__,
      timm_version=timm.__version__),
      # torch.compile's kernels are not aten operations: only eager is broken down.
      profile=(None if compile_model
               else functools.partial(step_profile.torch_breakdown, torch, step)))


def torch_matmul_probe(torch, dtype: str, device: str, n: int = 2048, repeats: int = 3,
                       max_s: float = 2.0, min_n: int = 256):
  """PyTorch's counterpart of `hardware.matmul_probe`: a function returning the FLOP/s of
  the best of `repeats` n x n matmuls in `dtype`, now (its `n` attribute: the size used).
  Next to XLA's probe it shows how much of a ratio to timm is the two frameworks' matmul
  libraries rather than the model code (on a 2-core Intel Xeon with AMX, PyTorch's bf16
  matmul is 2x XLA's).

  The matmul is what timm's linear layers run: `F.linear` on float32 tensors, under
  `torch.autocast` for bfloat16 (on a CPU without bf16 instructions, a bf16 `a @ a` takes
  another kernel, 10x slower than autocast's linear). Its time is capped: while the first
  matmul takes over `max_s` seconds, n halves (down to `min_n`), and the probe repeats it
  only as often as fits in `max_s`.
  """
  linear = torch.nn.functional.linear
  bf16 = dtype == 'bfloat16'
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)

  def matmul(a) -> float:
    t = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      linear(a, a)
    sync()
    return time.perf_counter() - t

  while True:
    a = torch.ones(n, n, device=device)
    first = matmul(a)
    if first <= max_s or n // 2 < min_n:
      break
    n //= 2
  repeats = max(1, min(repeats, int(max_s / max(first, 1e-9))))

  def probe() -> float:
    return 2 * n**3 / min(matmul(a) for _ in range(repeats))
  probe.n = n
  return probe


def library_mfu(model_flops_per_image: float, images_per_sec: float,
                peak: float) -> tuple[float | None, str | None]:
  """(MFU against the baseline library's own matmul peak, None) or, where that comes out
  above 1 (the probe's matmul was no peak: a slower kernel than the model's layers get),
  (None, a warning saying so)."""
  mfu = model_flops_per_image * images_per_sec / peak
  if mfu <= 1:
    return mfu, None
  return None, (f"its MFU against PyTorch's matmul ({peak / 1e9:.1f} GFLOP/s) comes out at "
                f'{mfu:.2f}, above 1: that matmul is no peak of this library here, so no '
                'MFU is recorded')


def _timm_record(times, peaks, *, batch, library_probe, library_peak_before,
                 library_peak_matmul_size, **fields) -> dict:
  summary = _summary(times)
  return {**fields, 'batch': batch, 'images_per_sec': batch / summary['median_s'],
          'step_time': summary, 'step_times_s': times, 'peak_flops_per_sec_per_step': peaks,
          'images_per_sec_per_peak_tflops': _speed_per_peak(batch, times, peaks),
          # PyTorch's own n^3 matmul (`torch_matmul_probe`), the mean of a probe before the
          # timed steps and one after them.
          'library_peak_flops_per_sec': (library_peak_before + library_probe()) / 2,
          'library_peak_matmul_size': library_peak_matmul_size}


@dataclasses.dataclass
class Prepared:
  """A benchmark ready to time: `step()` runs one synchronised step; `finish(times,
  peaks)` returns the record from the step times and the peak at each step ([] where the
  datasheet gives it). `profile()`, where given, runs a few more steps under the
  framework's profiler and returns where their time went (`step_profile`)."""
  step: Callable[[], None]
  finish: Callable[[list, list], dict]
  profile: Callable[[], dict] | None = None
  memory: dict | None = None  # `compiled_memory` of a vit_jax step


def free_memory() -> tuple[int | None, str]:
  """Bytes a step can still allocate, and where that figure comes from: the device's
  pool less what is in use (GPU, TPU), or the host's available memory (CPU). None where
  neither is known."""
  stats = jax.devices()[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    return stats['bytes_limit'] - stats.get('bytes_in_use', 0), 'free in the device pool'
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024, "of the host's available memory"
  except OSError:
    pass
  return None, 'unknown'


def format_bytes(n: int) -> str:
  """'1.09 GiB' from a gibibyte up, else '995.3 MiB'."""
  return f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB'


def check_step_memory(prepared: list[Prepared], names: list[str]) -> None:
  """Raises MemoryError, before any step runs, when the largest of the steps needs more
  memory beyond its arguments (temporaries, outputs that do not reuse a donated buffer)
  than is free now that every step's state is allocated: several variants each hold their
  own train state, and the run would otherwise fail in the middle of the timing."""
  free, where = free_memory()
  needs = [(p.memory['temp_bytes'] + p.memory['output_bytes'] - p.memory['alias_bytes'], n)
           for p, n in zip(prepared, names) if p.memory]
  if free is None or not needs:
    return
  need, name = max(needs)
  if need > free:
    raise MemoryError(
        f'the {name} step needs {format_bytes(need)} beyond its arguments while it runs, '
        f'and {format_bytes(free)} is {where} with the {len(prepared)} steps built: time fewer '
        '--variant steps per run, a smaller --batch, or a remat policy that keeps less '
        "(--set=remat_policy=\"'full'\")")


def run_interleaved(prepared: list[Prepared], *, steps: int, warmup: int,
                    dtype: str) -> list[dict]:
  """Times the benchmarks' steps in turn (one step of each, `steps` rounds), so that
  frameworks compared share the machine's speed of the moment; on a CPU the matmul peak
  is probed before the first step and after every step (`_timed`). Step i of the round
  is the i-th of `prepared`."""
  for p in prepared:
    for _ in range(warmup):
      p.step()
  n = len(prepared)
  steps_in_turn = itertools.cycle([p.step for p in prepared])
  times, probes = _timed(lambda: next(steps_in_turn)(), steps * n, 0, _peak_probe(dtype))
  peaks = _per_step_peaks(probes)
  return [p.finish(times[i::n], peaks[i::n]) for i, p in enumerate(prepared)]
