"""The config a run recorded in its workdir, to resume it or start it again as it was.

    python -m vit_jax.main --config=configs/from_workdir.py:/tmp/run --workdir=/tmp/run

Source: `WORKDIR/config.json`, which `vit_jax.main` writes at the start of every run (the
fields it trains with). Any field can still be overridden on the command line
(`--config.total_steps=...` to train longer). JSON has no tuples: sequences come back as
lists, which the models and the loop take alike.
"""

import json
import os

import ml_collections


def get_config(workdir: str = ''):
  if not workdir:
    raise ValueError('name the workdir after a colon: '
                     '--config=configs/from_workdir.py:/path/to/workdir')
  path = os.path.join(workdir, 'config.json')
  from etils import epath  # pylint: disable=g-import-not-at-top  (gs:// paths too)
  if not epath.Path(path).exists():
    raise FileNotFoundError(f'{path} does not exist: --config=configs/from_workdir.py:DIR '
                            'takes the --workdir of a run of vit_jax.main')
  return ml_collections.ConfigDict(json.loads(epath.Path(path).read_text()))
