"""XLA:CPU speed tricks for the ViT's token-wise layers and the CIFAR ResNets' 3×3 convolutions,
behind `config.cpu_fast_layers`.

Same math, parameters and names as `nnx.Linear` / `nnx.LayerNorm` / `nnx.Conv`; only the lowering
differs:
  * dense and LayerNorm have hand-written VJPs: the weight gradient is one x[M, in]ᵀ·dy[M, out]
    product and the bias / scale gradients are sums over the M = B·N rows, computed as a product
    with a ones vector. Autodiff of the plain layers leaves XLA:CPU a transposed copy of every
    activation gradient and 2-D reduce-windows over (B, N), which together cost more than the
    matmuls at these widths (one [8448, 1024] bias gradient: 32 ms → ~7 ms; benchmarks/README.md).
  * the patch embedding is non-overlapping patches @ kernel instead of an XLA:CPU convolution.
  * the attention core softmax(q·kᵀ·scale)·v, forward and backward, is one C++ kernel per pass
    (cpu_attention.py), not XLA:CPU's one Eigen product per (image, head) and reduce-windows.
  * the CIFAR ResNets' 3×3 stride-1 convolutions (forward and input gradient) run as Winograd
    F(2×2, 3×3) in a C++ kernel (cpu_winograd.py), 2.25× fewer multiply-adds than XLA:CPU's
    direct convolution.
  * dropout masks are jax.random.bernoulli's, bit for bit, with the threefry hash unrolled.
On GPU/TPU the plain layers are what the compiler expects, so 'auto' turns these on only on CPU.
Results differ from autodiff of the plain layers by float32 rounding (tests/test_models.py).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from tikd_jax.models import cpu_winograd
from tikd_jax.models.cpu_attention import attention  # noqa: F401  (re-exported)

SETTINGS = ('auto', 'on', 'off')


def enabled(setting: str, backend: str | None = None) -> bool:
  """Whether `config.cpu_fast_layers` turns the fast layers on for `backend` (default: JAX's)."""
  if setting not in SETTINGS:
    raise ValueError(f'config.cpu_fast_layers={setting!r}: use one of {SETTINGS}')
  if setting == 'auto':
    return (backend or jax.default_backend()) == 'cpu'
  return setting == 'on'


# Threefry-2x32 (Salmon et al. 2011, 20 rounds) as jax's threefry2x32 lowering computes it.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_THREEFRY_PARITY = 0x1BD11BDA


def _threefry2x32(key1, key2, x1, x2):
  u32 = jnp.uint32
  keys = (key1, key2, key1 ^ key2 ^ u32(_THREEFRY_PARITY))
  x1, x2 = x1 + keys[0], x2 + keys[1]
  for i in range(5):
    for r in _THREEFRY_ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = x1 ^ ((x2 << u32(r)) | (x2 >> u32(32 - r)))
    x1, x2 = x1 + keys[(i + 1) % 3], x2 + keys[(i + 2) % 3] + u32(i + 1)
  return x1, x2


def bernoulli(key: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
  """`jax.random.bernoulli(key, p, shape)`, bit for bit, for a threefry key under jax's
  partitionable threefry (the default). jax lowers the hash on CPU as a 5-step loop over whole
  arrays; written out, XLA fuses it into one pass (a dropout mask 2.2× faster here). Other keys
  and settings take jax.random.bernoulli itself."""
  size = math.prod(shape)
  if (not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
      or str(jax.random.key_impl(key)) != 'threefry2x32'
      or not jax.config.jax_threefry_partitionable or size >= 2**32 or key.shape):
    return jax.random.bernoulli(key, p, shape)
  words = jax.random.key_data(key)
  counts = lax.iota(jnp.uint32, size).reshape(shape)  # the flat index; its high word is 0
  bits1, bits2 = _threefry2x32(words[0], words[1], jnp.zeros_like(counts), counts)
  # jax.random.uniform's floats in [0, 1): 23 random mantissa bits over 1.0, minus 1.
  mantissa = ((bits1 ^ bits2) >> jnp.uint32(9)) | jnp.uint32(0x3F800000)
  return lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0 < jnp.float32(p)


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


def conv3x3(conv: nnx.Conv, x: jax.Array) -> jax.Array:
  """`conv(x)` for a 3×3, stride-1, zero-padding-1 `nnx.Conv` (NHWC), through the Winograd kernel
  where it takes the operands (cpu_winograd.conv3x3 falls back to XLA's convolution itself)."""
  if (conv.kernel_size != (3, 3) or conv.strides not in (1, (1, 1)) or conv.mask is not None
      or isinstance(conv.padding, str) or tuple(map(tuple, conv.padding)) != ((1, 1), (1, 1))
      or conv.feature_group_count != 1 or conv.kernel_dilation not in (1, (1, 1))
      or conv.input_dilation not in (1, (1, 1)) or conv.precision is not None):
    return conv(x)
  kernel = conv.kernel[...]
  bias = None if conv.bias is None else conv.bias[...]
  x, kernel, bias = conv.promote_dtype((x, kernel, bias), dtype=conv.dtype)
  if x.ndim != 4:  # nnx.Conv also takes unbatched inputs
    return conv(x)
  y = cpu_winograd.conv3x3(x, kernel)
  return y if bias is None else y + bias
