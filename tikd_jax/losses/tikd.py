"""TIKD's text terms (JSJ515-Group/TIKD losses.py, models.py; README "TIKD").

The fused pass (the model's second pass, its tokens weighted by their cosine to the caption
feature) trains with the alignment loss mean(1 − c); the text predictor learns the caption feature
from the image so that inference needs no caption; and our self-distillation term lets the first
pass learn from the fused one (caption-free inference, README "Caption-free inference").

The config adds them itself (`auto_weight`), after the method's terms, in every phase that asks:
  tikd_alignment     alignment_beta (0.1)           in stages that fuse text
  tikd_self_distill  tikd.self_distill_weight (1)   in stages that fuse text
  text_predictor     text_predictor_weight (1)      when the run has caption features
A weight of 0 leaves the term out. A stage may set its own alignment_beta / text_predictor_weight.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from tikd_jax.losses.kd import kd_loss
from tikd_jax.losses.registry import Context, register


def _alignment_weight(config, stage):
  del config
  return float(stage['alignment_beta']) if stage['fuse_text'] and stage['alignment_beta'] else None


def _self_distill_weight(config, stage):
  weight = config.tikd.self_distill_weight
  return float(weight) if stage['fuse_text'] and weight else None


def _text_predictor_weight(config, stage):
  weight = stage['text_predictor_weight']
  return float(weight) if config.text.features_dir and weight else None


@register('tikd_alignment', auto_weight=_alignment_weight)
def tikd_alignment(ctx: Context):
  """TIKD's alignment loss mean(1 − c), c the clipped token–text cosines of the fused pass."""
  if 'text_weights' not in ctx.out:
    raise ValueError("loss term 'tikd_alignment' needs the fused TIKD pass: use it in a stage "
                     "with fuse_text=True on a model built with text_dim")
  loss = jnp.mean(1.0 - ctx.out['text_weights'])
  return loss, {'alignment_loss': loss}


@register('tikd_self_distill', auto_weight=_self_distill_weight)
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


@register('text_predictor', auto_weight=_text_predictor_weight)
def text_predictor(ctx: Context):
  """TIKD's text predictor: mean(1 − cos(text_pred, caption feature))."""
  if ctx.text is None or 'text_pred' not in ctx.out:
    raise ValueError("loss term 'text_predictor' needs caption features "
                     "(config.text.features_dir) and a model built with text_dim and "
                     "text_predictor=True (a released-layout model has none: set "
                     "--config.tikd.text_predictor_weight=0)")
  pred, target = ctx.out['text_pred'], ctx.text.astype(jnp.float32)
  pred = pred / jnp.maximum(jnp.linalg.norm(pred, axis=-1, keepdims=True), 1e-8)
  target = target / jnp.maximum(jnp.linalg.norm(target, axis=-1, keepdims=True), 1e-8)
  loss = jnp.mean(1.0 - jnp.sum(pred * target, axis=-1))
  return loss, {'text_predictor_loss': loss}
