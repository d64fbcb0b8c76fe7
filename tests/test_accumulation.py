"""Gradient accumulation (`StepOptions.grad_accum_steps`, `--config.grad_accum_steps`) through
the real jitted train step.

Semantics (PyTorch's `loss.backward()` on k micro-batches, then one `optimizer.step()`): the
micro-batches are the strided rows j, j + k, j + 2k, … of the global batch; gradients are
averaged. For losses that are means over examples and a LayerNorm student this equals the full
batch. BatchNorm normalises each micro-batch with its own statistics and updates the running
statistics micro-batch after micro-batch; PKCD treats each micro-batch as a batch whose "previous
batch" is the micro-batch before it. Those two are checked against sequential references written
here (the model and the losses called one micro-batch at a time, no `_accumulate` code).

Everything is compared after SGD steps (no Adam division to amplify differences) by `diff`:
max |a − b| over a pytree relative to max |b|, at most RTOL (PKCD_RTOL for PKCD). The measured
differences (float32 sums in another order) are printed by `pytest -s`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import kd_cifar100
from configs.common import DIGITS_MEAN, DIGITS_STD
from tikd_jax import sharding as sharding_lib
from tikd_jax.cpu import compiler
from tikd_jax.data import build_source
from tikd_jax.losses.pkcd import pkcd_init_state, pkcd_loss
from tikd_jax.models import build_model
from tikd_jax.models.variables import model_variables
from tikd_jax.train import trainer
from tikd_jax.train.checkpoint import save_weights
from tikd_jax.losses import registry as loss_terms
from tests.method_loss import method_loss
from tikd_jax.train.state import init_train_state
from tikd_jax.train.step import StepOptions, make_train_step
from tests.test_train import tiny_config

B, C = 32, 10
LR = 0.05  # plain SGD: updated parameters are params − LR · grads
STEP0 = 4  # steps_per_epoch 1 → epoch 5: CTKD's λ > 0, DKD's warm-up 5/20
RTOL = 1e-5  # measured ≤ 1.6e-6 (means over examples, CTKD's temperature, BatchNorm)
PKCD_RTOL = 3e-5  # measured ≤ 3.3e-6: InfoNCE and Pearson terms amplify rounding more
DECOMPOSABLE = ('none', 'soft', 'hard', 'kd', 'dkd', 'ctkd')
# Compiling is most of this file's time: on XLA:CPU these options compile its tiny programs 5×
# faster (pkcd k = 2: 2 s against 10 s) and change no result beyond float32 rounding.
jit = functools.partial(
    jax.jit, compiler_options=(compiler.compiler_options('fast_compile')
                               if jax.default_backend() == 'cpu' else None))


def record_grads() -> optax.GradientTransformation:
  """Keeps the step's gradients in the optimizer state, so a test reads what the step computed."""
  return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                      lambda updates, state, params=None: (updates, updates))


TX = optax.chain(record_grads(), optax.sgd(LR))


def grads_of(state):
  return state.opt_state[0]


def diff(a, b, absolute=False):
  """max |a − b| over all arrays of two pytrees, relative to max |b| (the tree's scale: a
  gradient entry that is a small residue of cancelling terms is not held to its own size)."""
  pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
  d = max(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))) for x, y in pairs)
  return d if absolute else d / max(max(np.max(np.abs(np.asarray(y))) for _, y in pairs), 1e-30)


def assert_same(what, rtol=RTOL, **pairs):
  """Each name=(actual, expected) within rtol by `diff`; prints the measured differences."""
  print(
      what + ':', ', '.join(f'{n} {diff(a, b, absolute=True):.1e} abs {diff(a, b):.1e} rel'
                            for n, (a, b) in pairs.items()))
  for name, (a, b) in pairs.items():
    assert diff(a, b) <= rtol, f'{what}: {name} differs by {diff(a, b):.2e} > {rtol:.0e}'


@pytest.fixture(scope='module')
def data():
  source = build_source(tiny_config().data, 'train')
  batches = [{
      'image': jnp.asarray(source.images[i * B:(i + 1) * B]),
      'label': jnp.asarray(source.labels[i * B:(i + 1) * B])
  } for i in range(2)]
  teacher = confident(build_model('resnet8', num_classes=C, rngs=nnx.Rngs(5)))
  tgraph, tparams, tstats = nnx.split(teacher, nnx.Param, nnx.BatchStat)
  teacher_vars = {'params': nnx.to_pure_dict(tparams), 'batch_stats': nnx.to_pure_dict(tstats)}

  @jit
  def teacher_logits(images):
    model = nnx.merge(tgraph, teacher_vars['params'], teacher_vars['batch_stats'])
    return model(images.astype(jnp.float32) / 255.0, train=False)[0]

  return batches, tgraph, teacher_vars, teacher_logits


def confident(model, scale=20.0):
  """Classifier kernels × scale: logits a few units apart, as a trained model's are. At random
  init they are ~0.1 apart, the softened distributions nearly uniform, and the small KD and
  Pearson terms dominated by float32 cancellation (up to 1e-4 relative in any summation order)."""
  for head in ('fc', 'head', 'head_dist'):
    if hasattr(model, head):
      getattr(model, head).kernel[...] *= scale
  return model


@functools.cache
def vit(drop_path=0.0):
  return confident(
      build_model('distilled_vit', variant='micro', img_size=16, num_classes=C, drop_path=drop_path,
                  rngs=nnx.Rngs(0)))


def setup_step(student, method, k, *, tgraph=None, seed=0, step0=STEP0, state_rows=None):
  """(unjitted step, initial state) for `student` trained with `method` (a name or a
  Loss) on k micro-batches."""
  objective = method if isinstance(method, loss_terms.Loss) else method_loss(
      kd_cifar100.get_config(method).distill)
  graphdef, _, _ = nnx.split(student, nnx.Param, nnx.BatchStat)
  variables = model_variables(student)
  state = init_train_state(variables, objective, TX, rng=jax.random.key(0),
                           shapes={'rows': state_rows or B // k, 'num_classes': C}, step=step0)
  fn = make_train_step(
      graphdef=graphdef, teacher_graphdef=tgraph if objective.needs_teacher else None,
      loss=objective, tx=TX, frozen_mask=None, opts=StepOptions(num_classes=C, steps_per_epoch=1,
                                                                seed=seed, grad_accum_steps=k))
  return fn, state


def run(data, student, method, k, *, steps=1, mesh=None, **kw):
  """The jitted step, `steps` times on the fixture's batches → (states, metrics) per step.

  With `mesh`, jitted as the trainer does: the batch split over the mesh, the state replicated
  by `param_shardings`, output shardings given."""
  batches, tgraph, teacher_vars, _ = data
  fn, state = setup_step(student, method, k, tgraph=tgraph, **kw)
  if mesh is None:
    step, put_batch = jit(fn), lambda b: b
  else:
    state_shardings = sharding_lib.param_shardings(state, mesh)
    step = jit(fn, out_shardings=(state_shardings, None))
    state = jax.device_put(state, state_shardings)
    teacher_vars = jax.device_put(teacher_vars, sharding_lib.replicated(mesh))
    put_batch = lambda b: jax.device_put(b, sharding_lib.batch_sharding(mesh))
  states, metrics = [], []
  for batch in batches[:steps]:
    state, m = step(state, put_batch(batch), teacher_vars)
    states.append(state)
    metrics.append(m)
  return states, metrics


# ----------------------------------------------------------------------------- decomposable
METRICS = ('base_loss', 'distill_loss', 'dkd_warmup', 'ctkd_lambda', 'ctkd_temperature')

ONE_OF = [method_loss(kd_cifar100.get_config(m).distill) for m in DECOMPOSABLE]


def _one_of_init(rng, shapes):
  params = {}
  for loss in ONE_OF:
    params.update(loss.init(rng, shapes)[0])
  return params, {'method': jnp.zeros((), jnp.int32)}


@loss_terms.register('one_of', init=_one_of_init, needs_teacher=True)
def one_of(ctx):
  """The loss of DECOMPOSABLE[state['method']], picked by lax.switch: all six methods (their own
  `Loss`es, weights from configs/kd_cifar100.py) share one compiled step per k instead of one
  each (compiling is most of this file's time on CPU)."""

  def branch(loss):

    def run(params):
      total, metrics, _ = loss(ctx, params, {})
      return total, {n: jnp.asarray(metrics.get(n, 0.0), jnp.float32) for n in METRICS}

    return run

  total, metrics = jax.lax.switch(ctx.state['method'], [branch(o) for o in ONE_OF], ctx.params)
  return total, metrics, ctx.state


@pytest.fixture(scope='module')
def full_batch_runs(data):
  """k = 1, 2, 4 for every mean-over-examples method, on a LayerNorm ViT without drop path."""
  objective = loss_terms.Loss((('one_of', 1.0),))
  runs = {}
  for k in (1, 2, 4):
    fn, state = setup_step(vit(), objective, k, tgraph=data[1])
    step = jit(fn)
    for i, method in enumerate(DECOMPOSABLE):
      one_of = {'one_of': {'method': jnp.asarray(i)}}
      new_state, metrics = step(state.replace(term_state=one_of), data[0][0], data[2])
      runs[method, k] = ([new_state], [metrics])
  return runs


@pytest.mark.parametrize('method', DECOMPOSABLE)
def test_accumulation_equals_the_full_batch_for_mean_over_examples_losses(full_batch_runs, method):
  (ref,), (ref_m,) = full_batch_runs[method, 1]
  assert float(optax.tree.norm(grads_of(ref))) > 0.1  # a real gradient
  for k in (2, 4):
    (acc,), (acc_m,) = full_batch_runs[method, k]
    metrics = {
        n: acc_m[n] for n in ('loss', 'base_loss', 'distill_loss', 'train_top1') if n in ref_m
    }
    ref_metrics = {n: ref_m[n] for n in metrics}
    assert_same(f'{method} k={k}', metrics=(metrics, ref_metrics),
                grads=(grads_of(acc), grads_of(ref)), params=(acc.params, ref.params))
    assert int(acc.step) == STEP0 + 1


def test_ctkd_temperature_gradient_is_the_full_batch_one(full_batch_runs):
  (ref,), (ref_m,) = full_batch_runs['ctkd', 1]
  g_ref = grads_of(ref)['objective']['one_of']['ctkd']['raw_temperature']
  assert float(ref_m['ctkd_lambda']) > 0.1 and abs(float(g_ref)) > 1e-4  # the GRL is on
  for k in (2, 4):
    (acc,), _ = full_batch_runs['ctkd', k]
    g = grads_of(acc)['objective']['one_of']['ctkd']['raw_temperature']
    assert_same(f'ctkd k={k} temperature', grad=(g, g_ref),
                param=(acc.params['objective'], ref.params['objective']))


# ----------------------------------------------------------------------------- sequential refs
def strided(x, j, k):
  return x[j::k]


def contiguous(x, j, k):
  n = x.shape[0] // k
  return x[j * n:(j + 1) * n]


def sgd_on_mean(params, grads):
  mean = jax.tree.map(lambda *g: sum(g) / len(grads), *grads)
  return mean, jax.tree.map(lambda p, g: p - LR * g, params, mean)


def sequential_step(micro_step, params, carry, xs, layout, k):
  """k micro-batches one after the other, `carry` (PKCD state or BatchNorm statistics) passed
  on, then SGD on the mean gradient → (mean loss, grads, params, carry)."""
  losses, grads = [], []
  for j in range(k):
    (loss, carry), g = micro_step(params, carry, *(layout(x, j, k) for x in xs))
    losses.append(loss)
    grads.append(g)
  grads, params = sgd_on_mean(params, grads)
  return np.mean(losses), grads, params, carry


@pytest.fixture(scope='module')
def pkcd_micro_step():
  """One PKCD micro-batch as a plain loss: CE + pkcd_loss(state) → ((loss, new state), grads)."""
  graphdef, _, _ = nnx.split(vit(), nnx.Param, nnx.BatchStat)
  temperature = kd_cifar100.get_config('pkcd').distill.temperature

  @jit
  def micro_step(params, state, images, labels, t_logits):

    def loss(p):
      _, out = nnx.merge(graphdef, p['student'], {})(images / 255.0, train=True)
      ce = optax.softmax_cross_entropy_with_integer_labels(out['cls_logits'], labels).mean()
      terms, new_state = pkcd_loss(out['dist_logits'], t_logits, labels, state,
                                   temperature=temperature)
      return ce + terms['total'], new_state

    return jax.value_and_grad(loss, has_aux=True)(params)

  return micro_step


def pkcd_reference(data, micro_step, k, starts, layout=strided):
  """PKCD accumulated as a PyTorch loop would: micro-batch after micro-batch, each micro-batch's
  teacher logits the next one's previous batch, SGD on the mean gradient. Step i starts from
  `starts[i]` (the step under test's own parameters, so float32 differences do not compound);
  the PKCD state is the reference's own chain. → per step (loss, grads, params, PKCD state)."""
  batches, teacher_logits = data[0], data[3]
  state, out = pkcd_init_state(B // k, C), []
  for batch, params in zip(batches, starts):
    xs = (batch['image'].astype(jnp.float32), batch['label'], teacher_logits(batch['image']))
    loss, grads, params, state = sequential_step(micro_step, params, state, xs, layout, k)
    out.append((loss, grads, params, state))
  return out


def check_pkcd(data, micro_step, k, states, metrics, what):
  starts = [{'student': model_variables(vit())['params'], 'objective': {}},
            jax.device_get(states[0].params)]  # the reference runs on one device
  ref = pkcd_reference(data, micro_step, k, starts)
  for i, (state, m, (loss, grads, params,
                     pstate)) in enumerate(zip(states, metrics, ref, strict=True)):
    assert_same(f'{what} step {i}', PKCD_RTOL, loss=(m['loss'], loss),
                grads=(grads_of(state), grads), params=(state.params, params),
                previous_batch=(state.term_state['pkcd'], pstate))
  return starts


@pytest.mark.parametrize('k', [2, 4])
def test_pkcd_accumulates_micro_batch_by_micro_batch_across_steps(data, pkcd_micro_step, k):
  states, metrics = run(data, vit(), 'pkcd', k, steps=2, step0=0)
  starts = check_pkcd(data, pkcd_micro_step, k, states, metrics, f'pkcd k={k}')
  # The state holds one micro-batch: the last one of the second batch (rows k − 1, 2k − 1, …).
  np.testing.assert_array_equal(states[1].term_state['pkcd']['prev_labels'],
                                data[0][1]['label'][k - 1::k])
  assert float(metrics[1]['pkcd_cbcd_previous']) != 0.0
  # The layout matters: contiguous micro-batches are another run.
  other = pkcd_reference(data, pkcd_micro_step, k, starts[:1], layout=contiguous)[0]
  assert diff(grads_of(states[0]), other[1]) > 1e-3


def test_state_sized_for_the_full_batch_or_an_indivisible_batch_is_refused(data):
  batches, tgraph, teacher_vars, _ = data
  fn, state = setup_step(vit(), 'pkcd', 2, tgraph=tgraph, state_rows=B)
  with pytest.raises(ValueError, match=r'micro-batch has 16 rows.*rows=16, num_classes=10'):
    jax.jit(fn).lower(state, batches[0], teacher_vars)
  fn, state = setup_step(vit(), 'none', 3, state_rows=10)
  with pytest.raises(ValueError, match='not divisible by grad_accum_steps 3'):
    jax.jit(fn).lower(state, batches[0], None)


def test_batchnorm_student_uses_micro_batch_statistics_sequentially(data):
  """resnet8 → resnet8, KD: gradients averaged over micro-batches normalised by their own
  statistics, running statistics updated micro-batch after micro-batch (PyTorch)."""
  batches, teacher_logits, k = data[0], data[3], 2
  student = build_model('resnet8', num_classes=C, rngs=nnx.Rngs(1))
  graphdef, _, _ = nnx.split(student, nnx.Param, nnx.BatchStat)
  variables = model_variables(student)
  cfg = kd_cifar100.get_config('kd').distill
  t = cfg.temperature

  @jit
  def micro_step(params, stats, images, labels, t_logits):

    def loss(p):
      model = nnx.merge(graphdef, p['student'], stats)
      logits, _ = model(images / 255.0, train=True)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      p_t = jax.nn.softmax(t_logits / t)
      kl = jnp.sum(p_t * (jnp.log(p_t) - jax.nn.log_softmax(logits / t)), -1).mean() * t**2
      return (cfg.base_weight * ce + cfg.distill_weight * kl,
              nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

    return jax.value_and_grad(loss, has_aux=True)(params)

  def reference(layout):
    params = {'student': variables['params'], 'objective': {}}
    stats, batch = variables['batch_stats'], batches[0]
    xs = (batch['image'].astype(jnp.float32), batch['label'], teacher_logits(batch['image']))
    return sequential_step(micro_step, params, stats, xs, layout, k)

  (state,), (m,) = run(data, student, 'kd', k)
  loss, grads, params, stats = reference(strided)
  assert_same(f'batchnorm k={k}', loss=(m['loss'], loss), grads=(grads_of(state), grads),
              params=(state.params, params), running_stats=(state.batch_stats, stats))
  # Contiguous micro-batches give other statistics (the check above sees the layout).
  assert diff(state.batch_stats, reference(contiguous)[3]) > 1e-3


# ----------------------------------------------------------------------------- randomness
def test_micro_batch_randomness_follows_the_seed_and_differs_between_micro_batches(data):
  """Drop path 0.5, k = 2: same seed → same step; another seed → other draws; micro-batches draw
  independently (with one key for all, swapping the two micro-batches would change nothing)."""
  batch = data[0][0]
  swapped = jax.tree.map(lambda x: x.reshape((B // 2, 2) + x.shape[1:])[:, ::-1].reshape(x.shape),
                         batch)
  grads = {}
  for seed in (0, 1):
    fn, state = setup_step(vit(drop_path=0.5), 'none', 2, seed=seed)
    step = jit(fn)
    grads[seed] = grads_of(step(state, batch, None)[0])
    if seed == 0:
      grads['again'] = grads_of(step(state, batch, None)[0])
      grads['swapped'] = grads_of(step(state, swapped, None)[0])
  assert diff(grads['again'], grads[0]) == 0.0
  assert diff(grads[1], grads[0]) > 1e-3
  assert diff(grads['swapped'], grads[0]) > 1e-3


# ----------------------------------------------------------------------------- 8 devices
@pytest.fixture(scope='module')
def mesh():
  mesh = sharding_lib.make_mesh([('data', -1)])
  assert mesh.size == 8
  return mesh


def test_hard_kd_k2_on_8_devices_equals_k1_on_one(data, full_batch_runs, mesh):
  """Against the unsharded k = 1 run of `full_batch_runs` (the same `HardDistillation`)."""
  (ref,), (ref_m,) = full_batch_runs['hard', 1]
  assert len(ref.params['student']['head']['kernel'].devices()) == 1
  (acc,), (acc_m,) = run(data, vit(), 'hard', 2, mesh=mesh)
  assert len(acc.params['student']['head']['kernel'].devices()) == 8
  assert_same('hard on 8 devices k=2', loss=(acc_m['loss'], ref_m['loss']),
              grads=(grads_of(acc)['student'], grads_of(ref)['student']),
              params=(acc.params['student'], ref.params['student']))


def test_pkcd_k2_on_8_devices_equals_the_sequential_reference(data, pkcd_micro_step, mesh):
  states, metrics = run(data, vit(), 'pkcd', 2, steps=2, step0=0, mesh=mesh)
  assert len(states[0].params['student']['head']['kernel'].devices()) == 8
  check_pkcd(data, pkcd_micro_step, 2, states, metrics, 'pkcd 8 devices k=2')


# ----------------------------------------------------------------------------- trainer
@pytest.mark.slow
def test_trainer_trains_pkcd_with_accumulation(tmp_path):
  """The trainer sizes PKCD's state for one micro-batch (a full-batch state made the scan's
  carry change shape; now the step refuses it) and trains with grad_accum_steps = 2."""
  kwargs = dict(num_classes=C, mean=DIGITS_MEAN, std=DIGITS_STD)
  teacher = build_model('resnet8', rngs=nnx.Rngs(5), **kwargs)
  path = save_weights(str(tmp_path / 'teacher'), model_variables(teacher),
                      {'model': {'name': 'resnet8', 'kwargs': kwargs}})
  c = tiny_config(
      'pkcd', **{
          'teacher.checkpoint': path, 'grad_accum_steps': 2, 'num_epochs': 0.2,
          'checkpoint_every_steps': 4
      })
  result = trainer.train_and_evaluate(c, str(tmp_path / 'run'))
  assert np.isfinite(result['loss'])
