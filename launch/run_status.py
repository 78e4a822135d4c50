#!/usr/bin/env python3
"""Has a vit_jax run reached its final step? Reads the workdir (local or gs://).

Prints e.g. `step 3000 of 10000 (newest complete checkpoint)` and exits 0 when the
newest complete checkpoint is the final step, 1 when it is not (or there is none yet),
2 on errors (the workdir cannot be read, a checkpoint's meta cannot be read where the
training loop would stop too, bad arguments). In a single-process run with a local
workdir a step whose meta is missing or unreadable is damaged: the training loop
resumes from the step before it, which is then the one reported (the damaged steps are
named on stderr). The final step is the one the training loop computes:
config.total_steps, else ceil(num_epochs * steps_per_epoch), both from the newest
checkpoint's `meta` (pass --total_steps when a restart raises config.total_steps). The
training loop always saves a checkpoint at the final step, so a finished run always
shows it.

Only the standard library is needed for a local workdir, so any Python 3.7+ runs this
(python3 outside the project's environment included); a gs:// (or other URL) workdir
needs etils.epath and a backend that reads it (the project's environment). Read-only:
it lists WORKDIR/checkpoints and reads the newest complete step's meta/metadata, as
Orbax does, so running it next to a training job never touches the job's in-progress
(temporary) checkpoints, and it starts no JAX.

--check tests, without reading any checkpoint, that this Python can run the check for
WORKDIR (prints `launch/run_status.py: ready ...`, exits 0; else exits 2 saying why):
launch/until_done.sh runs it once before it starts anything.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import sys

PROG = 'launch/run_status.py'
# Orbax's standard step names (CheckpointManager without step_prefix or padding). A
# checkpoint being written lives in `<step>.orbax-checkpoint-tmp-<timestamp>` and is
# renamed when complete; on gs:// it is written in place and complete once it holds
# commit_success.txt (Orbax's defaults: atomic rename, commit file on GCS).
STEP_NAME = re.compile(r'0|[1-9][0-9]*')
COMMIT_FILE = 'commit_success.txt'


def _path(workdir: str):
  """A pathlib.Path for a local workdir, an etils.epath.Path for a URL (gs://...)."""
  if '://' not in workdir:
    return pathlib.Path(workdir)
  try:
    from etils import epath  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError(
        f'reading {workdir} needs etils.epath ({type(e).__name__}: {e}); run this with '
        f'the Python vit_jax is installed in (not {sys.executable})') from e
  return epath.Path(workdir)


def complete_steps(checkpoints) -> list[int]:
  """The steps of the complete checkpoints in a `checkpoints` directory, ascending."""
  if not checkpoints.is_dir():
    return []
  needs_commit_file = str(checkpoints).startswith('gs://')
  steps = []
  for d in checkpoints.iterdir():
    if STEP_NAME.fullmatch(d.name) and d.is_dir() and (
        not needs_commit_file or (d / COMMIT_FILE).exists()):
      steps.append(int(d.name))
  return sorted(steps)


def final_step(meta: dict) -> int:
  """The training loop's last step from a checkpoint's meta (vit_jax.train.loop)."""
  config = meta.get('config') or {}
  if config.get('total_steps'):
    return int(config['total_steps'])
  return max(int(math.ceil(config['num_epochs'] * meta['steps_per_epoch'])), 1)


def status(workdir: str, total_steps: int | None = None) -> dict:
  """{'step': newest complete checkpoint step or None, 'total_steps', 'done', and
  'damaged': {step: why} for newer steps whose meta cannot be read}.

  As the training loop resumes: in a single-process run with a local workdir it passes
  over a damaged newest step (a meta that is missing or not JSON) for the one before it,
  which is then the step reported, so a damaged final step reads as not done. On gs://
  or after a multi-process run the loop stops at the damaged step, and so does this
  (an error). With --total_steps only the final step's meta is read (whether its
  evaluation is still to run).
  """
  root = _path(workdir)
  steps = complete_steps(root / 'checkpoints')
  out = {'step': None, 'total_steps': total_steps, 'done': False, 'damaged': {},
         'workdir_exists': root.exists()}
  if not steps:
    return out
  if total_steps is not None:
    out.update(step=steps[-1], done=steps[-1] >= total_steps)
    if out['done']:
      try:
        meta = json.loads((root / 'checkpoints' / str(steps[-1]) / 'meta' / 'metadata')
                          .read_text())
      except (OSError, ValueError):
        meta = {}
      _unless_evaluation_pending(out, root, meta)
    return out
  for step in reversed(steps):
    meta_file = root / 'checkpoints' / str(step) / 'meta' / 'metadata'
    try:
      meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
      out['damaged'][step] = f'{meta_file}: {type(e).__name__}: {e}'
      if '://' in workdir:
        break  # the loop passes over damaged steps in local workdirs only
      continue
    if out['damaged'] and (meta.get('process_count') or 1) > 1:
      break  # a multi-process run stops at the damaged step too
    try:
      total_steps = final_step(meta)
    except (KeyError, TypeError, ValueError) as e:
      raise RuntimeError(
          f'cannot find the final step in {meta_file} ({type(e).__name__}: {e}); pass '
          '--total_steps=N') from e
    out.update(step=step, total_steps=total_steps, done=step >= total_steps)
    _unless_evaluation_pending(out, root, meta)
    return out
  raise RuntimeError(
      'the newest checkpoint cannot be resumed (' + '; '.join(out['damaged'].values()) +
      '): the training loop would stop there too. Remove or repair it, or pass '
      '--total_steps=N to read the steps only')


def _unless_evaluation_pending(out: dict, root, meta: dict) -> None:
  """A final checkpoint saved before its evaluation ran (a stop during it) is not done:
  the resumed run evaluates it first, unless metrics.jsonl has that evaluation already
  (as the training loop decides)."""
  if not out['done'] or not meta.get('eval_pending'):
    return
  try:
    rows = (root / 'metrics.jsonl').read_text().splitlines()
  except OSError:
    rows = []
  for line in rows:
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and row.get('step') == out['step'] and 'eval_loss' in row:
      return
  out.update(done=False, eval_pending=True)


def check(workdir: str) -> str:
  """Raises unless this Python can read `workdir`; returns what it runs on."""
  _path(workdir).exists()  # for a URL: imports and reaches the backend (credentials)
  return (f'{PROG}: ready (Python {sys.version.split()[0]} at {sys.executable} can '
          f'read {workdir})')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('workdir', help="the run's workdir (--workdir of vit_jax.main)")
  parser.add_argument('--total_steps', type=int, default=None,
                      help='the final step (default: from the newest checkpoint)')
  parser.add_argument('--json', action='store_true', help='print the status as JSON')
  parser.add_argument('--check', action='store_true',
                      help='only test that this Python can read WORKDIR (see above)')
  args = parser.parse_args(argv)  # exits 2 on bad arguments
  try:
    if args.check:
      print(check(args.workdir))
      return 0
    s = status(args.workdir, args.total_steps)
  except Exception as e:  # pylint: disable=broad-except
    print(f'{PROG}: cannot read {args.workdir}: {type(e).__name__}: {e}', file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(s))
  elif s['step'] is None:
    where = '' if s['workdir_exists'] else ' (the workdir does not exist)'
    print(f'{args.workdir}: no complete checkpoint yet{where}')
  else:
    pending = (': its evaluation was put off by a stop, and the resumed run makes it up'
               if s.get('eval_pending') else '')
    print(f'{args.workdir}: step {s["step"]} of {s["total_steps"]} (newest complete '
          f'checkpoint){": done" if s["done"] else pending}')
  for step, why in sorted(s['damaged'].items()):
    print(f'{PROG}: step {step} is damaged, the run resumes before it ({why})',
          file=sys.stderr)
  return 0 if s['done'] else 1


if __name__ == '__main__':
  sys.exit(main())
