"""Every training signal is a loss term: one registry, one signature (README "Add a method").

A term is a pure function `term(ctx, **settings) → (loss, metrics)`; a term that carries state
(its `init` returns some) returns `(loss, metrics, new_state)`. `ctx` (a `Context`) holds the
student's and the frozen teacher's named outputs, the targets, the epoch and step, the modules,
and the term's own parameters (`ctx.params`, trained with the student) and carried state
(`ctx.state`). A term that owns either registers `init(rng, shapes, **settings) → (params,
state)`; `shapes` has 'rows' (one micro-batch), 'num_classes', and the eval_shape of the
student's and teacher's outputs ('student_out', 'teacher_out'). A phase trains a `Loss`:
Σ weight · term over its (term, weight) list.

What a registration says besides the function (`register`):
  * `method`: the term is a distillation method; `config.distill.method=<name>` expands to
    `method(name)(distill)`, a (term, weight) list (`alpha_weighted`: DeiT's (1 − α)·ce + α·term,
    `added_to_ce`: ce + term). `METHODS` is the list the configs accept.
  * `settings`: its keyword arguments read from the config (`settings(config) → dict`), e.g.
    DKD's from `config.distill`; `config.loss_settings.<term>.<key>` overrides them.
  * `auto_weight`: a term the config adds to every phase that asks for it (TIKD's, IRKD's), as
    `auto_weight(config, stage) → weight`, or None: not in this phase (`stage` holds the
    phase's fuse_text, alignment_beta and text_predictor_weight).
  * `no_decay`: regexes of the term's own parameter names that get no weight decay.
Importing `tikd_jax.losses` registers the built-in terms, one file per method.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

Terms = tuple[tuple[str, float], ...]  # (term, weight) pairs


@dataclasses.dataclass(frozen=True)
class Context:
  """What a term may read. Teacher values are eval-mode and stop-gradient."""
  out: Mapping[str, jax.Array]  # the student's named outputs (train mode)
  labels: jax.Array  # [B] int hard labels
  targets: jax.Array  # [B, C] smoothed / mixed soft targets
  epoch: jax.Array  # 1-based epoch (float), for warm-ups and ramps
  step: jax.Array  # optimizer steps taken
  teacher_logits: jax.Array | None = None  # [B, C]
  teacher_out: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
  text: jax.Array | None = None  # [B, D] caption features, or None
  student: Any = None  # the merged student module
  teacher: Any = None  # the merged teacher module, or None
  params: Any = None  # this term's trainable parameters
  state: Any = None  # this term's carried state

  @property
  def distill_logits(self) -> jax.Array:
    """The distillation head when the student has one (DeiT), else the class head."""
    return self.out.get('dist_logits', self.out['cls_logits'])


@dataclasses.dataclass(frozen=True)
class Term:
  name: str
  fn: Callable[..., tuple]
  init: Callable[..., tuple[Any, Any]] | None = None
  needs_teacher: bool = False
  settings: Callable[[Any], dict[str, Any]] | None = None
  auto_weight: Callable[[Any, Mapping[str, Any]], float] | None = None
  no_decay: tuple[str, ...] = ()
  EMPTY = inspect.Parameter.empty  # a setting without a default

  def setting_defaults(self) -> dict[str, Any]:
    """The term's keyword arguments and their defaults (what loss_settings.<term> may set)."""
    params = list(inspect.signature(self.fn).parameters.values())[1:]
    return {p.name: p.default for p in params if p.kind == p.POSITIONAL_OR_KEYWORD}


TERMS: dict[str, Term] = {}
# distill.method name → its (term, weight) list as a function of the config's `distill` block.
METHODS: dict[str, Callable[[Any], Terms]] = {}


def register(name: str, *, init=None, needs_teacher: bool = False,
             method: Callable[[str], Callable[[Any], Terms]] | None = None, settings=None,
             auto_weight=None, no_decay: Sequence[str] = ()):
  """Decorator: `@register('fitnet', init=fitnet_init, needs_teacher=True)` on `term(ctx, **kw)`.

  `method=alpha_weighted` also makes `name` a `distill.method` (see the module docstring for
  `settings`, `auto_weight` and `no_decay`).
  """

  def wrap(fn):
    old = TERMS.get(name)
    if old is not None and (old.fn.__module__, old.fn.__qualname__) != (fn.__module__,
                                                                        fn.__qualname__):
      raise ValueError(f'loss term {name!r} is already registered by {old.fn.__module__}.'
                       f'{old.fn.__qualname__}; pick another name')
    TERMS[name] = Term(name, fn, init, needs_teacher, settings, auto_weight, tuple(no_decay))
    if method is not None:
      register_method(name, method(name))
    return fn

  return wrap


def register_method(name: str, expand: Callable[[Any], Terms]) -> None:
  """`distill.method=name` expands to `expand(config.distill)`, a (term, weight) list."""
  METHODS[name] = expand


def alpha_weighted(term: str) -> Callable[[Any], Terms]:
  """DeiT's (1 − α)·ce + α·term, α = distill.alpha; distill.base_weight / distill_weight, when
  set, replace 1 − α / α (RepDistiller's 0.1·CE + 0.9·KD)."""

  def expand(distill) -> Terms:
    alpha, bw, dw = distill.alpha, distill.base_weight, distill.distill_weight
    return (('ce', float(1.0 - alpha if bw is None else bw)), (term,
                                                               float(alpha if dw is None else dw)))

  return expand


def added_to_ce(term: str) -> Callable[[Any], Terms]:
  """base_weight·ce + term (base_weight default 1): the term carries its own weights (mdistiller
  DKD's α, β and warm-up; the released PKCD `base_loss + distillation_loss`)."""

  def expand(distill) -> Terms:
    bw = distill.base_weight
    return (('ce', 1.0 if bw is None else float(bw)), (term, 1.0))

  return expand


def get_term(name: str) -> Term:
  if name not in TERMS:
    raise ValueError(f'unknown loss term {name!r}; known terms: {sorted(TERMS)} (register one '
                     f'with tikd_jax.losses.register, README "Add a method")')
  return TERMS[name]


def no_decay_patterns() -> tuple[str, ...]:
  """Regexes of the flat parameter paths ('objective/<term>/<name>') that the registered terms
  exempt from weight decay; the optimizer adds them to the model's `optimizer.wd_exclude`."""
  return tuple(
      f'(^|/)objective/{re.escape(t.name)}/({p})($|/)' for t in TERMS.values() for p in t.no_decay)


def teacher_logits(ctx: Context, name: str) -> jax.Array:
  """The teacher's logits, or an error naming the term that needs them."""
  if ctx.teacher_logits is None:
    raise ValueError(f'loss term {name!r} needs a teacher: set config.teacher.checkpoint')
  return ctx.teacher_logits


# ----------------------------------------------------------------------------- labels
# distill.base → the settings of the terms that read the targets or the label.
BASES = {
    'deit': dict(target='soft', label='true'),
    'released': dict(target='argmax', label='argmax_target'),
}
LABELS = ('true', 'argmax_target')


def base_of(distill) -> dict[str, str]:
  if distill.base not in BASES:
    raise ValueError(f'config.distill.base={distill.base!r}; use one of {sorted(BASES)}')
  return BASES[distill.base]


def label_of(ctx: Context, which: str, name: str) -> jax.Array:
  """The [B] int label a label-reading term uses: the example's own ('true'), or the argmax of
  the smoothed / mixed target ('argmax_target': JSJ515-Group/TIKD losses.py `DistillationLoss.
  forward`, `original_labels = labels.argmax(dim=1)` on the 2-D mixed target). Both argmaxes
  take the first of tied classes."""
  if which == 'true':
    return ctx.labels
  if which == 'argmax_target':
    return jnp.argmax(ctx.targets, axis=-1).astype(ctx.labels.dtype)
  raise ValueError(f'loss term {name!r}: label={which!r}; use one of {LABELS} '
                   f"(config.distill.base='deit' | 'released' sets it)")


# ----------------------------------------------------------------------------- the loss
def _rng_for(rng, name):
  return jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)


class Loss:
  """Σ weight · term over a (term, weight) list, with each term's settings: one phase's loss.

  Parameters and state are dicts keyed by term name (terms without any have no entry); a phase
  may train a sub-list of the run's terms, the others' entries pass through unchanged. A term
  with an entry in the state returns its new state as a third value.
  """

  def __init__(self, terms: Sequence[tuple[str, float]],
               settings: Mapping[str, Mapping[str, Any]] | None = None):
    self.terms = tuple((str(name), float(weight)) for name, weight in terms)
    if not self.terms:
      raise ValueError('the loss has no terms: set config.loss, e.g. (("ce", 1.0),)')
    names = [name for name, _ in self.terms]
    if len(set(names)) != len(names):
      raise ValueError(f'loss terms {names} name a term twice; give each term one weight')
    for name in names:
      get_term(name)
    settings = settings or {}
    self.settings = {name: dict(settings.get(name, {})) for name in names}

  def __repr__(self):
    return f'Loss({self.terms})'

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self.terms)

  @property
  def needs_teacher(self) -> bool:
    return any(TERMS[name].needs_teacher for name in self.names)

  def init(self, rng: jax.Array, shapes: Mapping[str, Any]) -> tuple[dict, dict]:
    """(params, state) of the terms that own any, keyed by term name."""
    params, state = {}, {}
    for name in self.names:
      term = TERMS[name]
      if term.init is not None:
        p, s = term.init(_rng_for(rng, name), shapes, **self.settings[name])
        if p:
          params[name] = p
        if s:
          state[name] = s
    return params, state

  def __call__(self, ctx: Context, params: dict, state: dict):
    """→ (total loss, metrics, new state)."""
    total, metrics, new_state = None, {}, dict(state)
    for name, weight in self.terms:
      term_ctx = dataclasses.replace(ctx, params=params.get(name, {}), state=state.get(name, {}))
      if name in state:
        loss, term_metrics, new_state[name] = TERMS[name].fn(term_ctx, **self.settings[name])
      else:
        loss, term_metrics = TERMS[name].fn(term_ctx, **self.settings[name])
      metrics.update(term_metrics)
      total = weight * loss if total is None else total + weight * loss
    return total, metrics, new_state
