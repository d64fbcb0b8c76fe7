"""The CPU layers: what `build_model(..., fast_layers=True)` swaps into a built model
(`config.cpu_fast_layers`, 'auto' = on XLA:CPU only).

`substitute(model)` walks the built module graph and, by role, changes the class of these layers to
the subclasses below, in place; parameters, their names and values stay as they are, and the model
code calls its layers as usual:
  * ViT: the qkv, output, MLP and TIKD text projections (`Linear`), the blocks' and final LayerNorms
    (`LayerNorm`), the patch embedding (`PatchEmbed`), the attention core (`Attention.core` →
    kernels.attention, a C++ kernel) and the dropout masks (`.bernoulli` → `bernoulli` here);
  * CIFAR ResNets: the 3×3 stride-1 convolutions (`Conv3x3`, Winograd in a C++ kernel).
Heads, text adapters and the ResNets' 1×1 convolutions stay plain.

Same math, another lowering, chosen for XLA:CPU:
  * dense and LayerNorm have hand-written VJPs: the weight gradient is one x[M, in]ᵀ·dy[M, out]
    product and the bias / scale gradients are sums over the M = B·N rows, computed as a product
    with a ones vector. Autodiff of the plain layers leaves XLA:CPU a transposed copy of every
    activation gradient and 2-D reduce-windows over (B, N), which cost more than the matmuls at
    these widths.
  * the patch embedding is non-overlapping patches @ kernel instead of an XLA:CPU convolution.
  * dropout masks are jax.random.bernoulli's, bit for bit, with the threefry hash unrolled.
On GPU/TPU the plain layers are what the compiler expects. Results differ from autodiff of the
plain layers by float32 rounding (tests/test_models.py).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from tikd_jax.cpu import kernels
from tikd_jax.models import resnet_cifar, vit

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
  arrays; written out, XLA fuses it into one pass. Other keys and settings take
  jax.random.bernoulli itself."""
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
  float32. XLA:CPU lowers a column sum over M = B·N rows to a strided 2-D reduce-window; the
  product streams the rows once."""
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


class Linear(nnx.Linear):
  """`nnx.Linear` with bias: x @ kernel + bias, with the fast VJP."""

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.bias is None or self.precision is not None or self.preferred_element_type is not None:
      return nnx.Linear.__call__(self, x)
    x, kernel, bias = self.promote_dtype((x, self.kernel[...], self.bias[...]), dtype=self.dtype)
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


class LayerNorm(nnx.LayerNorm):
  """`nnx.LayerNorm` over the last axis with scale and bias (same formula), with the fast VJP."""

  def __call__(self, x: jax.Array) -> jax.Array:
    if (self.scale is None or self.bias is None or self.reduction_axes not in (-1, (-1,))
        or self.feature_axes not in (-1, (-1,)) or self.axis_name is not None
        or not self.use_fast_variance):
      return nnx.LayerNorm.__call__(self, x)
    x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
    if x.dtype != jnp.float32:  # flax computes the statistics in at least float32
      return nnx.LayerNorm.__call__(self, x)
    return _layer_norm_fn(x, scale, bias, self.epsilon)


class PatchEmbed(nnx.Conv):
  """A p×p, stride-p, VALID `nnx.Conv` as non-overlapping patches @ kernel: each output is the same
  sum over (row, column, channel) of one patch, a matmul instead of an XLA:CPU convolution."""

  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.kernel_size[0]
    if (self.kernel_size != (p, p) or self.strides not in (p, (p, p)) or self.bias is None
        or self.padding != 'VALID' or self.feature_group_count != 1 or self.mask is not None
        or self.kernel_dilation not in (1, (1, 1)) or self.input_dilation not in (1, (1, 1))):
      return nnx.Conv.__call__(self, x)
    b, h, w, c = x.shape
    gh, gw = h // p, w // p
    x, kernel, bias = self.promote_dtype((x, self.kernel[...], self.bias[...]), dtype=self.dtype)
    patches = x[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    return _dense_fn(patches.reshape(b, gh, gw, p * p * c), kernel.reshape(p * p * c, -1), bias)


class Conv3x3(nnx.Conv):
  """A 3×3, stride-1, zero-padding-1 `nnx.Conv` (NHWC) through the Winograd kernel where it takes
  the operands (kernels.conv3x3 falls back to XLA's convolution itself)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    if (self.kernel_size != (3, 3) or self.strides not in (1, (1, 1)) or self.mask is not None
        or isinstance(self.padding, str) or tuple(map(tuple, self.padding)) != ((1, 1), (1, 1))
        or self.feature_group_count != 1 or self.kernel_dilation not in (1, (1, 1))
        or self.input_dilation not in (1, (1, 1)) or self.precision is not None):
      return nnx.Conv.__call__(self, x)
    kernel = self.kernel[...]
    bias = None if self.bias is None else self.bias[...]
    x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
    if x.ndim != 4:  # nnx.Conv also takes unbatched inputs
      return nnx.Conv.__call__(self, x)
    y = kernels.conv3x3(x, kernel)
    return y if bias is None else y + bias


# ----------------------------------------------------------------------------------- substitution
def _swap(cpu_class: type, *layers) -> None:
  """Makes each layer (None: absent) an instance of `cpu_class`, a subclass of its own class
  with the same fields: only `__call__` differs (it calls the Flax layer's own `__call__` where
  its fast form does not apply)."""
  for layer in layers:
    if layer is None:
      continue
    if type(layer) not in (cpu_class, cpu_class.__base__):
      raise TypeError(f'{type(layer).__name__} cannot take the CPU layer {cpu_class.__name__}')
    object.__setattr__(layer, '__class__', cpu_class)


def substitute(model: nnx.Module) -> nnx.Module:
  """`model` (a DistilledViT or a CifarResNet, built) with its CPU layers swapped in, in place."""
  for _, node in list(nnx.iter_graph(model)):
    if isinstance(node, vit.DistilledViT):
      _swap(PatchEmbed, node.patch_embed)
      _swap(LayerNorm, node.norm)
      _swap(Linear, getattr(node, 'text_decoder', None), getattr(node, 'text_proj', None))
      node.bernoulli = bernoulli
    elif isinstance(node, vit.Block):
      _swap(LayerNorm, node.norm1, node.norm2)
      node.bernoulli = bernoulli
    elif isinstance(node, vit.Attention):
      _swap(Linear, node.qkv, node.proj, node.text_proj)
      node.core = kernels.attention
      node.bernoulli = bernoulli
    elif isinstance(node, vit.Mlp):
      _swap(Linear, node.fc1, node.fc2)
    elif isinstance(node, resnet_cifar.CifarResNet):
      _swap(Conv3x3, node.conv1)
    elif isinstance(node, resnet_cifar.BasicBlock):
      _swap(Conv3x3, node.conv1, node.conv2)
  return model
