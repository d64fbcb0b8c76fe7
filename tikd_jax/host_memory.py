"""Keep freed host memory for reuse on XLA:CPU: no page faults on every step's buffers.

XLA:CPU allocates a step's buffers afresh on every call (one temp buffer of ~650 MB for the small
student's distillation step) and frees them when it ends. glibc serves each block over 32 MB (its
largest mmap threshold) with a fresh mmap and gives it back with munmap, so every step faults its
whole working set back in, zero-filled: ~147,000 minor page faults per small-student step and
~272,000 per medium one on the 2-core development machine, where PyTorch's eager tensors mostly
stay under the threshold. With mmap off for allocations (M_MMAP_MAX = 0), no trimming of the heap
(M_TRIM_THRESHOLD at its maximum) and one arena (M_ARENA_MAX = 1: XLA's threads then allocate
from the main heap, not from per-thread arenas that are themselves mmapped and trimmed), freed
blocks are reused and a step takes ~0 faults (tests/test_host_memory.py; the speed:
benchmarks/README.md). The cost: the process keeps its peak host memory until it exits, which a
training process reaches on every step anyway.

The arena setting only holds for threads that have not allocated yet, so this must run before
JAX starts a backend (its thread pools): main.py calls `prepare(config)` before anything else
touches JAX. It is one of `config.xla_options`' CPU settings: on unless `xla_options='default'`
(jaxlib's own behaviour), and only where JAX will run on CPU.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import platform

import jax
from absl import logging
from jax._src import xla_bridge  # pylint: disable=g-direct-tensorflow-import  # no public query

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_ARENA_MAX, 1))


def runs_on_cpu() -> bool:
  """Whether JAX will run on XLA:CPU, decided without starting a backend (that starts threads):
  `jax_platforms` names cpu first, or none is named and no GPU/TPU plugin is installed."""
  named = jax.config.jax_platforms
  if named:
    return named.split(',')[0].strip() == 'cpu'
  plugins = list(importlib.metadata.entry_points(group='jax_plugins'))
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top  # jaxlib's CUDA/ROCm plugins
    plugins += list(jax_plugins.__path__)
  except ImportError:
    pass
  return not plugins and importlib.util.find_spec('libtpu') is None


def wanted(config) -> bool:
  """Whether `config` (or every run of a multi-run config) leaves `xla_options` to us."""
  runs = list(config.runs.values()) if 'runs' in config else [config]
  return all(run.get('xla_options', 'auto') != 'default' for run in runs)


@functools.cache
def reuse_freed_memory() -> bool:
  """Sets glibc's malloc to keep and reuse freed blocks (module docstring), once per process.

  Returns whether it applies; logs why not where it does not (not glibc, or JAX already running).
  """
  if platform.libc_ver()[0] != 'glibc':
    logging.info('Host memory: not glibc (%s); freed blocks are left to the system allocator',
                 platform.libc_ver()[0] or platform.system())
    return False
  if xla_bridge.backends_are_initialized():
    logging.warning(
        'Host memory: JAX is already running, so its threads keep their own malloc arenas and '
        'XLA:CPU still page-faults every step\'s buffers back in. Call '
        'tikd_jax.host_memory.reuse_freed_memory() before the first JAX computation.')
    return False
  libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  for parameter, value in _SETTINGS:
    if not libc.mallopt(parameter, value):
      logging.warning('Host memory: glibc refused mallopt(%d, %d); left as it is', parameter, value)
      return False
  logging.info('Host memory: freed blocks are kept for reuse (mmap off, no trim, one arena)')
  return True


def prepare(config) -> bool:
  """`reuse_freed_memory()` where `config` and the platform want it (module docstring)."""
  return wanted(config) and runs_on_cpu() and reuse_freed_memory()
