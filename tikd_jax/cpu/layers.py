"""The CPU layers: what `build_model(..., fast_layers=True)` swaps into a built model
(`config.cpu_fast_layers`, 'auto' = on XLA:CPU only), and everything they run while a step is
traced, the calls into the C++ kernels included.

`substitute(model)` walks the built module graph and, by role, changes the class of these layers to
the subclasses below, in place; parameters, their names and values stay as they are, and the model
code calls its layers as usual:
  * ViT: the qkv, output, MLP and TIKD text projections (`Linear`), the blocks' and final LayerNorms
    (`LayerNorm`), the patch embedding (`PatchEmbed`), the attention core (`Attention.core` →
    `attention`, the C++ attention kernel) and the dropout masks (`.bernoulli` → `bernoulli`);
  * CIFAR ResNets: the 3×3 stride-1 convolutions (`Conv3x3`, Winograd in a C++ kernel).
Heads, text adapters and the ResNets' 1×1 convolutions stay plain. Whether a C++ kernel runs here
is decided once, in `substitute` (kernels.py builds and loads it); without it the attention core
and the convolutions stay plain.

Same math, another lowering, chosen for XLA:CPU:
  * dense and LayerNorm have hand-written VJPs: the weight gradient is one x[M, in]ᵀ·dy[M, out]
    product and the bias / scale gradients are sums over the M = B·N rows, computed as a product
    with a ones vector. Autodiff of the plain layers leaves XLA:CPU a transposed copy of every
    activation gradient and 2-D reduce-windows over (B, N), which cost more than the matmuls at
    these widths.
  * the patch embedding is non-overlapping patches @ kernel instead of an XLA:CPU convolution.
  * dropout masks are jax.random.bernoulli's, bit for bit, with the threefry hash unrolled.
  * attention (attention.cc): softmax(q·kᵀ·scale)·v, forward and backward. XLA:CPU runs
    attention's batched dots as one Eigen product per (image, head) on one thread and the
    softmax's row reductions as reduce-windows; the kernel does each (image, head) whole while its
    scores sit in cache, spread over XLA's intra-op threads. Float32 q, k, v only; anything else
    takes the plain formula (`vit.attention_core`, which the kernel is checked against).
  * 3×3 convolutions (winograd.cc): Winograd F(2×2, 3×3) (Lavin & Gray, CVPR 2016), 16 instead of
    36 multiply-adds per output tile and channel pair; the input gradient is the same kind of
    convolution and runs through it too, the weight gradient is XLA's. Float32 NHWC inputs with
    even H and W and channel counts that are multiples of 16; anything else takes XLA's
    convolution.
The kernels are XLA FFI custom calls joined by custom VJPs, split over a mesh's image axis with no
collectives (`split_over_images`), and equal to the plain formulas to float32 rounding
(tests/test_cpu_attention.py, tests/test_cpu_winograd.py). On GPU/TPU the plain layers are what
the compiler expects. Results differ from autodiff of the plain layers by float32 rounding
(tests/test_models.py).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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


# --------------------------------------------------------------- kernel calls split over images
def _operand_shardings(rule: str, images, mesh) -> list[NamedSharding]:
  """Per operand and result of `rule` (Shardy's einsum-like rule, 'b' the image axis): sharded
  like the first operand's image axis on 'b', whole on every other factor."""
  operands, results = rule.split('->')
  return [
      NamedSharding(mesh, P(*(images if f == 'b' else None
                              for f in term.split())))
      for term in operands.split(',') + results.split(',')
  ]


def split_over_images(local, rule: str):
  """`local` (one kernel call) split over the image axis 'b' of `rule` only: each device runs the
  kernel on its own images, with no collectives (XLA would otherwise gather a custom call's
  operands onto every device). Operands without 'b' (weights) are whole on every device."""
  kernel = custom_partitioning(local)
  arguments = len(rule.split('->')[0].split(','))

  def shardings(arg_shapes):
    sharding = arg_shapes[0].sharding
    images = sharding.spec[0] if len(sharding.spec) else None  # an axis name or a tuple of them
    every = _operand_shardings(rule, images, sharding.mesh)
    results = tuple(every[arguments:])
    return tuple(every[:arguments]), results if len(results) > 1 else results[0]

  def infer(mesh, arg_shapes, result_shape):
    del mesh, result_shape
    return shardings(arg_shapes)[1]

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    operands, results = shardings(arg_shapes)
    return mesh, local, results, operands

  # every factor but the image axis stays whole, listed in order of first appearance (Shardy)
  whole = tuple(dict.fromkeys(f for f in rule.replace(',', ' ').split() if f not in ('b', '->')))
  kernel.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                       need_replication_factors=whole)
  return kernel


# ------------------------------------------------------------------------------------ attention
def _attention_forward_call(q, k, v, scale: float):
  b, n, h, _ = q.shape
  return jax.ffi.ffi_call(
      kernels.ATTENTION_TARGETS['forward'],
      (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(
          (b, h, n, n), q.dtype)))(q, k, v, scale=np.float32(scale))


def _attention_backward_call(scale: float, *operands):
  """(dq, dk, dv) from q, k, v, probs, d_out and, where something reads probs, d_probs."""
  target = kernels.ATTENTION_TARGETS['backward' if len(operands) == 6 else 'backward_out_only']
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in operands[:3])
  return jax.ffi.ffi_call(target, shapes)(*operands, scale=np.float32(scale))


@functools.cache
def _attention_kernels(scale: float):
  """(forward, backward, backward without d_probs) for one scale, each split over images."""
  forward = split_over_images(lambda q, k, v: _attention_forward_call(q, k, v, scale),
                              'b n h d, b m h d, b m h d -> b n h d, b h n m')
  backward = split_over_images(
      lambda q, k, v, probs, d_out, d_probs: _attention_backward_call(scale, q, k, v, probs, d_out,
                                                                      d_probs),
      'b n h d, b m h d, b m h d, b h n m, b n h d, b h n m -> b n h d, b m h d, b m h d')
  backward_out_only = split_over_images(
      lambda q, k, v, probs, d_out: _attention_backward_call(scale, q, k, v, probs, d_out),
      'b n h d, b m h d, b m h d, b h n m, b n h d -> b n h d, b m h d, b m h d')
  return forward, backward, backward_out_only


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, scale):
  return jax.lax.platform_dependent(q, k, v, cpu=_attention_kernels(scale)[0],
                                    default=lambda q, k, v: vit.attention_core(q, k, v, scale))


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
  cpu = _attention_kernels(scale)[2]
  if not isinstance(d_probs, SymbolicZero):
    operands, cpu = operands + (d_probs,), _attention_kernels(scale)[1]

  def plain_vjp(q, k, v, probs, d_out, d_probs=None):
    del probs
    d_probs = jnp.zeros(
        (q.shape[0], q.shape[2], q.shape[1], q.shape[1]), q.dtype) if d_probs is None else d_probs
    return jax.vjp(lambda q, k, v: vit.attention_core(q, k, v, scale), q, k, v)[1]((d_out, d_probs))

  return jax.lax.platform_dependent(*operands, cpu=cpu, default=plain_vjp)


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float):
  """(softmax(q·kᵀ·scale)·v, the softmax) per head: q, k, v [B, N, H, d] token-major (the qkv
  projection's layout, reshaped) → out [B, N, H, d], probs [B, H, N, N].

  The kernel for float32 operands, `vit.attention_core` (the plain formula) otherwise. The kernel
  must be loaded: `substitute` makes this a layer's core only where
  `kernels.ATTENTION.available()`."""
  if (any(x.dtype != jnp.float32 for x in (q, k, v)) or q.ndim != 4
      or not q.shape == k.shape == v.shape):
    return vit.attention_core(q, k, v, scale)
  return _attention(q, k, v, float(scale))


# ------------------------------------------------------------------------------------- winograd
CHANNEL_MULTIPLE = 16  # the kernel's vector width in floats
# G of F(2×2, 3×3): the kernel enters the products as u = G·g·Gᵀ (Lavin & Gray 2016, eq. 8)
KERNEL_TRANSFORM = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)
DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def conv3x3_plain(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The convolution the kernel computes: 3×3, stride 1, zero padding 1, NHWC × HWIO."""
  return lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DIMENSIONS)


def conv3x3_supported(x: jax.Array, kernel: jax.Array) -> bool:
  """Whether the kernel can take `conv3x3_plain(x, kernel)`."""
  return (x.ndim == 4 and kernel.shape[:2] == (3, 3) and x.dtype == kernel.dtype == jnp.float32
          and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0 and x.shape[3] == kernel.shape[2]
          and x.shape[3] % CHANNEL_MULTIPLE == 0 and kernel.shape[3] % CHANNEL_MULTIPLE == 0)


def transformed_kernel(kernel: jax.Array) -> jax.Array:
  """u[4·a + b, c, o] = (G·g·Gᵀ)[a, b] of each 3×3 kernel slice g = kernel[:, :, c, o]."""
  g = jnp.asarray(KERNEL_TRANSFORM)
  u = jnp.einsum('ai,ijco,bj->abco', g, kernel, g, precision=lax.Precision.HIGHEST)
  return u.reshape(16, *kernel.shape[2:])


def _winograd_call(x, u):
  return jax.ffi.ffi_call(kernels.WINOGRAD_TARGET,
                          jax.ShapeDtypeStruct(x.shape[:3] + u.shape[2:], x.dtype))(x, u)


@functools.cache
def _winograd_kernel():
  return split_over_images(_winograd_call, 'b h w c, k c o -> b h w o')


@jax.custom_vjp
def _conv(x, kernel):
  return lax.platform_dependent(
      x, kernel, cpu=lambda x, kernel: _winograd_kernel()(x, transformed_kernel(kernel)),
      default=conv3x3_plain)


def _conv_fwd(x, kernel):
  return _conv(x, kernel), (x, kernel)


def _conv_bwd(residuals, dy):
  x, kernel = residuals
  # ∂x is itself a 3×3, stride-1, pad-1 convolution: of dy, with the kernel turned by 180° and its
  # input and output channels swapped, so the kernel takes it too. ∂kernel is XLA's.
  dx = _conv(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
  return dx, jax.vjp(lambda k: conv3x3_plain(x, k), kernel)[1](dy)[0]


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv3x3_plain(x, kernel)`: the kernel where it takes these operands, else XLA's. The kernel
  must be loaded: `substitute` swaps `Conv3x3` in only where `kernels.WINOGRAD.available()`."""
  if not conv3x3_supported(x, kernel):
    return conv3x3_plain(x, kernel)
  return _conv(x, kernel)


class Conv3x3(nnx.Conv):
  """A 3×3, stride-1, zero-padding-1 `nnx.Conv` (NHWC) through the Winograd kernel where it takes
  the operands (`conv3x3` falls back to XLA's convolution itself)."""

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
    y = conv3x3(x, kernel)
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
  """`model` (a DistilledViT or a CifarResNet, built) with its CPU layers swapped in, in place.

  The attention core and the 3×3 convolutions take their C++ kernels only where the kernel is
  available here: `Kernel.available()` builds or finds and loads it at the first model that needs
  it and keeps the answer for the process; where it is unavailable, one warning says what to
  install and those layers stay plain."""
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
      if kernels.ATTENTION.available():
        node.core = attention
      node.bernoulli = bernoulli
    elif isinstance(node, vit.Mlp):
      _swap(Linear, node.fc1, node.fc2)
    elif isinstance(node, resnet_cifar.CifarResNet):
      if kernels.WINOGRAD.available():
        _swap(Conv3x3, node.conv1)
    elif isinstance(node, resnet_cifar.BasicBlock):
      if kernels.WINOGRAD.available():
        _swap(Conv3x3, node.conv1, node.conv2)
  return model
