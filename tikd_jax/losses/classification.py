"""Classification: cross-entropy, timm-style smoothed one-hot, top-k hits, and the `ce` term.

The functions are pure JAX, take float logits ``[B, C]`` (cast to float32) and are jit-able.
`ce` is every method's base loss; `distill.method='none'` trains it alone.
"""

import jax
import jax.numpy as jnp

from tikd_jax.losses.registry import Context, base_of, label_of, register, register_method


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean cross-entropy over the batch, for hard or soft targets.

    Hard targets (int labels ``[B]``):   CE = mean_b [ -log_softmax(z_b)[y_b] ]
    Soft targets (``[B, C]`` rows summing to 1, e.g. mixup / label smoothing):
                                          CE = mean_b [ -sum_c q_bc · log_softmax(z_b)_c ]

    The hard form is ``torch.nn.functional.cross_entropy(logits, labels)``; the soft form is
    timm's ``SoftTargetCrossEntropy`` (timm/loss/cross_entropy.py:
    ``torch.sum(-target * F.log_softmax(x, dim=-1), dim=-1).mean()``). Which form is used is
    decided from the static rank of ``targets``.
    """
  logits = jnp.asarray(logits, jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  targets = jnp.asarray(targets)
  if targets.ndim == logits.ndim:
    targets = jnp.asarray(targets, jnp.float32)
    return jnp.mean(-jnp.sum(targets * log_probs, axis=-1))
  if targets.ndim != logits.ndim - 1:
    raise ValueError(f"cross_entropy: targets have shape {targets.shape} but logits have shape "
                     f"{logits.shape}; pass int labels [B] or soft targets [B, C].")
  picked = jnp.take_along_axis(log_probs, targets.astype(jnp.int32)[..., None], axis=-1)
  return -jnp.mean(picked)


def one_hot_smoothed(labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
  """timm-style smoothed one-hot targets ``[B, C]`` (float32).

    off = s / C,  on = 1 − s + s / C   (timm/data/mixup.py ``mixup_target``:
    ``off_value = smoothing / num_classes; on_value = 1. - smoothing + off_value``).
    Each row sums to 1.
    """
  off_value = label_smoothing / num_classes
  on_value = 1.0 - label_smoothing + off_value
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return one_hot * (on_value - off_value) + off_value


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Per-example top-k hit, float32 ``[B]`` (1.0 if the label is among the k largest logits).

    Same as the per-example part of timm's ``accuracy`` (``output.topk(k)`` then ``eq(target)``);
    ``jnp.mean`` of it is the top-k accuracy, ``jnp.sum`` the number of hits.
    """
  _, top_indices = jax.lax.top_k(jnp.asarray(logits, jnp.float32), k)
  hits = jnp.any(top_indices == labels.astype(top_indices.dtype)[:, None], axis=-1)
  return hits.astype(jnp.float32)


# ----------------------------------------------------------------------------- the term
CE_TARGETS = ('soft', 'argmax')


def _ce_settings(config):
  return {'target': base_of(config.distill)['target']}


@register('ce', settings=_ce_settings)
def ce(ctx: Context, target: str = 'soft'):
  """Cross-entropy of the class head. target='soft': against the smoothed / mixed targets
  (DeiT's base loss); 'argmax': against their argmax, unsmoothed (JSJ515-Group/TIKD main.py's
  `torch.nn.CrossEntropyLoss()` base criterion, applied in losses.py to the argmax label)."""
  if target not in CE_TARGETS:
    raise ValueError(f"loss term 'ce': target={target!r}; use one of {CE_TARGETS} "
                     f"(config.distill.base='deit' | 'released' sets it)")
  y = ctx.targets if target == 'soft' else label_of(ctx, 'argmax_target', 'ce')
  loss = cross_entropy(ctx.out['cls_logits'], y)
  return loss, {'base_loss': loss}


register_method('none', lambda distill: (('ce', 1.0),))
