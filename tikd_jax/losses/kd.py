"""Logit distillation: Hinton KD and DeiT's soft / hard distillation, losses and terms.

The teacher logits are wrapped in ``jax.lax.stop_gradient`` everywhere (the reference code runs
the teacher under ``torch.no_grad()``); a traced temperature keeps its gradient. Each is a
`distill.method` of weight (1 − α)·ce + α·term (DeiT's, α = distill.alpha; `alpha_weighted`), at
`distill.temperature` where it has one.
"""

import jax
import jax.numpy as jnp

from tikd_jax.losses.classification import cross_entropy, one_hot_smoothed
from tikd_jax.losses.registry import Context, alpha_weighted, register, teacher_logits


def _kl_from_log_probs(log_p_teacher: jax.Array, log_p_student: jax.Array) -> jax.Array:
  """Element-wise p_t · (log p_t − log p_s), with p_t = exp(log p_t) (0 where p_t underflows).

    This is what ``F.kl_div(input=log p_s, target=p_t)`` and
    ``F.kl_div(input=log p_s, target=log p_t, log_target=True)`` compute per element; computing
    it from log-probabilities (never ``log(softmax)``) keeps it finite for T = 0.1, logits ±50.
    """
  return jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student)


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature) -> jax.Array:
  """Hinton KD: KL(p_t^T ‖ p_s^T) summed over classes, averaged over the batch, × T².

        L = T² / B · Σ_b Σ_c p_t(c) · (log p_t(c) − log p_s(c)),  p = softmax(z / T)

    From RepDistiller / CTKD ``DistillKL`` (CTKD distiller_zoo/KD.py:
    ``nn.KLDivLoss(reduction='batchmean')(F.log_softmax(y_s/T, dim=1), F.softmax(y_t/T, dim=1))
    * T * T``) and mdistiller ``kd_loss``. ``temperature`` may be a Python float or a traced
    scalar (CTKD learns it; the gradient then flows through both softmaxes and T²).
    """
  student_logits = jnp.asarray(student_logits, jnp.float32)
  teacher_logits = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
  temperature = jnp.asarray(temperature, jnp.float32)
  log_p_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  log_p_teacher = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  kl = jnp.sum(_kl_from_log_probs(log_p_teacher, log_p_student)) / student_logits.shape[0]
  return kl * temperature**2


def soft_distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                           temperature) -> jax.Array:
  """DeiT soft distillation: KL summed over ALL elements, × T², divided by B·C.

        L = T² / (B·C) · Σ_b Σ_c p_t(c) · (log p_t(c) − log p_s(c)),  p = softmax(z / T)

    From facebookresearch/deit losses.py (identical in JSJ515-Group/TIKD losses.py):
    ``F.kl_div(F.log_softmax(outputs_kd / T, dim=1), F.log_softmax(teacher_outputs / T, dim=1),
    reduction='sum', log_target=True) * (T * T) / outputs_kd.numel()``.
    Note the division by ``numel`` (B·C), not B: this is C times smaller than ``kd_loss``.
    """
  student_logits = jnp.asarray(student_logits, jnp.float32)
  teacher_logits = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
  temperature = jnp.asarray(temperature, jnp.float32)
  log_p_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  log_p_teacher = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  kl = jnp.sum(_kl_from_log_probs(log_p_teacher, log_p_student))
  return kl * temperature**2 / student_logits.size


def hard_distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """DeiT hard distillation: cross-entropy against the teacher's argmax.

        L = mean_b [ -log_softmax(z_s,b)[argmax_c z_t,b] ]

    From facebookresearch/deit losses.py (and TIKD losses.py):
    ``F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))``. The teacher gets
    ``stop_gradient`` (argmax has no gradient anyway).
    """
  student_logits = jnp.asarray(student_logits, jnp.float32)
  teacher_labels = jnp.argmax(jax.lax.stop_gradient(teacher_logits), axis=-1)
  log_probs = jax.nn.log_softmax(student_logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, teacher_labels[:, None], axis=-1)
  return -jnp.mean(picked)


# ----------------------------------------------------------------------------- terms
def _temperature(config):
  return {'temperature': config.distill.temperature}


@register('soft', needs_teacher=True, method=alpha_weighted, settings=_temperature)
def soft(ctx: Context, temperature: float = 1.0):
  """DeiT soft distillation (losses.py `DistillationLoss`, 'soft')."""
  loss = soft_distillation_loss(ctx.distill_logits, teacher_logits(ctx, 'soft'), temperature)
  return loss, {'distill_loss': loss}


@register('hard', needs_teacher=True, method=alpha_weighted)
def hard(ctx: Context, label_smoothing: float = 0.0):
  """DeiT hard distillation: CE against the teacher's argmax (losses.py, 'hard'). The code
  smooths nothing; `label_smoothing` > 0 smooths the teacher's label as DeiT's paper (§5.1)
  suggests."""
  return _hard_label_loss(ctx.distill_logits, teacher_logits(ctx, 'hard'), label_smoothing)


@register('hard_oracle', method=alpha_weighted)
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


@register('kd', needs_teacher=True, method=alpha_weighted, settings=_temperature)
def kd(ctx: Context, temperature: float = 4.0):
  """Hinton et al. 2015 KD at temperature T (RepDistiller DistillKL)."""
  loss = kd_loss(ctx.distill_logits, teacher_logits(ctx, 'kd'), temperature)
  return loss, {'distill_loss': loss}
