"""Config → each phase's (term, weight) list and the terms' settings (README "Add a method").

`config.loss` lists the terms, e.g. `(('ce', 0.5), ('hard', 0.5), ('tikd_alignment', 0.1))`,
and a stage may override it (`loss=...`). Left empty, `config.distill.method` is a shorthand
with the weights of README "Distillation methods" (α = distill.alpha):
  none                 ce
  soft|hard|kd|ctkd|hard_oracle  base_weight·ce + distill_weight·method  (default 1 − α, α)
  dkd                  base_weight·ce + dkd    (base_weight default 1; the warm-up is in dkd)
  pkcd                 base_weight·ce + pkcd   (base_weight default 1)
plus TIKD's alignment_beta·tikd_alignment in stages that fuse text, text_predictor_weight·
text_predictor when the run has caption features, and saliency.weight·<kind>_saliency (IRKD).
Settings: the built-in terms take theirs from config.distill and config.saliency;
`config.loss_settings.<term>` adds to or overrides them. `distill.base` picks the reading of the
targets: 'deit' (ce against the smoothed / mixed targets, dkd / pkcd on the true label) or
'released' (the released TIKD code: ce against their argmax, unsmoothed, and that argmax as the
dkd / pkcd label; README "The released recipe").
"""
from __future__ import annotations

from typing import Any

# hard_oracle: hard with the data's own label as the teacher (a control, README "The demo").
DISTILL_METHODS = ('none', 'soft', 'hard', 'hard_oracle', 'kd', 'ctkd', 'dkd', 'pkcd')
SALIENCY_KINDS = ('none', 'attention', 'gradient')
# distill.base → the settings of the terms that read the targets or the label.
BASES = {
    'deit': dict(target='soft', label='true'),
    'released': dict(target='argmax', label='argmax_target'),
}


def method_terms(distill) -> tuple[tuple[str, float], ...]:
  """The (term, weight) list of `distill.method` (the config's `distill` block)."""
  method = distill.method
  if method not in DISTILL_METHODS:
    raise ValueError(f'unknown distillation method {method!r}; known: {list(DISTILL_METHODS)} '
                     f'(or list loss terms in config.loss)')
  if method == 'none':
    return (('ce', 1.0),)
  bw = distill.base_weight
  if method in ('dkd', 'pkcd'):
    return (('ce', 1.0 if bw is None else float(bw)), (method, 1.0))
  alpha, dw = distill.alpha, distill.distill_weight
  return (('ce', float(1.0 - alpha if bw is None else bw)), (method,
                                                             float(alpha if dw is None else dw)))


def saliency_terms(saliency) -> tuple[tuple[str, float], ...]:
  kind = saliency.kind
  if kind not in SALIENCY_KINDS:
    raise ValueError(f"saliency must be 'none', 'attention' or 'gradient', got {kind!r}")
  return () if kind == 'none' else ((f'{kind}_saliency', float(saliency.weight)),)


def tikd_terms(*, fuse_text: bool, alignment_beta: float, text_predictor_weight: float,
               has_text: bool, self_distill_weight: float = 0.0) -> tuple[tuple[str, float], ...]:
  terms = []
  if fuse_text and alignment_beta:
    terms.append(('tikd_alignment', float(alignment_beta)))
  if fuse_text and self_distill_weight:
    terms.append(('tikd_self_distill', float(self_distill_weight)))
  if has_text and text_predictor_weight:
    terms.append(('text_predictor', float(text_predictor_weight)))
  return tuple(terms)


def distill_settings(distill) -> dict[str, dict[str, Any]]:
  """The built-in distillation terms' settings from a `distill` block."""
  if distill.base not in BASES:
    raise ValueError(f'config.distill.base={distill.base!r}; use one of {sorted(BASES)}')
  base = BASES[distill.base]
  return {
      'ce': {'target': base['target']},
      'soft': {'temperature': distill.temperature},
      'kd': {'temperature': distill.temperature},
      'ctkd': {'ramp_epochs': distill.ctkd_ramp_epochs},
      'dkd': {
          'alpha': distill.dkd_alpha, 'beta': distill.dkd_beta, 'temperature': distill.temperature,
          'warmup_epochs': distill.dkd_warmup_epochs, 'label': base['label']
      },
      'pkcd': {'temperature': distill.temperature, 'label': base['label']},
  }


def term_settings(config) -> dict[str, dict[str, Any]]:
  """Every term's settings: from distill / saliency, then config.loss_settings.<term>."""
  settings = distill_settings(config.distill)
  saliency = config.saliency
  for kind in ('attention', 'gradient'):
    settings[f'{kind}_saliency'] = {'layers': saliency.layers, 'resize_to': saliency.resize_to}
  for name, kw in config.loss_settings.items():
    settings.setdefault(name, {}).update(dict(kw))
  return settings


def stage_terms(config, stage: dict, *, fuse_text: bool, alignment_beta: float,
                text_predictor_weight: float) -> tuple[tuple[str, float], ...]:
  """One stage's (term, weight) list: its `loss`, else config.loss, else the shorthand."""
  explicit = stage.get('loss') or config.loss  # a stage's keys are optional (plan._STAGE_KEYS)
  if explicit:
    return tuple((str(name), float(weight)) for name, weight in explicit)
  return (method_terms(config.distill) + tikd_terms(
      fuse_text=fuse_text, alignment_beta=alignment_beta,
      text_predictor_weight=text_predictor_weight, has_text=bool(config.text.features_dir),
      self_distill_weight=config.tikd.self_distill_weight) + saliency_terms(config.saliency))


def method_loss(distill, extra: tuple[tuple[str, float], ...] = ()):
  """The `Loss` of `distill.method` (plus `extra` terms), settings from the `distill` block."""
  from tikd_jax.losses.terms import Loss  # pylint: disable=g-import-not-at-top
  return Loss(method_terms(distill) + tuple(extra), distill_settings(distill))
