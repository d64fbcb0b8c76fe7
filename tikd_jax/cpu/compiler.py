"""XLA compiler options of the jitted train and eval steps (`config.xla_options`), and the host
allocator policy that goes with them. Used where a run is set up, not on a step's path.

On XLA:CPU this jaxlib hands dots, convolutions and reductions to YNNPACK by default; its
convolutions and the distillation steps run slower than XLA's own Eigen kernels on the CPUs this
project is measured on (benchmarks/README.md), so 'auto' turns the YNNPACK fusions off on CPU and
leaves other backends alone. The options are per `jax.jit` (`compiler_options=`), so they never
leak into other JAX code in the same process.

'auto' on CPU also cuts a step's temporaries into heaps of `HEAP_BYTES`
(`xla_multiheap_size_constraint_per_heap`) when every intermediate of the step fits in one, so
that glibc serves them from its arenas (`step_options` decides once per step, from its traced
program). Steps with a larger intermediate gain nothing, since glibc maps such blocks afresh
whatever it is told, and would hold about twice the temporaries: they compile without.

The heaps pay off only when glibc keeps freed memory mapped (`keep_freed_memory_mapped`): XLA:CPU
allocates every execution's temporaries afresh and frees them when the step ends; with glibc's
defaults that memory goes back to the kernel (blocks over the mmap threshold are unmapped, a thread
arena deletes its emptied heaps in `heap_trim`), and the next step takes a page fault and a
zero-filled page for every 4 KiB it touches (benchmarks/host_memory.py counts them). The setting
is process-wide, so the application chooses it (main.py `--allocator`, `set_allocator`), never the
library.
"""
from __future__ import annotations

import ctypes
import math
import platform
from typing import Callable

import jax

# mallopt(3) parameters, glibc's malloc.h.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_MAX = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: mallopt refuses more
ARENA_HEAP_BYTES = 2 * MMAP_THRESHOLD_MAX  # HEAP_MAX_SIZE: a thread arena's heap
# `M_TOP_PAD` as large as a thread arena's heap makes `heap_trim` keep emptied heaps, the largest
# fixed mmap threshold keeps blocks up to 32 MiB in the arenas, and a trim threshold beyond any
# step stops the main arena returning its top. The process then holds its peak of temporaries, as
# a GPU runtime's caching allocator does.
MALLOPT_SETTINGS = {
    M_MMAP_THRESHOLD: MMAP_THRESHOLD_MAX,
    M_TOP_PAD: ARENA_HEAP_BYTES,
    M_TRIM_THRESHOLD: (1 << 31) - 1,  # mallopt takes a C int
}

# Under glibc's largest mmap threshold with room for its chunk header; a step whose every
# intermediate fits one heap compiles without XLA's warning per buffer.
HEAP_BYTES = 30 << 20
SMALL_HEAPS = {'xla_multiheap_size_constraint_per_heap': HEAP_BYTES}
NO_YNN = {'xla_cpu_experimental_ynn_fusion_type': ''}

PRESETS: dict[str, dict[str, object]] = {
    'default': {},  # jaxlib's own choice
    'no_ynn': NO_YNN,
    'small_heaps': dict(NO_YNN, **SMALL_HEAPS),  # whatever the step's intermediates
    # Compile several times faster, run slower: LLVM at -O0, no fusion emitters. For tests and
    # smoke runs, where compiling the tiny steps costs more than running them.
    'fast_compile': {
        'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False, **NO_YNN
    },
}
CPU_AUTO = 'no_ynn'  # and SMALL_HEAPS for the steps they fit (`step_options`)


def compiler_options(name: str = 'auto', backend: str | None = None) -> dict[str, object] | None:
  """The options of preset `name` ('auto' picks per backend, without the per-step heaps); None
  when there are none."""
  backend = backend or jax.default_backend()
  if name == 'auto':
    name = CPU_AUTO if backend == 'cpu' else 'default'
  if name not in PRESETS:
    raise ValueError(f'config.xla_options={name!r}: use auto or one of {sorted(PRESETS)}')
  if PRESETS[name] and backend != 'cpu':
    raise ValueError(f'config.xla_options={name!r} holds XLA:CPU options; on {backend} use auto '
                     f'or default')
  return dict(PRESETS[name]) or None


def step_options(name: str, fn: Callable, *abstract_args) -> dict[str, object] | None:
  """The compiler options of the step `fn` called on arguments shaped as `abstract_args`
  (ShapeDtypeStructs or arrays): preset `name`'s, plus SMALL_HEAPS under 'auto' on CPU when the
  largest intermediate of `fn`'s traced program fits one heap. Traces `fn` once for 'auto' on CPU;
  pass the result to `jax.jit(fn, compiler_options=...)`."""
  options = compiler_options(name)
  if name != 'auto' or jax.default_backend() != 'cpu':
    return options
  if largest_intermediate_bytes(jax.make_jaxpr(fn)(*abstract_args)) <= HEAP_BYTES:
    return {**options, **SMALL_HEAPS}
  return options


def uses_small_heaps(options: dict[str, object] | None) -> bool:
  """Whether compiler options cut the temporaries into heaps (and so want freed memory kept)."""
  return SMALL_HEAPS.items() <= (options or {}).items()


def largest_intermediate_bytes(jaxpr) -> int:
  """The largest array any equation of `jaxpr` (or of the programs inside it) produces."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)  # a ClosedJaxpr's Jaxpr
  largest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      aval = var.aval
      if hasattr(aval, 'shape') and hasattr(aval, 'dtype'):
        largest = max(largest, math.prod(aval.shape) * aval.dtype.itemsize)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(getattr(sub, 'jaxpr', sub), 'eqns'):
          largest = max(largest, largest_intermediate_bytes(sub))
  return largest


# ------------------------------------------------------------------------------------- allocator
# main.py --allocator: auto = keep_mapped where the steps may cut small heaps (XLA:CPU under the
# 'auto' or 'small_heaps' preset) and the C library is glibc, else system.
ALLOCATORS = ('auto', 'keep_mapped', 'system')


def is_glibc() -> bool:
  return platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'


def keep_freed_memory_mapped() -> None:
  """Sets glibc's malloc to keep freed memory mapped (MALLOPT_SETTINGS): process-wide and never
  undone, so only applications call it (main.py, benchmarks)."""
  if not is_glibc():
    raise RuntimeError(f'keeping freed memory mapped needs glibc; this is '
                       f'{platform.system()} {platform.libc_ver()[0] or "without glibc"}: use '
                       f'--allocator=system')
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  for param, value in MALLOPT_SETTINGS.items():
    if mallopt(param, value) != 1:
      raise RuntimeError(f'glibc mallopt({param}, {value}) refused: use --allocator=system')


def resolve_allocator(policy: str, xla_options: str = 'auto', backend: str | None = None) -> str:
  """'keep_mapped' or 'system' for allocator `policy` (ALLOCATORS) under preset `xla_options`."""
  if policy not in ALLOCATORS:
    raise ValueError(f'allocator {policy!r}: use one of {ALLOCATORS}')
  if policy != 'auto':
    return policy
  backend = backend or jax.default_backend()
  heaps = backend == 'cpu' and xla_options in ('auto', 'small_heaps')
  return 'keep_mapped' if heaps and is_glibc() else 'system'


def set_allocator(policy: str, xla_options: str = 'auto', backend: str | None = None) -> str:
  """Applies allocator `policy` to this process and returns a line that says what it chose."""
  chosen = resolve_allocator(policy, xla_options, backend)
  if chosen == 'keep_mapped':
    keep_freed_memory_mapped()
    return (f'allocator: keep_mapped (--allocator={policy}; glibc keeps freed memory mapped '
            f'between steps)')
  return f"allocator: system (--allocator={policy}; the C library's defaults)"
