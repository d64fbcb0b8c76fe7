"""The training loop: the run's compiled steps (`Steps`), the input stream, resume, and
`train_loop(run, state, stream, outputs)`.

Batch k of the whole run is element k of the phase's input stream, for any number of processes
and workers, so a position is all it takes to resume; grain's saved iterator state makes the
resume exact when the layout is unchanged (README "Reliability").
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tikd_jax.data import pipeline
from tikd_jax.train import checkpoint as ckpt_lib
from tikd_jax.train import stage_val
from tikd_jax.train.evaluate import (EMA_PREFIX, compiled_eval_step, evaluate, evaluate_source,
                                     format_eval)
from tikd_jax.train.logger import MetricLogger
from tikd_jax.train.plan import Phase, phase_at
from tikd_jax.train.preemption import StopRequest
from tikd_jax.train.run import Run, train_step_for
from tikd_jax.train.spec import EVAL_TEXT
from tikd_jax.train.state import TERM_PARAMS, TrainState
from tikd_jax.tree import CheckpointMismatchError


class NonFiniteLossError(FloatingPointError):
  pass


class Steps:
  """The run's compiled steps, each built once: a train step per distinct `phase.switches`, an
  eval step per `fuse_text` (evaluation and stage validation reuse them)."""

  def __init__(self, run: Run):
    self.run = run
    self._train: dict = {}
    self._eval: dict = {}

  def train(self, phase: Phase):
    if phase.switches not in self._train:
      self._train[phase.switches] = train_step_for(self.run, phase)
    return self._train[phase.switches]

  def eval(self, fuse_text: bool):
    if fuse_text not in self._eval:
      self._eval[fuse_text] = compiled_eval_step(self.run, fuse_text)
    return self._eval[fuse_text]


@dataclasses.dataclass
class Stream:
  """A phase's train input from element `start` on (what a checkpoint records to resume it)."""
  iterator: Any
  start: int
  closed: bool = False

  def close(self) -> None:
    """Stops grain's worker processes and frees the batches they hold in shared memory (left to
    interpreter exit, Python's resource tracker reports them as leaked). Idempotent."""
    if not self.closed:
      self.closed = True
      self.iterator.close()


def train_stream(run: Run, phase: Phase, start: int) -> Stream:
  spec, data = run.spec, run.data
  ds = pipeline.train_dataset(data.train, batch_size=spec.batch_size // jax.process_count(),
                              seed=spec.seed, crop_padding=spec.input.crop_padding,
                              crop_size=phase.resolution, crop_mode=spec.input.crop_mode,
                              flip=spec.input.flip, text_features=data.text_features,
                              text_rows=spec.text.rows, extra_augment=data.host_augment,
                              process_index=jax.process_index(), process_count=jax.process_count(),
                              sampler=data.sampler)
  return Stream(pipeline.make_iterator(ds[start:], data.num_workers), start)


def next_batch(run: Run, stream: Stream) -> dict:
  """The stream's next batch as global arrays sharded over the mesh's batch axes."""
  return pipeline.to_global(next(stream.iterator), run.data_sharding)


@dataclasses.dataclass
class Outputs:
  """Where a run's results go and what can stop it."""
  checkpointer: ckpt_lib.Checkpointer
  logger: MetricLogger
  stop: StopRequest


# ------------------------------------------------------------------------------------ resume
def restore_or_start(run: Run, state: TrainState,
                     checkpointer: ckpt_lib.Checkpointer) -> tuple[TrainState, Stream, str]:
  """(state, input stream, note) at the newest checkpoint that restores, or at step 0 with the
  fresh `state`. Unreadable checkpoints are set aside (`checkpointer.set_aside`)."""
  latest, restored = checkpointer.restore_newest(
      lambda step: _restore(run, state, checkpointer, step))
  if latest is None:
    return state, train_stream(run, run.phases[0], 0), ''
  return restored


def _restore(run: Run, template: TrainState, checkpointer, step: int):
  """The state and stream at checkpoint `step` (a fresh stream every call, closed when the
  attempt fails, so a failed attempt leaves nothing behind)."""
  phase = run.phases[phase_at(run.phases, step)]
  meta = checkpointer.read_meta(step)
  saved = meta.get('data', {})  # metadata: absent in old checkpoints
  num_workers = run.data.num_workers
  # grain's saved iterator state is per process and per worker layout; with another host or
  # worker count (or at a phase boundary, where a new stream starts) resume by position.
  exact = (step > phase.start_step and saved.get('processes') == jax.process_count()
           and saved.get('workers') == num_workers)
  _check_optional_items(f'{checkpointer.directory}/{step}', meta, template)
  stream = train_stream(run, phase, saved['start'] if exact else step)
  try:
    variables, extra, opt_state, _ = checkpointer.restore(
        step, variables_template={
            'params': template.params['student'], 'batch_stats': template.batch_stats
        }, extra_template=_extra(template), opt_template=template.opt_state,
        data_iterator=stream.iterator if exact else None)
  except BaseException:  # an unreadable checkpoint: the next attempt opens its own stream
    stream.close()
    raise
  restored = TrainState(step=jnp.asarray(step, jnp.int32),
                        params={'student': variables['params'], TERM_PARAMS: extra[TERM_PARAMS]},
                        batch_stats=variables['batch_stats'], opt_state=opt_state,
                        term_state=extra[TERM_STATE], ema=extra.get('ema', {}),
                        stage_val=extra.get('stage_val', {}))
  note = '' if exact or step == phase.start_step else (
      f'checkpoint {step} was written by {saved.get("processes", "?")} process(es) with '
      f'{saved.get("workers", "?")} input worker(s), this run has {jax.process_count()} with '
      f'{num_workers}: the input stream resumes by position')
  return jax.device_put(restored, run.state_shardings), stream, note


# The loss terms' carried state in a checkpoint's `extra` item (TrainState.term_state; the name
# is the checkpoint layout's, kept so that every checkpoint written so far restores).
TERM_STATE = 'objective_state'

# State a run keeps only with some settings: (TrainState field, what it is, the setting).
OPTIONAL_ITEMS = (('ema', 'a model EMA', 'config.ema.decay'), ('stage_val', 'per-stage validation',
                                                               'config.curriculum.val_transform'))


def _extra(state: TrainState) -> dict:
  """Trained state that is not the model's: the loss terms' parameters and carried state, and
  the OPTIONAL_ITEMS the run keeps (model EMA, the stage's validation record)."""
  extra = {TERM_PARAMS: state.params[TERM_PARAMS], TERM_STATE: state.term_state}
  extra.update({name: getattr(state, name) for name, _, _ in OPTIONAL_ITEMS if getattr(state, name)})
  return extra


def _check_optional_items(where: str, meta: dict, template: TrainState) -> None:
  """A checkpoint holds each of OPTIONAL_ITEMS exactly when the run keeps it (metadata)."""
  for name, what, setting in OPTIONAL_ITEMS:
    saved, want = bool(meta.get(name, False)), bool(getattr(template, name))
    if saved != want:
      raise CheckpointMismatchError(
          f'checkpoint {where} was written {"with" if saved else "without"} {what}, and this '
          f'run is {"with" if want else "without"} it: resume with the {setting} it was trained '
          f'with, or start a new workdir (config.init_from=<this workdir> starts from its '
          f'weights)')


# ------------------------------------------------------------------------------------ loop
@dataclasses.dataclass
class Progress:
  """The loop's bookkeeping, and what it returns."""
  step: int
  start_step: int
  stream: Stream
  last_saved: int
  steps: Steps  # the compiled train and eval steps
  pending: list = dataclasses.field(default_factory=list)  # device metrics not yet logged
  eval_metrics: dict | None = None
  preempted: bool = False


def train_loop(run: Run, state: TrainState, stream: Stream, out: Outputs,
               steps: Steps | None = None) -> tuple[TrainState, Progress]:
  """Trains from `state.step` to the end of the run, to `spec.cadence.stop_at_step`, or to a
  stop request (SIGTERM / SIGINT), then checkpoints; evaluates at the end of a completed run.
  `steps`: the run's compiled steps (those `check_evaluation` compiled), a new set without."""
  step = int(jax.device_get(state.step))
  progress = Progress(step=step, start_step=step, stream=stream, last_saved=step, steps=steps
                      or Steps(run))
  # Stop early (checkpointed) at this step, e.g. for time-sliced cluster jobs; rerun to resume.
  end = min(run.spec.cadence.stop_at_step or run.total_steps, run.total_steps)
  try:
    while progress.step < end and not progress.preempted:
      phase = run.phases[phase_at(run.phases, progress.step)]
      state = _enter_phase(run, state, progress, phase, out.logger)
      state = _train_phase(run, state, progress, phase, end, out)
    if progress.step < run.total_steps:
      _checkpoint_stop(run, state, progress, out)
  finally:  # also after an error: a bad image met by a worker, a non-finite loss
    progress.stream.close()
  if progress.eval_metrics is None and not progress.preempted:  # resumed at the end, or stopped
    progress.eval_metrics = _evaluate_and_log(run, state, progress, out.logger)
  out.checkpointer.wait()
  return state, progress


def _enter_phase(run: Run, state: TrainState, progress: Progress, phase: Phase,
                 logger: MetricLogger) -> TrainState:
  """A new phase starts a new input stream and, if it says so, a new optimizer state."""
  step, boundary = progress.step, progress.step == phase.start_step
  if boundary and step > 0 and step != progress.start_step:
    progress.stream.close()
    progress.stream = train_stream(run, phase, step)
  if boundary and phase.reset_optimizer and step > 0:
    state = state.replace(
        opt_state=jax.jit(run.tx.init, out_shardings=run.state_shardings.opt_state)(state.params))
    logger.message(f'phase {phase.name}: optimizer state re-created')
  if boundary or step == progress.start_step:
    logger.message(f'phase {phase.name} (steps {phase.start_step}–{phase.end_step}, '
                   f'resolution {phase.resolution or "full"}, fuse_text {phase.fuse_text})')
  return state


def _train_phase(run: Run, state: TrainState, progress: Progress, phase: Phase, end: int,
                 out: Outputs) -> TrainState:
  train_step = progress.steps.train(phase)
  teacher_vars = run.teacher.variables if run.teacher else None
  while progress.step < min(phase.end_step, end):
    batch = next_batch(run, progress.stream)
    t0 = time.time()
    state, metrics = train_step(state, batch, teacher_vars)
    if progress.step in (progress.start_step, phase.start_step):
      jax.block_until_ready(metrics)
      out.logger.message(f'phase {phase.name}: first step (compile + run) '
                         f'{time.time() - t0:.1f}s')
    progress.pending.append(metrics)
    progress.step += 1
    before = progress.step
    state = _validate_stage(run, state, progress, phase, out)
    _log_evaluate_save(run, state, progress, out, force_save=progress.step != before)
    # SIGTERM / SIGINT: every step on one host; at log intervals (agreed) on several.
    at_sync_point = progress.step % run.spec.cadence.log_every_steps == 0
    if progress.step < run.total_steps and out.stop.should_stop(at_sync_point=at_sync_point):
      progress.preempted = True
      break
  return state


def _validate_stage(run: Run, state: TrainState, progress: Progress, phase: Phase,
                    out: Outputs) -> TrainState:
  """After each epoch of a validated stage (train/stage_val.py): the hold-out's top-1 at the
  stage's resolution, one `stage_val` row, the record updated; at the stage's end or an early
  stop its best weights restored (an early stop also moves the step to the stage's end)."""
  step, spe = progress.step, run.data.steps_per_epoch
  if not state.stage_val or ((step - phase.start_step) % spe and step != phase.end_step):
    return state
  validation = run.spec.stage_val
  source = stage_val.ValSource(run.data.val, phase.resolution, validation.transform)
  # A text-fusing stage is validated on its fused pass with predicted text (caption-free).
  eval_step = progress.steps.eval(phase.fuse_text)
  m = evaluate_source(eval_step, state.params, state.batch_stats, source,
                      batch_size=run.spec.eval_batch_size, data_sharding=run.data_sharding)
  variables = {'params': state.params['student'], 'batch_stats': state.batch_stats}
  record, stop = stage_val.update(state.stage_val, variables, m['top1'], validation.patience)
  stop = stop and step < phase.end_step  # out of patience at the stage's last epoch: its end
  row = {
      'stage': phase.name, 'resolution': phase.resolution or 0,
      'stage_epoch': int(record['epochs']), 'val_top1': m['top1'], 'val_loss': m['loss'],
      'best_val_top1': float(record['best_top1']), 'bad_epochs': int(record['bad_epochs']),
      'early_stop': stop
  }
  out.logger.write(step, row, kind='stage_val')
  out.logger.message(f'phase {phase.name}: validation epoch {row["stage_epoch"]} top-1 '
                     f'{m["top1"]:.3f} at {phase.resolution or "full"} px (best '
                     f'{row["best_val_top1"]:.3f}, {row["bad_epochs"]} epoch(s) without a better)')
  if stop or step == phase.end_step:
    _flush(run, progress, out)  # the train rows up to here, before the step may move
    best = jax.tree.map(jnp.copy, record['best'])
    state = state.replace(params=dict(state.params, student=best['params']),
                          batch_stats=best['batch_stats'], stage_val=stage_val.fresh(best))
    if stop:
      progress.step = phase.end_step
      state = state.replace(step=jnp.asarray(phase.end_step, jnp.int32))
    out.logger.message(
        f'phase {phase.name}: {"stopped early" if stop else "done"} after {row["stage_epoch"]} '
        f'validated epoch(s); its best weights (validation top-1 {row["best_val_top1"]:.3f}) '
        f'go on' + (f' at step {progress.step}' if stop else ''))
  else:
    state = state.replace(stage_val=record)
  return jax.device_put(state, run.state_shardings)


def _log_evaluate_save(run: Run, state: TrainState, progress: Progress, out: Outputs,
                       force_save: bool = False) -> None:
  """The intervals: metrics every `log_every_steps`, eval every `eval_every_epochs`, a
  checkpoint every `checkpoint_every_steps` (0: every epoch), after every eval and when
  `force_save` (a stage stopped early: the step moved)."""
  cadence, step, total = run.spec.cadence, progress.step, run.total_steps
  eval_every = int(round(cadence.eval_every_epochs * run.data.steps_per_epoch)) or total
  checkpoint_every = cadence.checkpoint_every_steps or run.data.steps_per_epoch
  evaluating = step % eval_every == 0 or step == total
  if step % cadence.log_every_steps == 0 or evaluating or step % checkpoint_every == 0:
    _flush(run, progress, out)
  if evaluating:
    progress.eval_metrics = _evaluate_and_log(run, state, progress, out.logger)
  if evaluating or step % checkpoint_every == 0 or force_save:
    best = cadence.best_metric
    _save(run, state, progress, out.checkpointer,
          {best: progress.eval_metrics[best]} if evaluating else None)


def _checkpoint_stop(run: Run, state: TrainState, progress: Progress, out: Outputs) -> None:
  """Before the run ends early: the last metrics, then the checkpoint that covers them."""
  _flush(run, progress, out)
  if progress.last_saved != progress.step:
    _save(run, state, progress, out.checkpointer)
  out.checkpointer.wait()  # the stop checkpoint is complete on disk (or its error is raised)
  where = f'stopped at step {progress.step} of {run.total_steps}'
  if progress.preempted:
    out.logger.message(f'{out.stop.reason}: {where}; the checkpoint is complete in '
                       f'{out.checkpointer.directory}; rerun to resume')
  else:
    out.logger.message(f'{where} (stop_at_step); rerun to resume')


def _flush(run: Run, progress: Progress, out: Outputs) -> None:
  """Host sync at log intervals only: average pending metrics, stop on a non-finite loss."""
  if not progress.pending:
    return
  step = progress.step
  rows = jax.device_get(progress.pending)
  progress.pending.clear()
  bad = next((r for r in rows if bool(r['nonfinite'])), None)
  if bad is not None:
    raise NonFiniteLossError(
        f'non-finite loss or gradient before step {step} (loss={float(bad["loss"])}); '
        f'nothing was saved after the last good checkpoint (step {progress.last_saved}) in '
        f'{out.checkpointer.directory}. Lower the learning rate, check the data, or resume from '
        f'that checkpoint with different settings.')
  avg = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != 'nonfinite'}
  avg['lr'] = float(run.schedule(step - 1))
  avg['resolution'] = run.phases[phase_at(run.phases, step - 1)].resolution or 0
  out.logger.write(step, avg)
  out.logger.progress(step, avg)


def _evaluate_and_log(run: Run, state: TrainState, progress: Progress,
                      logger: MetricLogger) -> dict:
  step, t = progress.step, time.time()
  m = evaluate(run, state, run.phases[phase_at(run.phases, step - 1)], progress.steps.eval)
  modes = [
      f'{mode} {m[f"top1_{suffix}"]:.3f}' for mode, suffix in EVAL_TEXT.items()
      if f'top1_{suffix}' in m
  ]
  extra = f'; Acc@1 by text input: {", ".join(modes)}' if modes else ''
  if EMA_PREFIX + 'top1' in m:
    extra += f'; {format_eval(m, EMA_PREFIX)[2:]}'
  logger.message(f'{run.spec.name}[step {step}] {format_eval(m)} '
                 f'({m["count"]} examples, {time.time() - t:.1f}s{extra})')
  logger.write(step, m, kind='eval')
  return m


def _save(run: Run, state: TrainState, progress: Progress, checkpointer, metrics=None) -> None:
  step = progress.step
  meta = {
      'step': int(step),
      'epoch': step / run.data.steps_per_epoch,
      'num_params': run.student.num_params,
      'model': {'name': run.student.name, 'kwargs': run.student.kwargs},
      'phase': run.phases[phase_at(run.phases, step)].name,
      **{name: bool(getattr(state, name)) for name, _, _ in OPTIONAL_ITEMS},
      # Where the saved iterator's stream starts, and the layout its state belongs to.
      'data': {
          'start': progress.stream.start, 'processes': jax.process_count(),
          'workers': run.data.num_workers
      }
  }
  checkpointer.save(step,
                    variables={'params': state.params['student'], 'batch_stats': state.batch_stats},
                    extra=_extra(state), opt_state=state.opt_state,
                    data_iterator=progress.stream.iterator, meta=meta, metrics=metrics, force=True)
  progress.last_saved = step
