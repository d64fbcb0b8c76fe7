"""Distillation methods as plug-ins: how the student's outputs and the teacher's logits become a loss.

`config.distill.method` picks one of OBJECTIVES. Each objective may own trainable parameters
(CTKD's temperature, optimised with the student) and carried state (PKCD's previous batch), both
part of the checkpointed train state. Weights (REFERENCE §4):
  none                 base
  soft|hard|kd|ctkd    base_weight·base + distill_weight·distill   (default 1 − α, α; α = 0.5)
  dkd                  base_weight·base + min(epoch/warmup, 1)·(α_dkd·TCKD + β_dkd·NCKD)
  pkcd                 base_weight·base + KD_soft + InfoNCE + intra-class
`base` is the cross-entropy of the class head against the (smoothed / mixed) targets; the
distillation term uses the distillation head when the student has one (DeiT), else the class head.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from tikd_jax import losses


@dataclasses.dataclass(frozen=True)
class LossInputs:
  out: dict[str, jax.Array]          # the student's named outputs
  teacher_logits: jax.Array | None   # [B, C], already stop-gradient
  targets: jax.Array                 # [B, C] soft targets for the base loss
  labels: jax.Array                  # [B] int hard labels
  epoch: jax.Array                   # 1-based epoch (float), for warm-ups and ramps

  @property
  def class_logits(self):
    return self.out['cls_logits']

  @property
  def distill_logits(self):
    return self.out.get('dist_logits', self.out['cls_logits'])


class Objective:
  name = 'none'
  needs_teacher = False

  def __init__(self, cfg):
    self.cfg = cfg
    alpha = cfg.get('alpha', 0.5)
    bw, dw = cfg.get('base_weight'), cfg.get('distill_weight')
    self.base_weight = float(1.0 - alpha if bw is None else bw)
    self.distill_weight = float(alpha if dw is None else dw)

  def init_params(self) -> dict:
    return {}

  def init_state(self, batch_size: int, num_classes: int) -> dict:
    """Carried state for batches of `batch_size` rows: the micro-batch, batch / grad_accum_steps."""
    del batch_size, num_classes
    return {}

  def base(self, x: LossInputs) -> jax.Array:
    return losses.cross_entropy(x.class_logits, x.targets)

  def __call__(self, x: LossInputs, params: dict, state: dict):
    """→ (total loss, metrics, new state)."""
    del params
    base = self.base(x)
    return base, {'base_loss': base}, state


class _WeightedDistill(Objective):
  needs_teacher = True

  def distill(self, x: LossInputs, params: dict) -> jax.Array:
    raise NotImplementedError

  def __call__(self, x, params, state):
    base, distill = self.base(x), self.distill(x, params)
    total = self.base_weight * base + self.distill_weight * distill
    return total, {'base_loss': base, 'distill_loss': distill}, state


class NoDistillation(Objective):
  """Cross-entropy only: the student alone (no teacher is run)."""

  def __init__(self, cfg):
    super().__init__(cfg)
    self.base_weight = 1.0


class SoftDistillation(_WeightedDistill):
  name = 'soft'

  def distill(self, x, params):
    return losses.soft_distillation_loss(x.distill_logits, x.teacher_logits,
                                         self.cfg.temperature)


class HardDistillation(_WeightedDistill):
  name = 'hard'

  def distill(self, x, params):
    return losses.hard_distillation_loss(x.distill_logits, x.teacher_logits)


class KnowledgeDistillation(_WeightedDistill):
  name = 'kd'

  def distill(self, x, params):
    return losses.kd_loss(x.distill_logits, x.teacher_logits, self.cfg.temperature)


class CurriculumTemperatureKD(_WeightedDistill):
  """CTKD: the temperature is a trained parameter, pushed *up* the KD loss by gradient reversal."""
  name = 'ctkd'

  def init_params(self):
    return {'ctkd_raw_temperature': losses.ctkd_init_raw_temperature()}

  def strength(self, epoch):
    return losses.ctkd_lambda(epoch, ramp_epochs=self.cfg.ctkd_ramp_epochs)

  def distill(self, x, params):
    return losses.ctkd_loss(x.distill_logits, x.teacher_logits, params['ctkd_raw_temperature'],
                            self.strength(x.epoch))

  def __call__(self, x, params, state):
    total, metrics, state = super().__call__(x, params, state)
    metrics['ctkd_temperature'] = losses.ctkd_temperature(
        jax.lax.stop_gradient(params['ctkd_raw_temperature']), 0.0)
    metrics['ctkd_lambda'] = jnp.asarray(self.strength(x.epoch), jnp.float32)
    return total, metrics, state


class DecoupledKD(Objective):
  name = 'dkd'
  needs_teacher = True

  def __init__(self, cfg):
    super().__init__(cfg)
    bw = cfg.get('base_weight')
    self.base_weight = 1.0 if bw is None else float(bw)

  def __call__(self, x, params, state):
    base = self.base(x)
    dkd = losses.dkd_loss(x.distill_logits, x.teacher_logits, x.labels,
                          alpha=self.cfg.dkd_alpha, beta=self.cfg.dkd_beta,
                          temperature=self.cfg.temperature)
    warm = losses.dkd_warmup_factor(x.epoch, self.cfg.dkd_warmup_epochs)
    total = self.base_weight * base + warm * dkd
    return total, {'base_loss': base, 'distill_loss': dkd, 'dkd_warmup': warm}, state


class PearsonKD(Objective):
  """PKCD as released with TIKD; the previous batch's teacher logits are explicit state.

  Under gradient accumulation each micro-batch is a PKCD batch (as accumulating in the released
  PyTorch code would make it): its InfoNCE and intra-class terms run over the micro-batch, and
  its "previous batch" is the micro-batch before it, so the state holds one micro-batch.
  """
  name = 'pkcd'
  needs_teacher = True

  def __init__(self, cfg):
    super().__init__(cfg)
    bw = cfg.get('base_weight')
    self.base_weight = 1.0 if bw is None else float(bw)

  def init_state(self, batch_size, num_classes):
    return losses.pkcd_init_state(batch_size, num_classes)

  def __call__(self, x, params, state):
    base = self.base(x)
    terms, new_state = losses.pkcd_loss(x.distill_logits, x.teacher_logits, x.labels, state,
                                        temperature=self.cfg.temperature)
    total = self.base_weight * base + terms['total']
    metrics = {'base_loss': base, 'distill_loss': terms['total']}
    metrics.update({f'pkcd_{k}': v for k, v in terms.items() if k != 'total'})
    return total, metrics, new_state


OBJECTIVES: dict[str, type[Objective]] = {
    'none': NoDistillation,
    'soft': SoftDistillation,
    'hard': HardDistillation,
    'kd': KnowledgeDistillation,
    'ctkd': CurriculumTemperatureKD,
    'dkd': DecoupledKD,
    'pkcd': PearsonKD,
}


def build_objective(cfg) -> Objective:
  if cfg.method not in OBJECTIVES:
    raise ValueError(f'unknown distillation method {cfg.method!r}; known: {sorted(OBJECTIVES)}')
  return OBJECTIVES[cfg.method](cfg)


def tree_any_nonfinite(tree: Any) -> jax.Array:
  leaves = [jnp.any(~jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.any(jnp.stack(leaves)) if leaves else jnp.asarray(False)
