"""Compiler options of the jitted steps (tikd_jax/xla_options.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tikd_jax import xla_options
from tikd_jax.models import build_model


def test_auto_turns_ynnpack_off_on_cpu_only():
  assert xla_options.compiler_options('auto', 'cpu') == {'xla_cpu_experimental_ynn_fusion_type': ''}
  assert xla_options.compiler_options('auto', 'gpu') is None
  assert xla_options.compiler_options('default', 'cpu') is None
  with pytest.raises(ValueError, match="xla_options='fastest'.*auto or one of"):
    xla_options.compiler_options('fastest', 'cpu')
  with pytest.raises(ValueError, match='XLA:CPU options; on tpu use auto or default'):
    xla_options.compiler_options('no_ynn', 'tpu')


@pytest.mark.parametrize('preset', sorted(set(xla_options.PRESETS) - {'default'}))
def test_presets_compute_what_the_default_computes(preset):
  """Same model, same input: conv + BN + dense forward and its gradient agree to float noise."""
  model = build_model('resnet8', num_classes=10, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  x = jnp.asarray(np.random.RandomState(0).rand(4, 16, 16, 3), jnp.float32)

  def loss(state, x):
    logits, _ = nnx.merge(graphdef, state)(x)
    return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

  fn = jax.value_and_grad(loss, argnums=1)
  want = jax.jit(fn)(state, x)
  got = jax.jit(fn, compiler_options=xla_options.compiler_options(preset, 'cpu'))(state, x)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)


def _outer_sum(x):
  """sum(x xᵀ): one intermediate of len(x)² floats, seen only inside a nested jit."""
  return jax.jit(lambda x: jnp.sum(jnp.outer(x, x)))(x)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason="'auto' cuts heaps on CPU only")
def test_auto_cuts_heaps_only_for_inputs_whose_intermediates_fit_one_heap(capfd):
  step = xla_options.jit(_outer_sum)
  # x xᵀ of 16.0 MiB, of 25.8 MiB (one heap of 30 MiB holds it) and of 32.1 MiB (over glibc's
  # largest mmap threshold: mapped afresh whatever glibc is told, so heaps would gain nothing).
  small, medium, large = jnp.ones(2048), jnp.ones(2600), jnp.ones(2900)
  assert xla_options.largest_intermediate_bytes(jax.make_jaxpr(_outer_sum)(large)) == 2900**2 * 4
  assert step.choose(small) is step.heaps
  assert step.choose(medium) is step.heaps
  assert step.choose(large) is step.plain
  assert len(step.chosen) == 3  # one decision per input signature
  for x in (small, medium, large):
    np.testing.assert_allclose(step(x), float(x.size)**2)
  # XLA warns once per buffer larger than a heap: a chosen step has none.
  assert 'per-heap size limit' not in capfd.readouterr().err
  assert not isinstance(xla_options.jit(_outer_sum, 'no_ynn'), type(step))  # named presets as is


def test_named_presets_report_their_own_heaps():
  assert xla_options.compiled_with_small_heaps(xla_options.jit(_outer_sum, 'small_heaps'),
                                               'small_heaps')
  assert not xla_options.compiled_with_small_heaps(xla_options.jit(_outer_sum, 'no_ynn'), 'no_ynn')
