"""Curriculum Temperature for Knowledge Distillation (Li et al., AAAI 2023), zhengli97/CTKD.

A single learnable scalar ``raw_temperature`` (CTKD ``Global_T.global_T``,
``nn.Parameter(torch.ones(1))``) goes through a gradient-reversal layer and a sigmoid:

    T = t_start + t_range · sigmoid(GRL_λ(raw))      (CTKD helper/loops.py:
    ``temp = opt.t_start + opt.t_end * torch.sigmoid(temp)``, t_start 1, t_end 20)

so gradient descent on the total loss moves the student to *decrease* KD and the temperature to
*increase* it (λ-scaled). λ ramps from 0 to 1 over the first 10 epochs (``ctkd_lambda``).

As a `distill.method`: (1 − α)·CE + α·KD at the learned T (CTKD: 0.1·CE + 0.9·KD, set by
distill.base_weight / distill_weight), λ's ramp over `distill.ctkd_ramp_epochs`. The temperature
is the term's parameter `objective/ctkd/raw_temperature`, trained with the student and never
weight-decayed (CTKD trains it in its own parameter group without decay).
"""

import math

import jax
import jax.numpy as jnp

from tikd_jax.losses.kd import kd_loss
from tikd_jax.losses.registry import Context, alpha_weighted, register, teacher_logits


@jax.custom_vjp
def gradient_reversal(x: jax.Array, strength) -> jax.Array:
  """Gradient-reversal layer (Ganin & Lempitsky 2015): identity forward, backward × (−strength).

    CTKD models/temp_global.py ``GradientReversalFunction``: ``forward: x.clone()``,
    ``backward: dx = lambda_ * grads`` where CTKD passes ``lambda_`` = its cosine value in
    [−1, 0]; here ``strength`` = −lambda_ ≥ 0 and the minus sign lives in the layer.
    ``strength`` is an ordinary (traceable) argument and receives a zero cotangent.
    """
  return x


def _gradient_reversal_fwd(x, strength):
  return x, strength


def _gradient_reversal_bwd(strength, cotangent):
  reversed_cotangent = (-strength * cotangent).astype(cotangent.dtype)
  return reversed_cotangent, jnp.zeros_like(strength)


gradient_reversal.defvjp(_gradient_reversal_fwd, _gradient_reversal_bwd)


def ctkd_init_raw_temperature() -> jax.Array:
  """Initial raw temperature: a float32 scalar 1.0 (CTKD ``nn.Parameter(torch.ones(1))``).

    At init T = 1 + 20·sigmoid(1) ≈ 15.62.
    """
  return jnp.ones((), jnp.float32)


def ctkd_temperature(raw_temperature, strength, t_start: float = 1.0, t_range: float = 20.0):
  """T = t_start + t_range · sigmoid(gradient_reversal(raw_temperature, strength)).

    CTKD helper/loops.py: ``temp = mlp_net(logit_t, logit_s, cos_value)`` (= GRL(global_T))
    then ``temp = opt.t_start + opt.t_end * torch.sigmoid(temp)``; defaults t_start 1, t_end 20
    (scripts/run_cifar_distill.sh), so T ∈ (1, 21).
    """
  raw_temperature = jnp.asarray(raw_temperature, jnp.float32)
  strength = jnp.asarray(strength, jnp.float32)
  return t_start + t_range * jax.nn.sigmoid(gradient_reversal(raw_temperature, strength))


def ctkd_lambda(epoch, ramp_epochs: int = 10, lambda_max: float = 1.0, lambda_min: float = 0.0):
  """Gradient-reversal strength λ(epoch): cosine ramp from lambda_min to lambda_max.

        i = clip(epoch, 0, ramp_epochs)
        λ = lambda_min + (lambda_max − lambda_min) · (1 − cos(π · i / ramp_epochs)) / 2

    CTKD train_student.py ``CosineDecay.get_value(i)``: clamps i to [0, num_loops], then
    ``value = (math.cos(i * math.pi / self._num_loops) + 1.0) * 0.5``,
    ``value = value * (self._max_value - self._min_value) + self._min_value``, run with
    ``--decay_max 0 --decay_min -1 --decay_loops 10`` (scripts/run_cifar_distill.sh) and passed
    as the GRL's ``lambda_`` (backward ``dx = lambda_ * grads``). That value goes 0 → −1; our
    λ = −value goes 0 → 1 with the reversal sign inside ``gradient_reversal``. CTKD evaluates it
    once per epoch with its 1-based epoch counter (``for epoch in range(1, opt.epochs + 1)``):
    λ(1) = 0.0245, λ(5) = 0.5, λ(≥10) = 1. Returns a float32 scalar.
    """
  i = jnp.clip(jnp.asarray(epoch, jnp.float32), 0.0, float(ramp_epochs))
  ramp = (1.0 - jnp.cos(i * math.pi / ramp_epochs)) * 0.5
  return lambda_min + (lambda_max - lambda_min) * ramp


def ctkd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    raw_temperature,
    strength,
    t_start: float = 1.0,
    t_range: float = 20.0,
) -> jax.Array:
  """KD at the learned temperature: kd_loss(s, t, ctkd_temperature(raw, strength)).

        L = T² / B · Σ KL(softmax(z_t/T) ‖ softmax(z_s/T)),  T = t_start + t_range·σ(GRL(raw))

    CTKD helper/loops.py ``loss_div = criterion_div(logit_s, logit_t, temp)`` with ``DistillKL``
    (batchmean KL × T·T). The gradient w.r.t. ``raw_temperature`` is −strength × the plain KD
    gradient, so a descent step on the total loss increases KD w.r.t. the temperature while the
    student logits' gradient is untouched. The caller weights it (CTKD: 0.1·CE + 0.9·KD).
    """
  temperature = ctkd_temperature(raw_temperature, strength, t_start=t_start, t_range=t_range)
  return kd_loss(student_logits, teacher_logits, temperature)


def _ctkd_init(rng, shapes, **settings):
  del rng, shapes, settings
  return {'raw_temperature': ctkd_init_raw_temperature()}, {}


def _ctkd_settings(config):
  return {'ramp_epochs': config.distill.ctkd_ramp_epochs}


@register('ctkd', init=_ctkd_init, needs_teacher=True, method=alpha_weighted,
          settings=_ctkd_settings, no_decay=('raw_temperature',))
def ctkd(ctx: Context, ramp_epochs: int = 10):
  """CTKD (Li et al. 2023): KD at a learned temperature, raised by gradient reversal with the
  cosine λ ramp over `ramp_epochs` (CTKD helper/loops.py, models/temp_global.py)."""
  strength = ctkd_lambda(ctx.epoch, ramp_epochs=ramp_epochs)
  raw = ctx.params['raw_temperature']
  loss = ctkd_loss(ctx.distill_logits, teacher_logits(ctx, 'ctkd'), raw, strength)
  return loss, {
      'distill_loss': loss, 'ctkd_temperature': ctkd_temperature(jax.lax.stop_gradient(raw), 0.0),
      'ctkd_lambda': jnp.asarray(strength, jnp.float32)
  }
