"""Orbax checkpoints of the whole train state in the workdir, resumable after preemption.

A checkpoint holds the train state (params, optimizer state, step, RNG) and a JSON
`meta` item: the data pipeline position (the pipeline is a pure function of seed and
step, so the step is the position; seed, global batch and steps per epoch are stored to
check that a resumed run reads the same order), the class names and the resolved config.

Saves are asynchronous and atomic: Orbax writes into a temporary directory and renames
it when complete, so a run killed mid-save leaves the previous checkpoints untouched and
the incomplete one is ignored (and cleaned up) on restart. `keep_last` newest checkpoints
are kept, plus the `keep_best` best by an evaluation metric.
"""

import contextlib
import json
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_manager
from orbax.checkpoint import checkpoint_managers


# Where Orbax's CheckpointManager.save keeps a step's metrics: <step>/metrics/metrics.
METRICS_ITEM = checkpoint_manager.METRIC_ITEM_NAME


# Orbax's marker of a finished save on object stores (gs://), where a step folder is
# written in place: a save cut short leaves the folder without it. Local saves are
# renamed from a temporary folder when complete, so a local step folder is finished.
COMMIT_MARKER = 'commit_success.txt'


def is_finished_step(directory, *, remote: bool) -> bool:
  """Whether `directory` (an epath.Path) is a finished step checkpoint folder."""
  return (directory.name.isdigit() and directory.is_dir()
          and (not remote or (directory / COMMIT_MARKER).exists()))


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (a full disk, a lost bucket, permissions); the
  message names the step, the cause and where the run resumes."""


class _Manager(ocp.CheckpointManager):
  """Orbax's manager without its own preemption queries.

  The training loop asks JAX's preemption service once per step, in order
  (vit_jax/train/preemption.py), and saves with force=True. Orbax would ask it again in
  save() and, from its finalize thread, with the step it just finished: that moves the
  service's step counter back to an older step, and a notice arriving then could agree on
  a step the loop has already passed, so the run would not stop to save.
  """

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


class TrainCheckpointer:
  """Saves and restores {'state': train state, 'meta': JSON} under `directory`."""

  def __init__(self, directory, *, keep_last: int = 3, keep_best: int = 0,
               best_metric: str = 'eval_top1', best_mode: str = 'max',
               async_save: bool = True):
    policies = [checkpoint_managers.LatestN(n=max(keep_last, 1))]
    sign = 1.0 if best_mode == 'max' else -1.0
    metric = lambda m: sign * float(m[best_metric])  # noqa: E731
    if keep_best:
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=metric, n=keep_best, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        # Orbax writes a save's metrics only when best_fn is set (the BestN policy alone
        # ranked nothing: every checkpoint was unranked and the best ones were deleted).
        best_fn=metric if keep_best else None,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
    self._keep_best = keep_best
    self._manager = _Manager(directory, options=options, item_names=('state', 'meta'))
    self._saving = None  # the step of the newest save started, for its error message

  @property
  def directory(self):
    return self._manager.directory

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, meta: dict, metrics: dict | None = None) -> None:
    """Starts an asynchronous save of `state` at `step` (returns before it completes).

    Raises CheckpointSaveError if the previous save failed, or this one cannot start.
    """
    self._wait_for_previous_save()
    quiet = _without_orbax_warning('did not provide metrics') if (
        self._keep_best and metrics is None) else contextlib.nullcontext()
    with self._failure_named(step), quiet:  # a save between evaluations has no metrics
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
          metrics=metrics, force=True)
    self._saving = step

  def rank(self, metrics_by_step: dict[int, dict]) -> list[int]:
    """Ranks the checkpoints saved without metrics by the `metrics_by_step` evaluated
    since, as if they had been given to `save`. Returns the steps it ranked.

    A checkpoint is saved without metrics when a stop put its evaluation off, or when
    the run that saved it had `keep_best=0`; without this, `keep_best` never keeps it
    and it is deleted once it is older than the `keep_last` newest. Orbax offers no call
    for it, so the metrics go where its `save` puts them (the JSON file
    `<step>/metrics/metrics`, written to a temporary name and renamed). Every process
    calls it (a barrier follows); process 0 alone decides and writes, from its own
    argument (the others may pass {}), and every process then re-reads the metrics.
    """
    self._wait_for_previous_save()
    ranked = []
    if jax.process_index() == 0:
      on_disk = set(self.all_steps())
      for step, metrics in sorted(metrics_by_step.items()):
        if step not in on_disk or self._manager.metrics(step) is not None:
          continue
        folder = self.directory / str(step) / METRICS_ITEM
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f'.{METRICS_ITEM}.tmp'
        tmp.write_text(json.dumps({k: float(v) for k, v in metrics.items()}))
        tmp.rename(folder / METRICS_ITEM)
        ranked.append(step)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('vit_jax_rank_checkpoints')
    self._manager.reload()
    return ranked

  def metrics(self, step: int) -> dict | None:
    """The metrics checkpoint `step` is ranked by (None: saved without)."""
    return self._manager.metrics(step)

  def _wait_for_previous_save(self) -> None:
    with self._failure_named(self._saving):
      self._manager.wait_until_finished()

  @contextlib.contextmanager
  def _failure_named(self, step):
    """Turns an error of saving `step` into a CheckpointSaveError that says what to do."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      if step is None:
        raise
      lines = str(e).strip().splitlines()
      cause = f'{type(e).__name__}: {lines[0][:600] if lines else ""}'
      try:
        # From disk: Orbax's own list already dropped the steps the failed save was to
        # prune, which are still there (keep_checkpoints=1 would read "none").
        self._manager.reload()
        newest = self._manager.latest_step()
      except Exception:  # pylint: disable=broad-except
        newest = None
      raise CheckpointSaveError(
          f'saving checkpoint step {step} in {self.directory} failed ({cause}). The run '
          'stopped; ' + (f'the newest complete checkpoint is step {newest}, where the same '
                         'command resumes' if newest is not None else
                         'no checkpoint is complete yet, so the same command starts again '
                         'from step 0') +
          ' once the cause (a full disk, a missing directory, permissions) is fixed.'
      ) from e

  def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
    """(state, meta) of `step` (default: the newest complete one), laid out like
    `abstract_state` (a tree of jax.ShapeDtypeStruct with shardings)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no complete checkpoint in {self.directory}')
    logging.info('Restoring checkpoint %d from %s', step, self.directory)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out['state'], out['meta']

  def differences(self, abstract_state, step: int | None = None,
                  limit: int = 6) -> list[str]:
    """How the arrays of checkpoint `step` differ from `abstract_state` (paths missing on
    either side, other shapes), read from the checkpoint's metadata; [] when they match."""
    step = self.latest_step() if step is None else step
    saved = ocp.PyTreeCheckpointHandler().metadata(self.directory / str(step) / 'state')
    saved = _shapes(getattr(saved, 'item_metadata', saved))
    wanted = _shapes(abstract_state)
    order = lambda k: (not k.startswith('params/'), k)  # noqa: E731 (params first)
    out = [f'{k}: {saved[k]} in the checkpoint, {wanted[k]} in this config'
           for k in sorted(saved.keys() & wanted.keys(), key=order) if saved[k] != wanted[k]]
    out += [f'{k}: in the checkpoint only'
            for k in sorted(saved.keys() - wanted.keys(), key=order)]
    out += [f'{k}: in this config only'
            for k in sorted(wanted.keys() - saved.keys(), key=order)]
    return out[:limit] + ([f'... {len(out) - limit} more'] if len(out) > limit else [])

  def set_aside(self, step: int) -> str:
    """Renames checkpoint `step` to '<step>.unreadable[.N]' (kept for inspection; not a
    step any more, so the next save of that step is possible). Returns the new name."""
    source = self.directory / str(step)
    name, n = f'{step}.unreadable', 1
    while (self.directory / name).exists():
      n += 1
      name = f'{step}.unreadable.{n}'
    source.rename(self.directory / name)
    self._manager.reload()
    return name

  def restore_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']

  def check_for_errors(self) -> None:
    """Raises the error of an asynchronous save that failed since the last call (a full
    disk, a lost bucket), so that the run stops then, not at the next save. Does not
    wait for a save in progress."""
    if not self._manager.is_saving_in_progress():
      # Returns at once once the save's last thread has ended, raising its error (Orbax's
      # own check_for_errors misses it: the manager's finalize thread took it).
      self._wait_for_previous_save()

  def wait(self) -> None:
    """Blocks until pending saves are complete (CheckpointSaveError if one failed)."""
    self._wait_for_previous_save()

  def close(self) -> None:
    """Waits for the pending save (CheckpointSaveError if it failed), then closes."""
    try:
      self._wait_for_previous_save()
    finally:
      self._manager.close()


def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _shapes(tree) -> dict[str, tuple]:
  """{'params/Transformer/...': shape} of a state tree, saved (dicts and lists) or
  abstract (dataclasses and named tuples): the same path names either way."""
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))
  return {'/'.join(_key_name(k) for k in path): tuple(leaf.shape)
          for path, leaf in leaves if hasattr(leaf, 'shape')}


@contextlib.contextmanager
def _without_orbax_warning(text: str):
  """Drops the absl log records containing `text` while the block runs."""
  def keep(record) -> bool:
    return text not in record.getMessage()
  logger = logging.get_absl_logger()
  logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)
