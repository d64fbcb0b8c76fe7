"""The trainer: one function that reads top to bottom, from mesh to final evaluation.

  mesh → input → models → optimizer & state → sharding → checkpoint/resume → steps → loop → eval
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tikd_jax import sharding as sharding_lib
from tikd_jax import xla_options
from tikd_jax.data import build_source
from tikd_jax.data import pipeline
from tikd_jax.models import VIT_MODELS, build_model, count_params, cpu_fast_layers
from tikd_jax.models.variables import load_model, model_variables
from tikd_jax.train import checkpoint as ckpt_lib
from tikd_jax.train import optim
from tikd_jax.train.logger import MetricLogger
from tikd_jax.losses.terms import Loss
from tikd_jax.train.loss_config import term_settings
from tikd_jax.train.plan import build_phases, phase_at
from tikd_jax.train.preemption import Preempted, StopRequest
from tikd_jax.train.step import (StepOptions, TrainState, loss_shapes, make_eval_step,
                                 make_train_step)


class NonFiniteLossError(FloatingPointError):
  pass


def model_spec(model_config, num_classes: int) -> tuple[str, dict]:
  """(name, kwargs) for build_model from a config block; num_classes filled from the data."""
  kwargs = {k: v for k, v in model_config.to_dict().items() if k not in ('name', 'checkpoint')}
  kwargs.setdefault('num_classes', num_classes)
  for k, v in list(kwargs.items()):
    if isinstance(v, tuple):
      kwargs[k] = list(v)
  return model_config.name, kwargs


def _place(tree, shardings):
  """Host NumPy → global arrays with the given shardings (works on every host of a pod)."""
  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(put, tree, shardings)


def build_augmentations(config):
  """(per-example host augmentation or None, on-device batch augmentation or None).

  Host: RandAugment on uint8 images in the grain workers. Device (inside the jitted step, so
  teacher and student see the same result): random erasing, then Mixup/CutMix with smoothed
  targets. Built once: the compiled step is specialised on the batch-augmentation function.
  """
  from tikd_jax.data.mixup import make_batch_augment  # pylint: disable=g-import-not-at-top
  from tikd_jax.data.randaugment import make_host_augment  # pylint: disable=g-import-not-at-top
  aug = config.get('augment')
  if aug is None:
    return None, None
  cfg = ml_collections.ConfigDict(dict(
      aug.to_dict(), label_smoothing=config.get('label_smoothing', 0.0),
      mean=tuple(config.model.get('mean', (0.5, 0.5, 0.5))),
      std=tuple(config.model.get('std', (0.5, 0.5, 0.5)))))
  host = make_host_augment(cfg) if aug.randaugment else None
  on_device = aug.mixup_alpha > 0 or aug.cutmix_alpha > 0 or aug.erasing_prob > 0
  return host, (make_batch_augment(cfg) if on_device else None)


def load_train_text_features(config, train_source, is_chief: bool) -> np.ndarray | None:
  """The caption features of the train split, one row per example index (README "The text
  teacher").

  With `config.text.class_prompt_encoder` set (a local encoder folder, or 'minilm' for the
  offline MiniLM), class-prompt features are built first when the folder has none (the
  fallback without a VLM). Eval never reads these: it uses the text predictor or no text.
  """
  text = config.get('text')
  if not text or not text.get('features_dir'):
    return None
  from tikd_jax.data.text_features import load_text_features  # pylint: disable=g-import-not-at-top
  if text.get('class_prompt_encoder'):
    if is_chief:
      from tikd_jax import text_teacher  # pylint: disable=g-import-not-at-top
      encoder = text.class_prompt_encoder
      if encoder == 'minilm':
        encoder = text_teacher.minilm_folder()
      text_teacher.build_class_prompt_features(
          config.data, config.data.get('train_split', 'train'), text.features_dir, encoder,
          template=text.class_prompt_template, source=train_source)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('class prompt features written')
  return load_text_features(text.features_dir, train_source)


def _extra(state: TrainState) -> dict:
  """Trained state that is not the model's: the loss terms' parameters and carried state."""
  return {'objective': state.params['objective'], 'objective_state': state.objective_state}


def load_teacher(config, num_classes: int, mesh, rules):
  """Builds the teacher, loads its checkpoint strictly and places it on the mesh."""
  name, kwargs = model_spec(config.teacher, num_classes)
  if config.get('dtype', 'float32') != 'float32':
    kwargs['dtype'] = config.dtype
  kwargs['fast_layers'] = cpu_fast_layers.enabled(config.cpu_fast_layers)
  path = config.teacher.checkpoint
  if not path:
    raise ValueError(f'the loss terms of distill.method={config.distill.method!r} / config.loss '
                     f'need a teacher: set '
                     f'--config.teacher.checkpoint to a workdir or converted checkpoint')
  meta, flat = ckpt_lib.load_weights(path)
  graphdef, variables = load_model(name, kwargs, flat,
                                   what=f'teacher checkpoint {path} (for model {name})')
  variables = _place(variables, sharding_lib.param_shardings(variables, mesh, rules))
  return graphdef, variables, meta


def evaluate(eval_step, params, batch_stats, source, *, batch_size, data_sharding,
             text_features=None) -> dict[str, float]:
  """Top-1, top-5 and mean loss over every example of `source` (padded last batch masked)."""
  sums = None
  for batch in pipeline.eval_batches(source, global_batch=batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count(),
                                     text_features=text_features):
    out = eval_step(params, batch_stats, pipeline.to_global(batch, data_sharding))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  n = float(sums['count'])
  if n != len(source):
    raise RuntimeError(f'evaluation counted {n} examples, the split has {len(source)}')
  return {'top1': 100.0 * float(sums['top1_sum']) / n, 'top5': 100.0 * float(sums['top5_sum']) / n,
          'loss': float(sums['loss_sum']) / n, 'count': int(n)}


def format_eval(m: dict) -> str:
  return f"* Acc@1 {m['top1']:.3f} Acc@5 {m['top5']:.3f} loss {m['loss']:.3f}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its newest checkpoint) and returns final eval.

  Raises `Preempted` after a SIGTERM / SIGINT once the checkpoint of the step it stopped at is
  complete (main.py exits 75); rerunning resumes exactly. See README "Reliability".
  """
  with StopRequest() as stop:
    return _train_and_evaluate(config, workdir, stop)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        stop: StopRequest) -> dict[str, Any]:
  workdir = os.path.abspath(workdir)
  is_chief = jax.process_index() == 0
  if is_chief:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  # ----------------------------------------------------------------------------- mesh
  mesh = sharding_lib.make_mesh(config.mesh)
  compiler_options = xla_options.compiler_options(config.get('xla_options', 'auto'))
  data_sharding = sharding_lib.batch_sharding(mesh)
  rules = [tuple(r) for r in config.get('sharding_rules', ())]
  if config.batch_size % mesh.size or config.eval_batch_size % mesh.size:
    raise ValueError(f'batch_size {config.batch_size} and eval_batch_size '
                     f'{config.eval_batch_size} must divide by the {mesh.size} devices')

  # ----------------------------------------------------------------------------- input
  train_source = build_source(config.data, config.data.get('train_split', 'train'))
  eval_source = build_source(config.data, config.data.get('eval_split', 'test'))
  num_classes = train_source.num_classes
  steps_per_epoch = len(train_source) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'batch_size {config.batch_size} is larger than the train split '
                     f'({len(train_source)} examples)')
  phases = build_phases(config, steps_per_epoch)
  total_steps = phases[-1].end_step
  text_features = load_train_text_features(config, train_source, is_chief)
  per_process_batch = config.batch_size // jax.process_count()
  host_augment, batch_augment = build_augmentations(config)

  num_workers = pipeline.resolve_num_workers(config.data.get('num_workers', 0))

  def train_iterator(phase, start):
    """The phase's stream from element `start` on (batch k of the whole run is element k, for any
    number of processes and workers, so a position is all it takes to resume)."""
    ds = pipeline.train_dataset(
        train_source, batch_size=per_process_batch, seed=config.seed,
        crop_padding=config.data.get('crop_padding', 4), crop_size=phase.resolution,
        crop_mode=config.get('curriculum', {}).get('mode', 'crop'),
        flip=config.data.get('flip', True), text_features=text_features,
        extra_augment=host_augment,
        process_index=jax.process_index(), process_count=jax.process_count())
    return pipeline.make_iterator(ds[start:], num_workers)

  # ----------------------------------------------------------------------------- models
  fusing = [p.name for p in phases if p.fuse_text]
  if fusing and text_features is None:
    raise ValueError(f'stage(s) {fusing} fuse text but config.text.features_dir is empty: '
                     f'generate caption features (python -m tikd_jax.text_teacher, see README) '
                     f'and pass --config.text.features_dir=DIR, or use a config without text '
                     f'stages (e.g. configs/tikd_cifar100.py:large,hard,notext)')
  student_name, student_kwargs = model_spec(config.model, num_classes)
  if config.get('dtype', 'float32') != 'float32':
    # Mixed precision: compute in config.dtype; parameters, optimizer state and losses float32.
    student_kwargs['dtype'] = config.dtype
  if text_features is not None and config.model.name in VIT_MODELS:
    student_kwargs.setdefault('text_dim', int(text_features.shape[1]))
  fast_layers = cpu_fast_layers.enabled(config.cpu_fast_layers)
  abstract_model = nnx.eval_shape(lambda: build_model(
      student_name, rngs=nnx.Rngs(config.seed), fast_layers=fast_layers, **student_kwargs))
  graphdef, _, _ = nnx.split(abstract_model, nnx.Param, nnx.BatchStat)
  n_params = count_params(abstract_model)
  # Each phase trains Σ weight · term over its list; parameters and state cover every phase's.
  settings = term_settings(config)
  phase_losses = {p.loss: Loss(p.loss, settings) for p in phases}
  all_terms = Loss(tuple(dict.fromkeys(t for p in phases for t in p.loss)), settings)
  teacher_graphdef = teacher_vars = None
  if all_terms.needs_teacher:
    teacher_graphdef, teacher_vars, _ = load_teacher(config, num_classes, mesh, rules)
  micro_rows = config.batch_size // config.get('grad_accum_steps', 1)
  _, abstract_params, abstract_stats = nnx.split(abstract_model, nnx.Param, nnx.BatchStat)
  shapes = loss_shapes(graphdef=graphdef, variables={'params': abstract_params,
                                                     'batch_stats': abstract_stats},
                       teacher_graphdef=teacher_graphdef, teacher_vars=teacher_vars,
                       image_shape=train_source[0]['image'].shape, rows=micro_rows,
                       num_classes=num_classes)

  # ----------------------------------------------------------------------------- optimizer & state
  schedule = optim.make_schedule(config.schedule, steps_per_epoch, total_steps)

  def init_state() -> TrainState:
    model = build_model(student_name, rngs=nnx.Rngs(config.seed), fast_layers=fast_layers,
                        **student_kwargs)
    variables = model_variables(model)
    term_params, term_state = all_terms.init(  # state sized for one micro-batch
        jax.random.fold_in(jax.random.key(config.seed), 1), shapes)
    params = {'student': variables['params'], 'objective': term_params}
    tx = optim.make_optimizer(config.optimizer, schedule, params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables['batch_stats'], opt_state=tx.init(params),
                      objective_state=term_state)

  abstract_state = jax.eval_shape(init_state)
  tx = optim.make_optimizer(config.optimizer, schedule, abstract_state.params)

  # ----------------------------------------------------------------------------- sharding
  state_shardings = sharding_lib.param_shardings(abstract_state, mesh, rules)
  state = jax.jit(init_state, out_shardings=state_shardings)()

  # ----------------------------------------------------------------------------- checkpoint / resume
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                       keep=config.get('keep_checkpoints', 3),
                                       best_metric=config.get('best_metric', 'top1'))

  def restore(step):
    """The state, phase and input iterator at checkpoint `step` (fresh iterators every call, so
    a failed attempt leaves nothing behind)."""
    index = phase_at(phases, step)
    phase = phases[index]
    saved = checkpointer.read_meta(step).get('data', {})
    # grain's saved iterator state is per process and per worker layout; with another host or
    # worker count (or at a phase boundary, where a new stream starts) resume by position.
    exact = (step > phase.start_step and saved.get('processes') == jax.process_count()
             and saved.get('workers') == num_workers)
    data_start = saved['start'] if exact else step
    iterator = train_iterator(phase, data_start)
    variables, extra, opt_state, _ = checkpointer.restore(
        step, variables_template={'params': state.params['student'],
                                  'batch_stats': state.batch_stats},
        extra_template=_extra(state), opt_template=state.opt_state,
        data_iterator=iterator if exact else None)
    restored = TrainState(step=jnp.asarray(step, jnp.int32),
                          params={'student': variables['params'],
                                  'objective': extra['objective']},
                          batch_stats=variables['batch_stats'], opt_state=opt_state,
                          objective_state=extra['objective_state'])
    note = '' if exact or step == phase.start_step else (
        f'checkpoint {step} was written by {saved.get("processes", "?")} process(es) with '
        f'{saved.get("workers", "?")} input worker(s), this run has {jax.process_count()} with '
        f'{num_workers}: the input stream resumes by position')
    return jax.device_put(restored, state_shardings), index, iterator, data_start, note

  # The newest checkpoint that restores: unreadable ones are reported and set aside.
  latest, restored = checkpointer.restore_newest(restore)
  if latest is None:
    start_step, phase_index, iterator, data_start = 0, 0, train_iterator(phases[0], 0), 0
    resume_note = ''
  else:
    start_step = latest
    state, phase_index, iterator, data_start, resume_note = restored
  logger = MetricLogger(workdir, is_chief=is_chief, total_steps=total_steps,
                        initial_step=start_step, prefix=config.get('name', ''))
  logger.message(
      f'{student_name} {student_kwargs.get("variant", "")}: {n_params:,} parameters; '
      f'{len(train_source)} train / {len(eval_source)} eval examples; {steps_per_epoch} steps '
      f'per epoch, {total_steps} steps in {len(phases)} phase(s); mesh {dict(mesh.shape)}; '
      + (f'resumed at step {start_step}' if start_step else 'starting fresh'))
  if resume_note:
    logger.message(resume_note)
  for bad_step, reason in checkpointer.set_aside:
    logger.message(f'checkpoint step {bad_step} is unreadable ({reason}); moved it to '
                   f'{os.path.join(workdir, ckpt_lib.UNREADABLE_DIR)} and resumed from step '
                   f'{start_step} instead')

  # ----------------------------------------------------------------------------- steps
  compiled: dict[tuple, Any] = {}

  def step_for(phase):
    if phase.switches not in compiled:
      opts = StepOptions(
          num_classes=num_classes, steps_per_epoch=steps_per_epoch, seed=config.seed,
          label_smoothing=config.get('label_smoothing', 0.0), fuse_text=phase.fuse_text,
          frozen=phase.frozen, batch_augment=batch_augment,
          grad_accum_steps=config.get('grad_accum_steps', 1))
      frozen_mask = optim.frozen_mask(abstract_state.params, phase.frozen) if phase.frozen else None
      fn = make_train_step(graphdef=graphdef, teacher_graphdef=teacher_graphdef,
                           loss=phase_losses[phase.loss], tx=tx, frozen_mask=frozen_mask, opts=opts)
      compiled[phase.switches] = jax.jit(fn, out_shardings=(state_shardings, None),
                                         donate_argnums=(0,), compiler_options=compiler_options)
    return compiled[phase.switches]

  eval_text = config.tikd.eval_text if config.get('tikd') else 'none'
  eval_steps = {fuse: jax.jit(make_eval_step(graphdef=graphdef, eval_text=eval_text,
                                             fuse_text=fuse), compiler_options=compiler_options)
                for fuse in (False, True)}

  def run_eval(step):
    t = time.time()
    fused = phases[phase_at(phases, step - 1)].fuse_text and eval_text == 'predicted'
    m = evaluate(eval_steps[fused], state.params, state.batch_stats, eval_source,
                 batch_size=config.eval_batch_size, data_sharding=data_sharding)
    if fused:  # caption-free TIKD: also report the first pass alone (eval_text='none')
      plain = evaluate(eval_steps[False], state.params, state.batch_stats, eval_source,
                       batch_size=config.eval_batch_size, data_sharding=data_sharding)
      m.update({f'{k}_no_text': v for k, v in plain.items() if k != 'count'})
    extra = (f'; first pass only: Acc@1 {m["top1_no_text"]:.3f}' if fused else '')
    logger.message(f'{config.get("name", "")}[step {step}] {format_eval(m)} '
                   f'({m["count"]} examples, {time.time() - t:.1f}s{extra})')
    logger.write(step, m, kind='eval')
    return m

  def meta(step):
    return {'step': int(step), 'epoch': step / steps_per_epoch, 'num_params': n_params,
            'model': {'name': student_name, 'kwargs': student_kwargs},
            'phase': phases[phase_at(phases, step)].name,
            # Where the saved iterator's stream starts, and the layout its state belongs to.
            'data': {'start': data_start, 'processes': jax.process_count(),
                     'workers': num_workers}}

  def save(step, metrics=None):
    checkpointer.save(step, variables={'params': state.params['student'],
                                       'batch_stats': state.batch_stats},
                      extra=_extra(state), opt_state=state.opt_state, data_iterator=iterator, meta=meta(step),
                      metrics=metrics, force=True)

  # ----------------------------------------------------------------------------- loop
  log_every = config.get('log_every_steps', 50)
  ckpt_every = config.get('checkpoint_every_steps', 0) or steps_per_epoch
  eval_every = int(round(config.get('eval_every_epochs', 1) * steps_per_epoch)) or total_steps
  pending: list[dict] = []
  last_saved = start_step

  def flush(step):
    """Host sync at log intervals only: average pending metrics, stop on a non-finite loss."""
    if not pending:
      return
    rows = jax.device_get(pending)
    pending.clear()
    if any(bool(r['nonfinite']) for r in rows):
      bad = next(r for r in rows if bool(r['nonfinite']))
      raise NonFiniteLossError(
          f'non-finite loss or gradient before step {step} (loss={float(bad["loss"])}); '
          f'nothing was saved after the last good checkpoint (step {last_saved}) in '
          f'{checkpointer.directory}. Lower the learning rate, check the data, or resume from '
          f'that checkpoint with different settings.')
    avg = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != 'nonfinite'}
    avg['lr'] = float(schedule(step - 1))
    avg['resolution'] = phases[phase_at(phases, step - 1)].resolution or 0
    logger.write(step, avg)
    logger.progress(step, avg)

  step = start_step
  eval_metrics = None
  # Stop early (checkpointed) at this step, e.g. for time-sliced cluster jobs; rerun to resume.
  stop_at = config.get('stop_at_step', 0) or total_steps
  preempted = False
  completed = False
  try:
    while step < min(stop_at, total_steps) and not preempted:
      phase = phases[phase_index]
      if step == phase.start_step and step > 0 and step != start_step:
        iterator, data_start = train_iterator(phase, step), step
      if step == phase.start_step and phase.reset_optimizer and step > 0:
        state = state.replace(opt_state=jax.jit(tx.init, out_shardings=state_shardings.opt_state)(
            state.params))
        logger.message(f'phase {phase.name}: optimizer state re-created')
      train_step = step_for(phase)
      if step == phase.start_step or step == start_step:
        logger.message(f'phase {phase.name} (steps {phase.start_step}–{phase.end_step}, '
                       f'resolution {phase.resolution or "full"}, fuse_text {phase.fuse_text})')
      while step < min(phase.end_step, stop_at):
        batch = pipeline.to_global(next(iterator), data_sharding)
        t0 = time.time()
        state, metrics = train_step(state, batch, teacher_vars)
        if step == start_step or step == phase.start_step:
          jax.block_until_ready(metrics)
          logger.message(f'phase {phase.name}: first step (compile + run) {time.time() - t0:.1f}s')
        pending.append(metrics)
        step += 1
        if step % log_every == 0 or step == total_steps:
          flush(step)
        evaluating = step % eval_every == 0 or step == total_steps
        if evaluating:
          flush(step)
          eval_metrics = run_eval(step)
        if evaluating or step % ckpt_every == 0:
          flush(step)
          save(step, {config.get('best_metric', 'top1'): eval_metrics[config.get(
              'best_metric', 'top1')]} if evaluating else None)
          last_saved = step
        # SIGTERM / SIGINT: every step on one host; at log intervals (agreed) on several.
        if step < total_steps and stop.should_stop(at_sync_point=step % log_every == 0):
          preempted = True
          break
      if step == phase.end_step:
        phase_index = min(phase_index + 1, len(phases) - 1)
    if step < total_steps:
      flush(step)  # the metrics of the last steps, before the checkpoint that covers them
      if last_saved != step:
        save(step)
      checkpointer.wait()  # the stop checkpoint is complete on disk (or its error is raised)
      if preempted:
        logger.message(f'{stop.reason}: stopped at step {step} of {total_steps}; the '
                       f'checkpoint is complete in {checkpointer.directory}; rerun to resume')
      else:
        logger.message(f'stopped at step {step} of {total_steps} (stop_at_step); rerun to resume')
    if eval_metrics is None and not preempted:  # resumed at the very end, or stopped early
      eval_metrics = run_eval(step)
    checkpointer.wait()
    completed = True
  finally:
    # After an error, close quietly so that error (not a follow-up one) is what is reported.
    checkpointer.close(quiet=not completed)
    logger.close()
  if preempted:
    raise Preempted(step, checkpointer.directory, stop.reason)
  result = dict(eval_metrics, step=step, num_params=n_params)
  if is_chief:
    with open(os.path.join(workdir, 'final_eval.json'), 'w') as f:
      json.dump(result, f, indent=2)
  return result


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates the newest checkpoint in `workdir` on the eval split (no training state needed)."""
  mesh = sharding_lib.make_mesh(config.mesh)
  eval_source = build_source(config.data, config.data.get('eval_split', 'test'))
  meta, flat = ckpt_lib.load_weights(workdir)
  if 'model' not in meta:
    raise ValueError(f'{workdir}: checkpoint metadata names no model; was it written by tikd-jax?')
  kwargs = dict(meta['model']['kwargs'],
                fast_layers=cpu_fast_layers.enabled(config.cpu_fast_layers))
  graphdef, loaded = load_model(meta['model']['name'], kwargs, flat,
                                what=f'checkpoint in {workdir}')
  variables = {'params': {'student': loaded['params']}, 'batch_stats': loaded['batch_stats']}
  rules = [tuple(r) for r in config.get('sharding_rules', ())]
  variables = _place(variables, sharding_lib.param_shardings(variables, mesh, rules))
  fuse = bool(meta['model']['kwargs'].get('text_dim')) and config.tikd.get('eval_text') == 'predicted'
  eval_step = jax.jit(make_eval_step(graphdef=graphdef, eval_text=config.tikd.eval_text,
                                     fuse_text=fuse),
                      compiler_options=xla_options.compiler_options(
                          config.get('xla_options', 'auto')))
  result = evaluate(eval_step, variables['params'], variables['batch_stats'], eval_source,
                    batch_size=config.eval_batch_size,
                    data_sharding=sharding_lib.batch_sharding(mesh))
  return dict(result, step=meta.get('step'), num_params=meta.get('num_params'))
