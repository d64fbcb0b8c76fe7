"""Config → each phase's (term, weight) list and the terms' settings, read off the registry.

A phase's loss, in this order:
  1. `config.distill.method`'s terms (`tikd_jax.losses.METHODS`: each method's file says its
     weights, e.g. (1 − α)·ce + α·kd, or ce + dkd);
  2. the terms the config adds itself (`register(..., auto_weight=...)`): TIKD's alignment and
     self-distillation in stages that fuse text, its text predictor when the run has caption
     features (losses/tikd.py), IRKD's saliency when `config.saliency.kind` is set;
  3. `config.extra_loss`, e.g. `(('my_term', 0.5),)`: your own terms, added to all of the above.
`config.loss` (or a stage's `loss`) is the explicit full list in place of 1 and 2; it must then
name the terms of 2 that the config asks for itself, else the run stops and says so.
Settings: each term's registered `settings(config)` (e.g. DKD's from `config.distill`), then
`config.loss_settings.<term>.<key>` where set (not None).
"""
from __future__ import annotations

from typing import Any

from tikd_jax.losses.registry import METHODS, TERMS, Terms


def method_terms(distill) -> Terms:
  """The (term, weight) list of `distill.method` (the config's `distill` block)."""
  method = distill.method
  if method not in METHODS:
    raise ValueError(f'unknown distillation method {method!r}; known: {list(METHODS)} '
                     f'(or list loss terms in config.loss)')
  return METHODS[method](distill)


def auto_terms(config, switches: dict[str, Any]) -> Terms:
  """The terms the config adds itself in a phase with these `switches` (fuse_text,
  alignment_beta, text_predictor_weight), in registration order."""
  terms = []
  for name, term in TERMS.items():
    if term.auto_weight is not None:
      weight = term.auto_weight(config, switches)
      if weight is not None:
        terms.append((name, float(weight)))
  return tuple(terms)


def term_settings(config) -> dict[str, dict[str, Any]]:
  """Every term's settings: its registered `settings(config)`, then config.loss_settings.<term>."""
  settings = {name: dict(t.settings(config)) for name, t in TERMS.items() if t.settings}
  for name, kw in config.loss_settings.items():
    kw = {k: v for k, v in dict(kw).items() if v is not None}
    if kw:
      settings.setdefault(name, {}).update(kw)
  return settings


def stage_terms(config, stage: dict, *, fuse_text: bool, alignment_beta: float,
                text_predictor_weight: float) -> Terms:
  """One stage's (term, weight) list: its `loss`, else config.loss, else the method and the
  terms the config adds itself; then config.extra_loss."""
  added = auto_terms(
      config,
      dict(fuse_text=fuse_text, alignment_beta=alignment_beta,
           text_predictor_weight=text_predictor_weight))
  explicit = stage.get('loss') or config.loss  # a stage's keys are optional (plan._STAGE_KEYS)
  if explicit:
    terms = tuple((str(name), float(weight)) for name, weight in explicit)
    dropped = [name for name, _ in added if name not in dict(terms)]
    if dropped:
      where = "its 'loss'" if stage.get('loss') else 'config.loss'
      raise ValueError(
          f'stage {stage.get("name", "main")!r}: {where} {[n for n, _ in terms]} replaces the '
          f'terms of distill.method, the TIKD stages and saliency, and leaves out {dropped}, '
          f'which this config adds itself here: name them in the list too, or leave config.loss '
          f'empty and add your own terms with config.extra_loss, e.g. '
          f"config.extra_loss = (('my_term', 0.5),)")
  else:
    terms = method_terms(config.distill) + added
  extra = tuple((str(name), float(weight)) for name, weight in config.extra_loss)
  twice = sorted({name for name, _ in extra} & {name for name, _ in terms})
  if twice:
    raise ValueError(f'config.extra_loss names {twice}, which the loss {terms} already has: '
                     f'change its weight where it comes from (distill.*, tikd.*, saliency.*) '
                     f'or list the whole loss in config.loss')
  return terms + extra
