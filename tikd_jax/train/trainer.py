"""The trainer, top to bottom: set up the run, build or restore its state, train, evaluate.

  setup(config, workdir) → Run            train/run.py: the spec (train/spec.py: the config read
                                          once), mesh, data, models, loss terms, optimizer
  create_train_state(run) → TrainState    train/run.py
  restore_or_start(run, state, ckpt)      train/loop.py: the newest readable checkpoint, if any
  init_from(run, state)                   train/init_from.py: a fresh run from other weights
  check_evaluation(run, state, eval_steps) train/evaluate.py: the eval step(s) on one batch, first
  train_loop(run, state, stream, outputs, steps)  train/loop.py: steps, logs, evals, checkpoints
  evaluate(run, state, phase, eval_steps) train/evaluate.py
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from tikd_jax.train import checkpoint as ckpt_lib
from tikd_jax.train.evaluate import check_evaluation
from tikd_jax.train.evaluate import evaluate_checkpoint, format_eval, format_evals  # noqa: F401  (main.py's API)
from tikd_jax.train.init_from import init_from
from tikd_jax.train.logger import MetricLogger
from tikd_jax.train.loop import NonFiniteLossError, Outputs, Steps, restore_or_start, train_loop  # noqa: F401
from tikd_jax.train.preemption import Preempted, StopRequest
from tikd_jax.train.run import Run, create_train_state, setup


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its newest checkpoint) and returns final eval.

  Raises `Preempted` after a SIGTERM / SIGINT once the checkpoint of the step it stopped at is
  complete (main.py exits 75); rerunning resumes exactly. See README "Reliability".
  """
  workdir = os.path.abspath(workdir)
  with StopRequest() as stop:
    run = setup(config, workdir)
    spec = run.spec
    # The config as run: with data.normalization='compute', the measured mean / std.
    _write_json(workdir, 'config.json', run.config.to_json_best_effort(indent=2))
    state = create_train_state(run)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                         keep=spec.cadence.keep_checkpoints,
                                         best_metric=spec.cadence.best_metric)
    state, stream, resume_note = restore_or_start(run, state, checkpointer)
    start_step = int(jax.device_get(state.step))
    if spec.init_from and start_step == 0:  # a resumed run continues from its own weights
      state, resume_note = init_from(run, state)
    logger = MetricLogger(workdir, is_chief=run.is_chief, total_steps=run.total_steps,
                          initial_step=start_step, prefix=spec.name)
    _log_start(run, logger, checkpointer, start_step, resume_note)
    steps = Steps(run)
    completed = False
    try:
      logger.message(f'evaluation checked on one batch before training (compile + run): '
                     f'{check_evaluation(run, state, steps.eval):.1f}s')
      state, progress = train_loop(run, state, stream, Outputs(checkpointer, logger, stop), steps)
      completed = True
    finally:
      # After an error, close quietly so that error (not a follow-up one) is what is reported.
      stream.close()  # train_loop closes the streams it opens; this one, if it never ran
      checkpointer.close(quiet=not completed)
      logger.close()
  if progress.preempted:
    raise Preempted(progress.step, checkpointer.directory, stop.reason)
  result = dict(progress.eval_metrics, step=progress.step, num_params=run.student.num_params)
  _write_json(workdir, 'final_eval.json', json.dumps(result, indent=2))
  return result


def _log_start(run: Run, logger: MetricLogger, checkpointer, start_step: int, resume_note: str):
  data, student = run.data, run.student
  logger.message(
      f'{student.name} {student.kwargs.get("variant", "")}: {student.num_params:,} parameters; '
      f'{data.num_classes} classes; {len(data.train)} train / {len(data.eval)} eval examples; '
      f'{data.steps_per_epoch} steps '
      f'per epoch, {run.total_steps} steps in {len(run.phases)} phase(s); mesh '
      f'{dict(run.mesh.shape)}; ' +
      (f'resumed at step {start_step}' if start_step else 'starting fresh'))
  for note in data.notes:
    logger.message(note)
  if data.sampler:
    s = data.sampler
    logger.message(f'repeated augmentation: {s.num_repeats} repeats over {s.num_replicas} '
                   f'replica(s) of {s.replica_batch} rows, {s.per_replica} examples per replica '
                   f'and epoch (DeiT\'s RASampler)')
  if resume_note:
    logger.message(resume_note)
  for bad_step, reason in checkpointer.set_aside:
    logger.message(f'checkpoint step {bad_step} is unreadable ({reason}); moved it to '
                   f'{os.path.join(run.workdir, ckpt_lib.UNREADABLE_DIR)} and resumed from step '
                   f'{start_step} instead')


def _write_json(workdir: str, name: str, text: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, name), 'w') as f:
      f.write(text)
