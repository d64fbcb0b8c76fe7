"""The attention core softmax(q·kᵀ·scale)·v on XLA:CPU as one C++ kernel (cpu_attention.cc).

XLA:CPU runs attention's batched dots as one Eigen product per batch element on one thread, and
the softmax's row reductions through reduce-windows: one small-student block's core took ~90 ms
against ~37 ms in PyTorch eager on the same two cores (benchmarks/attention_core.py). The kernel
does each (image, head) whole while its scores sit in cache, spread over XLA's intra-op threads:
a forward and a backward XLA FFI custom call joined by a custom VJP. `cpu_fast_layers.attention`
uses it (so only under `config.cpu_fast_layers`, on by default on CPU only) for float32 q, k, v;
anything else takes the plain jnp formula.

The kernel is compiled once per machine with the system C++ compiler (`$CXX`, else c++ / g++ /
clang++) into a cache directory (`$TIKD_JAX_CACHE`, else ~/.cache/tikd_jax), keyed by the source,
the compiler, jaxlib and the CPU's instruction sets. With no compiler the fast layers fall back to
the plain formula after one warning that says what to install. Results equal the plain formula to
float32 rounding, forward and gradients (tests/test_cpu_attention.py).
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
import numpy as np
import jax.numpy as jnp
from absl import logging
from jax.custom_derivatives import SymbolicZero
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# the formula the kernel computes: other platforms and dtypes run it, tests check against it
from tikd_jax.models.attention import attention_core as plain

SOURCE = Path(__file__).with_suffix('.cc')
TARGETS = {
    'forward': 'TikdAttentionForward', 'backward': 'TikdAttentionBackward',
    'backward_out_only': 'TikdAttentionBackwardOutOnly'
}
# -fno-math-errno lets GCC vectorise the softmax's exp (glibc's libmvec; nothing reads errno);
# -w: the FFI headers' own warnings would bury a real compile error in the message.
FLAGS = ('-O3', '-march=native', '-fno-math-errno', '-std=c++17', '-shared', '-fPIC', '-w')
COMPILERS = ('c++', 'g++', 'clang++')


class KernelUnavailable(RuntimeError):
  """The kernel cannot be built or loaded here; the message says why and what to do."""


def cache_dir() -> Path:
  root = os.environ.get('TIKD_JAX_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'tikd_jax')
  return Path(root) / 'kernels'


def _compiler() -> str:
  for name in ([os.environ['CXX']] if os.environ.get('CXX') else []) + list(COMPILERS):
    path = shutil.which(name)
    if path:
      return path
  raise KernelUnavailable(
      'no C++ compiler found ($CXX, ' + ', '.join(COMPILERS) + '): install one (e.g. '
      '`apt install g++`) for the XLA:CPU attention kernel, or set --config.cpu_fast_layers=off')


def _cpu_features() -> str:
  """The CPU's instruction sets: -march=native code must not load on another CPU (a cache on a
  shared home directory)."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      return next((line for line in f if line.startswith(('flags', 'Features'))), '')
  except OSError:
    import platform  # pylint: disable=g-import-not-at-top
    return platform.processor() + platform.machine()


def build(compiler: str | None = None) -> Path:
  """The compiled kernel library, built on first use (a few seconds) and cached."""
  compiler = compiler or _compiler()
  version = subprocess.run([compiler, '--version'], capture_output=True, text=True).stdout
  key = hashlib.sha256('\0'.join(
      [SOURCE.read_text(), compiler, version, ' '.join(FLAGS), jax.__version__,
       _cpu_features()]).encode()).hexdigest()[:16]
  library = cache_dir() / f'{SOURCE.stem}-{key}.so'
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  logging.info('Compiling the XLA:CPU attention kernel %s into %s (once per machine)', SOURCE.name,
               library)
  # Built under a temporary name and renamed: a parallel process never loads a half-written file.
  fd, partial = tempfile.mkstemp(suffix='.so', dir=library.parent)
  os.close(fd)
  command = [compiler, *FLAGS, '-I', jax.ffi.include_dir(), str(SOURCE), '-o', partial]
  done = subprocess.run(command, capture_output=True, text=True)
  if done.returncode:
    os.unlink(partial)
    raise KernelUnavailable(f'compiling {SOURCE.name} failed ({" ".join(command)}):\n'
                            f'{done.stderr.strip()[-2000:]}\nSet --config.cpu_fast_layers=off to '
                            'run without it')
  os.replace(partial, library)
  return library


@functools.cache
def _register() -> None:
  """Builds (or finds) and loads the kernel and registers it with XLA:CPU, once per process."""
  library = ctypes.cdll.LoadLibrary(str(build()))
  for target in TARGETS.values():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), platform='cpu')


@functools.cache
def available() -> bool:
  """Whether the kernel runs here; the first failure is logged once, with what to do."""
  try:
    _register()
    return True
  except (KernelUnavailable, OSError) as e:
    logging.warning(
        'The XLA:CPU attention kernel is unavailable; attention takes the plain '
        'formula: %s', e)
    return False


def _image_axis_only(arg_shapes) -> NamedSharding:
  """q's sharding over the image axis, every other axis whole (all operands are rank 4)."""
  sharding = arg_shapes[0].sharding
  images = sharding.spec[0] if len(sharding.spec) else None  # an axis name or a tuple of them
  return NamedSharding(sharding.mesh, P(images, None, None, None))


def _split_over_images(local, rule: str, results: int):
  """`local` (one kernel call) split over the image axis `b` only: each device runs the kernel on
  its own images, with no collectives (XLA would otherwise gather a custom call's operands onto
  every device). `rule`: Shardy's einsum-like rule of the call."""
  kernel = custom_partitioning(local)

  def infer(mesh, arg_shapes, result_shape):
    del mesh, result_shape
    return (_image_axis_only(arg_shapes),) * results

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    sharding = _image_axis_only(arg_shapes)
    return mesh, local, (sharding,) * results, (sharding,) * len(arg_shapes)

  # every factor but the image axis stays whole, listed in order of first appearance (Shardy)
  whole = tuple(dict.fromkeys(f for f in rule.replace(',', ' ').split() if f not in ('b', '->')))
  kernel.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                       need_replication_factors=whole)
  return kernel


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
  forward = _split_over_images(lambda q, k, v: _forward_call(q, k, v, scale),
                               'b n h d, b m h d, b m h d -> b n h d, b h n m', results=2)
  backward = _split_over_images(
      lambda q, k, v, probs, d_out, d_probs: _backward_call(scale, q, k, v, probs, d_out, d_probs),
      'b n h d, b m h d, b m h d, b h n m, b n h d, b h n m -> b n h d, b m h d, b m h d',
      results=3)
  backward_out_only = _split_over_images(
      lambda q, k, v, probs, d_out: _backward_call(scale, q, k, v, probs, d_out),
      'b n h d, b m h d, b m h d, b h n m, b n h d -> b n h d, b m h d, b m h d', results=3)
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
