"""Random-weight PyTorch reference models for the numerical tests (timm, transformers).

Every comparison runs the same random fp32 inputs in [-1, 1] through vit_jax (NHWC)
and through the independent PyTorch implementation (NCHW). Weights are random, with
norms and biases perturbed away from their initial 1 / 0 (so a swapped scale and bias,
or a transposed kernel, cannot hide) and a non-zero head scaled so that logits are of
order one (so an absolute tolerance means something).

Importable from any test as `import torch_reference` (pyproject.toml puts tests/ on the
path); it needs torch, so import it after `pytest.importorskip('torch')`.
"""

import jax
import numpy as np
import torch

NORM_STD = 0.2    # added to LayerNorm / GroupNorm weights
BIAS_STD = 0.05   # added to every bias
BATCH = 2


def random_images(size, seed=0, batch=BATCH, channels=3):
  """NHWC float32 images uniform in [-1, 1]; `size` is an int or (height, width)."""
  h, w = (size, size) if isinstance(size, int) else size
  rng = np.random.RandomState(seed)
  return rng.uniform(-1, 1, (batch, h, w, channels)).astype(np.float32)


def to_nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def perturb_torch(model, seed=0, generator=None):
  """Adds N(0, NORM_STD) to every LayerNorm/GroupNorm weight and N(0, BIAS_STD) to biases.

  Draws from `generator` if given (the caller goes on drawing from it), else from one
  seeded with `seed`. Returns the number of norm layers perturbed.
  """
  g = generator if generator is not None else torch.Generator().manual_seed(seed)
  norms = 0
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and module.weight is not None:
        module.weight.add_(torch.randn(module.weight.shape, generator=g) * NORM_STD)
        norms += 1
    for name, p in model.named_parameters():
      if name.endswith('bias'):
        p.add_(torch.randn(p.shape, generator=g) * BIAS_STD)
  return norms


def calibrated_head_std(features):
  """Normal std for a head kernel giving logits of std ~1 on these pooled features."""
  features = np.asarray(features, np.float64)
  rms = float(np.sqrt(np.mean(features ** 2)))
  return 1.0 / (rms * np.sqrt(features.shape[-1]))


def set_torch_head(model, head, images_nchw, seed=0):
  """Draws `head` (a torch Linear of `model`) so that mean |logit| is about 1.

  The pooled features are captured by a forward pre-hook on the head. The bias gets
  N(0, BIAS_STD).
  """
  captured = []
  hook = head.register_forward_pre_hook(lambda mod, inputs: captured.append(inputs[0]))
  try:
    with torch.no_grad():
      model(images_nchw)
  finally:
    hook.remove()
  std = calibrated_head_std(captured[0].numpy())
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    head.weight.copy_(torch.randn(head.weight.shape, generator=g) * std)
    head.bias.copy_(torch.randn(head.bias.shape, generator=g) * BIAS_STD)
  return std


def torch_logits(model, images_nhwc, hf=False):
  """Logits of a torch model (timm, or transformers with hf=True) as numpy."""
  with torch.no_grad():
    out = model(pixel_values=to_nchw(images_nhwc)).logits if hf else model(
        to_nchw(images_nhwc))
  return out.numpy()


def jax_logits(module, params, images_nhwc):
  fn = jax.jit(lambda p, x: module.apply({'params': p}, x, train=False))
  return np.asarray(fn(params, images_nhwc))


def max_diff(a, b, name, reference=None):
  """max |a - b|, printed with the mean |logit| of the reference for `pytest -s`."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, f'{name}: shapes {a.shape} vs {b.shape}'
  d = float(np.max(np.abs(a - b)))
  s = float(np.mean(np.abs(b if reference is None else reference)))
  print(f'[tolerance] {name}: max|diff|={d:.2e} mean|logit|={s:.2f}')
  return d


def perturb_jax_params(params, seed=0, head_std=None):
  """Numpy copy of vit_jax params: LayerNorm scales +N(0, NORM_STD), biases
  +N(0, BIAS_STD), and (if head_std) a normal head kernel of that std."""
  from vit_jax import checkpoints  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(seed)
  flat = {k: np.array(v, np.float32) for k, v in checkpoints.flatten(params).items()}
  for k, v in flat.items():
    if k.endswith('/scale'):
      flat[k] = (v + rng.normal(0, NORM_STD, v.shape)).astype(np.float32)
    elif k.endswith('/bias'):
      flat[k] = (v + rng.normal(0, BIAS_STD, v.shape)).astype(np.float32)
  if head_std is not None:
    flat['head/kernel'] = rng.normal(0, head_std, flat['head/kernel'].shape).astype(np.float32)
  return checkpoints.unflatten(flat)


