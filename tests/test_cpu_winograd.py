"""The XLA:CPU Winograd convolution (`conv3x3` in tikd_jax/cpu/layers.py) equals the plain 3×3
convolution and its gradients, is what a CIFAR ResNet (and the trainer's ResNet teacher) runs
under fast_layers, keeps a mesh's image sharding, and falls back where it cannot run."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tikd_jax import sharding as sharding_lib
from tikd_jax.cpu import kernels
from tikd_jax.cpu import layers as cpu_fast_layers
from tikd_jax.models import build_model, resnet_cifar
from tests.test_cpu_attention import needs_compiler, without_the_kernel

# float32 rounding of a sum of 9·C products, relative to the output's largest entry (the kernel
# measured 3e-7 to 8e-7 on the teacher's layers, XLA's own convolution 4e-7 to 7e-7)
TOLERANCE = 2e-6


@pytest.fixture(autouse=True)
def _kernel_loaded():
  """The kernel's FFI target registered, as `layers.substitute` does where a model is built: the
  tests below call `conv3x3` and `Conv3x3` directly."""
  kernels.WINOGRAD.available()


def _inputs(batch, height, width, channels, outputs, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, height, width, channels)).astype(np.float32)
  kernel = (rng.standard_normal((3, 3, channels, outputs)) / np.sqrt(9 * channels))
  return x, kernel.astype(np.float32)


def _float64_convolution(x, kernel):
  """The 3×3, stride-1, zero-padding-1 convolution in float64, written out as 9 shifted products."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  _, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(padded[:, i:i + h, j:j + w] @ kernel[i, j] for i in range(3) for j in range(3))


def _relative_error(got, want):
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


@needs_compiler
@pytest.mark.parametrize(
    'shape', [(2, 8, 8, 256, 256), (1, 10, 10, 16, 48), (3, 6, 10, 32, 16), (4, 32, 32, 64, 64)],
    ids=[
        'teacher_8x8_three_blocks', 'tile_remainder_and_half_vector_outputs', 'not_square',
        'teacher_32x32'
    ])
def test_the_kernel_equals_the_convolution(shape):
  """Every output pixel, borders included, equals the float64 convolution to float32 rounding:
  several blocks of tiles per call (C = 256), a tile count that is no multiple of the 6-tile
  register tile, an output count that is no multiple of 32, H ≠ W."""
  assert kernels.WINOGRAD.available()
  x, kernel = _inputs(*shape)
  got = jax.jit(cpu_fast_layers.conv3x3)(x, kernel)
  assert 'TikdWinogradConvForward' in str(jax.make_jaxpr(cpu_fast_layers.conv3x3)(x, kernel))
  assert _relative_error(got, _float64_convolution(x, kernel)) < TOLERANCE


@needs_compiler
def test_the_input_gradient_runs_through_the_kernel_and_the_weight_gradient_is_xlas():
  """∂x is the convolution of the output gradient with the kernel turned by 180° and its channels
  swapped: it runs through the kernel too (a second call in the gradient's jaxpr) and equals the
  float64 ∂x; ∂kernel is exactly autodiff of the plain conv. Channel counts differ (32 → 48), so a
  kernel not transposed would not even fit."""
  x, kernel = _inputs(2, 8, 8, 32, 48)
  d_y = np.random.default_rng(1).standard_normal((2, 8, 8, 48)).astype(np.float32)

  def grads(conv):
    return jax.grad(lambda x, k: jnp.sum(conv(x, k) * d_y), argnums=(0, 1))

  jaxpr = str(jax.make_jaxpr(grads(cpu_fast_layers.conv3x3))(x, kernel))
  assert len(re.findall('TikdWinogradConvForward', jaxpr)) >= 2
  got_dx, got_dkernel = jax.jit(grads(cpu_fast_layers.conv3x3))(x, kernel)
  _, want_dkernel = jax.jit(grads(cpu_fast_layers.conv3x3_plain))(x, kernel)
  # ∂x of Σ conv(x, k) ⊙ d_y = conv(d_y, k turned by 180°, in ↔ out), in float64
  want_dx = _float64_convolution(d_y, np.flip(kernel, (0, 1)).swapaxes(2, 3))
  assert _relative_error(got_dx, want_dx) < TOLERANCE
  np.testing.assert_array_equal(got_dkernel, want_dkernel)


@needs_compiler
def test_a_resnet_under_fast_layers_runs_its_stride_one_convs_through_the_kernel():
  """resnet8x4 with fast_layers gives the plain model's logits to float32 rounding, and exactly its
  four 3×3 stride-1 convs with 16k channels go through the kernel (not the 3-channel stem, not the
  two stride-2 convs). Whole-network gradients are compared per layer above: through ReLUs a
  difference of float32 rounding flips units near zero."""
  images = jnp.asarray(np.random.default_rng(1).random((4, 32, 32, 3), np.float32))
  logits, jaxprs = [], []
  for fast in (True, False):
    model = build_model('resnet8x4', rngs=nnx.Rngs(0), num_classes=10, fast_layers=fast)
    graphdef, state = nnx.split(model)

    def forward(state, graphdef=graphdef):
      return nnx.merge(graphdef, state)(images, train=False)[0]

    logits.append(np.asarray(jax.jit(forward)(state), np.float64))
    jaxprs.append(str(jax.make_jaxpr(forward)(state)))
  assert len(re.findall(r'TikdWinogradConvForward', jaxprs[0])) == 4
  assert 'TikdWinograd' not in jaxprs[1]
  assert _relative_error(logits[0], logits[1]) < TOLERANCE


@needs_compiler
def test_the_layer_adds_its_bias_and_leaves_other_convolutions_to_xla():
  """The CPU layer `Conv3x3` equals `nnx.Conv` with a bias; a stride-2 conv, odd sizes and 3
  input channels take the plain layer."""
  rngs = nnx.Rngs(0)
  conv = nnx.Conv(16, 32, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
  conv.bias[...] = jnp.linspace(-1.0, 1.0, 32)
  x = jnp.asarray(_inputs(2, 8, 8, 16, 1)[0])
  assert 'TikdWinograd' in str(
      jax.make_jaxpr(lambda x: cpu_fast_layers.Conv3x3.__call__(conv, x))(x))
  want = np.asarray(conv(x), np.float64)
  assert _relative_error(cpu_fast_layers.Conv3x3.__call__(conv, x), want) < TOLERANCE
  others = {
      'stride 2': (nnx.Conv(16, 32, (3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=rngs), x),
      'odd size': (conv, x[:, :7, :7]),
      '3 channels': (nnx.Conv(3, 32, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs), x[..., :3]),
  }
  for what, (layer, inputs) in others.items():
    jaxpr = str(
        jax.make_jaxpr(lambda x, layer=layer: cpu_fast_layers.Conv3x3.__call__(layer, x))(inputs))
    assert 'TikdWinograd' not in jaxpr, what
    np.testing.assert_array_equal(cpu_fast_layers.Conv3x3.__call__(layer, inputs), layer(inputs))


@needs_compiler
def test_the_kernel_keeps_the_image_sharding_with_no_collectives():
  """Over a mesh on the image axis each device convolves its own images with the whole kernel:
  the compiled forward + backward holds no collective and y stays sharded like x."""
  devices = jax.devices()[:4]
  assert len(devices) == 4, 'tests/conftest.py gives 8 host devices'
  mesh = sharding_lib.make_mesh((('data', 2), ('fsdp', 2)), devices)
  sharding = sharding_lib.batch_sharding(mesh)
  x, kernel = _inputs(8, 8, 8, 16, 32)
  x_s = jax.device_put(x, sharding)
  forward = jax.jit(cpu_fast_layers.conv3x3)
  assert forward(x_s, kernel).sharding.spec[0] == sharding.spec[0]
  hlo = forward.lower(x_s, kernel).compile().as_text()
  assert 'TikdWinogradConvForward' in hlo
  assert not re.search(r'all-gather|all-reduce|all-to-all|collective-permute', hlo)
  assert _relative_error(forward(x_s, kernel), _float64_convolution(x, kernel)) < TOLERANCE


def test_an_unavailable_kernel_falls_back_to_xla_with_one_warning(monkeypatch):
  """No kernel: `substitute` leaves the ResNets' 3×3 convolutions plain (decided once, for every
  model built), the convolution still runs (XLA's) and the log says why, once."""
  warnings = without_the_kernel(monkeypatch, kernels.WINOGRAD)
  x, kernel = _inputs(2, 8, 8, 16, 16)
  for _ in range(2):  # two models built
    block = cpu_fast_layers.substitute(resnet_cifar.BasicBlock(16, 16, 1, rngs=nnx.Rngs(0)))
    block.conv1.kernel[...] = kernel
    jaxpr = str(jax.make_jaxpr(block.conv1)(x))
  assert 'TikdWinograd' not in jaxpr
  assert len(warnings) == 1 and 'no C++ compiler found' in warnings[0]
  np.testing.assert_array_equal(block.conv1(x), cpu_fast_layers.conv3x3_plain(x, kernel))


@needs_compiler
@pytest.mark.parametrize('setting,kernel_calls', [('auto', 4), ('off', 0)])
def test_the_trainers_teacher_runs_the_kernel_unless_switched_off(tmp_path, setting, kernel_calls):
  """`run.load_teacher` builds the teacher under `config.cpu_fast_layers`: on CPU ('auto') the
  four 3×3 stride-1 convs of configs/tiny.py's resnet8 (16–64 channels) go through the kernel,
  'off' leaves every conv to XLA; the logits agree either way."""
  from tests.test_train import tiny_config  # pylint: disable=g-import-not-at-top
  from tikd_jax.models.variables import model_variables  # pylint: disable=g-import-not-at-top
  from tikd_jax.train import checkpoint, run  # pylint: disable=g-import-not-at-top
  config = tiny_config('hard', cpu_fast_layers=setting)
  teacher = build_model('resnet8', rngs=nnx.Rngs(0), num_classes=10, mean=config.teacher.mean,
                        std=config.teacher.std)
  path = checkpoint.save_weights(str(tmp_path), model_variables(teacher),
                                 meta={'model': {'name': 'resnet8', 'kwargs': {}}})
  with config.unlocked():
    config.teacher.checkpoint = path
  from tikd_jax.train.spec import resolve  # pylint: disable=g-import-not-at-top
  loaded = run.load_teacher(resolve(config), 10, sharding_lib.make_mesh(config.mesh))
  images = jnp.asarray(np.random.default_rng(0).random((8, 16, 16, 3), np.float32))

  def logits(variables):
    model = nnx.merge(loaded.graphdef, variables['params'], variables['batch_stats'])
    return model(images, train=False)[0]

  jaxpr = str(jax.make_jaxpr(logits)(loaded.variables))
  assert len(re.findall('TikdWinogradConvForward', jaxpr)) == kernel_calls
  want = np.asarray(teacher(images, train=False)[0], np.float64)
  assert _relative_error(jax.jit(logits)(loaded.variables), want) < TOLERANCE
