"""The attention core softmax(q·kᵀ·scale)·v on XLA:CPU as one C++ kernel (cpu_attention.cc).

XLA:CPU runs attention's batched dots as one Eigen product per batch element on one thread, and
the softmax's row reductions through reduce-windows: one small-student block's core took ~90 ms
against ~37 ms in PyTorch eager on the same two cores (benchmarks/attention_core.py). The kernel
does each (image, head) whole while its scores sit in cache, spread over XLA's intra-op threads:
a forward and a backward XLA FFI custom call joined by a custom VJP. `cpu_fast_layers.attention`
uses it (so only under `config.cpu_fast_layers`, on by default on CPU only) for float32 q, k, v;
anything else takes the plain jnp formula.

The kernel is compiled once per machine (cpu_kernels.py); with no compiler attention falls back to
the plain formula after one warning that says what to install. Results equal the plain formula to
float32 rounding, forward and gradients (tests/test_cpu_attention.py).
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from tikd_jax.models import cpu_kernels

# the formula the kernel computes: other platforms and dtypes run it, tests check against it
from tikd_jax.models.attention import attention_core as plain

SOURCE = Path(__file__).with_suffix('.cc')
TARGETS = {
    'forward': 'TikdAttentionForward', 'backward': 'TikdAttentionBackward',
    'backward_out_only': 'TikdAttentionBackwardOutOnly'
}


def build(compiler: str | None = None) -> Path:
  """The compiled kernel library, built on first use (a few seconds) and cached."""
  return cpu_kernels.build(SOURCE, compiler)


@functools.cache
def _register() -> None:
  """Builds (or finds) and loads the kernel and registers it with XLA:CPU, once per process."""
  cpu_kernels.register(SOURCE, TARGETS.values())


@functools.cache
def available() -> bool:
  """Whether the kernel runs here; the first failure is logged once, with what to do."""
  return cpu_kernels.registers(_register, 'attention')


def _forward_call(q, k, v, scale: float):
  b, n, h, _ = q.shape
  return jax.ffi.ffi_call(
      TARGETS['forward'],
      (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(
          (b, h, n, n), q.dtype)))(q, k, v, scale=np.float32(scale))


def _backward_call(scale: float, *operands):
  """(dq, dk, dv) from q, k, v, probs, d_out and, where something reads probs, d_probs."""
  target = TARGETS['backward' if len(operands) == 6 else 'backward_out_only']
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in operands[:3])
  return jax.ffi.ffi_call(target, shapes)(*operands, scale=np.float32(scale))


@functools.cache
def _kernels(scale: float):
  """(forward, backward, backward without d_probs) for one scale, each split over images."""
  forward = cpu_kernels.split_over_images(lambda q, k, v: _forward_call(q, k, v, scale),
                                          'b n h d, b m h d, b m h d -> b n h d, b h n m')
  backward = cpu_kernels.split_over_images(
      lambda q, k, v, probs, d_out, d_probs: _backward_call(scale, q, k, v, probs, d_out, d_probs),
      'b n h d, b m h d, b m h d, b h n m, b n h d, b h n m -> b n h d, b m h d, b m h d')
  backward_out_only = cpu_kernels.split_over_images(
      lambda q, k, v, probs, d_out: _backward_call(scale, q, k, v, probs, d_out),
      'b n h d, b m h d, b m h d, b h n m, b n h d -> b n h d, b m h d, b m h d')
  return forward, backward, backward_out_only


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, scale):
  return jax.lax.platform_dependent(q, k, v, cpu=_kernels(scale)[0],
                                    default=lambda q, k, v: plain(q, k, v, scale))


def _attention_fwd(q, k, v, scale):
  q, k, v = q.value, k.value, v.value  # symbolic_zeros: primals come wrapped
  out, probs = _attention(q, k, v, scale)
  return (out, probs), (q, k, v, probs)


def _attention_bwd(scale, residuals, cotangents):
  q, k, v, probs = residuals
  d_out, d_probs = cotangents
  if isinstance(d_out, SymbolicZero):
    d_out = jnp.zeros(q.shape, q.dtype)
  operands = (q, k, v, probs, d_out)
  # The probs are usually read by nothing (a block's attention map in `out`): then the backward
  # skips adding a zero [B, H, N, N] cotangent.
  cpu = _kernels(scale)[2]
  if not isinstance(d_probs, SymbolicZero):
    operands, cpu = operands + (d_probs,), _kernels(scale)[1]

  def plain_vjp(q, k, v, probs, d_out, d_probs=None):
    del probs
    d_probs = jnp.zeros(
        (q.shape[0], q.shape[2], q.shape[1], q.shape[1]), q.dtype) if d_probs is None else d_probs
    return jax.vjp(lambda q, k, v: plain(q, k, v, scale), q, k, v)[1]((d_out, d_probs))

  return jax.lax.platform_dependent(*operands, cpu=cpu, default=plain_vjp)


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float):
  """(softmax(q·kᵀ·scale)·v, the softmax) per head: q, k, v [B, N, H, d] token-major (the qkv
  projection's layout, reshaped) → out [B, N, H, d], probs [B, H, N, N].

  The kernel for float32 operands where it is available, `plain` otherwise."""
  if (any(x.dtype != jnp.float32 for x in (q, k, v)) or q.ndim != 4
      or not q.shape == k.shape == v.shape or not available()):
    return plain(q, k, v, scale)
  return _attention(q, k, v, float(scale))
