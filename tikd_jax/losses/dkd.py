"""Decoupled Knowledge Distillation (Zhao et al., CVPR 2022), as in megvii-research/mdistiller.

Source: mdistiller/distillers/DKD.py ``dkd_loss`` and ``DKD.forward_train``. As a
`distill.method`: base_weight·CE (default 1) + min(epoch / warm-up, 1)·(α·TCKD + β·NCKD), with
α, β, T and the warm-up from `distill.dkd_alpha`, `dkd_beta`, `temperature`,
`dkd_warmup_epochs` (mdistiller's CIFAR defaults 1, 8, 4, 20).
"""

import jax
import jax.numpy as jnp

from tikd_jax.losses.registry import (Context, added_to_ce, base_of, label_of, register,
                                      teacher_logits)


def dkd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    alpha,
    beta,
    temperature,
) -> jax.Array:
  """DKD = alpha · TCKD + beta · NCKD (no CE, no warm-up: the caller adds both).

    With p = softmax(z / T), g the ground-truth class and B the batch size:

      TCKD = T² / B · Σ_b KL([p_t(g), 1 − p_t(g)] ‖ [p_s(g), 1 − p_s(g)])
      NCKD = T² / B · Σ_b KL(softmax(z_t/T − 1000·1[g]) ‖ softmax(z_s/T − 1000·1[g]))

    mdistiller lines reproduced:
      ``pred_student = cat_mask(F.softmax(logits_student / temperature), gt_mask, other_mask)``
      ``tckd_loss = F.kl_div(torch.log(pred_student), pred_teacher, size_average=False)
                    * (temperature**2) / target.shape[0]``
      ``log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask)``
      ``nckd_loss = F.kl_div(log_pred_student_part2, pred_teacher_part2, size_average=False)
                    * (temperature**2) / target.shape[0]``
    The −1000 is subtracted AFTER dividing by T, as in the code. The binary probabilities are
    computed in log space (log p(g) from log_softmax, log(Σ_{c≠g} p(c)) as a logsumexp over the
    non-target classes), which equals mdistiller's ``torch.log(cat_mask(softmax))`` but stays
    finite for T = 0.1 and logits ±50.
    """
  student_logits = jnp.asarray(student_logits, jnp.float32)
  teacher_logits = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
  temperature = jnp.asarray(temperature, jnp.float32)
  batch_size, num_classes = student_logits.shape
  gt_mask = jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_)

  def binary_log_probs(logits):
    scaled = logits / temperature
    log_norm = jax.nn.logsumexp(scaled, axis=-1)
    log_p_gt = jnp.sum(jnp.where(gt_mask, scaled, 0.0), axis=-1) - log_norm
    log_p_other = jax.nn.logsumexp(jnp.where(gt_mask, -jnp.inf, scaled), axis=-1) - log_norm
    return jnp.stack([log_p_gt, log_p_other], axis=-1)  # [B, 2]

  log_bin_student = binary_log_probs(student_logits)
  log_bin_teacher = binary_log_probs(teacher_logits)
  tckd = jnp.sum(jnp.exp(log_bin_teacher) * (log_bin_teacher - log_bin_student))
  tckd = tckd * temperature**2 / batch_size

  mask_offset = 1000.0 * gt_mask.astype(jnp.float32)
  log_p_teacher_part2 = jax.nn.log_softmax(teacher_logits / temperature - mask_offset, axis=-1)
  log_p_student_part2 = jax.nn.log_softmax(student_logits / temperature - mask_offset, axis=-1)
  nckd = jnp.sum(jnp.exp(log_p_teacher_part2) * (log_p_teacher_part2 - log_p_student_part2))
  nckd = nckd * temperature**2 / batch_size

  return alpha * tckd + beta * nckd


def dkd_warmup_factor(epoch, warmup_epochs: int = 20) -> jax.Array:
  """DKD warm-up weight min(epoch / warmup_epochs, 1).

    From mdistiller ``DKD.forward_train``: ``min(kwargs["epoch"] / self.warmup, 1.0)``; mdistiller
    counts epochs from 1, so the first epoch has weight 1/20. Returns a float32 scalar.
    """
  return jnp.minimum(jnp.asarray(epoch, jnp.float32) / warmup_epochs, 1.0)


def _dkd_settings(config):
  distill = config.distill
  return {
      'alpha': distill.dkd_alpha, 'beta': distill.dkd_beta, 'temperature': distill.temperature,
      'warmup_epochs': distill.dkd_warmup_epochs, 'label': base_of(distill)['label']
  }


@register('dkd', needs_teacher=True, method=added_to_ce, settings=_dkd_settings)
def dkd(ctx: Context, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
        warmup_epochs: int = 20, label: str = 'true'):
  """mdistiller DKD: min(epoch / warmup, 1) · (α·TCKD + β·NCKD); the metric is unwarmed. The
  target class is `label` ('true' | 'argmax_target', registry.label_of)."""
  loss = dkd_loss(ctx.distill_logits, teacher_logits(ctx, 'dkd'), label_of(ctx, label, 'dkd'),
                  alpha=alpha, beta=beta, temperature=temperature)
  warm = dkd_warmup_factor(ctx.epoch, warmup_epochs)
  return warm * loss, {'distill_loss': loss, 'dkd_warmup': warm}
