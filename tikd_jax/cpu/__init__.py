"""Everything tikd-jax does only for XLA:CPU, swapped in where a run is built, never branched on in
the models:

  layers.py    the CPU layers `models.build_model(..., fast_layers=True)` substitutes (dense,
               LayerNorm, patch embedding, 3×3 convolutions, attention core, dropout masks);
  kernels.py   their C++ kernels (attention.cc, winograd.cc, parallel.h): build, load, FFI calls;
  compiler.py  the XLA:CPU compiler presets of the steps and the host allocator policy, chosen
               once at setup (compiler options) or by the application (allocator).
"""
