"""Distillation and classification losses: pure JAX functions on float32 logits [B, C].

One file per method: ``classification`` (CE, smoothed one-hot, top-k), ``kd`` (Hinton KD, DeiT
soft / hard), ``dkd`` (mdistiller DKD), ``ctkd`` (learned temperature through gradient
reversal), ``pkcd`` (TIKD's released PKCD, previous batch as explicit state).
"""

from tikd_jax.losses.classification import cross_entropy, one_hot_smoothed, topk_correct
from tikd_jax.losses.ctkd import (
    ctkd_init_raw_temperature,
    ctkd_lambda,
    ctkd_loss,
    ctkd_temperature,
    gradient_reversal,
)
from tikd_jax.losses.dkd import dkd_loss, dkd_warmup_factor
from tikd_jax.losses.kd import hard_distillation_loss, kd_loss, soft_distillation_loss
from tikd_jax.losses.pkcd import pkcd_init_state, pkcd_loss
from tikd_jax.losses.saliency import (
    attention_saliency,
    attention_saliency_loss,
    gradient_saliency,
    gradient_saliency_loss,
    saliency_loss,
)

__all__ = [
    "cross_entropy",
    "one_hot_smoothed",
    "topk_correct",
    "kd_loss",
    "soft_distillation_loss",
    "hard_distillation_loss",
    "dkd_loss",
    "dkd_warmup_factor",
    "gradient_reversal",
    "ctkd_init_raw_temperature",
    "ctkd_temperature",
    "ctkd_lambda",
    "ctkd_loss",
    "pkcd_init_state",
    "pkcd_loss",
    "attention_saliency",
    "attention_saliency_loss",
    "gradient_saliency",
    "gradient_saliency_loss",
    "saliency_loss",
]
