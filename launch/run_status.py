"""Has a vit_jax run reached its final step? Reads the workdir (local or gs://).

usage: python launch/run_status.py WORKDIR [--total_steps=N] [--json]

Prints e.g. `step 3000 of 10000 (newest complete checkpoint)` and exits 0 when the
newest complete checkpoint is the final step, 1 when it is not (or there is none yet),
2 on errors. The final step is the one the training loop computes: config.total_steps,
else ceil(num_epochs * steps_per_epoch), both from the newest checkpoint's `meta`
(pass --total_steps when a restart raises config.total_steps). The training loop always
saves a checkpoint at the final step, so a finished run always shows it.

Read-only: the checkpoint directory is opened with Orbax in read-only mode, so running
this next to a training job never removes its in-progress (temporary) checkpoints. JAX
runs on the CPU here (JAX_PLATFORMS=cpu unless set), so it does not take the
accelerators of a job running on the same machine.
"""

import argparse
import json
import math
import os
import sys


def status(workdir: str, total_steps: int | None = None) -> dict:
  """{'step': newest complete checkpoint step or None, 'total_steps', 'done'}."""
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  from absl import logging  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.ERROR)  # Orbax warns that read-only mode is read-only
  directory = epath.Path(workdir) / 'checkpoints'
  if not directory.exists():
    return {'step': None, 'total_steps': total_steps, 'done': False}
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                      cleanup_tmp_directories=False),
      item_names=('state', 'meta'))
  step = manager.latest_step()
  if step is None:
    return {'step': None, 'total_steps': total_steps, 'done': False}
  if total_steps is None:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    config = meta.get('config') or {}
    total_steps = config.get('total_steps') or max(
        int(math.ceil(config['num_epochs'] * meta['steps_per_epoch'])), 1)
  return {'step': step, 'total_steps': total_steps, 'done': step >= total_steps}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('workdir')
  parser.add_argument('--total_steps', type=int, default=None)
  parser.add_argument('--json', action='store_true', help='print the status as JSON')
  args = parser.parse_args(argv)
  try:
    s = status(args.workdir, args.total_steps)
  except Exception as e:  # pylint: disable=broad-except
    print(f'launch/run_status.py: cannot read {args.workdir}: {type(e).__name__}: {e}',
          file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(s))
  elif s['step'] is None:
    print(f'{args.workdir}: no complete checkpoint yet')
  else:
    print(f'{args.workdir}: step {s["step"]} of {s["total_steps"]} (newest complete '
          f'checkpoint){": done" if s["done"] else ""}')
  return 0 if s['done'] else 1


if __name__ == '__main__':
  sys.exit(main())
