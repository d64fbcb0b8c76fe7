"""The ResNet teacher's eval-mode forward with BatchNorm folded into its convolutions
(`cpu_fast_layers.conv_bn_eval`, on under `config.cpu_fast_layers`) computes the plain Flax
forward to float32 rounding, leaves training mode alone, and is what the trainer's teacher runs
only when the switch is on."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.common import DIGITS_MEAN, DIGITS_STD
from tikd_jax import sharding as sharding_lib
from tikd_jax import xla_options
from tikd_jax.models import build_model, cpu_fast_layers
from tikd_jax.models.variables import model_variables
from tikd_jax.train import run as run_lib
from tikd_jax.train.checkpoint import save_weights
from tikd_jax.train.step import _teacher_forward
from tests.test_train import tiny_config

FAST_COMPILE = xla_options.compiler_options('fast_compile', 'cpu')
KWARGS = dict(num_classes=10, mean=DIGITS_MEAN, std=DIGITS_STD)


def _teacher_variables(seed=0):
  """resnet8's variables with BatchNorm statistics, scales and biases far from their init (a
  fold of mean 0, var 1, scale 1, bias 0 would be a no-op and prove nothing)."""
  variables = model_variables(build_model('resnet8', rngs=nnx.Rngs(seed), **KWARGS))
  rng = np.random.RandomState(seed)
  values = {
      'mean': lambda s: rng.randn(*s), 'var': lambda s: rng.uniform(0.2, 3.0, s),
      'scale': lambda s: rng.uniform(0.5, 2.0, s), 'bias': lambda s: rng.randn(*s)
  }

  def perturb(path, x):
    name = path[-1].key
    if x.ndim == 1 and name in values and 'fc' not in str(path):
      return jnp.asarray(values[name](x.shape), jnp.float32)
    return x

  return jax.tree_util.tree_map_with_path(perturb, variables)


def _model(fast, variables):
  model = build_model('resnet8', rngs=nnx.Rngs(0), fast_layers=fast, **KWARGS)
  nnx.update(model, nnx.State(variables['params']), nnx.State(variables['batch_stats']))
  return model


def _images(n=4):
  return jax.random.uniform(jax.random.key(1), (n, 16, 16, 3))


def test_folded_teacher_equals_the_plain_eval_forward_values_and_gradients():
  """Logits, every named feature (stem, layer1..3, pre_logits) and the gradients of a function
  of the logits w.r.t. parameters and images, folded vs plain eval mode, to float32 rounding
  (resnet8 has stride-2 blocks with 1×1 downsample conv + BN, all folded)."""
  variables = _teacher_variables()
  images = _images()
  weights = jax.random.normal(jax.random.key(2), (images.shape[0], 10))
  results = []
  for fast in (False, True):
    graphdef, params, stats = nnx.split(_model(fast, variables), nnx.Param, nnx.BatchStat)

    def f(p, x, graphdef=graphdef, stats=stats):
      logits, out = nnx.merge(graphdef, p, stats)(x, train=False)
      return jnp.sum(jnp.tanh(logits) * weights), (logits, out)

    grad = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
    results.append(jax.jit(grad, compiler_options=FAST_COMPILE)(params, images))
  ((_, (l_plain, o_plain)), (gp_plain, gx_plain)), ((_, (l_fast, o_fast)), (gp_fast,
                                                                            gx_fast)) = results
  scale = float(jnp.max(jnp.abs(l_plain)))
  assert scale > 0.5, scale  # perturbed BN: logits of a real scale
  np.testing.assert_allclose(l_fast, l_plain, rtol=0, atol=1e-5 * scale)
  assert sorted(o_fast) == sorted(o_plain)
  for name in o_plain:
    ref = o_plain[name]
    np.testing.assert_allclose(o_fast[name], ref, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(ref))),
                               err_msg=name)
  np.testing.assert_allclose(gx_fast, gx_plain, rtol=0,
                             atol=1e-4 * float(jnp.max(jnp.abs(gx_plain))))
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(gp_fast), jax.tree.leaves(gp_fast),
                        jax.tree.leaves(gp_plain)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(b))) + 1e-7,
                               err_msg=jax.tree_util.keystr(path[0]))


def test_fast_layers_leave_the_resnet_training_forward_alone():
  """In training mode (batch statistics, running-stat updates) the switch changes nothing."""
  variables = _teacher_variables()
  outs = []
  for fast in (False, True):
    model = _model(fast, variables)
    logits, _ = model(_images(), train=True)
    outs.append((logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))))
  np.testing.assert_array_equal(outs[0][0], outs[1][0])
  for a, b in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1])):
    np.testing.assert_array_equal(a, b)


@pytest.fixture
def fold_calls(monkeypatch):
  """Counts the calls of cpu_fast_layers.conv_bn_eval (at trace time)."""
  calls = []
  real = cpu_fast_layers.conv_bn_eval

  def counted(conv, bn, x):
    calls.append(x.shape)
    return real(conv, bn, x)

  monkeypatch.setattr(cpu_fast_layers, 'conv_bn_eval', counted)
  return calls


@pytest.mark.parametrize('setting', ['off', 'on'])
def test_the_trainers_teacher_runs_folded_only_with_the_switch_on(tmp_path, fold_calls, setting):
  """run.load_teacher builds the teacher with `config.cpu_fast_layers`; the train step's teacher
  forward folds every conv + BatchNorm (resnet8: stem, 3 blocks × 2, 2 downsamples = 9) when the
  switch is on and runs the plain Flax layers when it is off."""
  path = save_weights(str(tmp_path / 'teacher'), _teacher_variables(),
                      {'model': {'name': 'resnet8', 'kwargs': KWARGS}})
  config = tiny_config('hard', **{'teacher.checkpoint': path, 'cpu_fast_layers': setting})
  mesh = sharding_lib.make_mesh(config.mesh)
  teacher = run_lib.load_teacher(config, 10, mesh, [tuple(r) for r in config.sharding_rules])
  module, logits, _ = _teacher_forward(teacher.graphdef, teacher.variables, _images(8))
  assert module.fast_layers is (setting == 'on')
  assert len(fold_calls) == (9 if setting == 'on' else 0), fold_calls
  plain = _model(False, _teacher_variables())(_images(8), train=False)[0]
  np.testing.assert_allclose(logits, plain, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(plain))))


def test_fast_layers_is_a_lowering_not_a_model_argument_of_the_resnets():
  """build_model passes the switch to the ResNets (as to the ViTs), and the variables are the
  same with and without it: checkpoints load into either."""
  on = model_variables(build_model('resnet8', rngs=nnx.Rngs(0), fast_layers=True, **KWARGS))
  off = model_variables(build_model('resnet8', rngs=nnx.Rngs(0), **KWARGS))
  assert jax.tree.structure(on) == jax.tree.structure(off)
  for a, b in zip(jax.tree.leaves(on), jax.tree.leaves(off)):
    np.testing.assert_array_equal(a, b)
