"""Optimizers, learning-rate schedules and weight-decay masks from `config.optimizer` / `config.schedule`."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from tikd_jax.tree import flatten


def make_schedule(cfg, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Per-step learning rate.

  cosine:    linear warm-up from `warmup_lr` over `warmup_epochs`, then cosine to `min_lr` (timm's
             CosineLRScheduler with DeiT's defaults, evaluated per step instead of per epoch).
  multistep: `lr` multiplied by `decay_factor` at each epoch of `decay_epochs` (RepDistiller).
  constant:  `lr` throughout (IRKD).
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
  raise ValueError(f"unknown schedule {cfg.name!r}; use 'cosine', 'multistep' or 'constant'")


def decay_mask(params, exclude: tuple[str, ...]):
  """True where weight decay applies. A leaf is excluded when its path matches any regex of
  `exclude` (e.g. biases, norm scales, position embedding, cls/dist tokens)."""
  patterns = [re.compile(p) for p in exclude]
  names = list(flatten(params).keys())
  leaves, treedef = jax.tree.flatten(params)
  flags = [not any(p.search(n) for p in patterns) for n in names]
  assert len(flags) == len(leaves)
  return jax.tree.unflatten(treedef, flags)


def make_optimizer(cfg, schedule: optax.Schedule, params) -> optax.GradientTransformation:
  """adamw (decoupled decay, DeiT) or sgd (PyTorch-style coupled decay, RepDistiller)."""
  mask = decay_mask(params, tuple(cfg.wd_exclude))
  if cfg.name == 'adamw':
    tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                     mask=mask)
  elif cfg.name == 'sgd':
    # torch.optim.SGD adds wd·p to the gradient before momentum.
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=mask),
                     optax.sgd(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov))
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


def zero_frozen(updates, mask):
  return jax.tree.map(lambda u, m: jnp.zeros_like(u) if m else u, updates, mask)
