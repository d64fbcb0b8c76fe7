"""The attention core of the ViTs, softmax(q·kᵀ·scale)·v per head, written plainly: what
vit.Attention runs on GPU/TPU and wherever `cpu_attention`'s kernel does not apply, and what that
kernel is checked against."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def attention_core(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                   drop: Callable[[jax.Array], jax.Array] | None = None):
  """(out [B, N, H, d], probs [B, H, N, N]) from token-major q, k, v [B, N, H, d].

  The softmax runs in at least float32; `drop` (attention dropout) acts on the probabilities
  before they weight v, and `probs` is what it returns (as Hugging Face returns the maps).
  """
  # heads-major [B, H, N, d] makes both products plain batched matmuls
  qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  scores = jnp.matmul(qh, jnp.swapaxes(kh, -1, -2)) * scale  # [B, H, N, N]
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
  if drop is not None:
    probs = drop(probs)
  return jnp.matmul(probs, vh).transpose(0, 2, 1, 3), probs
