"""The training loop: owns the side effects (devices, files, logs) around pure steps."""

import contextlib
import json
import math
import os
import signal
import time
import uuid

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import models
from vit_jax import sharding as sharding_lib
from vit_jax import tensorflow_startup
from vit_jax.checkpoints import train_state as ckpt_lib
from vit_jax.train import batch_mix
from vit_jax.train import defaults
from vit_jax.train import hardware
from vit_jax.train import metrics as metrics_lib
from vit_jax.train import optimizer as optimizer_lib
from vit_jax.train import preemption
from vit_jax.train import step as step_lib
from vit_jax.train import workdir_lock


RUN_AHEAD = 2  # train steps the host may dispatch before the device has run them


class NonFiniteError(FloatingPointError):
  """The loss or the gradient became NaN/inf; the message names the step."""


def workdir_path(workdir) -> epath.Path:
  """`workdir` as an absolute path (a local one relative to the current directory; a
  gs:// or other remote one as given); ConfigError for an empty one.

  Orbax saves only to absolute paths: a relative workdir used to train up to its first
  checkpoint and then fail there, again after every restart.
  """
  text = os.fspath(workdir)
  if not text.strip():
    raise defaults.ConfigError('--workdir is empty: give the folder for checkpoints and '
                               'metrics, e.g. --workdir=/tmp/my_run (or a gs:// path)')
  if '://' in text:
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def has_checkpoint(workdir) -> bool:
  """Whether the workdir holds a finished step checkpoint (a run there resumes from it):
  a step folder (on gs://, with Orbax's commit_success.txt: a save cut short leaves the
  folder without it)."""
  directory = epath.Path(workdir) / 'checkpoints'
  remote = '://' in str(directory)
  try:
    return directory.is_dir() and any(ckpt_lib.is_finished_step(d, remote=remote)
                                      for d in directory.iterdir())
  except Exception:  # pylint: disable=broad-except  (a file system's own errors)
    return False


def check_workdir(workdir: epath.Path) -> None:
  """Creates the workdir and checks it is writable; ConfigError naming --workdir if not.

  The probe file has a unique name: every process of a multi-host run checks the same
  (shared, e.g. gs://) workdir at the same moment, and one shared name let one process
  delete the file another was about to delete.
  """
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f'.write_test.{uuid.uuid4().hex}'
    probe.write_text('ok')
    probe.unlink()
  except (OSError, ValueError) as e:
    raise defaults.ConfigError(f'--workdir={workdir} is not writable: {e}') from e


class EvaluationStopped(Exception):
  """A stop request arrived during an evaluation (`should_stop`)."""


def evaluate(eval_step, variables, eval_source, config, batch_sharding,
             should_stop=None) -> dict:
  """Top-1, top-5 and loss over the whole eval split, every example counted once.

  Top-5 is left out for 5 classes or fewer, where every example would be a hit.
  should_stop: polled after each batch; True raises EvaluationStopped.
  """
  from vit_jax.data import builder as data_builder  # pylint: disable=g-import-not-at-top
  from vit_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  batches = data_builder.create_eval_batches(config.input, eval_source,
                                             global_batch_size=config.batch_size)
  with pipeline.prefetch_to_device(batches, batch_sharding) as placed:
    sums = sum_over_batches(eval_step, variables, placed, batch_sharding.device_set,
                            should_stop)
  return eval_metrics(jax.device_get(sums), config.model.get('num_classes') or 0)


def sum_over_batches(step, variables, batches, devices, should_stop=None):
  """The sum of `step(variables, batch)` (a tree of arrays) over the batches.

  On several CPU devices the steps run one at a time. They do not depend on each other,
  so XLA:CPU would run several at once; their collectives (the FSDP all-gather) can then
  hold every thread of its small pool while another device's part of an earlier step
  waits for one, until the rendezvous times out and aborts the process (2 devices,
  jax 0.10: hundreds of such steps in a row hang every time).
  """
  one_at_a_time = jax.default_backend() == 'cpu' and len(devices) > 1
  sums = None
  for batch in batches:
    out = step(variables, batch)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    if one_at_a_time:
      jax.block_until_ready(sums)
    if should_stop is not None and should_stop():
      raise EvaluationStopped()
  return sums


def eval_metrics(sums, num_classes: int) -> dict:
  """Averages of the eval step's sums; no top-5 for 5 classes or fewer (always 1)."""
  n = max(float(sums['count']), 1.0)
  result = {'eval_top1': float(sums['top1_sum'] / n), 'eval_top5': float(sums['top5_sum'] / n),
            'eval_loss': float(sums['loss_sum'] / n), 'eval_examples': int(sums['count'])}
  if num_classes <= 5:
    del result['eval_top5']
  return result


def init_summary(path, loaded, params, config) -> str:
  """What `init_from` took from a checkpoint: its format and size, the parameters taken
  unchanged, resized (position embedding, window tables) and left as initialised."""
  from vit_jax import checkpoints  # pylint: disable=g-import-not-at-top

  def shapes(tree):  # {name: shape} in the unrolled layout, without touching the arrays
    out = {}
    for name, x in checkpoints.flatten(tree).items():
      prefix = 'Transformer/encoderblock/'
      if name.startswith(prefix):  # stacked blocks (scan_layers=True)
        for i in range(x.shape[0]):
          out[f'Transformer/encoderblock_{i}/{name[len(prefix):]}'] = tuple(x.shape[1:])
      else:
        out[name] = tuple(x.shape)
    return out

  from vit_jax.checkpoints import pretrained  # pylint: disable=g-import-not-at-top
  # 'head/', or ResNet's 'fc/'
  heads = pretrained.head_prefixes(config['model']) if 'model' in config else ('head/',)
  source, new = shapes(loaded.params), shapes(params)
  kept, resized, fresh = [], [], []
  head = config.get('init_head', 'reset')
  for name, shape in new.items():
    if name not in source or (name.startswith(heads) and head != 'keep'):
      fresh.append(name)
    elif source[name] != shape:
      (fresh if name.startswith(heads) else resized).append(
          f'{name} {source[name]} -> {shape}')
    else:
      kept.append(name)
  parts = [f'{loaded.kind} checkpoint, {len(source)} arrays; {len(kept)} loaded as they are']
  if resized:
    parts.append(f'{len(resized)} resampled: ' + ', '.join(resized))
  if fresh:
    parts.append(f'{len(fresh)} not in the checkpoint or of another shape, initialised: '
                 + ', '.join(fresh[:6]) + (' ...' if len(fresh) > 6 else ''))
  unused = [name for name in source if name not in new]  # e.g. a dropped pre_logits layer
  if unused:
    parts.append(f'{len(unused)} not in the model, left out: '
                 + ', '.join(unused[:6]) + (' ...' if len(unused) > 6 else ''))
  parts.append(f'head: {head}')
  return f'{path} ({"; ".join(parts)})'


def load_pretrained(config):
  """Reads `config.init_from` and fits it to the model's shapes, the fitted values
  thrown away: weights that cannot start this model (a damaged file, another architecture,
  another family) fail here, before the input pipeline and any compilation. Returns the
  weights read, for `Trainer.with_pretrained`."""
  from vit_jax.checkpoints import pretrained  # pylint: disable=g-import-not-at-top
  from vit_jax.checkpoints import tree  # pylint: disable=g-import-not-at-top
  try:
    loaded = pretrained.load_checkpoint(config.init_from, model=config.model)
  except tree.CheckpointMismatchError:
    raise
  except (ValueError, OSError, KeyError) as e:  # a damaged or foreign file (a KeyError:
    # a key its format should have): the message says which; a restart would fail again
    what = f'{type(e).__name__} {e}' if isinstance(e, KeyError) else str(e)
    raise defaults.ConfigError(f'config.init_from={config.init_from!r}: {what}') from e
  shapes = models.abstract_variables(models.create(config.model), config.model.image_size)
  # Zeros stand in for the initialised values (pages never written cost no memory).
  reference = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  pretrained.adapt_variables(loaded, reference, config.model,
                             posemb_method=config.posemb_resample,
                             keep_head=config.init_head == 'keep')
  return loaded


def schedule_summary(config, total_steps: int, steps_per_epoch: float) -> str:
  """The learning rate and warmup a run uses, and where they come from."""
  s = config.schedule
  r = optimizer_lib.resolved_schedule(s, batch_size=config.batch_size,
                                      steps_per_epoch=steps_per_epoch)
  lr = f"peak learning rate {r['base_lr']:.4g}"
  if s.get('base_lr_batch'):
    lr += f' (base_lr {s.base_lr:g} for a batch of {s.base_lr_batch}, at {config.batch_size})'
  warmup = f"warmup {r['warmup_steps']} steps"
  if s.get('warmup_epochs'):
    warmup += f' ({s.warmup_epochs:g} epochs of {steps_per_epoch:.1f} steps)'
  return (f"{lr}, {warmup}, then {s.get('decay', 'cosine')} decay to step {total_steps} "
          f'({total_steps / steps_per_epoch:.2f} epochs)')


class Trainer:
  """Model, optimizer, shardings and the jitted steps of one config on one mesh."""

  def __init__(self, config, mesh, total_steps: int, steps_per_epoch: float | None = None):
    self.config = config
    self.mesh = mesh
    self.module = models.create(config.model)
    self.optimizer, self.schedule = optimizer_lib.create_optimizer(config, total_steps,
                                                                   steps_per_epoch)
    size = config.model.image_size
    module, optimizer = self.module, self.optimizer

    def init_state(rng):
      init_rng, train_rng = jax.random.split(rng)
      dummy = jnp.zeros((1, size, size, module.in_channels), jnp.float32)
      variables = dict(module.init(init_rng, dummy, train=False))
      params = variables.pop('params')
      return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=optimizer.init(params), rng=train_rng,
                                 model_state=variables)

    self._init_state = init_state
    self._rng = jax.random.PRNGKey(config.seed)
    self._abstract = jax.eval_shape(init_state, self._rng)
    replicated = sharding_lib.replicated(mesh)
    for problem in (sharding_lib.model_axis_problem(self._abstract.params, mesh),
                    sharding_lib.fsdp_axis_problem(self._abstract.params, mesh,
                                                   config.min_fsdp_size)):
      if problem:
        logging.warning('%s', problem)
    self.batch_sharding = sharding_lib.batch_sharding(mesh)
    self.state_sharding = step_lib.TrainState(
        step=replicated,
        params=sharding_lib.tree_shardings(self._abstract.params, mesh, config.min_fsdp_size),
        opt_state=sharding_lib.tree_shardings(self._abstract.opt_state, mesh,
                                              config.min_fsdp_size),
        rng=replicated,
        model_state=jax.tree.map(lambda _: replicated, self._abstract.model_state))
    train_step = jax.jit(
        step_lib.make_train_step(module, optimizer, loss=config.loss,
                                 accum_steps=config.accum_steps,
                                 skip_nonfinite=config.nonfinite == 'skip',
                                 trainable=config.get('trainable'),
                                 freeze=config.get('freeze'),
                                 mix=batch_mix.MixConfig.from_input_config(
                                     config.get('input', {}))),
        in_shardings=(self.state_sharding, self.batch_sharding),
        out_shardings=(self.state_sharding, replicated), donate_argnums=(0,))
    eval_step = jax.jit(step_lib.make_eval_step(module, loss=config.loss),
                        in_shardings=(self.state_sharding.variables(), self.batch_sharding),
                        out_shardings=replicated)
    self.train_step = self._with_mesh(train_step)
    self.eval_step = self._with_mesh(eval_step)
    self.lower_train_step = self._with_mesh(train_step.lower)  # for inspection and AOT

  def _with_mesh(self, fn):
    """Runs (and traces) fn with the mesh set, so logical activation constraints apply."""
    def call(*args):
      with jax.set_mesh(self.mesh):
        return fn(*args)
    return call

  def init_state(self):
    """A freshly initialised train state, created directly in its sharded layout."""
    return jax.jit(self._init_state, out_shardings=self.state_sharding)(self._rng)

  def with_pretrained(self, state, path: str, loaded=None):
    """`state` with params and model state (BatchNorm statistics) from pretrained weights
    (new head, resampled position embedding or Swin windows), a fresh optimizer state.

    loaded: the weights of `path` already read (`load_pretrained`), or None to read them.
    """
    from vit_jax.checkpoints import pretrained  # pylint: disable=g-import-not-at-top
    checked = loaded is not None  # load_pretrained has checked and warned already
    if loaded is None:
      loaded = pretrained.load_checkpoint(path, model=self.config.model)
    # The initialised variables, whole, on every host: with FSDP over several processes no
    # process holds all of them (jax.device_get would refuse).
    initialised = multihost_utils.process_allgather(state.variables(), tiled=True)
    variables = pretrained.adapt_variables(loaded, initialised, self.config.model,
                                           posemb_method=self.config.posemb_resample,
                                           keep_head=self.config.init_head == 'keep',
                                           warn_numerics=not checked)
    params = jax.device_put(variables.pop('params'), self.state_sharding.params)
    model_state = jax.device_put(variables, self.state_sharding.model_state)
    opt_state = jax.jit(self.optimizer.init, out_shardings=self.state_sharding.opt_state)(params)
    logging.info('Initialised from %s', init_summary(path, loaded, params, self.config))
    return state.replace(params=params, opt_state=opt_state, model_state=model_state)

  def abstract_state(self):
    """Shapes, dtypes and shardings of the train state (for restoring)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        self._abstract, self.state_sharding)


def train_and_evaluate(config, workdir, forward_flops_per_image: float | None = None,
                       summary: dict | None = None, validate: bool = True,
                       lock: bool = True, pretrained_weights=None) -> dict:
  """Trains (resuming from the newest checkpoint in workdir) and returns final metrics.

  `forward_flops_per_image` (for the MFU) is counted from the model when not given;
  `vit_jax.main` passes the count of its model summary, so a run counts once (on GPU and
  TPU the count compiles the forward pass). `summary`, if given, is written to the
  workdir's model_summary.json beside config.json, once the workdir's checkpoint is
  known to fit this config. `validate=False` skips `defaults.validate` (the caller ran it);
  `lock=False` leaves out the workdir lock (the caller holds it: `workdir_lock.hold`).
  `pretrained_weights`: what `load_pretrained(config)` returned, where the caller read
  config.init_from already (vit_jax.main, before its model summary); read here if None.
  """
  # The input pipeline (TensorFlow) is imported here, not with the module: the Trainer
  # and the benchmark run where TensorFlow is not installed (e.g. a GPU image).
  from vit_jax.data import builder as data_builder  # pylint: disable=g-import-not-at-top
  from vit_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from vit_jax.data import sources as data_sources  # pylint: disable=g-import-not-at-top
  workdir = workdir_path(workdir)
  is_main = jax.process_index() == 0
  if validate:
    defaults.validate(config, num_devices=jax.device_count(),
                      process_count=jax.process_count(), resuming=has_checkpoint(workdir))
  check_workdir(workdir)
  use_compilation_cache(config)

  with contextlib.ExitStack() as cleanup:  # closed in reverse order, on any exit
    if is_main and lock:  # before anything reads or cleans up another run's checkpoints
      cleanup.enter_context(workdir_lock.hold(workdir))
    checkpointer = ckpt_lib.TrainCheckpointer(
        workdir / 'checkpoints', keep_last=config.keep_checkpoints, keep_best=config.keep_best,
        async_save=config.async_checkpoint)
    cleanup.callback(checkpointer.close)  # also when the setup below fails (Orbax's threads)
    resuming = checkpointer.latest_step() is not None
    if not config.init_from or resuming:
      pretrained_weights = None
    elif pretrained_weights is None:
      pretrained_weights = load_pretrained(config)

    mesh = sharding_lib.create_mesh(config.mesh)
    train_source, eval_source = data_builder.create_sources(config.input)
    problem = None
    try:
      data_builder.check_eval_preprocessing(config.input, eval_source)
    except data_sources.DataError as e:
      problem = e
    raise_on_every_process(problem, data_sources.DataError,
                           'cannot preprocess its first evaluation example (their logs say '
                           'why)')
    spe = pipeline.steps_per_epoch(train_source, config.batch_size)
    total_steps = run_length(config.total_steps, config.num_epochs, spe)
    t = Trainer(config, mesh, total_steps, steps_per_epoch=spe)
    batch_sharding = t.batch_sharding
    if is_main:
      logging.info('Schedule: %s', schedule_summary(config, total_steps, spe))

    meta = {'seed': config.seed, 'global_batch_size': config.batch_size,
            'steps_per_epoch': spe, 'process_count': jax.process_count(),
            'class_names': train_source.class_names,
            'train_data': {'examples': train_source.num_examples(),
                           'fingerprint': train_source.fingerprint()},
            'model': config.model.to_dict(), 'config': json.loads(config.to_json_best_effort())}
    if resuming:
      state, saved_meta = _restore_newest_readable(
          checkpointer, t.abstract_state(), meta['config'], workdir,
          # before the arrays: a restore of a large state can take minutes, or run out
          # of memory on fewer devices, before the message
          check_meta=lambda saved: _check_same_batch(saved.get('global_batch_size'),
                                                     config, workdir))
      for key in ('seed', 'steps_per_epoch', 'process_count'):
        # (Checkpoints written before process_count was recorded do not have it.)
        if saved_meta.get(key) != meta[key] and (key in saved_meta
                                                 or key != 'process_count'):
          logging.warning('Checkpoint was written with %s=%s, this run has %s: the data '
                          'order of the resumed run differs from the original run.', key,
                          saved_meta.get(key), meta[key])
      _check_same_classes(saved_meta.get('class_names'), meta['class_names'], workdir)
      _warn_if_data_changed(saved_meta.get('train_data'), meta['train_data'], spe,
                            saved_meta.get('step'), saved_meta.get('steps_per_epoch') or spe)
      saved_init = (saved_meta.get('config') or {}).get('init_from') or ''
      if 'config' in saved_meta:  # the weights the run started from, whatever is given now
        meta['config']['init_from'] = saved_meta['config'].get('init_from')

      if config.init_from and config.init_from != saved_init:
        logging.warning(
            'config.init_from=%r is not used: the run resumes from its own checkpoint in '
            '%s (it started from %s). To fine-tune from those weights, give another '
            '--workdir.', config.init_from, workdir / 'checkpoints',
            repr(saved_init) if saved_init else 'a random initialisation')
    else:
      state = t.init_state()
      if config.init_from:
        if config.init_head == 'keep':
          _warn_if_head_classes_differ(pretrained_weights, meta['class_names'], config)
        state = t.with_pretrained(state, config.init_from, pretrained_weights)
        del pretrained_weights
    start_step = int(jax.device_get(state.step))
    # A checkpoint saved before its evaluation ran (a stop, or a failure, during it) is
    # evaluated first, the final step's too: such a run has not finished.
    # (Unless a resumed run made it up already, and stopped before its next checkpoint.)
    evaluations = _evaluations(workdir / 'metrics.jsonl') if resuming and is_main else {}
    # So is a final step without one: a run stopped between evaluations, ended there by a
    # lowered total_steps.
    put_off = (resuming and (bool(saved_meta.get('eval_pending')) or start_step >= total_steps)
               and not _agreed(start_step in evaluations))
    if resuming and config.keep_best:
      # Checkpoints saved without metrics (by a run with keep_best=0, or before an
      # evaluation a later run made up) are ranked by their evaluations in metrics.jsonl:
      # keep_best would delete them, the best of them too. Every process takes its barrier.
      ranked = checkpointer.rank(evaluations)
      if ranked:
        logging.info('keep_best: ranked checkpoint(s) %s, saved without metrics, by their '
                     'evaluations in metrics.jsonl.', ranked)
    if resuming and start_step > total_steps:
      _refuse_going_back(workdir, start_step, total_steps, saved_meta, spe)
    finished = resuming and start_step >= total_steps and not put_off
    if finished:  # nothing to train or evaluate: the record stays the run's own
      _warn_finished(workdir, start_step, total_steps, saved_meta.get('config') or {},
                     meta['config'])
    elif is_main:  # what this run trains (not written when the resume check fails)
      # (meta's copy: a resumed run's init_from is the one the run started from)
      (workdir / 'config.json').write_text(json.dumps(meta['config'], indent=2))
      if summary is not None:
        (workdir / 'model_summary.json').write_text(json.dumps(summary, indent=2))
    if resuming and start_step < total_steps:
      _warn_schedule_change(saved_meta, total_steps, spe, t.schedule, start_step)
    module, schedule, image_size = t.module, t.schedule, config.model.image_size
    train_step, eval_step = t.train_step, t.eval_step

    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main, start_step=start_step)
    cleanup.callback(writer.close)
    progress = metrics_lib.Progress(total_steps, config.batch_size, start_step, enabled=is_main)
    if forward_flops_per_image is None:
      forward_flops_per_image = models.forward_flops(module, image_size)
    flops_per_step = 3 * forward_flops_per_image * config.batch_size
    peak_meter = hardware.PeakMeter(module.dtype)
    logging.info('Training %s for %d steps (%d per epoch) from step %d; %.3g FLOPs/step; '
                 'MFU against the %s (%.4g FLOP/s at start).', config.model.name, total_steps,
                 spe, start_step, flops_per_step, peak_meter.source, peak_meter.peak)

    batches = pipeline.prefetch_to_device(
        data_builder.create_train_batches(config.input, train_source,
                                          global_batch_size=config.batch_size,
                                          seed=config.seed, start_step=start_step),
        batch_sharding)
    cleanup.callback(batches.close)
    pending = []  # per-step device metrics since the last host sync
    window = []  # per-step host metrics since the last log row (an eval or a save syncs too)
    last_eval = {}

    def sync(step_now):
      """Fetches pending metrics; raises NonFiniteError naming the first bad step."""
      fetched = jax.device_get(pending)
      first = start_of_pending
      for i, m in enumerate(fetched):
        if not m['finite'] and config.nonfinite == 'stop':
          last = checkpointer.latest_step()
          raise NonFiniteError(
              f'non-finite loss or gradient at step {first + i + 1} (loss={m["loss"]}); '
              'stopping. ' + (f'The last good checkpoint is step {last}. ' if last is not None
                              else 'No checkpoint was written before it. ') +
              "Lower config.schedule.base_lr, or set config.nonfinite='skip'.")
      pending.clear()
      return fetched

    # Before the evaluation below: a SIGTERM during it stops the run with its message
    # (it killed the process, status -15, without a word).
    stop_request = cleanup.enter_context(preemption.StopRequest())
    # The evaluation a stop request put off (see eval_pending below), made up now.
    if (config.get('eval_at_start') and start_step == 0) or put_off:
      try:
        last_eval = evaluate(eval_step, state.variables(), eval_source, config,
                             batch_sharding, should_stop=lambda: stop_request.requested_here)
      except EvaluationStopped:
        # Nothing trained since the checkpoint (or step 0): a restart evaluates it again.
        if resuming:
          raise _preempted(stop_request, f'during the evaluation at step {start_step}',
                           total_steps, workdir, ' and evaluates it first') from None
        number = stop_request.signal_number or signal.SIGTERM
        raise preemption.Preempted(
            f'stopped by {signal.Signals(number).name} during the evaluation before '
            'training (config.eval_at_start): nothing was trained; the same command starts '
            'again', number) from None
      if put_off and config.keep_best:
        # Its checkpoint was saved unranked (a stop during the evaluation), or keep_best
        # would never keep it. Ranked before metrics.jsonl, which tells a later resume it
        # was evaluated. Every process takes rank's barrier; the evaluation's collectives
        # keep process 0 from writing before all have restored.
        checkpointer.rank({start_step: last_eval})
      writer.write(start_step, last_eval)
      if is_main:
        logging.info('step %d (%s): %s', start_step,
                     ('before training' if not put_off else 'its evaluation, put off by the '
                      'stop' if saved_meta.get('eval_pending') else "the final step's evaluation"),
                     ', '.join(f'{k} {v:.4g}' for k, v in last_eval.items()))
      progress.rate(start_step)
    start_of_pending = start_step
    step = start_step
    final = {}
    eval_s = 0.0  # the last evaluation's time, for the ETA of the ones to come
    for step in range(start_step + 1, total_steps + 1):
      try:
        batch = next(batches)
      except Exception as e:  # pylint: disable=broad-except
        if tensorflow_startup.is_tensorflow_error(e) and step > start_step + 1:
          # A training file that went away (moved, deleted, a network file system): the
          # steps since the last checkpoint were lost with a bare TensorFlow traceback.
          _save_before_failing(
              checkpointer, step - 1, state, dict(meta, step=step - 1),
              f'Reading the training data for step {step} failed (the error follows: a '
              'file moved or deleted during the run?). Saving step {step} first, so that no '
              'training is lost; a restart reads the folder again and goes on from it.',
              eval_pending=False)
        failure = data_builder.preprocessing_failure(e, 'pp_train', config.input)
        if failure is not None:
          raise failure from e
        raise
      state, step_metrics = train_step(state, batch)
      pending.append(step_metrics)
      if len(pending) > RUN_AHEAD:
        # Dispatch runs at most RUN_AHEAD steps ahead of the device: waiting for an older
        # step keeps the device busy, and a stop request (SIGTERM, which often allows
        # only a few minutes) is saved after the steps already queued, not after up to
        # log_every of them.
        jax.block_until_ready(pending[-1 - RUN_AHEAD])
      is_last = step == total_steps
      stopping = not is_last and stop_request(step)
      do_log = step % config.log_every == 0 or is_last or stopping
      compiling = step == start_step + 1
      if compiling and not do_log:
        # The first step compiles: its time is left out of the first window's images/s,
        # MFU and ETA (one host sync, once).
        jax.block_until_ready(step_metrics)
        first_s = progress.rate(step)[1]
        if is_main:
          logging.info('First step (compilation included) took %.1f s.', first_s)
      do_eval = (config.eval_every and step % config.eval_every == 0) or is_last
      do_ckpt = ((config.checkpoint_every and step % config.checkpoint_every == 0) or is_last
                 or stopping)
      # A stop request saves at once (a preemption grants seconds to minutes) and leaves
      # this step's evaluation to the resumed run ('eval_pending' in the checkpoint).
      # (With keep_best the ranking needs the step's metrics: it evaluates, then saves.)
      eval_pending = bool(do_eval and stopping and not config.keep_best)
      do_eval = do_eval and not eval_pending
      step_meta = dict(meta, step=step, **({'eval_pending': True} if eval_pending else {}))
      if do_log or do_eval or do_ckpt:
        window.extend(sync(step))
        start_of_pending = step
        checkpointer.check_for_errors()  # a save that failed since: stop now, not later
        if do_log:
          fetched, window = window, []
          skipped = sum(1 - int(m['finite']) for m in fetched)
          ips, sps = progress.rate(step)
          if compiling:  # a window of the first step alone: its time is compilation's
            if is_main:
              logging.info('First step (compilation included) took %.1f s; images/s, MFU '
                           'and ETA start at the next row.', sps)
            ips = sps = None
          peak, probed = peak_meter.window(progress.last_window_s)
          if probed:
            progress.rate(step)  # the probe's time is not training time
          mean = {k: float(np.mean([m[k] for m in fetched])) for k in ('loss', 'grad_norm')}
          row = dict(mean, learning_rate=float(schedule(step - 1)),
                     param_norm=float(fetched[-1]['param_norm']), images_per_sec=ips,
                     sec_per_step=sps, epoch=step / spe,
                     mfu=flops_per_step / sps / peak if sps else None,
                     peak_flops_per_sec=peak,
                     skipped_nonfinite=skipped or None,
                     # A row after a resume, before a stop or at the end can average
                     # fewer than log_every steps; it then says how many.
                     steps_averaged=(len(fetched) if len(fetched) != config.log_every
                                     else None))
          writer.write(step, row)
          evals_left = ((total_steps // config.eval_every - (step - 1) // config.eval_every
                         if config.eval_every else 0)
                        + (not config.eval_every or total_steps % config.eval_every != 0))
          progress.report(step, ips, sps, {'loss': mean['loss'], 'lr': row['learning_rate'],
                                           **({'skipped': skipped} if skipped else {})},
                          other_s=evals_left * eval_s)
      if do_eval:
        eval_start = time.perf_counter()
        try:
          last_eval = evaluate(eval_step, state.variables(), eval_source, config,
                               batch_sharding,
                               should_stop=lambda: stop_request.requested_here)
        except EvaluationStopped:
          # A signal during the evaluation: save now and leave the evaluation to the
          # resumed run, rather than evaluate to the end of a grace period.
          if checkpointer.latest_step() != step:
            checkpointer.save(step, state, dict(meta, step=step, eval_pending=True))
          checkpointer.wait()
          raise _preempted(stop_request, f'during the evaluation at step {step}',
                           total_steps, workdir, ' and evaluates it first') from None
        except Exception as e:  # pylint: disable=broad-except
          _save_before_failing(
              checkpointer, step, state, dict(meta, step=step),
              'The evaluation at step {step} failed (the error follows). Saving step {step} '
              'first, so that no training is lost; a resumed run goes on from it and '
              'evaluates it first.')
          failure = data_builder.preprocessing_failure(e, 'pp_eval', config.input)
          if failure is not None:
            raise failure from e
          raise
        eval_s = time.perf_counter() - eval_start
        writer.write(step, last_eval)
        if is_main:
          logging.info('step %d: %s', step, ', '.join(f'{k} {v:.4g}'
                                                      for k, v in last_eval.items()))
        progress.rate(step)  # do not count evaluation time as training time
      if do_ckpt:
        checkpointer.save(step, state, step_meta,
                          metrics={k: float(v) for k, v in last_eval.items()} if do_eval
                          else None)
        progress.rate(step)  # nor the save's time (its copy to the host)
      if stopping:
        checkpointer.wait()
        raise _preempted(stop_request, f'at step {step}', total_steps, workdir,
                         ' and evaluates it first' if eval_pending else '')
    # The final save completes while the stop handler is in place: a SIGTERM now is
    # noted, not fatal (the ExitStack restored the default handler before its close()
    # waited for the save, so a late notice lost the final checkpoint).
    checkpointer.wait()
    if start_step >= total_steps and not last_eval:  # a finished run started again
      # (its final step's evaluation: an older one was reported under the final step)
      last_eval = _evaluations(workdir / 'metrics.jsonl').get(start_step, {})
    final = dict(last_eval, step=step)
    return final


def _preempted(stop_request, when: str, total_steps: int, workdir,
               resumed: str) -> preemption.Preempted:
  """The exception of a run stopped by a signal after saving its checkpoint."""
  number = stop_request.signal_number or signal.SIGTERM  # None: another host's notice
  return preemption.Preempted(
      f'stopped by {signal.Signals(number).name} {when} of {total_steps}, after saving '
      f'its checkpoint in {workdir / "checkpoints"}; the same command resumes there'
      + resumed, number)


def _evaluations(path) -> dict[int, dict]:
  """metrics.jsonl's evaluations: {step: its eval_* metrics}, the last row of a step."""
  found = {}
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict) and 'eval_loss' in row and isinstance(row.get('step'), int):
        found[row['step']] = {k: v for k, v in row.items()
                              if k.startswith('eval_') and v is not None}
  return found


def raise_on_every_process(problem: Exception | None, error_type, what: str) -> None:
  """Raises `problem`; with several processes, every process stops when one found one
  (an init_from on one host's disk only, a preprocessing that fails on one host's
  images): the others waited in their first collective until the heartbeat timeout, then
  a C++ abort. The others raise `error_type`, saying that process(es) [i, ...] `what`."""
  if jax.process_count() > 1:
    failed = np.asarray(multihost_utils.process_allgather(np.int32(problem is not None)))
    others = [i for i, f in enumerate(failed.reshape(-1)) if f and i != jax.process_index()]
    if others and problem is None:
      raise error_type(f'process(es) {others} of this run {what}; this process stops too')
  if problem is not None:
    raise problem


def _agreed(value: bool) -> bool:
  """Process 0's `value` on every process (for a decision that must be collective)."""
  if jax.process_count() > 1:
    value = bool(multihost_utils.broadcast_one_to_all(np.int32(value)))
  return value


def _save_before_failing(checkpointer, step, state, meta, message: str,
                         eval_pending: bool = True) -> None:
  """An evaluation or a read of the training data that raises (an unreadable image, a
  file gone) would lose the steps trained since the last checkpoint: save `step` first,
  in a single-process run (with several processes, the others are still evaluating or
  training and would not join the save); `message` (with {step}) says why."""
  if jax.process_count() > 1 or checkpointer.latest_step() == step:
    return
  logging.error(message.format(step=step))
  try:
    checkpointer.save(step, state, dict(meta, **({'eval_pending': True} if eval_pending
                                                  else {})))
    checkpointer.wait()
  except Exception as e:  # pylint: disable=broad-except
    logging.error('Saving step %d failed too: %s', step, e)


class ResumeError(ValueError):
  """The workdir's checkpoint cannot be resumed with this config; the message says why."""


def use_compilation_cache(config) -> None:
  """jax's persistent compilation cache in config.compilation_cache_dir, if set; a '~'
  is the home folder, as validate checks it ('~/xla_cache' was written to ./~/xla_cache:
  no shell expands it after '=')."""
  if config.get('compilation_cache_dir'):
    jax.config.update('jax_compilation_cache_dir',
                      os.path.expanduser(config.compilation_cache_dir))


def run_length(total_steps: int | None, num_epochs: float, steps_per_epoch: float) -> int:
  """The final step: config.total_steps, else num_epochs of the training split."""
  return total_steps or max(int(math.ceil(num_epochs * steps_per_epoch)), 1)


def _saved_run_length(saved_meta, spe) -> int | None:
  """The final step of the checkpoint's run (None for a checkpoint without its config)."""
  saved = saved_meta.get('config') or {}
  saved_spe = saved_meta.get('steps_per_epoch') or spe
  return (run_length(saved.get('total_steps'), saved.get('num_epochs', 0), saved_spe)
          if saved.get('total_steps') or saved.get('num_epochs') else None)


def _refuse_going_back(workdir, step, total_steps, saved_meta, spe) -> None:
  """A checkpoint past this run's final step, of a run stopped before its own end (a
  lowered total_steps): ResumeError. The run was reported finished at the step it was
  stopped at, with an older evaluation under that step, and a restart loop
  (until_done.sh), whose status check reads the run's own length, started it again and
  again. (A finished run started again with a lower length stays finished.)"""
  saved_total = _saved_run_length(saved_meta, spe)
  if saved_total is None or step >= saved_total:
    return
  raise ResumeError(
      f'the checkpoint in {workdir} is at step {step}, past this run\'s final step '
      f'{total_steps} (config.total_steps, or num_epochs): a run cannot go back, and its own '
      f'run was stopped before its end (step {saved_total}). To end it at step {step}, give '
      f'--config.total_steps={step} (its checkpoint is evaluated if it was not); to train '
      f'{total_steps} steps from the start, give another --workdir')


def _warn_schedule_change(saved_meta, total_steps, spe, schedule, step) -> None:
  """A warning where the resumed run's learning rate at the resumed step differs from the
  checkpoint's run's: another final step (a raised total_steps, another num_epochs), or
  another schedule (a changed field, another batch size with schedule.base_lr_batch)."""
  saved = saved_meta.get('config') or {}
  saved_spe = saved_meta.get('steps_per_epoch') or spe
  saved_total = _saved_run_length(saved_meta, spe)
  try:
    before = float(optimizer_lib.learning_rate_schedule(
        ml_collections.ConfigDict(saved['schedule']), saved_total,
        batch_size=saved_meta.get('global_batch_size'), steps_per_epoch=saved_spe)(step))
  except Exception:  # pylint: disable=broad-except  (a config written by an older version)
    before = None
  now = float(schedule(step))
  same_now = before is None or math.isclose(before, now, rel_tol=1e-6)
  if same_now and (saved_total == total_steps
                   or (saved.get('schedule') or {}).get('decay') == 'constant'):
    return  # (a constant rate is the same whatever the run's length)
  ends = (f"The checkpoint's run ended at step {saved_total}, this one at step "
          f'{total_steps}: ' if saved_total != total_steps else '')
  # (The update from step S to S+1 takes schedule(S); metrics.jsonl logs it at step S+1.)
  logging.warning(
      '%sthe learning-rate schedule (warmup and decay) is recomputed over %d steps, so '
      'step %d (the first of this run, learning_rate in metrics.jsonl) takes the rate '
      '%.4g%s.', ends or "This run's schedule differs from the checkpoint's run's: ",
      total_steps, step + 1, now, f' (it was {before:.4g})' if before is not None else '')


def _restore_newest_readable(checkpointer, abstract_state, config: dict, workdir,
                             check_meta=None):
  """(state, meta) of the newest checkpoint that can be read; `check_meta(meta)` may
  raise ResumeError from a checkpoint's meta before its arrays are restored.

  In a single process with a local workdir, a damaged newest checkpoint (a truncated file,
  missing metadata, an empty step directory) is passed over for the one before it, and
  only once that one has restored is it renamed '<step>.unreadable' (kept, with a
  warning): a read error that hits every step (a file system that is down) renames
  nothing, and the run fails as before. A checkpoint of another train state is a
  ResumeError, not damage. With several processes, or on gs://, the first error stops
  the run (the processes could not agree on which steps to pass over without more
  coordination; a rename on GCS is a copy).
  """
  fallback = jax.process_count() == 1 and '://' not in str(checkpointer.directory)
  failed = []
  for step in sorted(checkpointer.all_steps(), reverse=True):
    try:
      _check_resumable(checkpointer, abstract_state, config, workdir, step)
      if check_meta is not None:
        check_meta(checkpointer.restore_meta(step))
      restored = checkpointer.restore(abstract_state, step)
    except ResumeError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # Orbax reports a damaged array file as a bare Exception; running out of memory is
      # not damage, and propagates.
      if (not fallback or isinstance(e, MemoryError) or 'RESOURCE_EXHAUSTED' in str(e)
          or 'out of memory' in str(e).lower()):
        raise
      message = _read_error_message(e)
      failed.append((step, message[:300], e))
      logging.warning('Checkpoint step %d in %s cannot be read (%s); trying the one '
                      'before it.', step, checkpointer.directory, message[:300])
      continue
    for bad, message, _ in failed:
      name = checkpointer.set_aside(bad)
      logging.warning('Checkpoint step %d (%s) kept as %s.', bad, message, name)
    if failed:
      logging.warning('Resumed from step %d: the newer checkpoint(s) could not be read.', step)
    return restored
  if failed and all(_is_damage(e) for _, _, e in failed):
    # Every step's files are damaged (not a file system that is down): a restart would
    # fail the same way, so this is no crash to retry (exit status 3, not 1).
    steps = ', '.join(str(step) for step, _, _ in failed)
    raise ResumeError(
        f'no checkpoint in {checkpointer.directory} can be read: step(s) {steps} are '
        f'damaged ({failed[0][1]}). Restore them from a copy, or move them aside '
        f'(mv {checkpointer.directory}/<step> {checkpointer.directory}/<step>.damaged) to '
        'train again from the start') from failed[0][2]
  if failed:
    raise failed[0][2]  # no step reads: nothing renamed, the newest step's error
  raise FileNotFoundError(f'no checkpoint in {checkpointer.directory}')


# What a damaged file (truncated, overwritten) gives when read, as against a file system
# that is down or refuses access (which a restart may get past).
_DAMAGE_MARKERS = ('OUT_OF_RANGE', 'DATA_LOSS', 'JSONDecodeError', 'Requested byte range',
                   'Expecting value', 'Unterminated string', 'truncated', 'corrupt',
                   'Unexpected end', 'not a valid', 'is not valid')


def _error_chain(e: BaseException) -> list:
  chain, seen = [], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    chain.append(e)
    e = e.__cause__ or e.__context__
  return chain


def _read_error_message(e: BaseException) -> str:
  """'Type: first line' of the innermost error of `e`'s chain that says something (Orbax
  wraps TensorStore's error in a bare Exception naming a pybind11 method)."""
  for err in reversed(_error_chain(e)):
    text = str(err).strip()
    if text:
      return f'{type(err).__name__}: {text.splitlines()[0]}'
  return type(e).__name__


def _is_damage(e: BaseException) -> bool:
  return any(marker in f'{type(err).__name__}: {err}' for err in _error_chain(e)
             for marker in _DAMAGE_MARKERS)


def _check_resumable(checkpointer, abstract_state, config: dict, workdir,
                     step: int | None = None) -> None:
  """Raises ResumeError when checkpoint `step` (default: the newest) holds other arrays
  than this config's train state (another model, image size or frozen set), naming the
  arrays and the config fields that changed since the checkpoint was written."""
  step = checkpointer.latest_step() if step is None else step
  differences = checkpointer.differences(abstract_state, step)
  if not differences:
    return
  saved = _flat_fields(checkpointer.restore_meta(step).get('config') or {})
  now = _flat_fields(config)
  changed = [f'{k}: {saved.get(k, "(absent)")!r} -> {now.get(k, "(absent)")!r}'
             for k in sorted(saved.keys() | now.keys())
             if saved.get(k) != now.get(k) and not k.startswith('init_from')]
  raise ResumeError(
      f'--workdir={workdir} holds a checkpoint (step {step}) of another train state than '
      'this config makes:\n  ' + '\n  '.join(differences)
      + ('\nConfig fields changed since that checkpoint was written:\n  '
         + '\n  '.join(changed[:12]) + (f'\n  ... {len(changed) - 12} more'
                                        if len(changed) > 12 else '') if changed else '')
      + '\nTo resume, run with the config of that run: --config=configs/from_workdir.py:'
      f'{workdir} (it reads {workdir / "config.json"}). To '
      'fine-tune its weights (the same architecture; the head and the resolution may '
      f'change), start a new run in another --workdir with --config.init_from={workdir}.')


def _flat_fields(tree, prefix='') -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat_fields(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = tuple(v) if isinstance(v, list) else v
  return out


def _warn_if_data_changed(saved, now, steps_per_epoch, step, saved_steps_per_epoch) -> None:
  """A warning where the training files differ from the checkpoint's (an image added or
  removed since, a folder re-scanned): each epoch's order is drawn over the examples, so
  the rest of the interrupted epoch is drawn anew (checkpoints before the record: none)."""
  if not saved or saved.get('fingerprint') == now['fingerprint']:
    return
  then, count = saved.get('examples'), now['examples']
  what = (f'{then} examples then, {count} now' if then != count else
          f'{count} examples both times, but other files or labels')
  if isinstance(step, int) and step % saved_steps_per_epoch == 0:  # (no epoch cut short)
    logging.info('The training data differs from the checkpoint\'s (%s); the checkpoint is '
                 'at the end of an epoch, so the next epochs are drawn over the new data.',
                 what)
    return
  logging.warning(
      'The training data differs from the checkpoint\'s (%s): the rest of the interrupted '
      'epoch is drawn in a new order, so some of its examples are seen twice and others '
      'not at all (later epochs are whole; %d steps an epoch). To train on exactly the old '
      'data, restore the files it had.', what, steps_per_epoch)


def _check_same_classes(saved, now, workdir) -> None:
  """Raises ResumeError when the checkpoint's run was trained on other classes than this
  run's data has: resuming would give the head's outputs other labels, without an error."""
  if not saved or not now or list(saved) == list(now):
    return
  def shown(names):
    names = list(names)
    return ', '.join(map(str, names[:8])) + (f', ... ({len(names)} in all)'
                                              if len(names) > 8 else '')
  raise ResumeError(
      f'the checkpoint in {workdir / "checkpoints"} was trained on the classes [{shown(saved)}]'
      f', but this run\'s training data has [{shown(now)}]: resuming would give the head\'s '
      'outputs other labels. Check config.input (the folder or dataset); to train these '
      f'weights on this data, use another --workdir with --config.init_from={workdir} (a new '
      'head).' + _hidden_classes_note(saved, now))


def _check_same_batch(saved: int | None, config, workdir) -> None:
  """Raises ResumeError for a resume with another global batch size: the checkpoint's
  step counts batches of the old size, so the data position, an epoch-based run's length
  and the schedule would all be read in the wrong unit (examples skipped or repeated, a
  run declared finished early)."""
  if saved is None or saved == config.batch_size:
    return
  raise ResumeError(
      f'the checkpoint in {workdir / "checkpoints"} was trained with config.batch_size='
      f'{saved}, this run has {config.batch_size}: its step counts batches of {saved}, so '
      f'resuming with batches of {config.batch_size} would skip or repeat examples and '
      'misread the run length and schedule. To resume, keep '
      f'--config.batch_size={saved} and fit it to the devices with --config.accum_steps '
      '(batch_size must be divisible by accum_steps x batch devices). To go on with '
      f'another batch size, start a new run in another --workdir with --config.init_from='
      f'{workdir} and a schedule for it.')


def _hidden_classes_note(saved, now) -> str:
  """Why classes differ when the checkpoint's run took hidden or system folders (which
  are no longer read) as classes."""
  from vit_jax.data import sources  # pylint: disable=g-import-not-at-top
  hidden = [str(n) for n in saved if sources.is_system_folder(str(n))]
  if not hidden or [n for n in saved if str(n) not in hidden] != list(now):
    return ''
  return (f" The checkpoint's classes include {', '.join(map(repr, hidden))}: a hidden or "
          'system folder, which vit_jax read as a class until 2026-12-07 and now skips, so '
          'the classes after it have other indices now. The checkpoint is fine: continue '
          'from it with the --config.init_from above.')


def _warn_if_head_classes_differ(loaded, class_names, config) -> None:
  """init_head='keep' on weights whose recorded classes are not this run's data's."""
  saved = getattr(loaded, 'class_names', None)
  if saved and class_names and list(saved) != list(class_names):
    logging.warning(
        "config.init_head='keep' keeps the head of %s, trained on the classes %s, but this "
        "run's training data has %s: output i keeps its meaning only if class i is the "
        "same. For other classes, leave init_head unset (a new head).", config.init_from,
        list(saved)[:8], list(class_names)[:8])


def _warn_finished(workdir, step, total_steps, saved_config: dict, config: dict) -> None:
  """A run started again in the workdir of a finished one: say that nothing runs, and name
  the fields of this config that the finished run did not have."""
  saved, now = _flat_fields(saved_config), _flat_fields(config)
  changed = [f'{k}: {saved.get(k, "(absent)")!r} -> {now.get(k, "(absent)")!r}'
             for k in sorted(saved.keys() | now.keys())
             if saved.get(k) != now.get(k) and k not in ('total_steps', 'num_epochs')]
  logging.warning(
      'The run in %s already finished at step %d of %d: nothing is trained or evaluated, '
      'and its last evaluation (metrics.jsonl) is reported%s. To run with another config, '
      'give another --workdir (or raise config.total_steps to train on).', workdir, step,
      total_steps, (', although this config differs from the run\'s (' +
                    '; '.join(changed[:10]) + (' ...' if len(changed) > 10 else '') +
                    '), which config.json keeps') if changed else '')
