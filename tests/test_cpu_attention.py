"""The XLA:CPU attention kernel (`attention` in tikd_jax/cpu/layers.py) equals the plain formula,
forward and gradient, keeps a mesh's image sharding, and says what to do when it cannot be built
(tikd_jax/cpu/kernels.py)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging
from flax import nnx

from tikd_jax import sharding as sharding_lib
from tikd_jax.cpu import kernels, layers
from tikd_jax.models import build_model, vit

# float32 rounding of sums over ≤ 66 terms, relative to each output's largest entry
TOLERANCE = 2e-6


def _has_compiler() -> bool:
  try:
    return bool(kernels.compiler())
  except kernels.KernelUnavailable:
    return False


# Without a C++ compiler the kernel cannot be built; the model then runs the plain formula (the
# fallback tests below still run).
needs_compiler = pytest.mark.skipif(not _has_compiler(), reason='no C++ compiler on this machine')


@pytest.fixture(autouse=True)
def _kernel_loaded():
  """The kernel's FFI targets registered, as `layers.substitute` does where a model is built: the
  tests below call `layers.attention` directly."""
  kernels.ATTENTION.available()


def _inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  b, n, h, d = shape
  q, k, v, d_out = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
  d_probs = rng.standard_normal((b, h, n, n)).astype(np.float32)
  return q, k, v, d_out, d_probs


def _forward_and_grads(attention, q, k, v, d_out, d_probs, scale):
  """out, probs and ∂⟨(out, probs), (d_out, d_probs)⟩/∂(q, k, v); d_probs None: out only."""

  def objective(q, k, v):
    out, probs = attention(q, k, v, scale)
    return jnp.sum(out * d_out) + (0.0 if d_probs is None else jnp.sum(probs * d_probs))

  out, probs = jax.jit(lambda q, k, v: attention(q, k, v, scale))(q, k, v)
  return (out, probs) + jax.jit(jax.grad(objective, argnums=(0, 1, 2)))(q, k, v)


def _relative_errors(got, want):
  return [float(np.max(np.abs(g - w)) / np.max(np.abs(w))) for g, w in zip(got, want)]


@needs_compiler
@pytest.mark.parametrize('shape', [(4, 66, 8, 16), (3, 17, 2, 24), (2, 5, 3, 40)],
                         ids=['small_student', 'odd_sizes', 'wide_head'])
@pytest.mark.parametrize('reads_probs', [True, False], ids=['out_and_probs', 'out_only'])
def test_the_kernel_equals_the_plain_formula_forward_and_backward(shape, reads_probs):
  """Every output (out, probs) and every gradient (q, k, v) of the kernel equals the model's plain
  formula to float32 rounding: at the student's shape, at sizes that are no multiple of the 16-lane
  vector, and with or without a cotangent on probs (the backward without d_probs)."""
  assert kernels.ATTENTION.available()
  q, k, v, d_out, d_probs = _inputs(shape)
  scale = shape[-1]**-0.5
  d_probs = d_probs if reads_probs else None
  got = _forward_and_grads(layers.attention, q, k, v, d_out, d_probs, scale)
  want = _forward_and_grads(vit.attention_core, q, k, v, d_out, d_probs, scale)
  errors = _relative_errors(got, want)
  assert max(errors) < TOLERANCE, dict(zip(('out', 'probs', 'dq', 'dk', 'dv'), errors))
  np.testing.assert_allclose(np.sum(np.asarray(got[1]), -1), 1.0, rtol=2e-6)


@needs_compiler
def test_the_model_takes_the_kernel_under_fast_layers_and_matches_the_plain_model():
  """A DistilledViT with fast_layers runs the kernel (its jaxpr holds the FFI calls) and gives the
  plain model's logits, attention maps and parameter gradients to float32 rounding."""
  images = jnp.asarray(np.random.default_rng(1).random((4, 32, 32, 3), np.float32))
  results = []
  for fast in (True, False):
    model = build_model('distilled_vit', rngs=nnx.Rngs(0), variant='micro', num_classes=10,
                        fast_layers=fast)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, graphdef=graphdef, rest=rest):
      logits, out = nnx.merge(graphdef, p, rest)(images, train=False)
      return jnp.sum(logits**2), out['attn0']

    (_, attn), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    jaxpr = str(jax.make_jaxpr(loss)(params))
    results.append((attn, grads, jaxpr))
  (attn_fast, grads_fast, jaxpr_fast), (attn_plain, grads_plain, jaxpr_plain) = results
  assert 'TikdAttentionForward' in jaxpr_fast and 'TikdAttention' not in jaxpr_plain
  assert _relative_errors([attn_fast], [attn_plain])[0] < TOLERANCE
  for g, w in zip(jax.tree.leaves(grads_fast), jax.tree.leaves(grads_plain)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * float(np.max(np.abs(w))))


@needs_compiler
@pytest.mark.parametrize('axes', [(('data', 4),), (('data', 2), ('fsdp', 2))],
                         ids=['data', 'data_and_fsdp'])
def test_the_kernel_keeps_the_image_sharding_with_no_collectives(axes):
  """Under a mesh over the image axis each device runs the kernel on its own images: the compiled
  forward + backward holds no collective and the gradient stays sharded like q (XLA gathers a
  plain custom call's operands onto every device). The images may be split over several mesh
  axes at once (the trainer's data + fsdp batch sharding)."""
  devices = jax.devices()[:4]
  assert len(devices) == 4, 'tests/conftest.py gives 8 host devices'
  mesh = sharding_lib.make_mesh(axes, devices)
  sharding = sharding_lib.batch_sharding(mesh)
  q, k, v, d_out, _ = _inputs((8, 66, 4, 16))
  q_s, k_s, v_s = (jax.device_put(x, sharding) for x in (q, k, v))

  def objective(q, k, v):
    return jnp.sum(layers.attention(q, k, v, 0.25)[0] * d_out)

  grads = jax.jit(jax.grad(objective, argnums=(0, 1, 2)))
  hlo = grads.lower(q_s, k_s, v_s).compile().as_text()
  assert not re.search(r'all-gather|all-reduce|all-to-all|collective-permute', hlo)
  got = grads(q_s, k_s, v_s)
  assert got[0].sharding.spec[0] == sharding.spec[0]
  want = jax.grad(lambda q, k, v: jnp.sum(vit.attention_core(q, k, v, 0.25)[0] * d_out),
                  argnums=(0, 1, 2))(q, k, v)
  assert max(_relative_errors(got, want)) < TOLERANCE


def test_without_a_compiler_the_error_says_what_to_install(monkeypatch, tmp_path):
  monkeypatch.setenv('TIKD_JAX_CACHE', str(tmp_path))
  monkeypatch.delenv('CXX', raising=False)
  monkeypatch.setattr(kernels.shutil, 'which', lambda name: None)
  with pytest.raises(kernels.KernelUnavailable, match=r'apt install g\+\+.*cpu_fast_layers=off'):
    kernels.ATTENTION.build()


def test_a_failed_compile_shows_the_command_and_leaves_nothing_half_written(monkeypatch, tmp_path):
  monkeypatch.setenv('TIKD_JAX_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', '/bin/false')  # a "compiler" that fails every time
  with pytest.raises(kernels.KernelUnavailable, match=r'compiling attention.cc failed'):
    kernels.ATTENTION.build()
  assert not list((tmp_path / 'kernels').iterdir())


def without_the_kernel(monkeypatch, kernel) -> list[str]:
  """`kernel` (kernels.ATTENTION, kernels.WINOGRAD) unavailable as on a machine without a
  compiler, its availability not yet decided; returns the list the logged warnings go to."""
  monkeypatch.setattr(kernel, 'availability', None)

  def no_kernel():
    raise kernels.KernelUnavailable('no C++ compiler found')

  monkeypatch.setattr(kernel, 'load', no_kernel)
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *args: warnings.append(msg % args))
  return warnings


def test_an_unavailable_kernel_falls_back_to_the_plain_formula_with_one_warning(monkeypatch):
  """No kernel: the attention layers `substitute` swaps in keep the plain formula (decided once,
  for every model built) and the log says why, once."""
  warnings = without_the_kernel(monkeypatch, kernels.ATTENTION)
  for _ in range(2):  # two models built
    attention = layers.substitute(vit.Attention(16, 2, rngs=nnx.Rngs(0))).core
  q, k, v, _, _ = _inputs((2, 5, 2, 8))
  jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention(q, k, v, 0.5))(q, k, v))
  assert 'TikdAttention' not in jaxpr
  assert len(warnings) == 1 and 'no C++ compiler found' in warnings[0]
  got = attention(q, k, v, 0.5)
  want = vit.attention_core(q, k, v, 0.5)
  assert max(_relative_errors(got, want)) == 0.0
