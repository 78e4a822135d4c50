r"""Entry point: `python -m vit_jax.main --config=configs/vit_b16.py --workdir=DIR`.

Any config field can be overridden on the command line, e.g.
`--config.model.num_classes=10 --config.model.image_size=384`.

Training is not wired in yet; until it is, the main job builds the configured model and
prints its summary (parameters, FLOPs per image, output shape), and writes the resolved
config and the summary into the workdir.
"""

import json
import time

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from vit_jax import models

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (local or gs://).')


def model_summary(model_config) -> dict:
  """Parameter count, FLOPs per image and output shape of the configured model."""
  module = models.create(model_config)
  size = model_config.image_size
  params = models.abstract_params(module, size)
  images = jax.ShapeDtypeStruct((1, size, size, module.in_channels), jnp.float32)
  out = jax.eval_shape(lambda p, x: module.apply({'params': p}, x, train=False), params,
                       images)
  start = time.perf_counter()
  flops = models.forward_flops(module, size)
  return {
      'model': model_config.name,
      'image_size': size,
      'parameters': models.param_count(params),
      'forward_gflops_per_image': flops / 1e9,
      'analytic_transformer_gflops_per_image': models.analytic_flops(module, size) / 1e9,
      'output_shape_per_image': list(out.shape[1:]),
      'output_dtype': str(out.dtype),
      'compile_seconds': time.perf_counter() - start,
      'backend': jax.default_backend(),
  }


def format_summary(s: dict) -> str:
  rows = [
      ('model', s['model']),
      ('image size', f"{s['image_size']} x {s['image_size']}"),
      ('parameters', f"{s['parameters']:,}"),
      ('forward GFLOPs / image (XLA)', f"{s['forward_gflops_per_image']:.2f}"),
      ('  of which transformer (analytic)', f"{s['analytic_transformer_gflops_per_image']:.2f}"),
      ('output shape / image', f"{tuple(s['output_shape_per_image'])} {s['output_dtype']}"),
      ('forward compile time', f"{s['compile_seconds']:.1f} s on {s['backend']}"),
  ]
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  workdir = epath.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  summary = model_summary(config.model)
  (workdir / 'model_summary.json').write_text(json.dumps(summary, indent=2))
  print(format_summary(summary), flush=True)
  logging.info('Wrote %s and %s', workdir / 'config.json', workdir / 'model_summary.json')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
