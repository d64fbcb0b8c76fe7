"""The training state: everything a step reads and writes, as plain pytrees (the `nnx.split`
pattern), and the one function that builds a fresh one."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from tikd_jax.losses.registry import Loss
from tikd_jax.train.ema import init_ema

# The loss terms' parameters in `TrainState.params`, beside the student's. The name is the
# checkpoint layout's (the optimizer state's tree and the `extra` item carry it), kept so that
# every checkpoint written so far restores.
TERM_PARAMS = 'objective'


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: dict  # {'student': …, TERM_PARAMS: {term: its parameters}}: what the optimizer trains
  batch_stats: dict  # the student's BatchNorm statistics (empty for ViTs)
  opt_state: Any
  term_state: dict  # {term: its carried state} (PKCD's previous batch)
  # The model EMA (config.ema.decay > 0; train/ema.py): the student's {'params', 'batch_stats'}
  # averaged after every optimizer step. {} without EMA.
  ema: dict = flax.struct.field(default_factory=dict)
  # The current curriculum stage's validation record (config.curriculum.val_transform;
  # train/stage_val.py): checkpointed with the state, passed through the step unchanged. {} off.
  stage_val: dict = flax.struct.field(default_factory=dict)


def init_train_state(variables: dict, loss: Loss, tx: optax.GradientTransformation, *,
                     rng: jax.Array, shapes: dict, step: int = 0, ema: bool = False) -> TrainState:
  """A state at `step` from the student's `variables` ({'params', 'batch_stats'}): the loss
  terms' parameters and carried state from `loss.init(rng, shapes)` (`shapes['rows']` is one
  micro-batch), the optimizer state from `tx.init`, and with `ema` the model EMA starting as a
  copy of `variables`."""
  term_params, term_state = loss.init(rng, shapes)
  params = {'student': variables['params'], TERM_PARAMS: term_params}
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                    batch_stats=variables['batch_stats'], opt_state=tx.init(params),
                    term_state=term_state, ema=init_ema(variables) if ema else {})
