"""Evaluation: top-1 / top-5 (k ≤ the number of classes only) / loss over every example of the
eval split, during training (`evaluate(run, state, phase)`) or from a saved checkpoint
(`evaluate_checkpoint`); `check_evaluation` runs it on one batch before training starts.

Imports flow one way: spec → run → evaluate → loop → trainer."""
from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tikd_jax import sharding as sharding_lib
from tikd_jax.cpu import compiler
from tikd_jax.data import build_source, pipeline
from tikd_jax.data.text_features import load_text_features
from tikd_jax.models.variables import load_model, model_variables
from tikd_jax.train import checkpoint as ckpt_lib
from tikd_jax.train import spec as spec_lib
from tikd_jax.train.plan import Phase
from tikd_jax.train.run import Run
from tikd_jax.train.spec import EVAL_TEXT, RunSpec
from tikd_jax.train.state import TrainState
from tikd_jax.train.step import EVAL_TOPK, make_eval_step

# What the final table shows for a top-k accuracy that does not apply (k > the number of classes).
NOT_APPLICABLE = '–'

# The model EMA's metrics are the raw weights' names with this prefix (`ema_top1`).
EMA_PREFIX = 'ema_'


def evaluate(run: Run, state: TrainState, phase: Phase,
             eval_steps: Callable[[bool], Callable] | None = None) -> dict[str, float]:
  """The eval split's metrics for `state`, trained so far in `phase`.

  After a text-fusing phase every available text input is evaluated side by side (README
  "Caption-free inference"): 'predicted' (the text predictor's output: caption-free), 'none'
  (the first pass alone), 'captions' (the test split's own captions, `text.eval_features_dir`)
  and 'released' (rows 0…b−1 of the train feature file for every batch, as the released code
  does). `top1` etc. are the `tikd.eval_text` one's; each mode's are also under `top1_<suffix>`.
  With a model EMA (train/ema.py) its weights are evaluated the same way, every metric but the
  count prefixed `ema_` (`ema_top1`, `ema_top1_no_text`, …). `eval_steps(fuse_text)`: the run's
  compiled eval steps (the loop's `Steps.eval`); without it they are compiled here.
  """
  eval_steps = eval_steps or functools.cache(lambda fuse: compiled_eval_step(run, fuse))
  modes = _eval_modes(run, phase.fuse_text)

  def metrics_of(params, batch_stats):
    return evaluate_modes(lambda mode: eval_steps(mode != 'none'), params, batch_stats,
                          run.data.eval, modes=modes, headline=run.spec.text.eval_text,
                          texts={m: _eval_text_features(run, m) for m in modes},
                          batch_size=run.spec.eval_batch_size, data_sharding=run.data_sharding)

  metrics = metrics_of(state.params, state.batch_stats)
  if state.ema:
    # The same params structure as the raw weights' (the terms' are unused): no new compile.
    ema = metrics_of(dict(state.params, student=state.ema['params']), state.ema['batch_stats'])
    metrics.update({f'{EMA_PREFIX}{k}': v for k, v in ema.items() if k != 'count'})
  return metrics


def check_evaluation(run: Run, state: TrainState, eval_steps: Callable[[bool], Callable]) -> float:
  """Compiles and runs every eval step the run's phases will use, on the first eval batch, so
  that a broken evaluation fails before the first train step (seconds) rather than at the first
  evaluation (epochs). Draws no random numbers and changes no state; the compiled steps are the
  ones `eval_steps` (the loop's `Steps.eval`) keeps for `evaluate`. Returns the seconds it
  took."""
  t0 = time.time()
  for fuse_text in dict.fromkeys(p.fuse_text for p in run.phases):
    for mode in _eval_modes(run, fuse_text):
      batch = next(
          pipeline.eval_batches(run.data.eval, global_batch=run.spec.eval_batch_size,
                                process_index=jax.process_index(),
                                process_count=jax.process_count(),
                                text_features=_eval_text_features(run, mode)), None)
      if batch is None:
        split = getattr(run.data.eval, 'split', run.spec.data.eval_split)
        raise ValueError(f'the eval split {split!r} has no examples')
      try:
        jax.block_until_ready(
            eval_steps(mode != 'none')(state.params, state.batch_stats,
                                       pipeline.to_global(batch, run.data_sharding)))
      except Exception as e:
        e.add_note(f'(evaluation ({mode!r} text input) failed on its first batch, checked before '
                   f'the first train step of this start: nothing more was trained)')
        raise
  return time.time() - t0


def _eval_modes(run: Run, fuse_text: bool) -> tuple[str, ...]:
  """The text inputs evaluated after a phase: the first pass alone, or after a fusing phase
  every one available in this run."""
  if not fuse_text:
    return ('none',)
  return tuple(m for m in EVAL_TEXT if _eval_text_features(run, m) is not False)


def _eval_text_features(run: Run, mode: str):
  """The per-example text of the eval split for `mode`: None (none needed) or False (not
  available in this run)."""
  if mode == 'predicted' and not run.student.kwargs.get('text_predictor', True):
    return False  # a model without a text predictor (the released layout)
  if mode in ('predicted', 'none'):
    return None
  if mode == 'captions':
    return False if run.data.eval_text_features is None else run.data.eval_text_features
  return False if run.data.eval_released_text is None else run.data.eval_released_text


def evaluate_modes(eval_step_for, params, batch_stats, source, *, modes, headline, texts,
                   batch_size, data_sharding) -> dict[str, float]:
  """`evaluate_source` once per text mode; the `headline` mode's metrics (or the first pass's
  when it is not among `modes`) unsuffixed, every mode's with its suffix."""
  metrics = {}
  for mode in modes:
    m = evaluate_source(eval_step_for(mode), params, batch_stats, source, batch_size=batch_size,
                        data_sharding=data_sharding, text_features=texts[mode])
    if mode == headline or (headline not in modes and mode == 'none'):
      metrics.update(m)
    if len(modes) > 1:
      metrics.update({f'{k}_{EVAL_TEXT[mode]}': v for k, v in m.items() if k != 'count'})
  return metrics


def compiled_eval_step(run: Run, fuse_text: bool):
  """The run's jitted eval step (params, batch_stats, batch) → sums, compiled once per input
  shape (a curriculum stage's validation has its own resolution). Each call builds a new one:
  the loop's `Steps` keeps one per `fuse_text`."""
  step = make_eval_step(graphdef=run.student.graphdef, fuse_text=fuse_text)
  variables = jax.eval_shape(lambda: model_variables(run.student.build(0)))
  options = _eval_options(run.spec.xla_options, step, {'student': variables['params']},
                          variables['batch_stats'], run.data.eval, run.spec.eval_batch_size)
  return jax.jit(step, compiler_options=options)


def _eval_options(preset: str, step, params, batch_stats, source, batch_size: int):
  """The eval step's compiler options (cpu/compiler.py `step_options`), decided on a batch of
  `source` at full resolution as pipeline.eval_batches yields it; a curriculum stage's validation
  at a lower resolution runs under the same options."""
  image = np.asarray(source[0]['image'])

  def rows(shape=(), dtype=np.int32):
    return jax.ShapeDtypeStruct((batch_size,) + shape, dtype)

  batch = {
      'image': rows(image.shape, np.uint8), 'label': rows(), 'index': rows(),
      'mask': rows(dtype=np.float32)
  }
  return compiler.step_options(preset, step, params, batch_stats, batch)


def evaluate_source(eval_step, params, batch_stats, source, *, batch_size, data_sharding,
                    text_features=None) -> dict[str, float]:
  """Top-1, top-5 (with ≥ 5 classes) and mean loss over every example of `source` (padded last
  batch masked)."""
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
  topk = {
      f'top{k}': 100.0 * float(sums[f'top{k}_sum']) / n for k in EVAL_TOPK if f'top{k}_sum' in sums
  }  # k ≤ the number of classes only
  return dict(topk, loss=float(sums['loss_sum']) / n, count=int(n))


def format_eval(m: dict, prefix: str = '') -> str:
  """The final line; Acc@5 is '–' when the model has fewer than 5 classes. `prefix=EMA_PREFIX`:
  the model EMA's line (`* EMA Acc@1 …`)."""
  top5 = f"{m[prefix + 'top5']:.3f}" if prefix + 'top5' in m else NOT_APPLICABLE
  label = 'EMA ' if prefix == EMA_PREFIX else prefix
  return f"* {label}Acc@1 {m[prefix + 'top1']:.3f} Acc@5 {top5} loss {m[prefix + 'loss']:.3f}"


def format_evals(m: dict) -> str:
  """The raw weights' final line, and the model EMA's below it when the run has one."""
  lines = [format_eval(m)]
  if EMA_PREFIX + 'top1' in m:
    lines.append(format_eval(m, EMA_PREFIX))
  return '\n'.join(lines)


# `evaluate_checkpoint`'s choices for the model EMA (main.py --ema).
EVAL_EMA = ('auto', 'on', 'off')


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        ema: str = 'auto') -> dict[str, Any]:
  """Evaluates the newest checkpoint in `workdir` on the eval split (no training state needed).

  `ema`: the checkpoint's model EMA (train/ema.py) is evaluated beside the raw weights as
  training evaluates it (`ema_top1`, `ema_loss`, … ) — 'auto': when the checkpoint holds one;
  'on': it must (ValueError otherwise); 'off': the raw weights only.
  """
  if ema not in EVAL_EMA:
    raise ValueError(f'ema={ema!r}: use one of {EVAL_EMA}')
  spec = spec_lib.resolve(config)
  mesh = sharding_lib.make_mesh(spec.mesh)
  eval_source = build_source(spec.data, spec.data.eval_split)
  if jax.process_index() == 0:
    for note in getattr(eval_source, 'notes', ()):  # the split 'auto' chose, skipped files
      print(note, flush=True)
  meta, flat, ema_flat = ckpt_lib.load_weights_and_ema(workdir, with_ema=ema != 'off')
  if 'model' not in meta:
    raise ValueError(f'{workdir}: checkpoint metadata names no model; was it written by tikd-jax?')
  _check_ema_request(ema, ema_flat is not None, spec, f'{workdir} (step {meta.get("step")})')
  kwargs = dict(meta['model']['kwargs'], fast_layers=spec.fast_layers)

  def load(weights: dict, what: str):
    graphdef, loaded = load_model(meta['model']['name'], kwargs, weights, what=what)
    variables = {'params': {'student': loaded['params']}, 'batch_stats': loaded['batch_stats']}
    return graphdef, sharding_lib.place(
        variables, sharding_lib.param_shardings(variables, mesh, spec.sharding_rules))

  graphdef, variables = load(flat, f'checkpoint in {workdir}')
  modes, texts = _checkpoint_text_modes(spec, meta, eval_source)
  steps = {}
  for fuse in (False, True):
    step = make_eval_step(graphdef=graphdef, fuse_text=fuse)
    options = _eval_options(spec.xla_options, step, variables['params'], variables['batch_stats'],
                            eval_source, spec.eval_batch_size)
    steps[fuse] = jax.jit(step, compiler_options=options)

  def metrics_of(variables):
    return evaluate_modes(lambda mode: steps[mode != 'none'], variables['params'],
                          variables['batch_stats'], eval_source, modes=modes,
                          headline=spec.text.eval_text, texts=texts,
                          batch_size=spec.eval_batch_size,
                          data_sharding=sharding_lib.batch_sharding(mesh))

  result = metrics_of(variables)
  if ema_flat is not None:  # the same names as training's evaluation (`evaluate` above)
    _, ema_variables = load(ema_flat, f'model EMA of the checkpoint in {workdir}')
    result.update(
        {f'{EMA_PREFIX}{k}': v for k, v in metrics_of(ema_variables).items() if k != 'count'})
  return dict(result, step=meta.get('step'), num_params=meta.get('num_params'))


def _checkpoint_text_modes(spec: RunSpec, meta: dict, eval_source):
  """(text modes, their eval-split text) for a checkpoint's model: the fused modes need a TIKD
  model; 'captions' the eval split's caption features."""
  modes = ('none',)
  texts = {'none': None, 'predicted': None}
  if meta['model']['kwargs'].get('text_dim'):
    # 'predicted' needs the text predictor, which a released-layout model lacks
    modes = (('predicted', 'none') if meta['model']['kwargs'].get('text_predictor', True) else
             ('none',))
    if spec.text.eval_features_dir:
      texts['captions'] = load_text_features(spec.text.eval_features_dir, eval_source)
      modes += ('captions',)
    if spec.text.eval_text == 'released':  # the only mode that reads training captions
      train = load_text_features(spec.text.features_dir,
                                 build_source(spec.data, spec.data.train_split))
      texts['released'] = pipeline.released_rows(train, len(eval_source), spec.eval_batch_size)
      modes += ('released',)
  return modes, texts


def _check_ema_request(ema: str, has_ema: bool, spec: RunSpec, where: str):
  """`ema='on'` needs a checkpoint with a model EMA; 'auto' notes a config that trains one when
  the checkpoint has none."""
  if ema == 'on' and not has_ema:
    raise ValueError(
        f'--ema=on: the checkpoint in {where} holds no model EMA (trained with '
        f'config.ema.decay=0, or weights only): evaluate its raw weights with --ema=auto or '
        f'--ema=off, or train with --config.ema.decay (e.g. 0.99996) to have one')
  if ema == 'auto' and not has_ema and spec.ema_decay and jax.process_index() == 0:
    print(
        f'config.ema.decay={spec.ema_decay}, but the checkpoint in {where} holds no model '
        f'EMA: evaluating its raw weights only', flush=True)
