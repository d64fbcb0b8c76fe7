"""Evaluation: top-1 / top-5 / loss over every example of the eval split, during training
(`evaluate(run, state)`) or from a saved checkpoint (`evaluate_checkpoint`)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from tikd_jax import sharding as sharding_lib
from tikd_jax import xla_options
from tikd_jax.data import build_source, pipeline
from tikd_jax.models import cpu_fast_layers
from tikd_jax.models.variables import load_model
from tikd_jax.train import checkpoint as ckpt_lib
from tikd_jax.train.plan import Phase
from tikd_jax.train.run import Run, place
from tikd_jax.train.state import TrainState
from tikd_jax.train.step import make_eval_step


def evaluate(run: Run, state: TrainState, phase: Phase) -> dict[str, float]:
  """The eval split's metrics for `state`, trained so far in `phase`.

  After a text-fusing phase with `tikd.eval_text='predicted'` (caption-free TIKD) the fused pass
  is what counts, and the first pass alone is reported beside it as `*_no_text`.
  """
  eval_text = run.config.tikd.eval_text
  fused = phase.fuse_text and eval_text == 'predicted'
  metrics = evaluate_source(_eval_step(run, fused), state.params, state.batch_stats, run.data.eval,
                            batch_size=run.config.eval_batch_size, data_sharding=run.data_sharding)
  if fused:
    plain = evaluate_source(_eval_step(run, False), state.params, state.batch_stats, run.data.eval,
                            batch_size=run.config.eval_batch_size, data_sharding=run.data_sharding)
    metrics.update({f'{k}_no_text': v for k, v in plain.items() if k != 'count'})
  return metrics


def _eval_step(run: Run, fuse_text: bool):
  key = ('eval', fuse_text)
  if key not in run.compiled_steps:
    run.compiled_steps[key] = jax.jit(
        make_eval_step(graphdef=run.student.graphdef, eval_text=run.config.tikd.eval_text,
                       fuse_text=fuse_text), compiler_options=run.compiler_options)
  return run.compiled_steps[key]


def evaluate_source(eval_step, params, batch_stats, source, *, batch_size, data_sharding,
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
  return {
      'top1': 100.0 * float(sums['top1_sum']) / n, 'top5': 100.0 * float(sums['top5_sum']) / n,
      'loss': float(sums['loss_sum']) / n, 'count': int(n)
  }


def format_eval(m: dict) -> str:
  return f"* Acc@1 {m['top1']:.3f} Acc@5 {m['top5']:.3f} loss {m['loss']:.3f}"


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates the newest checkpoint in `workdir` on the eval split (no training state needed)."""
  mesh = sharding_lib.make_mesh(config.mesh)
  eval_source = build_source(config.data, config.data.eval_split)
  meta, flat = ckpt_lib.load_weights(workdir)
  if 'model' not in meta:
    raise ValueError(f'{workdir}: checkpoint metadata names no model; was it written by tikd-jax?')
  kwargs = dict(meta['model']['kwargs'],
                fast_layers=cpu_fast_layers.enabled(config.cpu_fast_layers))
  graphdef, loaded = load_model(meta['model']['name'], kwargs, flat,
                                what=f'checkpoint in {workdir}')
  variables = {'params': {'student': loaded['params']}, 'batch_stats': loaded['batch_stats']}
  rules = [tuple(r) for r in config.sharding_rules]
  variables = place(variables, sharding_lib.param_shardings(variables, mesh, rules))
  fuse = bool(meta['model']['kwargs'].get('text_dim')) and config.tikd.eval_text == 'predicted'
  eval_step = jax.jit(
      make_eval_step(graphdef=graphdef, eval_text=config.tikd.eval_text, fuse_text=fuse),
      compiler_options=xla_options.compiler_options(config.xla_options))
  result = evaluate_source(eval_step, variables['params'], variables['batch_stats'], eval_source,
                           batch_size=config.eval_batch_size,
                           data_sharding=sharding_lib.batch_sharding(mesh))
  return dict(result, step=meta.get('step'), num_params=meta.get('num_params'))
