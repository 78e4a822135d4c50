r"""`python -m vit_jax.benchmark --mode=input [--compare=torchvision] [--json=FILE]`.

Modes: `input` (the ImageNet training preprocessing on real photographs, images/s per
CPU core, optionally next to torchvision's DataLoader pipeline in the same run). The
model modes (`train`, `infer`) arrive with the performance work.
"""

import json

from absl import app
from absl import flags

_MODE = flags.DEFINE_enum('mode', 'input', ['input'], 'What to measure.')
_COMPARE = flags.DEFINE_string('compare', None, "Baseline run in the same process: 'torchvision'.")
_JSON = flags.DEFINE_string('json', None, 'Write the record to this JSON file.')
_WORKERS = flags.DEFINE_integer('workers', None, 'Threads / worker processes (default: cores).')
_BATCH = flags.DEFINE_integer('batch', 64, 'Batch size.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed batches (after warm-up).')
_FILES = flags.DEFINE_integer(
    'files', 2048, 'JPEG files written for the run; keep steps x batch within one epoch')


def main(argv):
  del argv
  from vit_jax.benchmark import input_speed  # pylint: disable=g-import-not-at-top
  record = input_speed.run(workers=_WORKERS.value, batch_size=_BATCH.value,
                           steps=_STEPS.value, num_files=_FILES.value, compare=_COMPARE.value)
  lines = [f"input pipeline ({record['pipeline']}), {record['workers']} worker(s), "
           f"{record['files']} JPEGs of {record['mean_file_kb']:.0f} KB on average:",
           f"  vit_jax:     {record['images_per_sec']:8.1f} images/s = "
           f"{record['images_per_sec_per_core']:7.1f} per core"]
  if 'baseline_images_per_sec' in record:
    lines.append(f"  torchvision: {record['baseline_images_per_sec']:8.1f} images/s = "
                 f"{record['baseline_images_per_sec_per_core']:7.1f} per core")
    lines.append(f"  ratio:       {record['ratio']:.2f}x")
  print('\n'.join(lines), flush=True)
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(record, f, indent=2)


if __name__ == '__main__':
  app.run(main)
