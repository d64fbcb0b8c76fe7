"""Tests for tikd_jax.losses: every loss and its gradient against a torch re-statement.

The torch side is written the way the reference code writes it (DeiT/TIKD losses.py,
mdistiller DKD.py, CTKD DistillKL + Global_T, TIKD ``_compute_pkcd_loss`` with its loops) and
runs in float64; the JAX side runs in float32. Tolerance rtol = atol = 1e-5.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tikd_jax.losses import (
    cross_entropy,
    ctkd_init_raw_temperature,
    ctkd_lambda,
    ctkd_loss,
    ctkd_temperature,
    dkd_loss,
    dkd_warmup_factor,
    gradient_reversal,
    hard_distillation_loss,
    kd_loss,
    one_hot_smoothed,
    pkcd_init_state,
    pkcd_loss,
    soft_distillation_loss,
    topk_correct,
)

TOL = dict(rtol=1e-5, atol=1e-5)
B, C = 8, 10


def _logits(seed, scale=3.0, shape=(B, C)):
  return (np.random.RandomState(seed).randn(*shape) * scale).astype(np.float32)


def _labels(seed, n=B, num_classes=C):
  return np.random.RandomState(seed).randint(0, num_classes, size=n).astype(np.int32)


def _torch_value_and_grad(fn, student, *args):
  """Loss value and d loss / d student of a torch function, float64."""
  s = torch.tensor(student, dtype=torch.float64, requires_grad=True)
  loss = fn(s, *args)
  loss.backward()
  return loss.item(), s.grad.numpy()


def _t64(x):
  return torch.tensor(np.asarray(x), dtype=torch.float64)


def _assert_close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), **TOL)


# ----------------------------------------------------------------- torch re-statements


def torch_distill_kl(y_s, y_t, T):
  """CTKD / RepDistiller DistillKL."""
  return (torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(y_s / T, dim=1),
                                                    F.softmax(y_t / T, dim=1)) * T * T)


def torch_deit_soft(outputs_kd, teacher_outputs, T):
  """DeiT / TIKD losses.py 'soft'."""
  return (F.kl_div(
      F.log_softmax(outputs_kd / T, dim=1),
      F.log_softmax(teacher_outputs / T, dim=1),
      reduction="sum",
      log_target=True,
  ) * (T * T) / outputs_kd.numel())


def torch_deit_hard(outputs_kd, teacher_outputs):
  return F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))


def torch_mdistiller_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
  """mdistiller/distillers/DKD.py dkd_loss, line for line."""
  gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
  other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

  def cat_mask(t, mask1, mask2):
    t1 = (t * mask1).sum(dim=1, keepdims=True)
    t2 = (t * mask2).sum(1, keepdims=True)
    return torch.cat([t1, t2], dim=1)

  pred_student = F.softmax(logits_student / temperature, dim=1)
  pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
  pred_student = cat_mask(pred_student, gt_mask, other_mask)
  pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
  log_pred_student = torch.log(pred_student)
  tckd_loss = (F.kl_div(log_pred_student, pred_teacher, reduction="sum") * (temperature**2) /
               target.shape[0])
  pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
  log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
  nckd_loss = (F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") *
               (temperature**2) / target.shape[0])
  return alpha * tckd_loss + beta * nckd_loss


class TorchGradientReversal(torch.autograd.Function):
  """CTKD models/temp_global.py GradientReversalFunction."""

  @staticmethod
  def forward(ctx, x, lambda_):
    ctx.lambda_ = lambda_
    return x.clone()

  @staticmethod
  def backward(ctx, grads):
    lambda_ = grads.new_tensor(ctx.lambda_)
    return lambda_ * grads, None


def torch_cosine_decay(i, max_value=0.0, min_value=-1.0, num_loops=10):
  """CTKD train_student.py CosineDecay.get_value (script: --decay_max 0 --decay_min -1)."""
  if i < 0:
    i = 0
  if i >= num_loops:
    i = num_loops
  value = (math.cos(i * math.pi / num_loops) + 1.0) * 0.5
  return value * (max_value - min_value) + min_value


EPS = 1e-8


def torch_pearson(tensor1, tensor2):
  """TIKD _compute_pearson_correlation (without its float32 cast: we compare in float64)."""
  centered_tensor1 = tensor1 - tensor1.mean(dim=-1, keepdim=True)
  centered_tensor2 = tensor2 - tensor2.mean(dim=-1, keepdim=True)
  covariance = (centered_tensor1 * centered_tensor2).sum(dim=-1)
  std1 = torch.sqrt((centered_tensor1**2).sum(dim=-1))
  std2 = torch.sqrt((centered_tensor2**2).sum(dim=-1))
  correlation = covariance / (std1 * std2 + EPS)
  return torch.clamp(correlation, -1.0, 1.0)


def torch_tikd_pkcd(outputs_kd, teacher_outputs, original_labels, T, prev_logits, prev_labels):
  """TIKD losses.py _compute_pkcd_loss with its loops; buffers passed in (None = first call).

    Returns (L_kd, L_c, L_p, L_intra, total) with pkcd_alpha = pkcd_beta = 1.
    """
  zero = torch.zeros((), dtype=torch.float64)
  L_c, L_p, L_intra = zero, zero, zero
  if prev_logits is not None:
    batch_size, num_classes_actual = outputs_kd.shape
    L_c_list = []
    for i in range(batch_size):
      anchor = outputs_kd[i]
      negatives = torch.cat([teacher_outputs[:i], teacher_outputs[i + 1:]], dim=0)
      sim_pos = torch_pearson(anchor.unsqueeze(0), teacher_outputs[i].unsqueeze(0))
      sim_neg = torch_pearson(anchor.unsqueeze(0).expand(negatives.shape[0], -1), negatives)
      numerator = torch.exp(sim_pos / T)
      denominator = numerator + torch.sum(torch.exp(sim_neg / T))
      L_c_list.append(-torch.log(numerator / (denominator + EPS)))
    L_c = torch.stack(L_c_list).mean()

    L_p_list = []
    for i in range(batch_size):
      anchor = outputs_kd[i]
      positives = prev_logits[prev_labels == original_labels[i]]
      negatives = prev_logits[prev_labels != original_labels[i]]
      if positives.numel() > 0:
        all_prev = torch.cat([positives, negatives], dim=0)
        expanded = anchor.unsqueeze(0).expand(all_prev.shape[0], -1)
        sim_all = torch_pearson(expanded, all_prev) / T
        term_sum_log = 0.0
        for pos_logit in positives:
          sim_pos = torch_pearson(anchor.unsqueeze(0), pos_logit.unsqueeze(0)) / T
          term_sum_log += -torch.log(torch.exp(sim_pos) / (torch.sum(torch.exp(sim_all)) + EPS))
        L_p_list.append(term_sum_log / positives.shape[0])
      else:
        L_p_list.append(torch.tensor([0.0], dtype=torch.float64))
    L_p = torch.stack(L_p_list).mean()

    P_s_icd = F.softmax(outputs_kd / T, dim=0)
    P_t_icd = F.softmax(teacher_outputs / T, dim=0)
    corrs = [
        torch_pearson(P_s_icd[:, c].unsqueeze(0), P_t_icd[:, c].unsqueeze(0)).squeeze(0)
        for c in range(num_classes_actual)
    ]
    L_intra = 1 - (T**2) * torch.stack(corrs).mean()
  L_kd = torch_deit_soft(outputs_kd, teacher_outputs, T)
  total = L_kd + 1.0 * (L_c + L_p) + 1.0 * L_intra
  return L_kd, L_c, L_p, L_intra, total


# ----------------------------------------------------------------- classification


def test_cross_entropy_hard_labels_matches_torch():
  s, y = _logits(0), _labels(1)
  value, grad = jax.value_and_grad(cross_entropy)(jnp.asarray(s), jnp.asarray(y))
  ref_value, ref_grad = _torch_value_and_grad(
      lambda x: F.cross_entropy(x, torch.tensor(y, dtype=torch.long)), s)
  _assert_close(value, ref_value)
  _assert_close(grad, ref_grad)


def test_cross_entropy_soft_targets_matches_torch():
  s, y = _logits(2), _labels(3)
  targets = np.asarray(one_hot_smoothed(jnp.asarray(y), C, 0.1))
  value, grad = jax.value_and_grad(cross_entropy)(jnp.asarray(s), jnp.asarray(targets))
  # timm SoftTargetCrossEntropy
  ref_value, ref_grad = _torch_value_and_grad(
      lambda x: torch.sum(-_t64(targets) * F.log_softmax(x, dim=-1), dim=-1).mean(), s)
  _assert_close(value, ref_value)
  _assert_close(grad, ref_grad)
  # a one-hot soft target gives the same value as the int label
  from_one_hot = cross_entropy(jnp.asarray(s), jax.nn.one_hot(y, C))
  _assert_close(from_one_hot, cross_entropy(jnp.asarray(s), jnp.asarray(y)))


def test_one_hot_smoothed_values():
  targets = np.asarray(one_hot_smoothed(jnp.array([2, 0]), 4, 0.1))
  expected = np.array([[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]],
                      dtype=np.float32)
  np.testing.assert_allclose(targets, expected, rtol=0, atol=1e-7)
  assert targets.dtype == np.float32
  np.testing.assert_allclose(targets.sum(-1), [1.0, 1.0], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(one_hot_smoothed(jnp.array([1]), 3, 0.0)), [[0, 1, 0]])


def test_topk_correct():
  logits = jnp.array([[0.1, 0.9, 0.5, 0.0], [0.8, 0.1, 0.3, 0.2], [0.2, 0.3, 0.1, 0.9]],
                     jnp.float32)
  labels = jnp.array([1, 2, 0])
  np.testing.assert_array_equal(np.asarray(topk_correct(logits, labels, 1)), [1.0, 0.0, 0.0])
  np.testing.assert_array_equal(np.asarray(topk_correct(logits, labels, 2)), [1.0, 1.0, 0.0])
  np.testing.assert_array_equal(np.asarray(topk_correct(logits, labels, 3)), [1.0, 1.0, 1.0])
  jitted = jax.jit(topk_correct, static_argnums=2)(logits, labels, 2)
  np.testing.assert_array_equal(np.asarray(jitted), [1.0, 1.0, 0.0])


# ----------------------------------------------------------------- KD / DeiT


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_matches_torch(temperature):
  s, t = _logits(10), _logits(11)
  value, grad = jax.value_and_grad(kd_loss)(jnp.asarray(s), jnp.asarray(t), temperature)
  ref_value, ref_grad = _torch_value_and_grad(lambda x: torch_distill_kl(x, _t64(t), temperature),
                                              s)
  assert ref_value > 0.1
  _assert_close(value, ref_value)
  _assert_close(grad, ref_grad)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_soft_distillation_matches_torch_and_is_kd_over_c(temperature):
  s, t = _logits(12), _logits(13)
  value, grad = jax.value_and_grad(soft_distillation_loss)(jnp.asarray(s), jnp.asarray(t),
                                                           temperature)
  ref_value, ref_grad = _torch_value_and_grad(lambda x: torch_deit_soft(x, _t64(t), temperature), s)
  _assert_close(value, ref_value)
  _assert_close(grad, ref_grad)
  # sum / (B*C) vs batchmean: a factor C apart
  _assert_close(value * C, kd_loss(jnp.asarray(s), jnp.asarray(t), temperature))


def test_hard_distillation_matches_torch_and_teacher_gets_no_grad():
  s, t = _logits(14), _logits(15)
  value, grad = jax.value_and_grad(hard_distillation_loss)(jnp.asarray(s), jnp.asarray(t))
  ref_value, ref_grad = _torch_value_and_grad(lambda x: torch_deit_hard(x, _t64(t)), s)
  _assert_close(value, ref_value)
  _assert_close(grad, ref_grad)
  teacher_grad = jax.grad(hard_distillation_loss, argnums=1)(jnp.asarray(s), jnp.asarray(t))
  np.testing.assert_array_equal(np.asarray(teacher_grad), 0.0)


def test_kd_teacher_gets_no_gradient():
  s, t = _logits(16), _logits(17)
  teacher_grad = jax.grad(kd_loss, argnums=1)(jnp.asarray(s), jnp.asarray(t), 4.0)
  np.testing.assert_array_equal(np.asarray(teacher_grad), 0.0)


# ----------------------------------------------------------------- DKD


@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_mdistiller(alpha, beta, temperature):
  s, t, y = _logits(20), _logits(21), _labels(22)
  fn = lambda x: dkd_loss(x, jnp.asarray(t), jnp.asarray(y), alpha, beta, temperature)
  value, grad = jax.jit(jax.value_and_grad(fn))(jnp.asarray(s))
  ref_value, ref_grad = _torch_value_and_grad(
      lambda x: torch_mdistiller_dkd(x, _t64(t), torch.tensor(y, dtype=torch.long), alpha, beta,
                                     temperature),
      s,
  )
  assert ref_value > 0.1
  _assert_close(value, ref_value)
  _assert_close(grad, ref_grad)


def test_dkd_tckd_and_nckd_separately():
  s, t, y = _logits(23), _logits(24), _labels(25)
  args = (jnp.asarray(s), jnp.asarray(t), jnp.asarray(y))
  yt = torch.tensor(y, dtype=torch.long)
  tckd = dkd_loss(*args, alpha=1.0, beta=0.0, temperature=4.0)
  nckd = dkd_loss(*args, alpha=0.0, beta=1.0, temperature=4.0)
  _assert_close(tckd, torch_mdistiller_dkd(_t64(s), _t64(t), yt, 1.0, 0.0, 4.0).item())
  _assert_close(nckd, torch_mdistiller_dkd(_t64(s), _t64(t), yt, 0.0, 1.0, 4.0).item())
  assert float(tckd) > 0 and float(nckd) > 0


def test_dkd_warmup_factor():
  values = [float(dkd_warmup_factor(e)) for e in (0, 1, 10, 20, 21, 240)]
  np.testing.assert_allclose(values, [0.0, 0.05, 0.5, 1.0, 1.0, 1.0], rtol=0, atol=1e-7)
  np.testing.assert_allclose(float(dkd_warmup_factor(3, warmup_epochs=4)), 0.75, atol=1e-7)
  np.testing.assert_allclose(float(jax.jit(dkd_warmup_factor)(jnp.int32(5))), 0.25, atol=1e-7)


# ----------------------------------------------------------------- CTKD


def test_gradient_reversal_forward_and_backward():
  x = jnp.array([0.5, -1.0, 2.0], jnp.float32)
  np.testing.assert_array_equal(np.asarray(gradient_reversal(x, 0.7)), np.asarray(x))
  f = lambda v: jnp.sum(jnp.sin(v) * v)
  plain = jax.grad(f)(x)
  for strength in (0.0, 0.3, 1.0):
    reversed_grad = jax.grad(lambda v: f(gradient_reversal(v, strength)))(x)
    _assert_close(reversed_grad, -strength * np.asarray(plain))
  strength_grad = jax.grad(lambda lam: f(gradient_reversal(x, lam)))(jnp.float32(0.5))
  assert float(strength_grad) == 0.0
  # traced strength under jit
  jitted = jax.jit(jax.grad(lambda v, lam: f(gradient_reversal(v, lam))))(x, jnp.float32(0.25))
  _assert_close(jitted, -0.25 * np.asarray(plain))


def test_ctkd_init_and_temperature():
  raw = ctkd_init_raw_temperature()
  assert raw.shape == () and raw.dtype == jnp.float32 and float(raw) == 1.0
  expected = 1.0 + 20.0 / (1.0 + math.exp(-1.0))
  np.testing.assert_allclose(float(ctkd_temperature(raw, 0.5)), expected, rtol=1e-6)
  np.testing.assert_allclose(float(ctkd_temperature(raw, 0.5, t_start=2.0, t_range=4.0)),
                             2.0 + 4.0 / (1.0 + math.exp(-1.0)), rtol=1e-6)


def test_ctkd_loss_matches_torch_global_t():
  s, t = _logits(30), _logits(31)
  strength = 0.6
  raw = jnp.float32(0.3)
  (value, (grad_s, grad_raw)) = jax.value_and_grad(ctkd_loss, argnums=(0, 2))(jnp.asarray(s),
                                                                              jnp.asarray(t), raw,
                                                                              strength)
  # CTKD: temp = t_start + t_end * sigmoid(GRL(global_T, cos_value)); cos_value = -strength
  global_t = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
  ys = torch.tensor(s, dtype=torch.float64, requires_grad=True)
  temp = 1.0 + 20.0 * torch.sigmoid(TorchGradientReversal.apply(global_t, -strength))
  loss = torch_distill_kl(ys, _t64(t), temp)
  loss.backward()
  _assert_close(value, loss.item())
  _assert_close(grad_s, ys.grad.numpy())
  _assert_close(grad_raw, global_t.grad.numpy()[0])
  assert abs(float(grad_raw)) > 1e-4


def test_ctkd_descent_step_increases_kd_wrt_temperature_and_decreases_it_wrt_student():
  s, t = jnp.asarray(_logits(32)), jnp.asarray(_logits(33))
  # raw -2 → T ≈ 3.4, where KD is sensitive to T (at the init T ≈ 15.6 a float32 step of
  # this size would be lost in rounding)
  raw = jnp.float32(-2.0)
  strength = ctkd_lambda(10)  # full reversal
  grad_s, grad_raw = jax.grad(ctkd_loss, argnums=(0, 2))(s, t, raw, strength)

  def kd_at(student, raw_temperature):  # plain KD at the (no longer reversed) temperature
    return float(kd_loss(student, t, ctkd_temperature(raw_temperature, 0.0)))

  base = kd_at(s, raw)
  lr = 0.1
  after_temperature_step = kd_at(s, raw - lr * grad_raw)  # student fixed
  after_student_step = kd_at(s - lr * grad_s, raw)  # temperature fixed
  assert after_temperature_step > base + 1e-3
  assert after_student_step < base - 1e-3
  # the reversed gradient is exactly minus the plain KD gradient w.r.t. raw
  plain_grad_raw = jax.grad(lambda r: kd_loss(s, t, 1.0 + 20.0 * jax.nn.sigmoid(r)))(raw)
  _assert_close(grad_raw, -np.asarray(plain_grad_raw))
  # no reversal at λ = 0: the temperature gets no gradient
  assert float(jax.grad(ctkd_loss, argnums=2)(s, t, raw, 0.0)) == 0.0


def test_ctkd_lambda_schedule():
  hand = {
      -2: 0.0,
      0: 0.0,
      1: (1.0 - math.cos(math.pi / 10)) / 2,  # 0.0244717
      5: 0.5,
      9: (1.0 - math.cos(9 * math.pi / 10)) / 2,  # 0.9755283
      10: 1.0,
      11: 1.0,
      240: 1.0,
  }
  for epoch, expected in hand.items():
    np.testing.assert_allclose(float(ctkd_lambda(epoch)), expected, rtol=0, atol=1e-6)
    # CTKD's CosineDecay(max 0, min -1, loops 10) is -λ
    np.testing.assert_allclose(float(ctkd_lambda(epoch)), -torch_cosine_decay(epoch), atol=1e-6)
  np.testing.assert_allclose(float(ctkd_lambda(1)), 0.0244717, atol=1e-6)
  np.testing.assert_allclose(float(ctkd_lambda(5, ramp_epochs=10, lambda_max=2.0, lambda_min=0.5)),
                             1.25, atol=1e-6)
  np.testing.assert_allclose(float(ctkd_lambda(2, ramp_epochs=4)), 0.5, atol=1e-6)
  np.testing.assert_allclose(float(jax.jit(ctkd_lambda)(jnp.int32(5))), 0.5, atol=1e-6)


# ----------------------------------------------------------------- PKCD

_jit_pkcd = jax.jit(pkcd_loss, static_argnames=("pkcd_alpha", "pkcd_beta", "eps"))


def _pkcd_total(x, t, y, state, temperature):
  terms, new_state = pkcd_loss(x, t, y, state, temperature=temperature)
  return terms["total"], (terms, new_state)


# one compilation for every PKCD value/gradient below (temperature and state are traced)
_pkcd_value_and_grad = jax.jit(jax.value_and_grad(_pkcd_total, has_aux=True))


def _pkcd_inputs():
  """Two consecutive batches (numpy) as (s1, t1, y1, s2, t2, y2)."""
  s1, t1 = _logits(40), _logits(41)
  s2, t2 = _logits(42), _logits(43)
  y1 = np.array([0, 1, 2, 3, 0, 1, 5, 6], np.int32)
  # in batch 2, labels 0 and 1 have two positives in batch 1, labels 7 and 8 have none
  y2 = np.array([0, 1, 7, 3, 8, 0, 2, 1], np.int32)
  return s1, t1, y1, s2, t2, y2


def _long(y):
  return torch.tensor(y, dtype=torch.long)


def test_pkcd_init_state():
  state = pkcd_init_state(4, 7)
  assert state["prev_teacher_logits"].shape == (4, 7)
  assert state["prev_teacher_logits"].dtype == jnp.float32
  assert state["prev_labels"].shape == (4,) and state["prev_labels"].dtype == jnp.int32
  assert state["valid"].shape == () and not bool(state["valid"])


def test_pkcd_first_call_is_kd_soft_only():
  s1, t1, y1, *_ = _pkcd_inputs()
  T = 4.0
  s, t, y = jnp.asarray(s1), jnp.asarray(t1), jnp.asarray(y1)
  empty = pkcd_init_state(B, C)
  (_, (terms, new_state)), grad = _pkcd_value_and_grad(s, t, y, empty, T)
  L_kd, _, _, _, total = torch_tikd_pkcd(_t64(s1), _t64(t1), _long(y1), T, None, None)
  _assert_close(terms["kd_soft"], L_kd.item())
  _assert_close(terms["total"], total.item())
  for name in ("cbcd_current", "cbcd_previous", "cbcd", "intra"):
    assert float(terms[name]) == 0.0
  _assert_close(terms["total"], soft_distillation_loss(s, t, T))
  np.testing.assert_array_equal(np.asarray(new_state["prev_teacher_logits"]), t1)
  np.testing.assert_array_equal(np.asarray(new_state["prev_labels"]), y1)
  assert bool(new_state["valid"])

  _, ref_grad = _torch_value_and_grad(
      lambda x: torch_tikd_pkcd(x, _t64(t1), _long(y1), T, None, None)[-1], s1)
  _assert_close(grad, ref_grad)


@pytest.mark.parametrize("temperature", [4.0, 1.0])
def test_pkcd_second_call_uses_previous_batch_and_matches_torch(temperature):
  s1, t1, y1, s2, t2, y2 = _pkcd_inputs()
  t, y = jnp.asarray(t2), jnp.asarray(y2)
  _, state = _jit_pkcd(
      jnp.asarray(s1),
      jnp.asarray(t1),
      jnp.asarray(y1),
      pkcd_init_state(B, C),
      temperature=temperature,
  )

  (_, (terms, _)), grad = _pkcd_value_and_grad(jnp.asarray(s2), t, y, state, temperature)

  def torch_total(x):
    return torch_tikd_pkcd(x, _t64(t2), _long(y2), temperature, _t64(t1), _long(y1))

  ref = torch_total(_t64(s2))
  for name, ref_term in zip(("kd_soft", "cbcd_current", "cbcd_previous", "intra", "total"), ref):
    _assert_close(terms[name], ref_term.item())
  _assert_close(terms["cbcd"], (ref[1] + ref[2]).item())
  assert float(terms["cbcd_previous"]) > 0.1 and float(terms["cbcd_current"]) > 0.1
  _, ref_grad = _torch_value_and_grad(lambda x: torch_total(x)[-1], s2)
  _assert_close(grad, ref_grad)

  # the previous batch really enters: other previous logits change cbcd_previous only
  other_state = dict(state, prev_teacher_logits=jnp.asarray(_logits(44)))
  other_terms, _ = _jit_pkcd(jnp.asarray(s2), t, y, other_state, temperature=temperature)
  assert abs(float(other_terms["cbcd_previous"]) - float(terms["cbcd_previous"])) > 1e-3
  _assert_close(other_terms["cbcd_current"], terms["cbcd_current"])
  _assert_close(other_terms["intra"], terms["intra"])


def test_pkcd_state_carry_keyword_weights_and_soft_labels():
  s1, t1, y1, s2, t2, y2 = _pkcd_inputs()
  s, t, y = jnp.asarray(s2), jnp.asarray(t2), jnp.asarray(y2)
  _, state = _jit_pkcd(jnp.asarray(s1), jnp.asarray(t1), jnp.asarray(y1), pkcd_init_state(B, C))
  unweighted, _ = _jit_pkcd(s, t, y, state)
  weighted, _ = _jit_pkcd(s, t, y, state, pkcd_alpha=0.5, pkcd_beta=2.0)
  expected = unweighted["kd_soft"] + 0.5 * unweighted["cbcd"] + 2.0 * unweighted["intra"]
  _assert_close(weighted["total"], expected)
  # soft (mixup) labels are reduced by argmax, as the released forward does
  soft_terms, soft_state = _jit_pkcd(s, t, one_hot_smoothed(y, C, 0.1), state)
  np.testing.assert_array_equal(np.asarray(soft_state["prev_labels"]), y2)
  _assert_close(soft_terms["total"], unweighted["total"])
  # a separate InfoNCE temperature changes only the contrastive terms
  tau_terms, _ = _jit_pkcd(s, t, y, state, contrastive_temperature=0.5)
  _assert_close(tau_terms["intra"], unweighted["intra"])
  _assert_close(tau_terms["kd_soft"], unweighted["kd_soft"])
  assert abs(float(tau_terms["cbcd"]) - float(unweighted["cbcd"])) > 1e-2


# ----------------------------------------------------------------- extreme inputs


def _extreme_logits(seed):
  rng = np.random.RandomState(seed)
  return (np.sign(rng.randn(B, C)) * 50.0).astype(np.float32)


def _ctkd_at(s, t, y, T):
  # CTKD's T lies in (1, 21); the raw parameter that gives T (T ≈ 1 when T < 1 is asked for)
  raw = jnp.log(jnp.maximum(T - 1.0, 1e-9) / (21.0 - T))
  return ctkd_loss(s, t, raw, 1.0)


def _pkcd_total_second_call(s, t, y, T):
  _, state = pkcd_loss(t, s, y, pkcd_init_state(B, C), temperature=T)
  return pkcd_loss(s, t, y, state, temperature=T)[0]["total"]


_LOSSES = {
    "cross_entropy": lambda s, t, y, T: cross_entropy(s, y),
    "kd": lambda s, t, y, T: kd_loss(s, t, T),
    "soft": lambda s, t, y, T: soft_distillation_loss(s, t, T),
    "hard": lambda s, t, y, T: hard_distillation_loss(s, t),
    "dkd": lambda s, t, y, T: dkd_loss(s, t, y, 1.0, 8.0, T),
    "ctkd": _ctkd_at,
    "pkcd": _pkcd_total_second_call,
}
# one compilation per loss, the temperature is traced
_LOSS_VALUE_AND_GRAD = {name: jax.jit(jax.value_and_grad(fn)) for name, fn in _LOSSES.items()}


@pytest.mark.parametrize("name", sorted(_LOSSES))
@pytest.mark.parametrize("temperature", [0.1, 20.0])
def test_losses_finite_at_extreme_temperature_and_logits(name, temperature):
  s, t = jnp.asarray(_extreme_logits(50)), jnp.asarray(_extreme_logits(51))
  y = jnp.asarray(_labels(52))
  value_and_grad = _LOSS_VALUE_AND_GRAD[name]
  value, grad = value_and_grad(s, t, y, jnp.float32(temperature))
  assert np.isfinite(float(value)), (name, temperature, float(value))
  assert np.all(np.isfinite(np.asarray(grad))), (name, temperature)
  assert np.any(np.asarray(grad) != 0.0), (name, temperature)
  # the student equal to the teacher: distillation terms must be ~0 with zero gradient
  if name in ("kd", "soft", "dkd", "ctkd"):
    same, same_grad = value_and_grad(t, t, y, jnp.float32(temperature))
    assert abs(float(same)) < 1e-4, (name, temperature, float(same))
    np.testing.assert_allclose(np.asarray(same_grad), 0.0, atol=1e-4)


def test_extreme_dkd_matches_mdistiller_where_torch_is_finite():
  # moderate extremes where mdistiller's torch.log(softmax) is still finite in float64
  s, t, y = _logits(53, scale=15.0), _logits(54, scale=15.0), _labels(55)
  value = dkd_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), 1.0, 8.0, 1.0)
  ref = torch_mdistiller_dkd(_t64(s), _t64(t), torch.tensor(y, dtype=torch.long), 1.0, 8.0, 1.0)
  np.testing.assert_allclose(float(value), ref.item(), rtol=1e-4)
