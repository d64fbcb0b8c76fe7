"""PKCD as released in the TIKD code (JSJ515-Group/TIKD losses.py ``_compute_pkcd_loss``).

Three terms on the distillation logits (the trainer adds CE: TIKD ``loss = base_loss +
distillation_loss``):

  1. ``kd_soft``  DeiT soft KD: KL sum × T² / (B·C)  (= ``soft_distillation_loss``).
  2. ``cbcd``     contrastive (InfoNCE) over Pearson correlations, ``cbcd_current`` +
                  ``cbcd_previous``; weight ``pkcd_alpha``.
  3. ``intra``    1 − T² · mean_c Pearson(P_s[:, c], P_t[:, c]), P = softmax(z/T, axis=0)
                  (softmax over the BATCH axis); weight ``pkcd_beta``.

The released code keeps the previous batch's teacher logits and labels in module buffers; here
they are explicit state (``pkcd_init_state`` → ``pkcd_loss`` → new state). As released, BOTH
``cbcd`` and ``intra`` are 0 while there is no previous batch (the whole block sits under
``if self.previous_teacher_logits is not None``), so the first call is ``kd_soft`` alone.

As a `distill.method`: base_weight·CE (default 1) + PKCD at `distill.temperature`.
"""

import jax
import jax.numpy as jnp

from tikd_jax.losses.kd import soft_distillation_loss
from tikd_jax.losses.registry import (Context, added_to_ce, base_of, label_of, register,
                                      teacher_logits)


def pkcd_init_state(batch_size: int, num_classes: int) -> dict:
  """Empty previous-batch state: zeros teacher logits, labels −1, ``valid`` False."""
  return {
      "prev_teacher_logits": jnp.zeros((batch_size, num_classes), jnp.float32),
      "prev_labels": jnp.full((batch_size,), -1, jnp.int32),
      "valid": jnp.zeros((), jnp.bool_),
  }


def _safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt with value 0 and gradient 0 at x = 0 (plain sqrt has an infinite gradient there)."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _pearson_matrix(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Pearson correlation of every row of ``a`` [N, D] with every row of ``b`` [M, D] → [N, M].

        r_ij = clip( Σ_d ā_id b̄_jd / (‖ā_i‖ ‖b̄_j‖ + eps), −1, 1 ),  x̄ = x − mean_d x

    TIKD ``_compute_pearson_correlation``: ``covariance / (std1 * std2 + self.EPS)`` then
    ``torch.clamp(correlation, -1.0, 1.0)`` with ``std = sqrt(sum(centered ** 2))``. The square
    root is made gradient-safe at 0 (constant rows, e.g. the all-zero initial state); the value
    is unchanged.
    """
  a_centered = a - jnp.mean(a, axis=-1, keepdims=True)
  b_centered = b - jnp.mean(b, axis=-1, keepdims=True)
  covariance = a_centered @ b_centered.T
  a_norm = _safe_sqrt(jnp.sum(a_centered**2, axis=-1))
  b_norm = _safe_sqrt(jnp.sum(b_centered**2, axis=-1))
  correlation = covariance / (a_norm[:, None] * b_norm[None, :] + eps)
  return jnp.clip(correlation, -1.0, 1.0)


def _pearson_rows(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Row-wise Pearson correlation of ``a`` [N, D] and ``b`` [N, D] → [N] (same formula)."""
  a_centered = a - jnp.mean(a, axis=-1, keepdims=True)
  b_centered = b - jnp.mean(b, axis=-1, keepdims=True)
  covariance = jnp.sum(a_centered * b_centered, axis=-1)
  a_norm = _safe_sqrt(jnp.sum(a_centered**2, axis=-1))
  b_norm = _safe_sqrt(jnp.sum(b_centered**2, axis=-1))
  return jnp.clip(covariance / (a_norm * b_norm + eps), -1.0, 1.0)


def pkcd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    state: dict,
    temperature=4.0,
    contrastive_temperature=None,
    pkcd_alpha: float = 1.0,
    pkcd_beta: float = 1.0,
    eps: float = 1e-8,
):
  """PKCD terms for one batch → (dict of terms with ``total``, new_state).

    T = ``temperature``; τ = ``contrastive_temperature`` (released code: the same T, the
    default when None); S_ij = Pearson(z_s,i, z_t,j) over the current batch; Q_ik =
    Pearson(z_s,i, z_prev,k) over the previous batch's teacher logits; ε = ``eps`` (1e-8).

      kd_soft      = T²/(B·C) · Σ KL(softmax(z_t/T) ‖ softmax(z_s/T))
      cbcd_current = mean_i −log( e^{S_ii/τ} / (Σ_j e^{S_ij/τ} + ε) )
                     (released: positive = own teacher row, negatives = the other rows)
      cbcd_previous= mean_i [ 1/|P_i| Σ_{k∈P_i} −log( e^{Q_ik/τ} / (Σ_k' e^{Q_ik'/τ} + ε) ) ],
                     P_i = {k : prev_label_k = y_i}; 0 for rows with P_i = ∅ (still counted in
                     the mean, as the released ``L_p_list.append(torch.tensor([0.0]))``)
      intra        = 1 − T² · mean_c Pearson(softmax(z_s/T, axis=0)[:, c],
                                            softmax(z_t/T, axis=0)[:, c])
      total        = kd_soft + pkcd_alpha · (cbcd_current + cbcd_previous) + pkcd_beta · intra

    ``cbcd_*`` and ``intra`` are 0 unless ``state['valid']`` (released: they are computed only
    when the previous-batch buffers exist). Released defaults: ``self.pkcd_alpha = 1.0``,
    ``self.pkcd_beta = 1.0``, ``self.EPS = 1e-8``. ``labels`` may be int ``[B]`` or soft
    ``[B, C]`` (argmax taken, as the released ``forward`` does for mixup targets). The teacher
    gets stop_gradient. new_state = {stop_gradient(teacher logits), labels, valid=True}
    (released: ``self.previous_teacher_logits = teacher_outputs.detach().clone()``).
    """
  student_logits = jnp.asarray(student_logits, jnp.float32)
  teacher_logits = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
  labels = jnp.asarray(labels)
  if labels.ndim == 2:
    labels = jnp.argmax(labels, axis=-1)
  labels = labels.astype(jnp.int32)
  temperature = jnp.asarray(temperature, jnp.float32)
  tau = temperature if contrastive_temperature is None else jnp.asarray(
      contrastive_temperature, jnp.float32)
  prev_teacher_logits = jax.lax.stop_gradient(jnp.asarray(state["prev_teacher_logits"],
                                                          jnp.float32))
  prev_labels = state["prev_labels"].astype(jnp.int32)
  valid = jnp.asarray(state["valid"], jnp.bool_)

  kd_soft = soft_distillation_loss(student_logits, teacher_logits, temperature)

  # Current batch: positive is the own teacher row (the diagonal), negatives the others.
  sim_current = _pearson_matrix(student_logits, teacher_logits, eps) / tau  # [B, B]
  log_denominator = jnp.log(jnp.sum(jnp.exp(sim_current), axis=-1) + eps)
  cbcd_current = jnp.mean(log_denominator - jnp.diagonal(sim_current))

  # Previous batch: every previous teacher row with the same label is a positive; the
  # denominator runs over all previous rows (released: ``torch.cat([positive, negative])``).
  sim_previous = _pearson_matrix(student_logits, prev_teacher_logits, eps) / tau  # [B, B']
  log_denominator_prev = jnp.log(jnp.sum(jnp.exp(sim_previous), axis=-1) + eps)
  positive_mask = (labels[:, None] == prev_labels[None, :]).astype(jnp.float32)
  num_positives = jnp.sum(positive_mask, axis=-1)
  per_positive = log_denominator_prev[:, None] - sim_previous
  per_anchor = jnp.sum(positive_mask * per_positive, axis=-1) / jnp.maximum(num_positives, 1.0)
  cbcd_previous = jnp.mean(jnp.where(num_positives > 0, per_anchor, 0.0))

  # Intra-class term: Pearson over the batch dimension of the batch-softmax columns.
  p_student_columns = jax.nn.softmax(student_logits / temperature, axis=0)
  p_teacher_columns = jax.nn.softmax(teacher_logits / temperature, axis=0)
  column_corr = _pearson_rows(p_student_columns.T, p_teacher_columns.T, eps)  # [C]
  intra = 1.0 - temperature**2 * jnp.mean(column_corr)

  zero = jnp.zeros((), jnp.float32)
  cbcd_current = jnp.where(valid, cbcd_current, zero)
  cbcd_previous = jnp.where(valid, cbcd_previous, zero)
  intra = jnp.where(valid, intra, zero)
  cbcd = cbcd_current + cbcd_previous
  total = kd_soft + pkcd_alpha * cbcd + pkcd_beta * intra

  terms = {
      "kd_soft": kd_soft,
      "cbcd_current": cbcd_current,
      "cbcd_previous": cbcd_previous,
      "cbcd": cbcd,
      "intra": intra,
      "total": total,
  }
  new_state = {
      "prev_teacher_logits": teacher_logits,
      "prev_labels": labels,
      "valid": jnp.ones((), jnp.bool_),
  }
  return terms, new_state


def _pkcd_init(rng, shapes, **settings):
  del rng, settings
  return {}, pkcd_init_state(shapes['rows'], shapes['num_classes'])


def _pkcd_settings(config):
  return {'temperature': config.distill.temperature, 'label': base_of(config.distill)['label']}


@register('pkcd', init=_pkcd_init, needs_teacher=True, method=added_to_ce, settings=_pkcd_settings)
def pkcd(ctx: Context, temperature: float = 4.0, label: str = 'true'):
  """PKCD as released with TIKD: KD_soft + InfoNCE + intra-class over the previous batch, whose
  teacher logits and labels are the carried state (one micro-batch under accumulation). The
  positives' label is `label` ('true' | 'argmax_target', registry.label_of), also what is
  carried."""
  parts, new_state = pkcd_loss(ctx.distill_logits, teacher_logits(ctx, 'pkcd'),
                               label_of(ctx, label, 'pkcd'), ctx.state, temperature=temperature)
  metrics = {'distill_loss': parts['total']}
  metrics.update({f'pkcd_{k}': v for k, v in parts.items() if k != 'total'})
  return parts['total'], metrics, new_state
