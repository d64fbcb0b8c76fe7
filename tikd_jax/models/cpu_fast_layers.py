"""XLA:CPU speed tricks for the ViT's token-wise layers, behind `config.cpu_fast_layers`.

Same math, parameters and names as `nnx.Linear` / `nnx.LayerNorm` / the p×p patch `nnx.Conv`;
only the lowering differs:
  * dense and LayerNorm have hand-written VJPs: the weight gradient is one x[M, in]ᵀ·dy[M, out]
    product and the bias / scale gradients are sums over the M = B·N rows, computed as a product
    with a ones vector. Autodiff of the plain layers leaves XLA:CPU a transposed copy of every
    activation gradient and 2-D reduce-windows over (B, N), which together cost more than the
    matmuls at these widths (one [8448, 1024] bias gradient: 32 ms → ~7 ms; benchmarks/README.md).
  * the patch embedding is non-overlapping patches @ kernel instead of an XLA:CPU convolution.
  * the attention core (softmax(q·kᵀ·scale)·v) has a hand-written VJP: the scale is applied to q
    (not to the [B, H, N, N] scores, one pass over them fewer), and the softmax gradient uses
    FlashAttention's identity Σ_m P·dP = Σ_d dO·O, a sum over head_dim instead of a second pass
    over the scores (XLA:CPU lowers that row sum to a padded reduce-window).
  * exact GELU has a hand-written VJP: the forward is one pass (autodiff stores erf(x/√2) as a
    second [M, mlp_dim] array) and the backward recomputes erf and the Gaussian density.
On GPU/TPU the plain layers are what the compiler expects, so 'auto' turns these on only on CPU.
Results differ from autodiff of the plain layers by float32 rounding (tests/test_models.py).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.custom_derivatives import SymbolicZero

SETTINGS = ('auto', 'on', 'off')


def enabled(setting: str, backend: str | None = None) -> bool:
  """Whether `config.cpu_fast_layers` turns the fast layers on for `backend` (default: JAX's)."""
  if setting not in SETTINGS:
    raise ValueError(f'config.cpu_fast_layers={setting!r}: use one of {SETTINGS}')
  if setting == 'auto':
    return (backend or jax.default_backend()) == 'cpu'
  return setting == 'on'


def _rows(x: jax.Array) -> jax.Array:
  return x.reshape(-1, x.shape[-1])


def _sum_rows(x: jax.Array) -> jax.Array:
  """Σ over every row of a [..., n] array, as the product ones[M] · x[M, n] accumulated in
  float32. XLA:CPU lowers a column sum over M = B·N rows to a strided 2-D reduce-window that ran
  at ~1 GB/s here; the product streams the rows once."""
  rows = _rows(x)
  ones = jnp.ones((rows.shape[0],), rows.dtype)
  return lax.dot_general(ones, rows, (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32).astype(x.dtype)


@jax.custom_vjp
def _dense_fn(x, kernel, bias):
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))) + bias


def _dense_fwd(x, kernel, bias):
  return _dense_fn(x, kernel, bias), (x, kernel)


def _dense_bwd(res, dy):
  x, kernel = res
  dx = lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
  dkernel = lax.dot_general(_rows(x), _rows(dy), (((0,), (0,)), ((), ())))
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype), _sum_rows(dy).astype(kernel.dtype)


_dense_fn.defvjp(_dense_fwd, _dense_bwd)


def dense(layer: nnx.Linear, x: jax.Array) -> jax.Array:
  """`layer(x)` for an `nnx.Linear` with bias: x @ kernel + bias, with the fast VJP."""
  if layer.bias is None or layer.precision is not None or layer.preferred_element_type is not None:
    return layer(x)
  x, kernel, bias = layer.promote_dtype((x, layer.kernel[...], layer.bias[...]), dtype=layer.dtype)
  return _dense_fn(x, kernel, bias)


def _ln_stats(x, epsilon):
  mu = jnp.mean(x, axis=-1)
  var = jnp.maximum(0.0, jnp.mean(x * x, axis=-1) - mu * mu)  # flax's fast variance, clipped at 0
  return mu, lax.rsqrt(var + epsilon)


@jax.custom_vjp
def _layer_norm_fn(x, scale, bias, epsilon):
  mu, r = _ln_stats(x, epsilon)
  return (x - mu[..., None]) * (r[..., None] * scale) + bias


def _layer_norm_fwd(x, scale, bias, epsilon):
  mu, r = _ln_stats(x, epsilon)
  x_hat = (x - mu[..., None]) * r[..., None]
  return (x - mu[..., None]) * (r[..., None] * scale) + bias, (x_hat, r, scale)


def _layer_norm_bwd(res, dy):
  x_hat, r, scale = res
  g = dy * scale
  mean_g = jnp.mean(g, axis=-1, keepdims=True)
  mean_gx = jnp.mean(g * x_hat, axis=-1, keepdims=True)
  dx = (g - mean_g - x_hat * mean_gx) * r[..., None]
  return dx, _sum_rows(dy * x_hat), _sum_rows(dy), None


_layer_norm_fn.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm(norm: nnx.LayerNorm, x: jax.Array) -> jax.Array:
  """`norm(x)` for an `nnx.LayerNorm` over the last axis with scale and bias (same formula)."""
  if (norm.scale is None or norm.bias is None or norm.reduction_axes not in (-1, (-1,))
      or norm.feature_axes not in (-1, (-1,)) or norm.axis_name is not None
      or not norm.use_fast_variance):
    return norm(x)
  x, scale, bias = norm.promote_dtype((x, norm.scale[...], norm.bias[...]), dtype=norm.dtype)
  if x.dtype != jnp.float32:  # flax computes the statistics in at least float32
    return norm(x)
  return _layer_norm_fn(x, scale, bias, norm.epsilon)


def patch_embed(conv: nnx.Conv, x: jax.Array, patch: int) -> jax.Array:
  """`conv(x)` for a p×p, stride-p, VALID conv, as non-overlapping patches @ kernel.

  Each output is the same sum over (row, column, channel) of one patch; a matmul instead of an
  XLA:CPU convolution (several times faster here, forward and backward).
  """
  p = patch
  if (conv.kernel_size != (p, p) or conv.strides not in (p, (p, p)) or conv.bias is None
      or conv.padding != 'VALID' or conv.feature_group_count != 1 or conv.mask is not None
      or conv.kernel_dilation not in (1, (1, 1)) or conv.input_dilation not in (1, (1, 1))):
    return conv(x)
  b, h, w, c = x.shape
  gh, gw = h // p, w // p
  x, kernel, bias = conv.promote_dtype((x, conv.kernel[...], conv.bias[...]), dtype=conv.dtype)
  patches = x[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
  return _dense_fn(patches.reshape(b, gh, gw, p * p * c), kernel.reshape(p * p * c, -1), bias)


def _batched(a, b, a_contract: int, b_contract: int):
  """a·b over the two leading (batch, head) axes, contracting a's and b's given axes."""
  return lax.dot_general(a, b, (((a_contract,), (b_contract,)), ((0, 1), (0, 1))))


def _attention_forward(q, k, v, scale):
  scores = _batched(q * jnp.asarray(scale, q.dtype), k, 3, 3)  # [B, H, N, M]
  e = jnp.exp(scores - lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
  attn = e / jnp.sum(e, axis=-1, keepdims=True)
  return _batched(attn, v, 3, 2), attn


@jax.custom_vjp
def _attention_fn(q, k, v, scale):
  return _attention_forward(q, k, v, scale)


def _attention_fwd(q, k, v, scale):  # symbolic_zeros: arguments arrive as CustomVJPPrimal
  q, k, v, scale = q.value, k.value, v.value, scale.value
  out, attn = _attention_forward(q, k, v, scale)
  return (out, attn), (q, k, v, out, attn, scale)


def _t_product(a, b):
  """aᵀ·b per (batch, head), contracting the token axis of both [B, H, N, ·] operands, computed
  as (bᵀ·a)ᵀ so that the transposed operand is the head_dim-wide one, not the [N, N] one."""
  return jnp.swapaxes(_batched(b, a, 2, 2), -1, -2)


def _attention_bwd(res, cotangents):
  q, k, v, out, attn, scale = res
  d_out, d_attn = cotangents
  out_zero, attn_zero = isinstance(d_out, SymbolicZero), isinstance(d_attn, SymbolicZero)
  if out_zero and attn_zero:
    return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v), None
  if out_zero:
    dp, dv = d_attn, jnp.zeros_like(v)
  else:
    dp = _batched(d_out, v, 3, 3)  # dO·vᵀ [B, H, N, M]
    dv = _t_product(attn, d_out)  # Pᵀ·dO
    if not attn_zero:
      dp = dp + d_attn
  if attn_zero:  # Σ_m P·dP = Σ_m P·(dO·vᵀ) = Σ_d dO·O: a sum over head_dim, not over the scores
    row = jnp.sum(d_out * out, axis=-1, keepdims=True)
  else:
    row = jnp.sum(attn * dp, axis=-1, keepdims=True)
  d_scores = attn * (dp - row)
  s = jnp.asarray(scale, q.dtype)
  return _batched(d_scores, k, 3, 2) * s, _t_product(d_scores, q) * s, dv, None


_attention_fn.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float):
  """(softmax(q·kᵀ·scale)·v, the softmax) for heads-major q, k, v [B, H, N, head_dim].

  Same values as the plain `matmul(q, kᵀ)·scale → softmax → matmul(·, v)` to float32 rounding;
  other dtypes take the plain path (which keeps the softmax in float32).
  """
  if not q.dtype == k.dtype == v.dtype == jnp.float32:
    scores = jnp.matmul(q, jnp.swapaxes(k, -1, -2)) * scale
    attn = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    return jnp.matmul(attn, v), attn
  return _attention_fn(q, k, v, float(scale))


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_vjp
def gelu_exact(x: jax.Array) -> jax.Array:
  """x·Φ(x) = x/2·(1 + erf(x/√2)), PyTorch's exact GELU, with a one-pass forward."""
  return 0.5 * x * (1.0 + lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


def _gelu_fwd(x):
  return gelu_exact(x), x


def _gelu_bwd(x, dy):
  cdf = 0.5 * (1.0 + lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))
  pdf = jnp.exp(-0.5 * x * x) * jnp.asarray(_INV_SQRT_2PI, x.dtype)
  return (dy * (cdf + x * pdf),)


gelu_exact.defvjp(_gelu_fwd, _gelu_bwd)
