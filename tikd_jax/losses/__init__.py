"""Distillation and classification losses, one file per method, and the registry of loss terms.

Each method file holds the pure loss (float32 logits [B, C], tested against the reference code)
and its registered term(s) with their defaults, weights, init and weight-decay policy:
``classification`` (CE, smoothed one-hot, top-k; the `ce` term and method 'none'), ``kd``
(Hinton KD, DeiT soft / hard, the hard_oracle control), ``ctkd`` (learned temperature through
gradient reversal), ``dkd`` (mdistiller DKD), ``pkcd`` (TIKD's released PKCD, previous batch as
explicit state), ``tikd`` (alignment, text predictor, self-distillation), ``saliency`` (IRKD).
``registry`` is the core: `Context`, `register`, `Loss`. Importing this package registers the
built-in terms; a term of your own registers itself with `tikd_jax.losses.register` (README
"Add a method").
"""

from tikd_jax.losses.registry import (METHODS, TERMS, Context, Loss, Term, added_to_ce,
                                      alpha_weighted, get_term, register, register_method)
# The method files, in the order of `METHODS` and of the terms a config adds itself.
from tikd_jax.losses.classification import cross_entropy, one_hot_smoothed, topk_correct
from tikd_jax.losses.kd import hard_distillation_loss, kd_loss, soft_distillation_loss
from tikd_jax.losses.ctkd import (
    ctkd_init_raw_temperature,
    ctkd_lambda,
    ctkd_loss,
    ctkd_temperature,
    gradient_reversal,
)
from tikd_jax.losses.dkd import dkd_loss, dkd_warmup_factor
from tikd_jax.losses.pkcd import pkcd_init_state, pkcd_loss
from tikd_jax.losses import tikd as _tikd  # noqa: F401  (registers TIKD's terms)
from tikd_jax.losses.saliency import (
    attention_saliency,
    attention_saliency_loss,
    gradient_saliency,
    gradient_saliency_loss,
    saliency_loss,
)

__all__ = [
    "Context",
    "Loss",
    "Term",
    "TERMS",
    "METHODS",
    "register",
    "register_method",
    "alpha_weighted",
    "added_to_ce",
    "get_term",
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
