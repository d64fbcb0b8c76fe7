"""Keep the memory of XLA:CPU's freed temporaries mapped, so the next step does not fault it in.

XLA:CPU allocates every execution's temporaries afresh and frees them when the step ends. With
glibc's defaults each step's memory goes back to the kernel: blocks over the mmap threshold
(at most 32 MiB) are unmapped, and a thread arena deletes its emptied heaps (`heap_trim` in glibc's
malloc/arena.c). The next step then takes a page fault, and a zero-filled page, for every 4 KiB it
touches: in the IRKD ViT-Tiny step at 16 px, 102,000 faults and 0.19 s of system time per step
(benchmarks/host_memory.py).

Two settings together remove them (`xla_options.jit` applies both under 'auto' on CPU, to the steps
whose every intermediate fits one heap):
- XLA's `xla_multiheap_size_constraint_per_heap` cuts the temporaries into heaps of at most
  `xla_options.HEAP_BYTES`, under the mmap threshold, so glibc serves them from its arenas;
- here, `M_TOP_PAD` as large as a thread arena's heap (64 MiB) makes `heap_trim` keep emptied
  heaps, the largest fixed mmap threshold keeps blocks up to 32 MiB in the arenas, and a trim
  threshold beyond any step stops the main arena returning its top.
The process then holds its peak of temporaries, as a GPU runtime's caching allocator does. The
settings are process-wide and only ever raise what is kept; other C libraries are left alone.
"""
from __future__ import annotations

import ctypes
import functools
import platform

# mallopt(3) parameters, glibc's malloc.h.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_MAX = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: mallopt refuses more
ARENA_HEAP_BYTES = 2 * MMAP_THRESHOLD_MAX  # HEAP_MAX_SIZE: a thread arena's heap
SETTINGS = {
    M_MMAP_THRESHOLD: MMAP_THRESHOLD_MAX,
    M_TOP_PAD: ARENA_HEAP_BYTES,
    M_TRIM_THRESHOLD: (1 << 31) - 1,  # mallopt takes a C int
}


@functools.cache
def keep_freed_memory_mapped() -> bool:
  """Set glibc's malloc to keep freed memory mapped; False where the C library is not glibc."""
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  for param, value in SETTINGS.items():
    if mallopt(param, value) != 1:
      raise RuntimeError(f'glibc mallopt({param}, {value}) refused: set '
                         f"config.xla_options='no_ynn' to run without the small-heaps preset")
  return True
