"""Model EMA (`config.ema.decay`; DeiT / TIKD main.py `--model-ema`): an exponential moving
average of the student's weights, kept in the train state and evaluated beside them.

timm's ModelEma / ModelEmaV2 (what DeiT's and TIKD's main.py use): the average starts as a copy of
the model when training starts (after `--finetune` weights are loaded: here after
`config.init_from`), and after every optimizer step every entry of the model's state dict,
parameters and BatchNorm buffers alike, becomes

    ema ← decay · ema + (1 − decay) · model

with the same decay from the first step on (no warm-up: that is ModelEmaV3's option). The
student's parameters and BatchNorm statistics are averaged; the loss terms' own parameters (CTKD's
temperature) are not part of the model and are not. DeiT never evaluates its EMA during training
(it only saves it); timm's train.py evaluates it beside the raw weights after every epoch, as we
do (metrics `ema_top1`, `ema_loss`, …).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def check_decay(decay: float) -> float:
  """`decay` as a float in [0, 1) (0: no EMA), or a ValueError saying where it came from."""
  decay = float(decay)
  if not 0.0 <= decay < 1.0:
    raise ValueError(f'config.ema.decay={decay}: use 0 (no model EMA) or a decay in (0, 1), '
                     'e.g. 0.99996 (DeiT / TIKD main.py)')
  return decay


def init_ema(variables: dict) -> dict:
  """The average at the start: a copy of the student's {'params', 'batch_stats'}.

  A copy, in buffers of its own: the train step donates the state, and a buffer shared by the
  weights and the EMA would be donated twice (XLA:CPU crashes on it)."""
  return jax.tree.map(jnp.copy,
                      {'params': variables['params'], 'batch_stats': variables['batch_stats']})


def update_ema(ema: dict, variables: dict, decay: float) -> dict:
  """One update after an optimizer step: decay · ema + (1 − decay) · variables, leaf by leaf
  (timm ModelEmaV2.update), in each leaf's dtype."""
  model = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  return jax.tree.map(lambda e, v: (decay * e + (1.0 - decay) * v).astype(e.dtype), ema, model)
