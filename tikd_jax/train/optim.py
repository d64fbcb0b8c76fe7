"""Optimizers, learning-rate schedules and weight-decay masks from `config.optimizer` / `config.schedule`."""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import optax

from tikd_jax.losses.registry import no_decay_patterns
from tikd_jax.tree import flatten

ANNEAL_STRATEGIES = ('cos', 'linear')


@dataclasses.dataclass(frozen=True)
class OneCycle:
  """torch.optim.lr_scheduler.OneCycleLR as a per-step schedule: `self(step)` is the learning
  rate and `self.momentum(step)` the momentum (AdamW's b1, SGD's momentum) of optimizer step
  `step` = 0 … total_steps - 1, i.e. torch's values after `step` calls of `scheduler.step()`.

  Two phases (three with `three_phase`) end at steps pct_start·T - 1 and T - 1 (torch's
  `_schedule_phases`; T = total_steps). Each anneals from its start to its end value over
  pct = (step - previous end) / (end - previous end), by `anneal_strategy`:
    cos:    end + (start - end) / 2 · (cos(π·pct) + 1)
    linear: start + (end - start) · pct
  lr runs max_lr/div_factor → max_lr → max_lr/div_factor/final_div_factor, the momentum the other
  way, max_momentum → base_momentum → max_momentum. Steps past T - 1 hold the last value (torch
  refuses them). tests/test_onecycle.py checks every step against torch.
  """
  max_lr: float
  total_steps: int
  pct_start: float = 0.3
  anneal_strategy: str = 'cos'
  div_factor: float = 25.0
  final_div_factor: float = 1e4
  three_phase: bool = False
  cycle_momentum: bool = True
  base_momentum: float = 0.85
  max_momentum: float = 0.95

  def __post_init__(self):
    if int(self.total_steps) != self.total_steps or self.total_steps <= 0:
      raise ValueError(f'onecycle needs a positive number of steps, got {self.total_steps}')
    if not 0.0 <= self.pct_start <= 1.0:
      raise ValueError(f'schedule.pct_start must be in [0, 1], got {self.pct_start}')
    if self.anneal_strategy not in ANNEAL_STRATEGIES:
      raise ValueError(f'schedule.anneal_strategy must be one of {ANNEAL_STRATEGIES}, got '
                       f'{self.anneal_strategy!r}')
    if self.pct_start * self.total_steps == 1.0:
      raise ValueError(f'onecycle: pct_start {self.pct_start} × {self.total_steps} steps = 1 '
                       'leaves the warm-up phase no length (torch divides by zero): change '
                       'pct_start or the number of steps')

  def _phases(self) -> list[tuple[float, tuple[float, float], tuple[float, float]]]:
    """(end step, (start lr, end lr), (start momentum, end momentum)) per phase."""
    initial_lr = self.max_lr / self.div_factor
    min_lr = initial_lr / self.final_div_factor
    hi, lo = self.max_momentum, self.base_momentum
    warmup_end = float(self.pct_start * self.total_steps) - 1
    if self.three_phase:
      return [(warmup_end, (initial_lr, self.max_lr), (hi, lo)),
              (float(2 * self.pct_start * self.total_steps) - 2, (self.max_lr, initial_lr), (lo,
                                                                                             hi)),
              (self.total_steps - 1, (initial_lr, min_lr), (hi, hi))]
    return [(warmup_end, (initial_lr, self.max_lr), (hi, lo)),
            (self.total_steps - 1, (self.max_lr, min_lr), (lo, hi))]

  def _anneal(self, start: float, end: float, pct):
    if self.anneal_strategy == 'cos':
      return end + (start - end) / 2.0 * (jnp.cos(math.pi * pct) + 1)
    return (end - start) * pct + start

  def _value(self, step, which: int):
    # Float math in the default float width (float64 under jax_enable_x64, as torch's Python floats).
    step = jnp.minimum(jnp.asarray(step).astype(jnp.result_type(float)), self.total_steps - 1)
    phases = self._phases()
    starts = [0.0] + [end for end, _, _ in phases[:-1]]
    values = [
        self._anneal(*phase[which], (step - start) / (phase[0] - start))
        for phase, start in zip(phases, starts)
    ]
    # torch takes the first phase whose end is not before the step, else the last one.
    value = values[-1]
    for (end, _, _), phase_value in zip(phases[-2::-1], values[-2::-1]):
      value = jnp.where(step <= end, phase_value, value)
    return value

  def __call__(self, step):
    return self._value(step, 1)

  def momentum(self, step):
    return self._value(step, 2)


def make_schedule(cfg, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Per-step learning rate.

  cosine:    linear warm-up from `warmup_lr` over `warmup_epochs`, then cosine to `min_lr` (timm's
             CosineLRScheduler with DeiT's defaults, evaluated per step instead of per epoch).
  multistep: `lr` multiplied by `decay_factor` at each epoch of `decay_epochs` (RepDistiller).
  constant:  `lr` throughout (IRKD).
  onecycle:  torch's OneCycleLR with max_lr `lr` over the run's `total_steps` (`OneCycle`); with
             `cycle_momentum` it also carries the momentum schedule `make_optimizer` applies.
  """
  lr = cfg.lr
  if cfg.name == 'constant':
    return optax.constant_schedule(lr)
  if cfg.name == 'multistep':
    boundaries = {int(e * steps_per_epoch): cfg.decay_factor for e in cfg.decay_epochs}
    return optax.piecewise_constant_schedule(lr, boundaries)
  if cfg.name == 'cosine':
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    decay_steps = max(1, total_steps - warmup)
    cosine = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.min_lr / lr if lr else 0.0)
    if warmup == 0:
      return cosine
    ramp = optax.linear_schedule(cfg.warmup_lr, lr, warmup)
    return optax.join_schedules([ramp, cosine], [warmup])
  if cfg.name == 'onecycle':
    return OneCycle(max_lr=lr, total_steps=int(total_steps), pct_start=float(cfg.pct_start),
                    anneal_strategy=cfg.anneal_strategy, div_factor=float(cfg.div_factor),
                    final_div_factor=float(cfg.final_div_factor), three_phase=bool(cfg.three_phase),
                    cycle_momentum=bool(cfg.cycle_momentum), base_momentum=float(cfg.base_momentum),
                    max_momentum=float(cfg.max_momentum))
  raise ValueError(
      f"unknown schedule {cfg.name!r}; use 'cosine', 'multistep', 'constant' or 'onecycle'")


def decay_mask(params, exclude: tuple[str, ...]):
  """True where weight decay applies. A leaf is excluded when its path matches any regex of
  `exclude` (e.g. biases, norm scales, position embedding, cls/dist tokens)."""
  patterns = [re.compile(p) for p in exclude]
  names = list(flatten(params).keys())
  leaves, treedef = jax.tree.flatten(params)
  flags = [not any(p.search(n) for p in patterns) for n in names]
  assert len(flags) == len(leaves)
  return jax.tree.unflatten(treedef, flags)


def weight_decay_mask(cfg, params):
  """True where weight decay applies: not on the model's names in `cfg.wd_exclude`, nor on the
  loss terms' parameters that their registration exempts (`register(..., no_decay=...)`)."""
  return decay_mask(params, tuple(cfg.wd_exclude) + no_decay_patterns())


def make_optimizer(cfg, schedule: optax.Schedule, params) -> optax.GradientTransformation:
  """adamw (decoupled decay, DeiT) or sgd (PyTorch-style coupled decay, RepDistiller).

  A `OneCycle` schedule with `cycle_momentum` also sets the momentum every step, as torch's
  OneCycleLR rewrites AdamW's beta1 (SGD's momentum) in place of `cfg.b1` (`cfg.momentum`):
  `optax.inject_hyperparams` evaluates it at the update count, and Adam's bias correction
  1 - b1^t then uses the current b1, as torch's AdamW does.
  """
  mask = weight_decay_mask(cfg, params)
  momentum = (schedule.momentum
              if isinstance(schedule, OneCycle) and schedule.cycle_momentum else None)
  if cfg.name == 'adamw':
    if momentum is None:
      tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=mask)
    else:
      adamw = optax.inject_hyperparams(optax.adamw, static_args=('mask',))
      tx = adamw(learning_rate=schedule, b1=momentum, b2=cfg.b2, eps=cfg.eps,
                 weight_decay=cfg.weight_decay, mask=mask)
  elif cfg.name == 'sgd':
    # torch.optim.SGD adds wd·p to the gradient before momentum.
    if momentum is None:
      sgd = optax.sgd(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov)
    else:
      sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=momentum,
                                                nesterov=cfg.nesterov)
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=mask), sgd)
  else:
    raise ValueError(f"unknown optimizer {cfg.name!r}; use 'adamw' or 'sgd'")
  if cfg.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx


def frozen_mask(params, frozen: tuple[str, ...]):
  """True for leaves whose path matches a regex of `frozen` (their updates are zeroed)."""
  patterns = [re.compile(p) for p in frozen]
  names = list(flatten(params).keys())
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [any(p.search(n) for p in patterns) for n in names])
