r"""The ViT's dense-layer matrix products on XLA:CPU under each dot library, beside PyTorch.

  python benchmarks/dense_dots.py [--models vit_tiny,irkd_teacher] [--rows 2304] [--runs 15]
      [--out benchmarks/results/dense_dots.jsonl]

For every dense layer of a block (qkv d → 3d, proj d → d, fc1 d → mlp, fc2 mlp → d; widths from
tikd_jax/models/vit.py's SIZES) and M token rows (B·N: 2304 = 128 images × 18 tokens, the IRKD
student at 16 px; 8448 = 128 × 66, the 32-px students), the three float32 products of the layer's
forward and backward, as tikd_jax/cpu/layers.py's dense VJP writes them:

  forward   x[M, in] · W[in, out]
  dx        dy[M, out] · W[in, out]ᵀ
  dW        x[M, in]ᵀ · dy[M, out]

each timed as:

  xla           one jitted lax.dot_general under XLA:CPU's own Eigen dot (xla_options 'auto')
  xla@<lib>     the same under XLA:CPU's library-dot options (YNNPACK / XNNPACK / oneDNN)
  torch         PyTorch (MKL / oneDNN sgemm), its default thread count

Thread pools spin for a while after a call (PyTorch's libgomp, numpy's OpenBLAS) and slow
whichever millisecond-scale contestant comes next: unpaused, an Eigen program that followed
PyTorch in the rotation timed 20–30 % slower than the same program elsewhere in it. So every call
waits PAUSE_S first. numpy is left out (its OpenBLAS spun longer still: 1.7×).

Every XLA contestant is checked against the float64 product (1e-5 of its scale) and refused if it
differs. Inputs stay on the device: jitted calls on numpy arrays would copy them every call.
Contestants run interleaved (order rotated every round) in this one process; one JSON line each,
then one `dense_dots_block` line per model and way: the sum over a block's 4 layers × 3 products.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks.attention_core import NO_YNN, OPTIONS  # noqa: E402  pylint: disable=g-import-not-at-top

PRODUCTS = ('forward', 'dx', 'dW')
TOLERANCE = 1e-5
PAUSE_S = 0.05


def layers(model: str) -> dict[str, tuple[int, int]]:
  """A block's dense layers of `model` (a vit.SIZES name): name → (in, out) features."""
  from tikd_jax.models.vit import SIZES  # pylint: disable=g-import-not-at-top
  d, mlp = SIZES[model].dim, SIZES[model].mlp_dim
  return {'qkv': (d, 3 * d), 'proj': (d, d), 'fc1': (d, mlp), 'fc2': (mlp, d)}


def products() -> dict:
  """product → f(x, w, dy), the dot_generals of the CPU Linear's dense forward and VJP."""
  from jax import lax  # pylint: disable=g-import-not-at-top
  return {
      'forward': lambda x, w, dy: lax.dot_general(x, w, (((1,), (0,)), ((), ()))),
      'dx': lambda x, w, dy: lax.dot_general(dy, w, (((1,), (1,)), ((), ()))),
      'dW': lambda x, w, dy: lax.dot_general(x, dy, (((0,), (0,)), ((), ()))),
  }


# The same three products with `@`, for numpy (the float64 reference) and torch tensors alike.
MATMULS = {
    'forward': lambda x, w, dy: x @ w,
    'dx': lambda x, w, dy: dy @ w.T,
    'dW': lambda x, w, dy: x.T @ dy,
}


def _operands(rows: int, features_in: int, features_out: int, seed: int = 0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  shapes = ((rows, features_in), (features_in, features_out), (rows, features_out))
  return tuple(rng.standard_normal(shape).astype('float32') for shape in shapes)


def contestants(product: str, rows: int, features_in: int, features_out: int) -> tuple[dict, dict]:
  """(way → timed callable, XLA way → max error against the float64 product, relative to its
  largest entry)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  operands = _operands(rows, features_in, features_out)
  exact = MATMULS[product](*(a.astype('float64') for a in operands))
  on_device = [jax.device_put(a) for a in operands]
  fns, errors = {}, {}
  for way, options in {'xla': NO_YNN, **{f'xla@{k}': v for k, v in OPTIONS.items()}}.items():
    compiled = jax.jit(products()[product], compiler_options=options).lower(*on_device).compile()
    error = np.max(np.abs(np.asarray(compiled(*on_device)) - exact)) / np.max(np.abs(exact))
    errors[way] = float(error)
    fns[way] = lambda c=compiled: jax.block_until_ready(c(*on_device))
  tensors = [torch.from_numpy(a) for a in operands]
  fns['torch'] = lambda: MATMULS[product](*tensors)
  return fns, errors


def run(model: str, rows: int, runs: int, emit) -> None:
  block: dict[str, float] = {}
  for layer, (features_in, features_out) in layers(model).items():
    for product in PRODUCTS:
      fns, errors = contestants(product, rows, features_in, features_out)
      for fn in fns.values():
        fn()  # warm-up
      flops = 2 * rows * features_in * features_out
      for way, (t, loads) in report.interleave(fns, runs, PAUSE_S).items():
        median = statistics.median(t)
        block[way] = block.get(way, 0.0) + median
        milliseconds = {
            'median_ms': median,
            'p10_ms': report.quantile(t, 0.1),
            'p90_ms': report.quantile(t, 0.9),
        }
        row = {
            'name': 'dense_dot',
            'model': model,
            'layer': layer,
            'product': product,
            'rows': rows,
            'in': features_in,
            'out': features_out,
            'way': way,
            'runs': runs,
            **{k: round(v * 1e3, 3) for k, v in milliseconds.items()},
            'gflop_per_s': round(flops / median / 1e9, 1),
            'load_1m': report.load_summary(loads),
        }
        if way in errors:
          row['max_rel_error'] = float(f'{errors[way]:.2e}')
          if errors[way] > TOLERANCE:
            raise AssertionError(f'{way} {product} of {model} {layer} differs from the float64 '
                                 f'product by {errors[way]:.1e}')
        emit(row)
  for way, seconds in block.items():
    emit({
        'name': 'dense_dots_block',
        'model': model,
        'rows': rows,
        'way': way,
        'sum_of_medians_ms': round(seconds * 1e3, 2),
        'torch_over_way': round(block['torch'] / seconds, 3),
    })


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', default='vit_tiny,irkd_teacher')
  parser.add_argument('--rows', default='2304', help='token rows B·N, comma-separated')
  parser.add_argument('--runs', type=int, default=15)
  parser.add_argument('--out', default=None)
  args = parser.parse_args(argv)
  with report.JsonLines(args.out) as emit:
    for rows in (int(r) for r in args.rows.split(',')):
      for model in args.models.split(','):
        run(model, rows, args.runs, emit)


if __name__ == '__main__':
  main()
