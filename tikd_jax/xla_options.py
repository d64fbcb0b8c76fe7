"""XLA compiler options for the jitted train and eval steps, chosen by `config.xla_options`.

On XLA:CPU this jaxlib hands dots, convolutions and reductions to YNNPACK by default. On the 2-core
AVX-512 machine this project is developed on, YNNPACK's convolutions run the ResNet32x4 teacher's
forward (batch 128, 32 px) in 3.18 s against 1.97 s with XLA's own Eigen kernels (PyTorch eager:
1.91 s), and the whole small-student distillation step in 4.04 s against 2.95 s
(benchmarks/README.md). 'auto' therefore turns the YNNPACK fusions off on CPU and leaves other
backends alone. The options are per `jax.jit` (`compiler_options=`), so they never leak into other
JAX code in the same process.

'auto' on CPU also cuts a step's temporaries into heaps of `HEAP_BYTES`
(`xla_multiheap_size_constraint_per_heap`) when every intermediate of the step fits in one, which
glibc then serves from its arenas, and tells glibc to keep freed memory mapped
(tikd_jax/host_malloc.py); `jit` decides at a step's first call from its traced program. Without
this every step faults its temporaries back in: the IRKD ViT-Tiny step at 12 / 16 / 24 px took
0.62 / 1.03 / 2.40 s against 0.57 / 0.93 / 2.22 s with it. Steps with a larger intermediate (the
ResNet32x4 teacher's 32 MiB activations at batch 128, IRKD from 28 px on) gain nothing, since
glibc maps such blocks afresh whatever it is told, and would hold about twice the temporaries:
they compile as before (benchmarks/README.md, "session 29").
"""
from __future__ import annotations

import math
from typing import Callable

import jax

from tikd_jax import host_malloc

# Under glibc's largest mmap threshold (host_malloc.MMAP_THRESHOLD_MAX) with room for its chunk
# header; a step whose every intermediate fits one heap compiles without XLA's warning per buffer.
HEAP_BYTES = 30 << 20
SMALL_HEAPS = {'xla_multiheap_size_constraint_per_heap': HEAP_BYTES}
NO_YNN = {'xla_cpu_experimental_ynn_fusion_type': ''}

PRESETS: dict[str, dict[str, object]] = {
    'default': {},  # jaxlib's own choice
    'no_ynn': NO_YNN,
    'small_heaps': dict(NO_YNN, **SMALL_HEAPS),  # whatever the step's intermediates
    'ynn_reduce_only': {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'},
    # Compile several times faster, run slower: LLVM at -O0, no fusion emitters. For tests and
    # smoke runs, where compiling the tiny steps costs more than running them.
    'fast_compile': {
        'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False, **NO_YNN
    },
}
CPU_AUTO = 'no_ynn'  # and SMALL_HEAPS for the steps they fit (`jit`)


def compiler_options(name: str = 'auto', backend: str | None = None) -> dict[str, object] | None:
  """The options of preset `name` ('auto' picks per backend); None when there are none."""
  backend = backend or jax.default_backend()
  if name == 'auto':
    name = CPU_AUTO if backend == 'cpu' else 'default'
  if name not in PRESETS:
    raise ValueError(f'config.xla_options={name!r}: use auto or one of {sorted(PRESETS)}')
  if PRESETS[name] and backend != 'cpu':
    raise ValueError(f'config.xla_options={name!r} holds XLA:CPU options; on {backend} use auto '
                     f'or default')
  return dict(PRESETS[name]) or None


def jit(fn: Callable, name: str = 'auto', **jit_kwargs) -> Callable:
  """`jax.jit(fn, **jit_kwargs)` compiled with preset `name`'s options: the trainer's and
  evaluator's steps. Under 'auto' on CPU, each input signature's first call traces the step and
  adds SMALL_HEAPS when its largest intermediate fits in one heap."""
  options = compiler_options(name)
  if name != 'auto' or jax.default_backend() != 'cpu':
    if options and SMALL_HEAPS.items() <= options.items():
      host_malloc.keep_freed_memory_mapped()
    return jax.jit(fn, compiler_options=options, **jit_kwargs)
  return _SmallHeapsWhereTheyFit(
      jax.jit(fn, compiler_options=options, **jit_kwargs),
      jax.jit(fn, compiler_options={**options, **SMALL_HEAPS}, **jit_kwargs))


class _SmallHeapsWhereTheyFit:
  """Calls `heaps` for the input signatures whose traced program has no intermediate over
  HEAP_BYTES, `plain` for the others (both share one trace: jax caches it per
  function, whatever the compiler options)."""

  def __init__(self, plain, heaps):
    self.plain, self.heaps = plain, heaps
    self.chosen: dict = {}  # input signature → the jitted function it runs

  def choose(self, *args):
    # Every call: shapes and dtypes read off the leaves (~0.2 ms for an IRKD state, where
    # jnp.result_type took 1.7 ms).
    leaves, treedef = jax.tree.flatten(args)
    signature = (treedef,
                 tuple((getattr(x, 'shape', ()), getattr(x, 'dtype', type(x))) for x in leaves))
    if signature not in self.chosen:
      fits = largest_intermediate_bytes(self.plain.trace(*args).jaxpr) <= HEAP_BYTES
      if fits:
        host_malloc.keep_freed_memory_mapped()
      self.chosen[signature] = self.heaps if fits else self.plain
    return self.chosen[signature]

  def __call__(self, *args):
    return self.choose(*args)(*args)

  def lower(self, *args):
    return self.choose(*args).lower(*args)


def compiled_with_small_heaps(step, name: str = 'auto') -> bool:
  """Whether `step`, from `jit(fn, name)`, runs with SMALL_HEAPS for some input signature it has
  seen (under a named preset: whether the preset holds them)."""
  if isinstance(step, _SmallHeapsWhereTheyFit):
    return any(fn is step.heaps for fn in step.chosen.values())
  return SMALL_HEAPS.items() <= (compiler_options(name) or {}).items()


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
