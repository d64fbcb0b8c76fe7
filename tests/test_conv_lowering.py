"""benchmarks/conv_lowering.py's Winograd F(4×4, 3×3) lowering against lax.conv_general_dilated:
forward and both gradients (input, kernel) of a random linear functional, on small shapes."""
from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import conv_lowering  # noqa: E402

# The lowering's ~200 dots and fusions (forward and both backward passes) take seconds to compile
# under LLVM's full optimisation; these shapes are tiny, so optimise less.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def _relative_error(got, want):
  return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


@pytest.mark.parametrize('shape,cout', [((2, 8, 8, 16), 24), ((3, 16, 12, 8), 12)])
def test_winograd_f4x4_matches_conv_forward_and_gradients(shape, cout):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  k = jnp.asarray(
      rng.normal(size=(3, 3, shape[-1], cout)) * np.sqrt(2 / (9 * shape[-1])), jnp.float32)
  b = jnp.asarray(rng.normal(size=(cout,)), jnp.float32)
  probe = jnp.asarray(rng.normal(size=shape[:3] + (cout,)), jnp.float32)
  winograd = conv_lowering.lowerings()['winograd_f4x4']

  def reference(x, k, b, s):
    dims = ('NHWC', 'HWIO', 'NHWC')
    return lax.conv_general_dilated(x, k, (s, s), ((1, 1), (1, 1)), dimension_numbers=dims) + b

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def output_and_gradients(x, k):  # conv(x, k) and the gradients of Σ probe ⊙ conv(x, k)
    outs = []
    for conv in (winograd, reference):
      y, vjp = jax.vjp(lambda x, k, conv=conv: conv(x, k, b, 1), x, k)
      outs.append((y, *vjp(probe)))
    return outs

  tolerance = conv_lowering.WINOGRAD_F4X4_TOLERANCE
  (y, dx, dk), (want, want_dx, want_dk) = output_and_gradients(x, k)
  assert y.shape == want.shape
  assert _relative_error(y, want) < tolerance
  assert _relative_error(dx, want_dx) < tolerance, 'gradient with respect to the input'
  assert _relative_error(dk, want_dk) < tolerance, 'gradient with respect to the kernel'


def test_winograd_f4x4_rejects_sizes_not_divisible_by_4():
  x, k = jnp.zeros((1, 10, 8, 4)), jnp.zeros((3, 3, 4, 4))
  with pytest.raises(AssertionError, match='divisible by 4'):
    conv_lowering.lowerings()['winograd_f4x4'](x, k, 0., 1)
