"""The C++ XLA:CPU kernels of the CPU layers (layers.py): their build, load and sharding, and the
calls into them.

  * attention (attention.cc): the attention core softmax(q·kᵀ·scale)·v, forward and backward. XLA:CPU
    runs attention's batched dots as one Eigen product per (image, head) on one thread and the
    softmax's row reductions as reduce-windows; the kernel does each (image, head) whole while its
    scores sit in cache, spread over XLA's intra-op threads. Float32 q, k, v only; anything else
    takes the plain formula (`vit.attention_core`, which the kernel is checked against).
  * winograd (winograd.cc): 3×3, stride-1, pad-1 convolutions by Winograd F(2×2, 3×3) (Lavin & Gray,
    CVPR 2016), 16 instead of 36 multiply-adds per output tile and channel pair; the input gradient
    is the same kind of convolution and runs through it too, the weight gradient is XLA's. Float32
    NHWC inputs with even H and W and channel counts that are multiples of 16; anything else takes
    XLA's convolution.
Both are XLA FFI custom calls joined by custom VJPs, equal to the plain formulas to float32
rounding (tests/test_cpu_attention.py, tests/test_cpu_winograd.py).

A kernel is compiled once per machine with the system C++ compiler (`$CXX`, else c++ / g++ /
clang++) into a cache directory (`$TIKD_JAX_CACHE`, else ~/.cache/tikd_jax), keyed by the source,
the compiler, jaxlib and the CPU's instruction sets, then registered as XLA FFI targets. With no
compiler the fast layers fall back to their plain formulas after one warning that says what to
install.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# the formula the attention kernel computes: other platforms and dtypes run it, tests check it
from tikd_jax.models.vit import attention_core as attention_plain

# -fno-math-errno lets GCC vectorise the softmax's exp (glibc's libmvec; nothing reads errno);
# -w: the FFI headers' own warnings would bury a real compile error in the message.
FLAGS = ('-O3', '-march=native', '-fno-math-errno', '-std=c++17', '-shared', '-fPIC', '-w')
COMPILERS = ('c++', 'g++', 'clang++')


class KernelUnavailable(RuntimeError):
  """A kernel cannot be built or loaded here; the message says why and what to do."""


def cache_dir() -> Path:
  root = os.environ.get('TIKD_JAX_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'tikd_jax')
  return Path(root) / 'kernels'


def compiler() -> str:
  for name in ([os.environ['CXX']] if os.environ.get('CXX') else []) + list(COMPILERS):
    path = shutil.which(name)
    if path:
      return path
  raise KernelUnavailable(
      'no C++ compiler found ($CXX, ' + ', '.join(COMPILERS) + '): install one (e.g. '
      '`apt install g++`) for the XLA:CPU kernels, or set --config.cpu_fast_layers=off')


def _cpu_features() -> str:
  """The CPU's instruction sets: -march=native code must not load on another CPU (a cache on a
  shared home directory)."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      return next((line for line in f if line.startswith(('flags', 'Features'))), '')
  except OSError:
    import platform  # pylint: disable=g-import-not-at-top
    return platform.processor() + platform.machine()


def build(source: Path, compiler_path: str | None = None) -> Path:
  """The compiled library of `source`, built on first use (a few seconds) and cached."""
  compiler_path = compiler_path or compiler()
  version = subprocess.run([compiler_path, '--version'], capture_output=True, text=True).stdout
  headers = [h.read_text() for h in sorted(source.parent.glob('*.h'))]  # parallel.h
  key = hashlib.sha256('\0'.join([
      source.read_text(), *headers, compiler_path, version, ' '.join(FLAGS), jax.__version__,
      _cpu_features()
  ]).encode()).hexdigest()[:16]
  library = cache_dir() / f'{source.stem}-{key}.so'
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  logging.info('Compiling the XLA:CPU kernel %s into %s (once per machine)', source.name, library)
  # Built under a temporary name and renamed: a parallel process never loads a half-written file.
  fd, partial = tempfile.mkstemp(suffix='.so', dir=library.parent)
  os.close(fd)
  command = [compiler_path, *FLAGS, '-I', jax.ffi.include_dir(), str(source), '-o', partial]
  done = subprocess.run(command, capture_output=True, text=True)
  if done.returncode:
    os.unlink(partial)
    raise KernelUnavailable(f'compiling {source.name} failed ({" ".join(command)}):\n'
                            f'{done.stderr.strip()[-2000:]}\nSet --config.cpu_fast_layers=off to '
                            'run without it')
  os.replace(partial, library)
  return library


def register(source: Path, targets) -> None:
  """Builds (or finds) and loads `source`'s library and registers its FFI `targets` with XLA:CPU."""
  library = ctypes.cdll.LoadLibrary(str(build(source)))
  for target in targets:
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), platform='cpu')


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


def registers(register_once, what: str) -> bool:
  """Whether `register_once()` (a module's cached registration) succeeds; a failure is logged,
  saying that `what` takes its plain formula and what to do."""
  try:
    register_once()
    return True
  except (KernelUnavailable, OSError) as e:
    logging.warning('The XLA:CPU %s kernel is unavailable; %s takes the plain formula: %s', what,
                    what, e)
    return False


class Kernel:
  """One C++ source and its FFI targets: built on first use, registered once per process."""

  def __init__(self, source: str, targets: tuple[str, ...], what: str):
    self.source = Path(__file__).with_name(source)
    self.targets = targets
    self.what = what
    self.availability: bool | None = None  # decided at the first `available()`

  def build(self, compiler_path: str | None = None) -> Path:
    """The compiled library, built on first use (a few seconds) and cached."""
    return build(self.source, compiler_path)

  def load(self) -> None:
    """Builds (or finds) and loads the library and registers its targets with XLA:CPU."""
    register(self.source, self.targets)

  def available(self) -> bool:
    """Whether the kernel runs here; the first failure is logged once, with what to do."""
    if self.availability is None:
      self.availability = registers(self.load, self.what)
    return self.availability


# ------------------------------------------------------------------------------------ attention
ATTENTION_TARGETS = {
    'forward': 'TikdAttentionForward', 'backward': 'TikdAttentionBackward',
    'backward_out_only': 'TikdAttentionBackwardOutOnly'
}
ATTENTION = Kernel('attention.cc', tuple(ATTENTION_TARGETS.values()), 'attention')


def _attention_forward_call(q, k, v, scale: float):
  b, n, h, _ = q.shape
  return jax.ffi.ffi_call(
      ATTENTION_TARGETS['forward'],
      (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(
          (b, h, n, n), q.dtype)))(q, k, v, scale=np.float32(scale))


def _attention_backward_call(scale: float, *operands):
  """(dq, dk, dv) from q, k, v, probs, d_out and, where something reads probs, d_probs."""
  target = ATTENTION_TARGETS['backward' if len(operands) == 6 else 'backward_out_only']
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
                                    default=lambda q, k, v: attention_plain(q, k, v, scale))


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
    return jax.vjp(lambda q, k, v: attention_plain(q, k, v, scale), q, k, v)[1]((d_out, d_probs))

  return jax.lax.platform_dependent(*operands, cpu=cpu, default=plain_vjp)


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float):
  """(softmax(q·kᵀ·scale)·v, the softmax) per head: q, k, v [B, N, H, d] token-major (the qkv
  projection's layout, reshaped) → out [B, N, H, d], probs [B, H, N, N].

  The kernel for float32 operands where it is available, `attention_plain` otherwise."""
  if (any(x.dtype != jnp.float32 for x in (q, k, v)) or q.ndim != 4
      or not q.shape == k.shape == v.shape or not ATTENTION.available()):
    return attention_plain(q, k, v, scale)
  return _attention(q, k, v, float(scale))


# ------------------------------------------------------------------------------------- winograd
WINOGRAD_TARGET = 'TikdWinogradConvForward'
WINOGRAD = Kernel('winograd.cc', (WINOGRAD_TARGET,), '3×3 convolution')
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
  return jax.ffi.ffi_call(WINOGRAD_TARGET, jax.ShapeDtypeStruct(x.shape[:3] + u.shape[2:],
                                                                x.dtype))(x, u)


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
  """`conv3x3_plain(x, kernel)`: the kernel where it is available and takes these operands, else
  XLA's."""
  if not conv3x3_supported(x, kernel) or not WINOGRAD.available():
    return conv3x3_plain(x, kernel)
  return _conv(x, kernel)
