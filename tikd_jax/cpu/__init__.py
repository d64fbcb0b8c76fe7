"""Everything tikd-jax does only for XLA:CPU, swapped in where a run is built, never branched on in
the models:

  layers.py    the CPU layers `models.build_model(..., fast_layers=True)` substitutes (dense,
               LayerNorm, patch embedding, 3×3 convolutions, attention core, dropout masks) and
               all they run while a step is traced: the C++ kernels' FFI calls and custom VJPs;
  kernels.py   the C++ kernels (attention.cc, winograd.cc, parallel.h): build and load, once,
               where the first model with the CPU layers is built;
  compiler.py  the XLA:CPU compiler presets of the steps and the host allocator policy, chosen
               once at setup (compiler options) or by the application (allocator).
"""
