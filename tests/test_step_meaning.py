"""What each method means, checked through the real jitted train and eval steps.

For one fixed batch, the step's reported loss and its gradient (recovered from one plain SGD step
with learning rate 1: new params = params − grad) are compared with independent restatements of
the formulas of the original code (DeiT, RepDistiller, mdistiller DKD, CTKD, TIKD, IRKD),
computed here from the student's own outputs and the frozen teacher's eval-mode logits and
differentiated with `jax.grad`. A one-line change of a method's
meaning (the wrong head, the teacher in train mode, lost label smoothing, a reversed CTKD
temperature, a dropped or flipped weight) moves the loss or the gradient well past the tolerance;
the tests also check that the wrong reading would differ, so that they can tell.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import irkd_cifar10, kd_cifar100, tikd_cifar100
from tikd_jax.cpu import compiler
from tikd_jax.models.variables import abstract_model
from tests.method_loss import method_loss
from tikd_jax.train.run import build_augmentations
from tikd_jax.train.spec import resolve as resolve_spec
from tikd_jax.train.state import init_train_state
from tikd_jax.train.step import StepOptions, make_eval_step, make_train_step

B, C, IMG, TEXT_DIM = 8, 10, 16, 12
LABELS = np.array([3, 1, 4, 1, 5, 9, 2, 6], np.int32)
# PKCD's previous batch: labels 1 and 3 have positives there, the other anchors none.
PREV_LABELS = np.array([1, 1, 3, 8, 8, 0, 7, 7], np.int32)
SEED = 0
# steps_per_epoch 2 at step 9: 1-based epoch 5, so DKD's warm-up is 5/20 and CTKD's λ is 0.5.
STEPS_PER_EPOCH, STEP, EPOCH = 2, 9, 5.0
LOSS_RTOL = 1e-5
# The steps' meaning, not their speed, is under test: the 'fast_compile' preset (LLVM -O0) roughly
# halves the CPU compiles.
COMPILE = {
    'compiler_options':
        compiler.compiler_options('fast_compile') if jax.default_backend() == 'cpu' else None
}


# ------------------------------------------------------------------ independent restatements
def log_softmax(z):
  z = z - jnp.max(z, axis=-1, keepdims=True)
  return z - jnp.log(jnp.sum(jnp.exp(z), axis=-1, keepdims=True))


def soft_ce(logits, q):
  """timm SoftTargetCrossEntropy: mean_b −Σ_c q·log_softmax(z)."""
  return jnp.mean(-jnp.sum(q * log_softmax(logits), axis=-1))


def kl_rows(s, t, temperature):
  """Σ_c p_t·(log p_t − log p_s) per row, p = softmax(z / T)."""
  lt, ls = log_softmax(t / temperature), log_softmax(s / temperature)
  return jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)


def kd(s, t, temperature):
  """Hinton KD as RepDistiller's DistillKL: batch-mean KL · T²."""
  return jnp.mean(kl_rows(s, t, temperature)) * temperature**2


def deit_soft(s, t, temperature):
  """DeiT losses.py 'soft': KL(reduction='sum') · T² / outputs_kd.numel()."""
  return jnp.sum(kl_rows(s, t, temperature)) * temperature**2 / s.size


def deit_hard(s, t):
  """DeiT losses.py 'hard': F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))."""
  return soft_ce(s, jax.nn.one_hot(jnp.argmax(t, axis=-1), s.shape[-1]))


def dkd(s, t, y, temperature, alpha=1.0, beta=8.0):
  """mdistiller DKD.py dkd_loss: α·TCKD + β·NCKD, TCKD the binary KL of [p_gt, 1 − p_gt], NCKD
  the KL of softmax(z/T − 1000·gt) (non-target classes), both · T² / B."""
  gt = jax.nn.one_hot(y, s.shape[-1])

  def binary(z):
    p = jax.nn.softmax(z / temperature, axis=-1)
    return jnp.stack([jnp.sum(p * gt, -1), jnp.sum(p * (1.0 - gt), -1)], axis=-1)

  bs, bt = binary(s), binary(t)
  tckd = jnp.sum(bt * (jnp.log(bt) - jnp.log(bs))) * temperature**2 / s.shape[0]
  ls, lt = log_softmax(s / temperature - 1000.0 * gt), log_softmax(t / temperature - 1000.0 * gt)
  nckd = jnp.sum(jnp.exp(lt) * (lt - ls)) * temperature**2 / s.shape[0]
  return alpha * tckd + beta * nckd


def pearson(a, b, eps=1e-8):
  """TIKD _compute_pearson_correlation of every row of a with every row of b, clamped to ±1."""
  a = a - jnp.mean(a, axis=-1, keepdims=True)
  b = b - jnp.mean(b, axis=-1, keepdims=True)
  norms = jnp.linalg.norm(a, axis=-1)[:, None] * jnp.linalg.norm(b, axis=-1)[None, :]
  return jnp.clip(a @ b.T / (norms + eps), -1.0, 1.0)


def pkcd_contrast(s, t, y, prev_t, prev_y, temperature, eps=1e-8):
  """TIKD losses.py _compute_pkcd_loss as released, without its DeiT-soft KD: InfoNCE over
  Pearson correlations (current batch: the own teacher row is the positive; previous batch:
  same-label rows, 0 for an anchor without one) + 1 − T²·mean_c Pearson of the batch-softmax
  columns; the contrastive τ is T."""
  sim = pearson(s, t) / temperature
  current = jnp.mean(jnp.log(jnp.sum(jnp.exp(sim), -1) + eps) - jnp.diagonal(sim))
  sim_prev = pearson(s, prev_t) / temperature
  log_den = jnp.log(jnp.sum(jnp.exp(sim_prev), -1) + eps)
  positive = (y[:, None] == prev_y[None, :]).astype(jnp.float32)
  count = jnp.sum(positive, -1)
  per_anchor = jnp.sum(positive * (log_den[:, None] - sim_prev), -1) / jnp.maximum(count, 1.0)
  previous = jnp.mean(jnp.where(count > 0, per_anchor, 0.0))
  columns = jnp.diagonal(
      pearson(jax.nn.softmax(s / temperature, axis=0).T,
              jax.nn.softmax(t / temperature, axis=0).T))
  intra = 1.0 - temperature**2 * jnp.mean(columns)
  return current + previous + intra


def ctkd_temperature(raw):
  """CTKD helper/loops.py: T = t_start + t_end·sigmoid(GRL(global_T)), t_start 1, t_end 20."""
  return 1.0 + 20.0 / (1.0 + jnp.exp(-raw))


def ctkd_lambda(epoch, ramp=10):
  """−CosineDecay(max 0, min −1, loops 10).get_value(epoch) of CTKD train_student.py."""
  return (1.0 - np.cos(np.pi * min(epoch, ramp) / ramp)) / 2.0


def cosine(a, b, eps=1e-8):
  """torch.nn.functional.cosine_similarity over the last axis."""
  na = jnp.maximum(jnp.linalg.norm(a, axis=-1), eps)
  nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), eps)
  return jnp.sum(a * b, axis=-1) / (na * nb)


def attention_map(attn, prefix):
  """IRKD P_4_ALL process_attention: head mean, cls row over patch keys, min-max per sample."""
  row = jnp.mean(attn, axis=1)[:, 0, prefix:]
  lo, hi = jnp.min(row, -1, keepdims=True), jnp.max(row, -1, keepdims=True)
  return (row - lo) / (hi - lo + 1e-8)


def method_terms(cls, dist, raw_temperature, x):
  """Every method's loss terms: CE on the class head, the distillation terms on `dist`.
  x: teacher logits t, targets q, labels y, PKCD's previous batch prev_t / prev_y."""
  t = x['t']
  return {
      'ce': soft_ce(cls, x['q']),
      'soft_t1': deit_soft(dist, t, 1.0),  # tikd_cifar100 'soft': DeiT's τ 1
      'soft_t4': deit_soft(dist, t, 4.0),
      'hard': deit_hard(dist, t),
      'kd': kd(dist, t, 4.0),
      'ctkd': kd(dist, t, ctkd_temperature(raw_temperature)),
      'dkd': dkd(dist, t, x['y'], 4.0),
      'pkcd_contrast': pkcd_contrast(dist, t, x['y'], x['prev_t'], x['prev_y'], 4.0),
  }


WARM = min(EPOCH / 20.0, 1.0)  # mdistiller DKD: min(epoch / warmup, 1), warmup 20
# Each method's loss as weights of those terms. tikd_cifar100 (DeiT students): (1 − α)·CE +
# α·distill, α 0.5; kd_cifar100 (CNN, RepDistiller / mdistiller): 0.1·CE + 0.9·KD; both:
# dkd CE + warm-up·(TCKD + 8·NCKD), pkcd CE + KD_soft(T 4) + InfoNCE + intra (as released).
DEIT_WEIGHTS = {
    'soft': {'ce': 0.5, 'soft_t1': 0.5}, 'hard': {'ce': 0.5, 'hard': 0.5},
    'kd': {'ce': 0.5, 'kd': 0.5}, 'ctkd': {'ce': 0.5, 'ctkd': 0.5}, 'dkd': {'ce': 1.0, 'dkd': WARM},
    'pkcd': {'ce': 1.0, 'soft_t4': 1.0, 'pkcd_contrast': 1.0}
}
CNN_WEIGHTS = {
    'kd': {'ce': 0.1, 'kd': 0.9}, 'ctkd': {'ce': 0.1, 'ctkd': 0.9}, 'dkd': {'ce': 1.0, 'dkd': WARM}
}


def tikd_terms(out, student_params, x):
  """TIKD (models/vit.py fusion): c = clamp(cos(x_i, A(t)), 0, 1) over the first pass's normed
  tokens, A the text adapter (ours); alignment mean(1 − c) (paper's β); predictor 1 − cos (ours)."""
  a = student_params['text_adapter']
  adapted = (x['text'] @ a['down']['kernel'] + a['down']['bias']) @ a['up']['kernel']
  c = jnp.clip(cosine(out['tokens'], (adapted + a['up']['bias'])[:, None, :]), 0.0, 1.0)
  return {
      'alignment': jnp.mean(1.0 - c),
      'predictor': jnp.mean(1.0 - cosine(out['text_pred'], x['text']))
  }


def irkd_terms(out, student_params, x):
  """IRKD attention saliency, averaged over the layers: MSE of the student's map (prefix cls,
  dist) and the teacher's (a plain ViT: prefix cls)."""
  del student_params
  return {
      'saliency':
          jnp.mean(
              jnp.stack([
                  jnp.mean((attention_map(out[f'attn{i}'], 2) -
                            attention_map(x[f'teacher_attn{i}'], 1))**2) for i in range(2)
              ]))
  }


# ------------------------------------------------------------------ expected loss and gradient
@functools.lru_cache(maxsize=None)
def expected_fn(graphdef, extra_terms=None, fuse_text=False):
  """jit(value_and_grad) of Σ_k weights[k]·term_k of the student's train-mode outputs:
  (params {'student', 'raw_temperature'}, batch_stats, images, x, weights) → ((loss, (terms,
  new batch stats)), grads). One compile per student serves every method."""

  def f(params, batch_stats, images, x, weights):
    model = nnx.merge(graphdef, params['student'], batch_stats)
    _, out = model(images, train=True, text=x.get('text'), fuse_text=fuse_text)
    terms = method_terms(out['cls_logits'], out.get('dist_logits', out['cls_logits']),
                         params['raw_temperature'], x)
    if extra_terms is not None:
      terms.update(extra_terms(out, params['student'], x))
    loss = sum(weights[k] * v for k, v in terms.items() if k in weights)
    return loss, (terms, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

  return jax.jit(jax.value_and_grad(f, has_aux=True), **COMPILE)


def expected(student, params, images, x, weights, extra_terms=None, fuse_text=False):
  """(loss, terms, new batch stats, grads shaped like the step's params) of `weights`."""
  graphdef, variables = student
  names = [
      'ce', 'soft_t1', 'soft_t4', 'hard', 'kd', 'ctkd', 'dkd', 'pkcd_contrast', 'alignment',
      'predictor', 'saliency'
  ]
  assert set(weights) <= set(names)
  w = {k: jnp.float32(weights.get(k, 0.0)) for k in names}
  raw = params['objective'].get('ctkd', {}).get('raw_temperature', jnp.float32(1.0))
  (loss,
   (terms,
    stats)), g = expected_fn(graphdef, extra_terms,
                             fuse_text)({'student': params['student'], 'raw_temperature': raw},
                                        variables['batch_stats'], images, x, w)
  grads = {'student': g['student'], 'objective': {}}
  if 'ctkd' in params['objective']:
    # Gradient reversal (Ganin & Lempitsky 2015; CTKD temp_global.py): −λ·∂L/∂raw.
    grads['objective']['ctkd'] = {'raw_temperature': -ctkd_lambda(EPOCH) * g['raw_temperature']}
  return loss, terms, stats, grads


def assert_same_gradient(step_grads, expected_grads):
  """Per leaf allclose (atol scaled to the leaf: sums that cancel keep float32 rounding of its
  largest entries), and cosine similarity of the whole gradients above 0.9999."""

  def check(path, g, e):
    e = np.asarray(e, np.float64)
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=max(1e-6, 1e-5 * np.abs(e).max()),
                               err_msg=jax.tree_util.keystr(path))

  jax.tree_util.tree_map_with_path(check, step_grads, expected_grads)
  flat = lambda tree: np.concatenate(
      [np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])
  g, e = flat(step_grads), flat(expected_grads)
  assert len(g) == len(e) and np.linalg.norm(e) > 1e-3
  assert g @ e / (np.linalg.norm(g) * np.linalg.norm(e)) > 0.9999


def far(a, b, factor=10.0):
  """`a` differs from `b` by far more than the loss tolerance: the checks can tell them apart."""
  return abs(float(a) - float(b)) > factor * LOSS_RTOL * abs(float(b))


# ------------------------------------------------------------------ models and the real step
def make_model(name, seed, **kw):
  """(graphdef, variables) with NumPy-drawn weights (what they are does not matter here, and the
  initialisers compile slowly on CPU): kernels N(0, 1/fan_in), norm scales near 1, others
  N(0, 0.1²), BatchNorm running statistics 0 / 1."""
  graphdef, template = abstract_model(name, num_classes=C, **kw)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = jax.tree_util.keystr(path), leaf.shape
    if name.endswith("['kernel']"):
      x = rng.normal(0.0, 1.0, shape) / np.sqrt(np.prod(shape[:-1]))
    elif name.endswith("['scale']"):
      x = 1.0 + rng.normal(0.0, 0.1, shape)
    elif name.endswith("['mean']"):
      x = np.zeros(shape)
    elif name.endswith("['var']"):
      x = np.ones(shape)
    else:
      x = rng.normal(0.0, 0.1, shape)
    return jnp.asarray(x, jnp.float32)

  return graphdef, jax.tree_util.tree_map_with_path(draw, template)


@functools.lru_cache(maxsize=None)
def _forward_fn(graphdef, train, fuse_text):

  def fn(variables, images, text):
    model = nnx.merge(graphdef, variables['params'], variables['batch_stats'])
    return model(images, train=train, text=text, fuse_text=fuse_text)

  return jax.jit(fn, **COMPILE)


def forward(model, images, train, text=None, fuse_text=False):
  """(logits, out) outside the step (no rng: drop_path is 0 in every test)."""
  graphdef, variables = model
  return _forward_fn(graphdef, train, fuse_text)(variables, images, text)


def images_of(batch):
  return jnp.asarray(batch['image'], jnp.float32) / 255.0


def run_step(student, teacher, objective, opts, batch, *, step=STEP, objective_state=None,
             jitted=None):
  """One real train step with optax.sgd(1.0) → (params, new state, metrics, gradient, step fn)."""
  graphdef, variables = student
  tx = optax.sgd(1.0)
  state = init_train_state(variables, objective, tx, rng=jax.random.key(0),
                           shapes={'rows': B, 'num_classes': C}, step=step)
  if 'ctkd' in state.params['objective']:
    # T = 1 + 20·σ(−1) ≈ 6.4, where KD is steeper in T than at the init raw 1 (T ≈ 15.6).
    state = state.replace(
        params=dict(state.params, objective={'ctkd': {'raw_temperature': jnp.float32(-1.0)}}))
  if objective_state is not None:
    state = state.replace(term_state=objective_state)
  params = state.params
  fn = jitted or jax.jit(
      make_train_step(graphdef=graphdef, teacher_graphdef=teacher[0], loss=objective, tx=tx,
                      frozen_mask=None, opts=opts), **COMPILE)
  new_state, metrics = fn(state, batch, teacher[1])
  grads = jax.tree.map(lambda p, q: np.asarray(p, np.float64) - np.asarray(q, np.float64), params,
                       new_state.params)
  return params, new_state, jax.tree.map(np.asarray, metrics), grads, fn


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope='module')
def batch():
  rng = np.random.default_rng(0)
  return {
      'image': jnp.asarray(rng.integers(0, 256, (B, IMG, IMG, 3), dtype=np.uint8)),
      'label': jnp.asarray(LABELS)
  }


@pytest.fixture(scope='module')
def teacher():
  """A resnet8 teacher whose BatchNorm running statistics are far from the batch's own, so that
  its eval-mode (running statistics) and train-mode (batch statistics) logits differ clearly."""
  graphdef, variables = make_model('resnet8', 5)
  rng = np.random.default_rng(5)

  def randomise(path, x):
    if jax.tree_util.keystr(path).endswith("['mean']"):
      return jnp.asarray(rng.normal(0.0, 0.5, x.shape), jnp.float32)
    return jnp.asarray(rng.uniform(0.3, 3.0, x.shape), jnp.float32)

  params = dict(variables['params'])
  params['fc'] = dict(params['fc'], kernel=params['fc']['kernel'] * 3.0)  # a confident teacher
  return graphdef, {
      'params': params,
      'batch_stats': jax.tree_util.tree_map_with_path(randomise, variables['batch_stats'])
  }


@pytest.fixture(scope='module')
def deit():
  return make_model('distilled_vit', 0, variant='micro', img_size=IMG, drop_path=0.0)


@pytest.fixture(scope='module')
def cnn():
  return make_model('resnet8', 1)


def teacher_eval_logits(teacher, images):
  return forward(teacher, images, train=False)[0]


def method_inputs(teacher, batch, q):
  rng = np.random.default_rng(1)
  return {
      't': teacher_eval_logits(teacher, images_of(batch)), 'q': q, 'y': batch['label'],
      'prev_t': jnp.asarray(rng.normal(0.0, 2.0, (B, C)),
                            jnp.float32), 'prev_y': jnp.asarray(PREV_LABELS)
  }


# ------------------------------------------------------------------ methods
def check_method(student, teacher, batch, method, distill_cfg, weights, label_smoothing):
  """Loss, gradient and BatchNorm statistics of one step of `method` against the restatement."""
  objective = method_loss(distill_cfg)
  opts = StepOptions(num_classes=C, steps_per_epoch=STEPS_PER_EPOCH, seed=SEED,
                     label_smoothing=label_smoothing)
  onehot = jax.nn.one_hot(batch['label'], C)
  x = method_inputs(teacher, batch, (1.0 - label_smoothing) * onehot + label_smoothing / C)
  prev = {
      'prev_teacher_logits': x['prev_t'], 'prev_labels': x['prev_y'], 'valid': jnp.ones((),
                                                                                        jnp.bool_)
  }
  params, new_state, metrics, grads, fn = run_step(
      student, teacher, objective, opts, batch,
      objective_state={'pkcd': prev} if method == 'pkcd' else None)
  images = images_of(batch)
  loss, terms, stats, expected_grads = expected(student, params, images, x, weights)
  np.testing.assert_allclose(metrics['loss'], loss, rtol=LOSS_RTOL)
  assert_same_gradient(grads, expected_grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new_state.batch_stats, stats)  # BatchNorm students: batch statistics
  # The teacher in train mode (batch statistics) would give another loss.
  t_train = forward(teacher, images, train=True)[0]
  assert np.abs(t_train - x['t']).max() > 0.5
  assert far(expected(student, params, images, dict(x, t=t_train), weights)[0], loss)
  if label_smoothing:  # and so would the unsmoothed targets
    assert far(expected(student, params, images, dict(x, q=onehot), weights)[0], loss)
  return params, new_state, metrics, x, fn, terms


@pytest.mark.parametrize('method', ['soft', 'hard', 'kd', 'dkd', 'ctkd', 'pkcd'])
def test_deit_student_ce_on_class_head_distillation_on_dist_head(deit, teacher, batch, method):
  """DeiT / TIKD students: CE on `head` (cls token) against the smoothed targets (DeiT recipe,
  ε 0.1: (1 − ε)·onehot + ε/C), distillation on `head_dist` (dist token), tikd_cifar100 weights."""
  cfg = tikd_cifar100.get_config(f'small,{method}').distill
  params, new_state, metrics, x, fn, terms = check_method(deit, teacher, batch, method, cfg,
                                                          DEIT_WEIGHTS[method], 0.1)
  # The distillation term on the class head would be another loss.
  _, out = forward(deit, images_of(batch), train=True)
  wrong = method_terms(out['cls_logits'], out['cls_logits'],
                       params['objective'].get('ctkd', {}).get('raw_temperature', 1.0), x)
  distill_term = {'soft': 'soft_t1', 'pkcd': 'pkcd_contrast'}.get(method, method)
  assert far(wrong[distill_term], terms[distill_term], factor=1e3)
  if method == 'pkcd':
    # The teacher's logits and the labels become the next step's "previous batch".
    state = new_state.term_state['pkcd']
    np.testing.assert_allclose(state['prev_teacher_logits'], x['t'], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(state['prev_labels'], LABELS)
    assert bool(state['valid'])
    # As released, InfoNCE and the intra-class term wait for a previous batch.
    objective = method_loss(cfg)
    first = run_step(deit, teacher, objective, None, batch, jitted=fn)[2]
    np.testing.assert_allclose(first['loss'], terms['ce'] + terms['soft_t4'], rtol=LOSS_RTOL)


@pytest.mark.parametrize('method', ['kd', 'dkd'])  # ctkd: test_ctkd_temperature_…
def test_cnn_student_one_head_with_kd_cifar100_weights(cnn, teacher, batch, method):
  """ResNet students: one head for both terms; RepDistiller / mdistiller weights, no smoothing.
  The student's BatchNorm trains on batch statistics and updates its running ones."""
  check_method(cnn, teacher, batch, method,
               kd_cifar100.get_config(method).distill, CNN_WEIGHTS[method], 0.0)


def test_ctkd_temperature_ascends_the_kd_term(cnn, teacher, batch):
  """CTKD: with λ > 0 the gradient reversal moves the temperature to *increase* KD while the
  student descends the loss (CTKD helper/loops.py, models/temp_global.py), 0.1·CE + 0.9·KD."""
  cfg = kd_cifar100.get_config('ctkd').distill
  params, new_state, metrics, x, _, _ = check_method(cnn, teacher, batch, 'ctkd', cfg,
                                                     CNN_WEIGHTS['ctkd'], 0.0)
  assert metrics['ctkd_lambda'] == pytest.approx(ctkd_lambda(EPOCH)) and 0 < ctkd_lambda(EPOCH)
  old = params['objective']['ctkd']['raw_temperature']
  new = new_state.params['objective']['ctkd']['raw_temperature']
  # KD with the logits fixed, in float64 (float32 KD at T ≈ 6 is too coarse for this step).
  s = np.asarray(forward(cnn, images_of(batch), train=True)[1]['cls_logits'], np.float64)
  t = np.asarray(x['t'], np.float64)

  def kd_at(raw):
    temperature = 1.0 + 20.0 / (1.0 + np.exp(-float(raw)))
    lt, ls = (z / temperature - np.log(np.sum(np.exp(z / temperature), -1, keepdims=True))
              for z in (t, s))
    return np.mean(np.sum(np.exp(lt) * (lt - ls), -1)) * temperature**2

  assert abs(float(new - old)) > 1e-3
  assert kd_at(new) > kd_at(old)  # the temperature went up the KD term
  slope = (kd_at(old + 1e-4) - kd_at(old - 1e-4)) / 2e-4
  assert np.sign(float(new - old)) == np.sign(slope)


# ------------------------------------------------------------------ mixed targets, teacher input
def test_mixup_cutmix_targets_and_teacher_sees_the_augmented_batch(deit, teacher, batch):
  """The DeiT recipe as the trainer builds it (random erasing 0.25, Mixup 0.8 / CutMix 1.0,
  smoothing 0.1): CE against the mixed soft targets; the teacher sees the augmented images."""
  config = tikd_cifar100.get_config('small,kd')
  _, batch_augment = build_augmentations(resolve_spec(config))
  objective = method_loss(config.distill)
  opts = StepOptions(num_classes=C, steps_per_epoch=STEPS_PER_EPOCH, seed=SEED, label_smoothing=0.1,
                     batch_augment=batch_augment)
  smoothed = 0.9 * jax.nn.one_hot(batch['label'], C) + 0.1 / C
  fn, mixed = None, []
  for step in (STEP, STEP + 1, STEP + 2):
    params, _, metrics, grads, fn = run_step(deit, teacher, objective, opts, batch, step=step,
                                             jitted=fn)
    # The step's aug_rng: split(fold_in(key(seed), step))[0]. Its model rng is unused
    # (drop_path 0). The augmentation's own correctness: test_augment.py.
    aug_rng = jax.random.split(jax.random.fold_in(jax.random.key(SEED), step))[0]
    images, q = jax.jit(batch_augment, static_argnums=2)(images_of(batch), batch['label'], C,
                                                         aug_rng)
    x = dict(method_inputs(teacher, batch, q), t=teacher_eval_logits(teacher, images))
    loss, _, _, expected_grads = expected(deit, params, images, x, DEIT_WEIGHTS['kd'])
    np.testing.assert_allclose(metrics['loss'], loss, rtol=LOSS_RTOL)
    assert_same_gradient(grads, expected_grads)
    # Neither the un-augmented teacher input nor the unmixed targets give this loss.
    plain_t = teacher_eval_logits(teacher, images_of(batch))
    assert far(expected(deit, params, images, dict(x, t=plain_t), DEIT_WEIGHTS['kd'])[0], loss)
    mixed.append(float(np.abs(q - smoothed).max()))
    if mixed[-1] > 0.05:
      assert far(expected(deit, params, images, dict(x, q=smoothed), DEIT_WEIGHTS['kd'])[0], loss)
  assert max(mixed) > 0.05  # the targets really were mixed


# ------------------------------------------------------------------ TIKD text fusion
@pytest.fixture(scope='module')
def tikd():
  return make_model('distilled_vit', 2, variant='micro', img_size=IMG, drop_path=0.0,
                    text_dim=TEXT_DIM)


@pytest.mark.parametrize('beta,weight', [(0.1, 1.0), (0.3, 2.0)])
def test_tikd_alignment_and_text_predictor_terms(tikd, teacher, batch, beta, weight):
  """hard KD objective (0.5·CE + 0.5·hard on the fused pass's heads) + β·mean(1 − c) +
  w·mean(1 − cos(text_pred, t)), with the config's β 0.1 / w 1 and with 0.3 / 2."""
  text = jnp.asarray(np.random.default_rng(3).normal(size=(B, TEXT_DIM)), jnp.float32)
  batch = dict(batch, text=text)
  objective = method_loss(
      tikd_cifar100.get_config('small,hard').distill,
      (('tikd_alignment', beta), ('text_predictor', weight)))
  opts = StepOptions(num_classes=C, steps_per_epoch=STEPS_PER_EPOCH, seed=SEED, fuse_text=True)
  params, _, metrics, grads, _ = run_step(tikd, teacher, objective, opts, batch)
  x = dict(method_inputs(teacher, batch, jax.nn.one_hot(batch['label'], C)), text=text)
  weights = dict(DEIT_WEIGHTS['hard'], alignment=beta, predictor=weight)
  loss, terms, _, expected_grads = expected(tikd, params, images_of(batch), x, weights, tikd_terms,
                                            fuse_text=True)
  np.testing.assert_allclose(metrics['loss'], loss, rtol=LOSS_RTOL)
  assert_same_gradient(grads, expected_grads)
  np.testing.assert_allclose(metrics['alignment_loss'], terms['alignment'], rtol=1e-5)
  np.testing.assert_allclose(metrics['text_predictor_loss'], terms['predictor'], rtol=1e-5)
  # Neither term is trivial: a weight off by 0.1 (or a flipped sign) would be far off.
  assert 0.05 < float(terms['alignment']) < 0.95 and float(terms['predictor']) > 0.05
  assert far(loss + 0.1 * terms['alignment'], loss) and far(loss + 0.1 * terms['predictor'], loss)


# ------------------------------------------------------------------ IRKD saliency
@pytest.fixture(scope='module')
def irkd():
  return make_model('irkd_vit', 3, variant='micro', img_size=IMG)


@pytest.fixture(scope='module')
def vit_teacher():
  return make_model('vit', 7, variant='micro', img_size=IMG, drop_path=0.0)


def test_irkd_attention_saliency_weight(irkd, vit_teacher, batch):
  """(1 − α)·CE + α·KD(T 4) + w·L_sal with the ViT teacher in eval mode; w 0.3, not the recipe's
  0.8, so that a hard-coded or dropped weight shows."""
  weight = 0.3
  objective = method_loss(
      irkd_cifar10.get_config('kd_cl_sal,p4').distill, (('attention_saliency', weight),))
  opts = StepOptions(num_classes=C, steps_per_epoch=STEPS_PER_EPOCH, seed=SEED)
  params, _, metrics, grads, _ = run_step(irkd, vit_teacher, objective, opts, batch)
  t_logits, t_out = forward(vit_teacher, images_of(batch), train=False)
  x = dict(method_inputs(vit_teacher, batch, jax.nn.one_hot(batch['label'], C)), t=t_logits,
           **{f'teacher_attn{i}': t_out[f'attn{i}'] for i in range(2)})
  loss, terms, _, expected_grads = expected(irkd, params, images_of(batch), x,
                                            dict(DEIT_WEIGHTS['kd'], saliency=weight), irkd_terms)
  np.testing.assert_allclose(metrics['loss'], loss, rtol=LOSS_RTOL)
  assert_same_gradient(grads, expected_grads)
  np.testing.assert_allclose(metrics['saliency_loss'], terms['saliency'], rtol=1e-5)
  # Weight 1 (dropped), 0.8 (hard-coded) or −0.3 (flipped) would be far off.
  assert far(loss + 0.5 * terms['saliency'], loss)


# ------------------------------------------------------------------ eval
@pytest.mark.parametrize('which', ['deit', 'irkd'])
def test_eval_step_heads(deit, irkd, batch, which):
  """Eval logits: DeiT averages the heads, (cls + dist) / 2; IRKD uses the cls head alone."""
  student = {'deit': deit, 'irkd': irkd}[which]
  graphdef, variables = student
  mask = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)
  eval_step = jax.jit(make_eval_step(graphdef=graphdef), **COMPILE)
  m = eval_step({'student': variables['params']}, variables['batch_stats'],
                dict(batch, mask=jnp.asarray(mask)))
  _, out = forward(student, images_of(batch), train=False)
  mean_logits = (out['cls_logits'] + out['dist_logits']) / 2
  logits, other = ((mean_logits, out['cls_logits']) if which == 'deit' else
                   (out['cls_logits'], mean_logits))

  def sums(z):
    z = np.asarray(z, np.float64)
    ce = -np.asarray(log_softmax(z))[np.arange(B), LABELS]
    ahead = np.sum(z > z[np.arange(B), LABELS][:, None], axis=-1)  # classes above the label
    return np.sum(mask * ce), np.sum(mask * (ahead < 1)), np.sum(mask * (ahead < 5))

  loss_sum, top1, top5 = sums(logits)
  np.testing.assert_allclose(m['loss_sum'], loss_sum, rtol=1e-5)
  assert (float(m['top1_sum']), float(m['top5_sum'])) == (top1, top5)
  assert float(m['count']) == mask.sum()
  assert far(sums(other)[0], loss_sum)
