"""Tests written for meaning-changing survivors of tests/mutate.py (tests/README.md lists them)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tikd_jax.losses import registry as terms
from tikd_jax.losses import saliency
from tikd_jax.models import build_model
from tikd_jax.models.vit import drop_path
from tikd_jax.train.step import tree_any_nonfinite


def test_tree_any_nonfinite_flags_nan_and_inf_in_float_leaves_only():
  """The step's `nonfinite` metric (what stops training on a NaN) reads every float leaf.

  Survivor: `jnp.issubdtype(x.dtype, jnp.floating)` with its arguments swapped is False for
  every dtype, so no leaf was checked and a NaN loss or gradient went unreported.
  """
  grads = {'w': jnp.ones((3,), jnp.float32), 'b': jnp.zeros((2,), jnp.bfloat16)}
  step = jnp.arange(4, dtype=jnp.int32)  # integer leaves are never non-finite
  assert not bool(tree_any_nonfinite((jnp.float32(1.0), grads, step)))
  assert bool(tree_any_nonfinite((jnp.float32(jnp.nan), grads, step)))
  assert bool(tree_any_nonfinite((jnp.float32(1.0), dict(grads, w=jnp.array([1.0, jnp.inf, 0.0])))))
  assert bool(tree_any_nonfinite({'b': jnp.array([-jnp.inf], jnp.bfloat16)}))
  assert not bool(tree_any_nonfinite({'step': step}))  # no float leaf: nothing to flag


def test_drop_path_drops_whole_samples_at_the_rate_and_rescales_the_kept_ones():
  """Stochastic depth keeps a residual branch with probability 1 − rate and divides it by
  1 − rate, so the branch's expectation is unchanged (timm `drop_path`).

  Survivor: `x / (1.0 + rate)` (the wrong rescale) passed: only seeding and eval were tested.
  """
  rate = 0.25
  x = jnp.ones((20000, 3, 2), jnp.float32)
  y = np.asarray(drop_path(x, rate, jax.random.key(0)))
  kept = y[:, 0, 0] != 0
  # Whole samples: every element of a row is dropped, or kept and scaled by 1 / (1 − rate).
  np.testing.assert_array_equal(y[~kept], 0.0)
  np.testing.assert_allclose(y[kept], 1.0 / (1.0 - rate), rtol=1e-6)
  assert abs(kept.mean() - (1.0 - rate)) < 0.02
  assert abs(y.mean() - 1.0) < 0.03  # the expectation is preserved
  np.testing.assert_array_equal(drop_path(x, rate, None), x)  # eval / no rng: identity
  np.testing.assert_array_equal(drop_path(x, 0.0, jax.random.key(0)), x)


def test_caption_free_fusion_does_not_train_the_text_predictor():
  """Without a caption the fused pass reads the text predictor's output under stop_gradient:
  the predictor learns only from its own cosine loss, never from the classification loss.

  Survivor: dropping that stop_gradient in `_text_fusion` passed (the forward is unchanged).
  """
  model = build_model('distilled_vit', variant='micro', img_size=16, num_classes=10, text_dim=12,
                      drop_path=0.0, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  images = jax.random.uniform(jax.random.key(1), (3, 16, 16, 3))

  def loss(p):
    logits, out = nnx.merge(graphdef, p)(images, train=True, text=None, fuse_text=True)
    return jnp.sum(logits**2) + jnp.sum(out['dist_logits']**2)

  grads = nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))
  predictor = jax.tree.leaves(grads['text_predictor'])
  assert predictor and all(np.all(np.asarray(g) == 0.0) for g in predictor)
  assert any(np.any(np.asarray(g) != 0.0) for g in jax.tree.leaves(grads['text_decoder']))


def _random_weights(model, seed):
  """Weights far from timm's near-zero init, so that saliency maps are far from flat."""
  rng = np.random.default_rng(seed)
  params = nnx.state(model, nnx.Param)
  nnx.update(
      model,
      jax.tree.map(
          lambda p: jnp.asarray(
              rng.normal(0.0, 1.0 / np.sqrt(p.shape[0])
                         if p.ndim > 1 else 0.3, p.shape), p.dtype), params))
  return model


@pytest.mark.parametrize('name', ['attention_saliency', 'gradient_saliency'])
def test_saliency_terms_pass_their_layers_on(name):
  """The IRKD loss terms compute the saliency loss over the configured layers.

  Survivor: `{'layers': layers} if not layers else {}` in the gradient term (configured layers
  ignored, the notebooks' default used) passed: no test ran the gradient term through
  `losses/saliency.py`.
  """
  student = _random_weights(
      build_model('irkd_vit', variant='micro', img_size=16, num_classes=10, drop_path=0.0,
                  rngs=nnx.Rngs(0)), 1)
  teacher = _random_weights(
      build_model('vit', variant='micro', img_size=16, num_classes=10, drop_path=0.0,
                  rngs=nnx.Rngs(0)), 2)
  images = jax.random.uniform(jax.random.key(3), (2, 16, 16, 3))
  _, out = student(images, train=True)
  _, teacher_out = teacher(images)
  ctx = terms.Context(out=out, labels=jnp.zeros((2,), jnp.int32), targets=jnp.zeros(
      (2, 10)), epoch=jnp.float32(1.0), step=jnp.int32(0), teacher_out=teacher_out, student=student,
                      teacher=teacher)
  models = dict(student_prefix=student.num_prefix, teacher_prefix=teacher.num_prefix)
  if name == 'gradient_saliency':
    direct = lambda layers: saliency.gradient_saliency_loss(
        out, teacher_out, student_classifier=student.head, teacher_classifier=teacher.head, layers=
        layers, **models)
  else:
    direct = lambda layers: saliency.attention_saliency_loss(out, teacher_out, layers=layers, **
                                                             models)
  term = terms.get_term(name).fn
  values = {}
  for spec, layers in (('0,1', (0, 1)), ('1', (1,)), ('0', (0,))):
    values[spec] = float(term(ctx, layers=spec)[0])
    np.testing.assert_allclose(values[spec], float(direct(layers)), rtol=1e-6)
  if name == 'attention_saliency':  # '' means every layer pair
    np.testing.assert_allclose(float(term(ctx)[0]), float(direct('all')), rtol=1e-6)
  assert abs(values['1'] - values['0']) > 1e-3 * max(values.values())  # layers matter here
