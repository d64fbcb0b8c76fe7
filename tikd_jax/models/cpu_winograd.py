"""3×3, stride-1, pad-1 convolutions on XLA:CPU by Winograd F(2×2, 3×3) in one C++ kernel
(cpu_winograd.cc).

XLA:CPU's Eigen convolution runs the ResNet32x4 teacher's 3×3 layers at 130–200 GFLOP/s on two
cores where PyTorch's oneDNN reaches the matmul peak, and that teacher's forward is most of a
distillation step's FLOPs (benchmarks/README.md). Winograd's F(2×2, 3×3) (Lavin & Gray, CVPR 2016)
computes each 2×2 output tile with 16 instead of 36 multiply-adds per input and output channel;
the kernel transforms a block of tiles in L2, multiplies and transforms back in one pass.
`cpu_fast_layers.conv3x3` uses it (so only under `config.cpu_fast_layers`, on by default on CPU
only) for float32 NHWC inputs with even H and W and channel counts that are multiples of 16;
anything else takes XLA's convolution. The gradient with respect to the input is the same kind of
convolution (the kernel turned by 180°, channels swapped) and runs through the kernel as well; the
gradient with respect to the weights is XLA's. Results equal the plain convolution and its
gradients to float32 rounding (tests/test_cpu_winograd.py).
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tikd_jax.models import cpu_kernels

SOURCE = Path(__file__).with_suffix('.cc')
TARGET = 'TikdWinogradConvForward'
CHANNEL_MULTIPLE = 16  # the kernel's vector width in floats
# G of F(2×2, 3×3): the kernel enters the products as u = G·g·Gᵀ (Lavin & Gray 2016, eq. 8)
KERNEL_TRANSFORM = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)
DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def plain(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The convolution the kernel computes: 3×3, stride 1, zero padding 1, NHWC × HWIO."""
  return lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DIMENSIONS)


@functools.cache
def _register() -> None:
  cpu_kernels.register(SOURCE, (TARGET,))


@functools.cache
def available() -> bool:
  """Whether the kernel runs here; the first failure is logged once, with what to do."""
  return cpu_kernels.registers(_register, '3×3 convolution')


def supported(x: jax.Array, kernel: jax.Array) -> bool:
  """Whether the kernel can take `plain(x, kernel)`."""
  return (x.ndim == 4 and kernel.shape[:2] == (3, 3) and x.dtype == kernel.dtype == jnp.float32
          and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0 and x.shape[3] == kernel.shape[2]
          and x.shape[3] % CHANNEL_MULTIPLE == 0 and kernel.shape[3] % CHANNEL_MULTIPLE == 0)


def transformed_kernel(kernel: jax.Array) -> jax.Array:
  """u[4·a + b, c, o] = (G·g·Gᵀ)[a, b] of each 3×3 kernel slice g = kernel[:, :, c, o]."""
  g = jnp.asarray(KERNEL_TRANSFORM)
  u = jnp.einsum('ai,ijco,bj->abco', g, kernel, g, precision=lax.Precision.HIGHEST)
  return u.reshape(16, *kernel.shape[2:])


def _forward_call(x, u):
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape[:3] + u.shape[2:], x.dtype))(x, u)


@functools.cache
def _kernel():
  return cpu_kernels.split_over_images(_forward_call, 'b h w c, k c o -> b h w o')


@jax.custom_vjp
def _conv(x, kernel):
  return lax.platform_dependent(x, kernel, cpu=lambda x, kernel: _kernel()
                                (x, transformed_kernel(kernel)), default=plain)


def _conv_fwd(x, kernel):
  return _conv(x, kernel), (x, kernel)


def _conv_bwd(residuals, dy):
  x, kernel = residuals
  # ∂x is itself a 3×3, stride-1, pad-1 convolution: of dy, with the kernel turned by 180° and its
  # input and output channels swapped, so the kernel takes it too. ∂kernel is XLA's.
  dx = _conv(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
  return dx, jax.vjp(lambda k: plain(x, k), kernel)[1](dy)[0]


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`plain(x, kernel)`: the kernel where it is available and takes these operands, else XLA's."""
  if not supported(x, kernel) or not available():
    return plain(x, kernel)
  return _conv(x, kernel)
