"""The config a run recorded in its workdir, to resume it or start it again as it was.

    python -m vit_jax.main --config=configs/from_workdir.py:/tmp/run --workdir=/tmp/run

Source: `WORKDIR/config.json`, which `vit_jax.main` writes at the start of every run (the
fields it trains with). The recorded values are set on the default training config and
the registered config of the recorded model's name, so every field stays overridable on
the command line as with the recipe files (`--config.total_steps=...` to train longer).
JSON has no tuples: sequences come back as tuples.
"""

import json
import os

import ml_collections

from vit_jax import models
from vit_jax.train import defaults


def _set(node, recorded: dict) -> None:
  """Sets recorded values on a config, keeping its typed fields (a None that the command
  line may override with an int); recorded fields it lacks are added."""
  for key, value in recorded.items():
    current = node.get(key) if key in node else None
    if isinstance(value, dict) and isinstance(current, ml_collections.ConfigDict):
      _set(current, value)
      continue
    if isinstance(value, dict):
      value = ml_collections.ConfigDict(value)
    elif isinstance(value, list):
      value = tuple(value)
    node[key] = value


def get_config(workdir: str = ''):
  if not workdir:
    raise ValueError('name the workdir after a colon: '
                     '--config=configs/from_workdir.py:/path/to/workdir')
  from etils import epath  # pylint: disable=g-import-not-at-top  (gs:// paths too)
  workdir = os.path.expanduser(workdir)  # (':~/run': no shell expands it there)
  path = epath.Path(os.path.join(workdir, 'config.json'))
  if not path.exists():  # a ValueError: absl reports it as one line, as a bad flag
    raise ValueError(f'{path} does not exist: --config=configs/from_workdir.py:DIR takes '
                     'the --workdir of a run of vit_jax.main')
  try:
    recorded = json.loads(path.read_text())
  except json.JSONDecodeError as e:  # (ml_collections failed to re-raise this one)
    raise ValueError(f'{path} is not valid JSON ({e}): a damaged or cut-short copy? '
                     'vit_jax.main writes it at the start of every run') from None
  if not isinstance(recorded, dict):
    raise ValueError(f'{path} holds no JSON object: not a config.json of vit_jax.main')
  config = defaults.default_config()
  model = recorded.get('model') or {}
  try:
    config.model = models.get_config(model.get('name', ''))
  except ValueError:  # no registered name: a registered model of its family, overwritten
    family = models.family_of(ml_collections.ConfigDict(model))
    config.model = models.get_config(models.list_models(family)[0])
  _set(config, recorded)
  return config
