"""Every training signal is a loss term: one registry, one signature (README "Add a method").

A term is a pure function `term(ctx, **settings) → (loss, metrics)`; a term with carried state
returns `(loss, metrics, new_state)`. `ctx` (a `Context`) holds the student's and the frozen
teacher's named outputs, the targets, the epoch and step, the modules, and the term's own
parameters (`ctx.params`, trained with the student) and carried state (`ctx.state`). A term that
owns either registers `init(rng, shapes) → (params, state)`; `shapes` has 'rows' (one
micro-batch), 'num_classes', and the eval_shape of the student's and teacher's outputs
('student_out', 'teacher_out'). A phase trains a `Loss`: Σ weight · term over its (term, weight)
list. The terms below are thin adapters of the tested pure losses of this package.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from tikd_jax.losses.classification import cross_entropy, one_hot_smoothed
from tikd_jax.losses.ctkd import (ctkd_init_raw_temperature, ctkd_lambda, ctkd_loss,
                                  ctkd_temperature)
from tikd_jax.losses.dkd import dkd_loss, dkd_warmup_factor
from tikd_jax.losses.kd import hard_distillation_loss, kd_loss, soft_distillation_loss
from tikd_jax.losses.pkcd import pkcd_init_state, pkcd_loss
from tikd_jax.losses.saliency import attention_saliency_loss, gradient_saliency_loss


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
  init: Callable[[jax.Array, dict], tuple[Any, Any]] | None = None
  needs_teacher: bool = False


TERMS: dict[str, Term] = {}


def register(name: str, *, init=None, needs_teacher: bool = False):
  """Decorator: `@register('fitnet', init=fitnet_init, needs_teacher=True)` on `term(ctx, **kw)`."""

  def wrap(fn):
    old = TERMS.get(name)
    if old is not None and (old.fn.__module__, old.fn.__qualname__) != (fn.__module__,
                                                                        fn.__qualname__):
      raise ValueError(f'loss term {name!r} is already registered by {old.fn.__module__}.'
                       f'{old.fn.__qualname__}; pick another name')
    TERMS[name] = Term(name, fn, init, needs_teacher)
    return fn

  return wrap


def get_term(name: str) -> Term:
  if name not in TERMS:
    raise ValueError(f'unknown loss term {name!r}; known terms: {sorted(TERMS)} (register one '
                     f'with tikd_jax.losses.terms.register, README "Add a method")')
  return TERMS[name]


def _rng_for(rng, name):
  return jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)


class Loss:
  """Σ weight · term over a (term, weight) list, with each term's settings: one phase's loss.

  Parameters and state are dicts keyed by term name (terms without any have no entry); a phase
  may train a sub-list of the run's terms, the others' entries pass through unchanged.
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
      term = TERMS[name]
      result = term.fn(
          dataclasses.replace(ctx, params=params.get(name, {}), state=state.get(name, {})),
          **self.settings[name])
      if len(result) == 3:
        new_state[name] = result[2]
      metrics.update(result[1])
      total = weight * result[0] if total is None else total + weight * result[0]
    return total, metrics, new_state


def _teacher_logits(ctx, name):
  if ctx.teacher_logits is None:
    raise ValueError(f'loss term {name!r} needs a teacher: set config.teacher.checkpoint')
  return ctx.teacher_logits


# ----------------------------------------------------------------------------- labels
CE_TARGETS = ('soft', 'argmax')
LABELS = ('true', 'argmax_target')


def _label(ctx: Context, label: str, name: str) -> jax.Array:
  """The [B] int label a label-reading term uses: the example's own ('true'), or the argmax of
  the smoothed / mixed target ('argmax_target': JSJ515-Group/TIKD losses.py `DistillationLoss.
  forward`, `original_labels = labels.argmax(dim=1)` on the 2-D mixed target). Both argmaxes
  take the first of tied classes."""
  if label == 'true':
    return ctx.labels
  if label == 'argmax_target':
    return jnp.argmax(ctx.targets, axis=-1).astype(ctx.labels.dtype)
  raise ValueError(f'loss term {name!r}: label={label!r}; use one of {LABELS} '
                   f"(config.distill.base='deit' | 'released' sets it)")


# ----------------------------------------------------------------------------- classification
@register('ce')
def ce(ctx: Context, target: str = 'soft'):
  """Cross-entropy of the class head. target='soft': against the smoothed / mixed targets
  (DeiT's base loss); 'argmax': against their argmax, unsmoothed (JSJ515-Group/TIKD main.py's
  `torch.nn.CrossEntropyLoss()` base criterion, applied in losses.py to the argmax label)."""
  if target not in CE_TARGETS:
    raise ValueError(f"loss term 'ce': target={target!r}; use one of {CE_TARGETS} "
                     f"(config.distill.base='deit' | 'released' sets it)")
  y = ctx.targets if target == 'soft' else _label(ctx, 'argmax_target', 'ce')
  loss = cross_entropy(ctx.out['cls_logits'], y)
  return loss, {'base_loss': loss}


# ----------------------------------------------------------------------------- distillation
@register('soft', needs_teacher=True)
def soft(ctx: Context, temperature: float = 1.0):
  """DeiT soft distillation (losses.py `DistillationLoss`, 'soft')."""
  loss = soft_distillation_loss(ctx.distill_logits, _teacher_logits(ctx, 'soft'), temperature)
  return loss, {'distill_loss': loss}


@register('hard', needs_teacher=True)
def hard(ctx: Context, label_smoothing: float = 0.0):
  """DeiT hard distillation: CE against the teacher's argmax (losses.py, 'hard'). The code
  smooths nothing; `label_smoothing` > 0 smooths the teacher's label as DeiT's paper (§5.1)
  suggests."""
  return _hard_label_loss(ctx.distill_logits, _teacher_logits(ctx, 'hard'), label_smoothing)


@register('hard_oracle')
def hard_oracle(ctx: Context, label_smoothing: float = 0.0):
  """`hard` with the data's own label (the argmax of the smoothed / mixed target) in place of
  the teacher's: the two-head mechanism without teacher knowledge, the control for `hard`."""
  return _hard_label_loss(ctx.distill_logits, ctx.targets, label_smoothing)


def _hard_label_loss(logits, label_logits, label_smoothing: float):
  if not label_smoothing:
    loss = hard_distillation_loss(logits, label_logits)
  else:
    labels = jnp.argmax(jax.lax.stop_gradient(label_logits), axis=-1)
    loss = cross_entropy(logits, one_hot_smoothed(labels, logits.shape[-1], label_smoothing))
  return loss, {'distill_loss': loss}


@register('kd', needs_teacher=True)
def kd(ctx: Context, temperature: float = 4.0):
  """Hinton et al. 2015 KD at temperature T (RepDistiller DistillKL)."""
  loss = kd_loss(ctx.distill_logits, _teacher_logits(ctx, 'kd'), temperature)
  return loss, {'distill_loss': loss}


def _ctkd_init(rng, shapes, **settings):
  del rng, shapes, settings
  return {'raw_temperature': ctkd_init_raw_temperature()}, {}


@register('ctkd', init=_ctkd_init, needs_teacher=True)
def ctkd(ctx: Context, ramp_epochs: int = 10):
  """CTKD (Li et al. 2023): KD at a learned temperature, raised by gradient reversal with the
  cosine λ ramp over `ramp_epochs` (CTKD helper/loops.py, models/temp_global.py)."""
  strength = ctkd_lambda(ctx.epoch, ramp_epochs=ramp_epochs)
  raw = ctx.params['raw_temperature']
  loss = ctkd_loss(ctx.distill_logits, _teacher_logits(ctx, 'ctkd'), raw, strength)
  return loss, {
      'distill_loss': loss, 'ctkd_temperature': ctkd_temperature(jax.lax.stop_gradient(raw), 0.0),
      'ctkd_lambda': jnp.asarray(strength, jnp.float32)
  }


@register('dkd', needs_teacher=True)
def dkd(ctx: Context, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
        warmup_epochs: int = 20, label: str = 'true'):
  """mdistiller DKD: min(epoch / warmup, 1) · (α·TCKD + β·NCKD); the metric is unwarmed. The
  target class is `label` ('true' | 'argmax_target', see `_label`)."""
  loss = dkd_loss(ctx.distill_logits, _teacher_logits(ctx, 'dkd'), _label(ctx, label, 'dkd'),
                  alpha=alpha, beta=beta, temperature=temperature)
  warm = dkd_warmup_factor(ctx.epoch, warmup_epochs)
  return warm * loss, {'distill_loss': loss, 'dkd_warmup': warm}


def _pkcd_init(rng, shapes, **settings):
  del rng, settings
  return {}, pkcd_init_state(shapes['rows'], shapes['num_classes'])


@register('pkcd', init=_pkcd_init, needs_teacher=True)
def pkcd(ctx: Context, temperature: float = 4.0, label: str = 'true'):
  """PKCD as released with TIKD: KD_soft + InfoNCE + intra-class over the previous batch, whose
  teacher logits and labels are the carried state (one micro-batch under accumulation). The
  positives' label is `label` ('true' | 'argmax_target', see `_label`), also what is carried."""
  parts, new_state = pkcd_loss(ctx.distill_logits, _teacher_logits(ctx, 'pkcd'),
                               _label(ctx, label, 'pkcd'), ctx.state, temperature=temperature)
  metrics = {'distill_loss': parts['total']}
  metrics.update({f'pkcd_{k}': v for k, v in parts.items() if k != 'total'})
  return parts['total'], metrics, new_state


# ----------------------------------------------------------------------------- TIKD
@register('tikd_alignment')
def tikd_alignment(ctx: Context):
  """TIKD's alignment loss mean(1 − c), c the clipped token–text cosines of the fused pass."""
  if 'text_weights' not in ctx.out:
    raise ValueError("loss term 'tikd_alignment' needs the fused TIKD pass: use it in a stage "
                     "with fuse_text=True on a model built with text_dim")
  loss = jnp.mean(1.0 - ctx.out['text_weights'])
  return loss, {'alignment_loss': loss}


@register('text_predictor')
def text_predictor(ctx: Context):
  """TIKD's text predictor: mean(1 − cos(text_pred, caption feature))."""
  if ctx.text is None or 'text_pred' not in ctx.out:
    raise ValueError("loss term 'text_predictor' needs caption features "
                     "(config.text.features_dir) and a model built with text_dim")
  pred, target = ctx.out['text_pred'], ctx.text.astype(jnp.float32)
  pred = pred / jnp.maximum(jnp.linalg.norm(pred, axis=-1, keepdims=True), 1e-8)
  target = target / jnp.maximum(jnp.linalg.norm(target, axis=-1, keepdims=True), 1e-8)
  loss = jnp.mean(1.0 - jnp.sum(pred * target, axis=-1))
  return loss, {'text_predictor_loss': loss}


@register('tikd_self_distill')
def tikd_self_distill(ctx: Context, temperature: float = 1.0):
  """Text-guided self-distillation (ours, for caption-free inference): the fused pass, which saw
  the caption, teaches the first pass, which needs none. KD (fused → first, T²-scaled) on the
  logits eval uses, the mean of the heads; no gradient into the fused side."""
  if 'first_cls_logits' not in ctx.out:
    raise ValueError("loss term 'tikd_self_distill' needs the fused TIKD pass: use it in a stage "
                     "with fuse_text=True on a model built with text_dim")
  loss = kd_loss(_mean_of_heads(ctx.out, 'first_'), _mean_of_heads(ctx.out, ''), temperature)
  return loss, {'self_distill_loss': loss}


def _mean_of_heads(out: Mapping[str, jax.Array], prefix: str) -> jax.Array:
  heads = [out[f'{prefix}{h}_logits'] for h in ('cls', 'dist') if f'{prefix}{h}_logits' in out]
  return sum(heads) / len(heads)


# ----------------------------------------------------------------------------- IRKD saliency
def _parse_layers(spec):
  if spec in ('', 'all', None):
    return spec or None
  if isinstance(spec, str):
    return tuple(int(i) for i in spec.split(','))
  return tuple(spec)


def _saliency_models(ctx, name):
  if ctx.teacher is None or not hasattr(ctx.teacher, 'num_prefix'):
    raise ValueError(f'loss term {name!r} needs a ViT teacher (attention maps, patch tokens)')
  return dict(student_prefix=ctx.student.num_prefix, teacher_prefix=ctx.teacher.num_prefix)


@register('attention_saliency', needs_teacher=True)
def attention_saliency(ctx: Context, layers='', resize_to: str = 'teacher'):
  """IRKD's attention saliency alignment (README "IRKD"), averaged over layer pairs."""
  loss = attention_saliency_loss(ctx.out, ctx.teacher_out, layers=_parse_layers(layers) or 'all',
                                 resize_to=resize_to, **_saliency_models(ctx, 'attention_saliency'))
  return loss, {'saliency_loss': loss}


@register('gradient_saliency', needs_teacher=True)
def gradient_saliency(ctx: Context, layers='', resize_to: str = 'teacher'):
  """IRKD's gradient saliency alignment (README "IRKD"), summed over layer pairs."""
  layers, models = _parse_layers(layers), _saliency_models(ctx, 'gradient_saliency')
  loss = gradient_saliency_loss(ctx.out, ctx.teacher_out, student_classifier=ctx.student.head,
                                teacher_classifier=ctx.teacher.head, resize_to=resize_to,
                                **({'layers': layers} if layers else {}), **models)
  return loss, {'saliency_loss': loss}
