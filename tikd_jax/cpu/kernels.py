"""The C++ XLA:CPU kernels of the CPU layers (layers.py): their build and load, done once, where
the first model with the CPU layers is built (`layers.substitute`).

  * attention (attention.cc): the attention core softmax(q·kᵀ·scale)·v, forward and backward, as
    the FFI targets ATTENTION_TARGETS;
  * winograd (winograd.cc): 3×3, stride-1, pad-1 convolutions by Winograd F(2×2, 3×3), as the FFI
    target WINOGRAD_TARGET.
What they compute, the calls into them, their custom VJPs and the operands they take are
layers.py's: that is what runs while a step is traced, this module is not.

A kernel is compiled once per machine with the system C++ compiler (`$CXX`, else c++ / g++ /
clang++) into a cache directory (`$TIKD_JAX_CACHE`, else ~/.cache/tikd_jax), keyed by the source,
the compiler, jaxlib and the CPU's instruction sets, then registered as XLA FFI targets.
`Kernel.available()` decides once per process whether a kernel runs here; where it does not (no
compiler, a failed compile), one warning says why and what to install, and the layers it serves
stay plain.
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
    """Whether the kernel runs here, decided at the first call (which builds or finds and loads
    it) and kept for the process; a failure is logged once, with what to do."""
    if self.availability is None:
      self.availability = registers(self.load, self.what)
    return self.availability


# The two kernels; layers.py calls them by these FFI target names.
ATTENTION_TARGETS = {
    'forward': 'TikdAttentionForward', 'backward': 'TikdAttentionBackward',
    'backward_out_only': 'TikdAttentionBackwardOutOnly'
}
ATTENTION = Kernel('attention.cc', tuple(ATTENTION_TARGETS.values()), 'attention')
WINOGRAD_TARGET = 'TikdWinogradConvForward'
WINOGRAD = Kernel('winograd.cc', (WINOGRAD_TARGET,), '3×3 convolution')
