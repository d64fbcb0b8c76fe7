"""Compiler options of the jitted steps (tikd_jax/cpu/compiler.py)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tikd_jax.cpu import compiler
from tikd_jax.models import build_model


def test_auto_turns_ynnpack_off_on_cpu_only():
  assert compiler.compiler_options('auto', 'cpu') == {'xla_cpu_experimental_ynn_fusion_type': ''}
  assert compiler.compiler_options('auto', 'gpu') is None
  assert compiler.compiler_options('default', 'cpu') is None
  with pytest.raises(ValueError, match="xla_options='fastest'.*auto or one of"):
    compiler.compiler_options('fastest', 'cpu')
  with pytest.raises(ValueError, match='XLA:CPU options; on tpu use auto or default'):
    compiler.compiler_options('no_ynn', 'tpu')


@pytest.mark.parametrize('preset', sorted(set(compiler.PRESETS) - {'default'}))
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
  got = jax.jit(fn, compiler_options=compiler.compiler_options(preset, 'cpu'))(state, x)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)


def _outer_sum(x):
  """sum(x xᵀ): one intermediate of len(x)² floats, seen only inside a nested jit."""
  return jax.jit(lambda x: jnp.sum(jnp.outer(x, x)))(x)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason="'auto' cuts heaps on CPU only")
def test_auto_cuts_heaps_only_for_inputs_whose_intermediates_fit_one_heap(capfd):
  heaps = {**compiler.NO_YNN, **compiler.SMALL_HEAPS}
  # x xᵀ of 16.0 MiB, of 25.8 MiB (one heap of 30 MiB holds it) and of 32.1 MiB (over glibc's
  # largest mmap threshold: mapped afresh whatever glibc is told, so heaps would gain nothing).
  small, medium, large = jnp.ones(2048), jnp.ones(2600), jnp.ones(2900)
  assert compiler.largest_intermediate_bytes(jax.make_jaxpr(_outer_sum)(large)) == 2900**2 * 4
  chosen = {}
  for x in (small, medium, large):  # decided from shapes alone, as setup does
    chosen[x.size] = compiler.step_options('auto', _outer_sum,
                                           jax.ShapeDtypeStruct(x.shape, x.dtype))
  assert chosen[small.size] == heaps
  assert chosen[medium.size] == heaps
  assert chosen[large.size] == compiler.NO_YNN
  for x in (small, medium, large):
    step = jax.jit(_outer_sum, compiler_options=chosen[x.size])
    np.testing.assert_allclose(step(x), float(x.size)**2)
  # XLA warns once per buffer larger than a heap: a chosen step has none.
  assert 'per-heap size limit' not in capfd.readouterr().err
  # named presets as they are, without tracing the step
  assert compiler.step_options('no_ynn', None, small) == compiler.NO_YNN


def test_named_presets_report_their_own_heaps():
  assert compiler.uses_small_heaps(compiler.step_options('small_heaps', _outer_sum))
  assert not compiler.uses_small_heaps(compiler.step_options('no_ynn', _outer_sum))


def _text_features_dir(path, source, dim=24):
  """A caption-feature directory for `source` (random rows), as the text teacher writes it."""
  features = np.random.default_rng(0).standard_normal((len(source), dim)).astype(np.float32)
  np.save(path / 'features.npy', features)
  (path / 'meta.json').write_text(
      json.dumps({
          'dim': dim, 'dtype': 'float32', 'num_examples': len(source), 'dataset': {
              'name': source.name, 'split': source.split, 'fingerprint': source.fingerprint()
          }
      }))
  return str(path)


@pytest.mark.parametrize('text', [False, True], ids=['images', 'images_and_text'])
def test_setup_decides_a_steps_options_on_the_batch_the_pipeline_yields(tmp_path, text):
  """`run.abstract_batch`, what `step_options` traces a phase's step on, has the keys, shapes and
  dtypes of the input pipeline's first batch of that phase (curriculum resolutions, text)."""
  from tests.test_train import tiny_config  # pylint: disable=g-import-not-at-top
  from tikd_jax.data import build_source  # pylint: disable=g-import-not-at-top
  from tikd_jax.train import loop, run  # pylint: disable=g-import-not-at-top
  config = tiny_config('none', **{'curriculum.stages': [(8, 1), (16, 1)]})
  if text:
    with config.unlocked():
      config.text.features_dir = _text_features_dir(tmp_path, build_source(config.data, 'train'))
      config.curriculum.stages = []
      config.stages = [dict(name='fused12', epochs=1.0, resolution=12, fuse_text=True)]
  r = run.setup(config, str(tmp_path / 'run'))
  for phase in r.phases:
    stream = loop.train_stream(r, phase, phase.start_step)
    batch = next(stream.iterator)
    stream.close()
    want = {k: (np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}
    got = {k: (v.shape, v.dtype) for k, v in run.abstract_batch(r, phase).items()}
    assert got == want, phase.name
    assert ('text' in got) == text
