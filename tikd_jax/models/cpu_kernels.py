"""Building, loading and sharding this package's C++ XLA:CPU kernels (cpu_attention.cc,
cpu_winograd.cc), behind `config.cpu_fast_layers`.

A kernel is compiled once per machine with the system C++ compiler (`$CXX`, else c++ / g++ /
clang++) into a cache directory (`$TIKD_JAX_CACHE`, else ~/.cache/tikd_jax), keyed by the source,
the compiler, jaxlib and the CPU's instruction sets, then registered as XLA FFI targets. With no
compiler the fast layers fall back to their plain formulas after one warning that says what to
install.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
from absl import logging
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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
  headers = [h.read_text() for h in sorted(source.parent.glob('*.h'))]  # cpu_parallel.h
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
