"""XLA compiler options for the jitted train and eval steps, chosen by `config.xla_options`.

On XLA:CPU this jaxlib hands dots, convolutions and reductions to YNNPACK by default. On the 2-core
AVX-512 machine this project is developed on, YNNPACK's convolutions run the ResNet32x4 teacher's
forward (batch 128, 32 px) in 3.18 s against 1.97 s with XLA's own Eigen kernels (PyTorch eager:
1.91 s), and the whole small-student distillation step in 4.04 s against 2.95 s
(benchmarks/README.md). 'auto' therefore turns the YNNPACK fusions off on CPU and leaves other
backends alone. The options are per `jax.jit` (`compiler_options=`), so they never leak into other
JAX code in the same process.
"""
from __future__ import annotations

import jax

PRESETS: dict[str, dict[str, object]] = {
    'default': {},  # jaxlib's own choice
    'no_ynn': {'xla_cpu_experimental_ynn_fusion_type': ''},
    'ynn_reduce_only': {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'},
    # Compile several times faster, run slower: LLVM at -O0, no fusion emitters. For tests and
    # smoke runs, where compiling the tiny steps costs more than running them.
    'fast_compile': {
        'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False,
        'xla_cpu_experimental_ynn_fusion_type': ''
    },
}
CPU_AUTO = 'no_ynn'


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
