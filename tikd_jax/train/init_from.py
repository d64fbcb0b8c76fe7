"""Start a run from other weights (`config.init_from`): fine-tuning, as DeiT's `--finetune`.

The student's parameters and BatchNorm statistics come from a workdir, checkpoint folder or
converted checkpoint (`python -m convert.from_torch`); the optimizer state starts fresh. A
position embedding of another grid is resampled bicubically to the model's (DeiT main.py
`--finetune` interpolates it the same way); keys matching a regex of `config.init_exclude` keep
their fresh initialisation, as Hugging Face's `ignore_mismatched_sizes` re-initialises the
layers that do not fit (README "Fine-tuning from a checkpoint").
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tikd_jax.models.vit import resize_pos_embed
from tikd_jax.train import checkpoint as ckpt_lib
from tikd_jax.train.ema import init_ema
from tikd_jax.train.run import Run
from tikd_jax.train.state import TrainState
from tikd_jax.tree import CheckpointMismatchError, fill_template, flatten


def init_from(run: Run, state: TrainState) -> tuple[TrainState, str]:
  """The fresh `state` with the student's variables from `spec.init_from`, and a report."""
  path = run.spec.init_from
  _, loaded = ckpt_lib.load_weights(path)
  exclude = [re.compile(p) for p in run.spec.init_exclude]
  template = {'params': state.params['student'], 'batch_stats': state.batch_stats}
  fresh = flatten(template)
  merged, problems, resampled, kept = {}, [], [], []
  for key, value in fresh.items():
    if any(p.search(key) for p in exclude):
      merged[key] = value
      kept.append(key)
    elif key not in loaded:
      problems.append(f'{key}: not in the checkpoint')
    elif tuple(loaded[key].shape) == tuple(value.shape):
      merged[key] = loaded[key]
    elif key.endswith('pos_embed') and _regriddable(run, loaded[key], value):
      merged[key] = _regrid(run, loaded[key], value)
      resampled.append(key)
    else:
      problems.append(f'{key}: checkpoint {tuple(loaded[key].shape)}, model {tuple(value.shape)}')
  if problems:
    raise CheckpointMismatchError(
        f'config.init_from={path!r} does not fit model {run.student.name} '
        f'{run.student.kwargs.get("variant", "")}:\n  ' + '\n  '.join(problems) +
        '\nRe-initialise what should not be loaded with --config.init_exclude="(\'regex\',)" '
        "(e.g. \"('^params/head',)\" for a new classifier).")
  tree = fill_template(template, merged, f'config.init_from={path!r}')
  # A model EMA starts from the loaded weights (timm's ModelEma is built after --finetune).
  state = state.replace(params=dict(state.params, student=tree['params']),
                        batch_stats=tree['batch_stats'], ema=init_ema(tree) if state.ema else {})
  unused = sorted(set(loaded) - set(fresh))
  report = (f'initialised from {path}: {len(fresh) - len(kept)} of {len(fresh)} arrays loaded' +
            (f'; position embedding resampled: {resampled}' if resampled else '') +
            (f'; fresh (init_exclude): {kept}' if kept else '') +
            (f'; not used from the checkpoint: {unused}' if unused else ''))
  return jax.device_put(state, run.state_shardings), report


def _prefix_tokens(run: Run, model_pos_embed) -> int:
  """Position-embedding rows before the patch grid (cls, and dist where it has one)."""
  model = nnx.eval_shape(lambda: run.student.build(0))
  return model_pos_embed.shape[1] - model.grid**2


def _regriddable(run: Run, loaded, model_pos_embed) -> bool:
  prefix = _prefix_tokens(run, model_pos_embed)
  patches = loaded.shape[1] - prefix
  return (loaded.ndim == 3 and loaded.shape[2] == model_pos_embed.shape[2] and patches > 0
          and math.isqrt(patches)**2 == patches)


def _regrid(run: Run, loaded, model_pos_embed):
  prefix = _prefix_tokens(run, model_pos_embed)
  grid = math.isqrt(model_pos_embed.shape[1] - prefix)
  resized = resize_pos_embed(jnp.asarray(loaded, jnp.float32), (grid, grid), num_prefix=prefix)
  return np.asarray(resized, dtype=np.asarray(loaded).dtype)
