"""OneCycle (tikd_jax/train/optim.py) against torch.optim.lr_scheduler.OneCycleLR, and the IRKD P4
teacher recipe of configs/vit_teacher_cifar10.py that uses it.

Torch is the reference here only: a dummy parameter, its optimizer and the scheduler stepped as
IRKD's notebook steps it (once per batch, after `optimizer.step()`).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from ml_collections import ConfigDict

from configs import common, vit_teacher_cifar10
from tikd_jax.train import optim

# (total_steps, OneCycleLR keyword arguments); max_lr is 4e-4 throughout.
CASES = {
    'torch_defaults': (100, {}),
    'irkd_p4_teacher': (90, dict(pct_start=0.6, div_factor=20.0, final_div_factor=5.0)),
    'three_phase_linear': (37, dict(three_phase=True, anneal_strategy='linear', pct_start=0.25)),
    'odd_boundary': (41, dict(pct_start=0.33, base_momentum=0.8, max_momentum=0.99)),
}
MAX_LR = 4e-4


def _schedule_cfg(**kw) -> ConfigDict:
  cfg = ConfigDict(common.base().schedule)
  cfg.name, cfg.lr = 'onecycle', MAX_LR
  cfg.update(kw)
  return cfg


def _torch_values(total_steps: int, kw: dict, optimizer: str = 'adamw'):
  """(lr, momentum) torch's optimizer uses at each of its `total_steps` steps."""
  param = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
  if optimizer == 'adamw':
    opt = torch.optim.AdamW([param], lr=3e-4)  # the notebook's lr=3e-4, replaced by max_lr/div
  else:
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
  sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=MAX_LR, total_steps=total_steps, **kw)
  lrs, moms = [], []
  for _ in range(total_steps):
    group = opt.param_groups[0]
    lrs.append(group['lr'])
    moms.append(group['betas'][0] if optimizer == 'adamw' else group['momentum'])
    opt.step()  # no gradient: a no-op that keeps torch's "step before scheduler" order
    sched.step()
  return np.array(lrs), np.array(moms)


@pytest.mark.parametrize('case', sorted(CASES))
def test_onecycle_lr_and_momentum_equal_torch_at_every_step(case):
  total_steps, kw = CASES[case]
  want_lr, want_momentum = _torch_values(total_steps, kw)
  schedule = optim.make_schedule(_schedule_cfg(**kw), steps_per_epoch=7, total_steps=total_steps)
  assert isinstance(schedule, optim.OneCycle)
  steps = np.arange(total_steps)
  with jax.enable_x64(True):  # torch computes in Python floats: compare the formula in float64
    lr = np.asarray(schedule(jnp.asarray(steps)))
    momentum = np.asarray(schedule.momentum(jnp.asarray(steps)))
    assert lr.dtype == np.float64
    np.testing.assert_allclose(lr, want_lr, rtol=1e-7, atol=0)
    np.testing.assert_allclose(momentum, want_momentum, rtol=1e-7, atol=0)
    # One step at a time, as optax calls it with its int32 update count.
    for t in (0, 1, total_steps // 2, total_steps - 1):
      np.testing.assert_allclose(float(schedule(jnp.int32(t))), want_lr[t], rtol=1e-7)
  # In training (float32) the same values to float32 precision, relative to max_lr.
  np.testing.assert_allclose(np.asarray(schedule(steps)), want_lr, rtol=0, atol=1e-6 * MAX_LR)
  np.testing.assert_allclose(np.asarray(schedule.momentum(steps)), want_momentum, rtol=0, atol=1e-6)
  # Past the end it holds the final value.
  assert float(schedule(total_steps + 5)) == pytest.approx(float(want_lr[-1]), rel=1e-5)


def test_onecycle_cycles_sgd_momentum_as_torch():
  total_steps, kw = CASES['torch_defaults']
  _, want = _torch_values(total_steps, kw, optimizer='sgd')
  schedule = optim.make_schedule(_schedule_cfg(), steps_per_epoch=7, total_steps=total_steps)
  with jax.enable_x64(True):
    np.testing.assert_allclose(np.asarray(schedule.momentum(jnp.arange(total_steps))), want,
                               rtol=1e-7)


def _params():
  rng = np.random.RandomState(0)
  return {'dense': {'kernel': rng.randn(3, 4), 'bias': rng.randn(4)}}


@pytest.mark.parametrize('cycle_momentum', [True, False])
def test_adamw_with_onecycle_updates_as_torch(cycle_momentum):
  """make_optimizer + the schedule take the steps torch's AdamW + OneCycleLR take: lr, cycled
  beta1 (with its bias correction), decoupled decay off on the bias. A large max lr (0.1), so
  that each step moves the parameters far beyond float32 rounding (steps of ~0.1 compared to
  1e-5; beta1 left at 0.9 instead of cycled is off by 7e-4)."""
  max_lr = 0.1
  total_steps, kw = 12, dict(pct_start=0.6, div_factor=20.0, final_div_factor=5.0,
                             cycle_momentum=cycle_momentum)
  opt_cfg = ConfigDict(common.base().optimizer)
  opt_cfg.update(weight_decay=2e-4, wd_exclude=('bias$',), b1=0.9)
  schedule = optim.make_schedule(_schedule_cfg(lr=max_lr, **kw), 1, total_steps)
  start = _params()
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), start)
  tx = optim.make_optimizer(opt_cfg, schedule, params)
  state = tx.init(params)

  kernel = torch.nn.Parameter(torch.tensor(start['dense']['kernel'], dtype=torch.float32))
  bias = torch.nn.Parameter(torch.tensor(start['dense']['bias'], dtype=torch.float32))
  torch_opt = torch.optim.AdamW(
      [{'params': [kernel], 'weight_decay': 2e-4}, {'params': [bias], 'weight_decay': 0.0}],
      lr=3e-4, betas=(0.9, 0.999), eps=1e-8)
  sched = torch.optim.lr_scheduler.OneCycleLR(torch_opt, max_lr=max_lr, total_steps=total_steps,
                                              **kw)
  rng = np.random.RandomState(1)
  for _ in range(total_steps):
    grads = {'dense': {'kernel': rng.randn(3, 4), 'bias': rng.randn(4)}}
    updates, state = tx.update(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), grads), state,
                               params)
    params = optax.apply_updates(params, updates)
    kernel.grad = torch.tensor(grads['dense']['kernel'], dtype=torch.float32)
    bias.grad = torch.tensor(grads['dense']['bias'], dtype=torch.float32)
    torch_opt.step()
    sched.step()
    for got, want in ((params['dense']['kernel'], kernel), (params['dense']['bias'], bias)):
      np.testing.assert_allclose(got, want.detach().numpy(), rtol=0, atol=1e-5)
  moved = np.abs(np.asarray(params['dense']['kernel']) - start['dense']['kernel']).mean()
  assert moved > 1e-2  # the comparison is not vacuous


def test_onecycle_refusals():
  with pytest.raises(ValueError, match=r'pct_start must be in \[0, 1\]'):
    optim.make_schedule(_schedule_cfg(pct_start=1.5), 1, 10)
  with pytest.raises(ValueError, match=r"anneal_strategy must be one of \('cos', 'linear'\)"):
    optim.make_schedule(_schedule_cfg(anneal_strategy='cosine'), 1, 10)
  with pytest.raises(ValueError, match='leaves the warm-up phase no length'):
    optim.make_schedule(_schedule_cfg(pct_start=0.1), 1, 10)
  with pytest.raises(ValueError, match=r"'cosine', 'multistep', 'constant' or 'onecycle'"):
    optim.make_schedule(_schedule_cfg(name='one_cycle'), 1, 10)


def test_vit_teacher_config_is_the_irkd_p4_teacher_recipe():
  c = vit_teacher_cifar10.get_config()
  assert c.num_epochs == 135.0 and c.batch_size == 128
  assert (c.schedule.name, c.schedule.lr, c.schedule.pct_start, c.schedule.div_factor,
          c.schedule.final_div_factor, c.schedule.anneal_strategy, c.schedule.three_phase,
          c.schedule.cycle_momentum, c.schedule.base_momentum,
          c.schedule.max_momentum) == ('onecycle', 4e-4, 0.6, 20.0, 5.0, 'cos', False, True, 0.85,
                                       0.95)
  assert (c.optimizer.name, c.optimizer.weight_decay, tuple(c.optimizer.wd_exclude), c.optimizer.b2,
          c.optimizer.eps) == ('adamw', 2e-4, ('bias$',), 0.999, 1e-8)
  assert c.label_smoothing == 0.01
  assert (c.augment.mixup_alpha, c.augment.cutmix_alpha, c.augment.switch_prob,
          c.augment.mix_prob) == (0.2, 1.0, 0.5, 1.0)
  # P_4_ALL cell 5 replaces the train split's transform by val_tf before training: its teacher
  # saw no crop, flip, AutoAugment or erasing (named switches, off; tests/test_irkd_rows.py).
  assert (c.data.crop_padding, c.data.flip, c.augment.randaugment,
          c.augment.erasing_prob) == (0, False, False, 0.0)
  assert c.model.drop_path == 0.0  # HF ViT has no stochastic depth
  assert (c.data.name, c.data.val_size, c.data.val_seed,
          c.data.val_split_method) == ('cifar10', 5000, 42, 'torch')
  assert c.model.mean == common.CIFAR10_MEAN and c.model.std == common.CIFAR10_STD
  # Its schedule is torch's OneCycleLR over the run's steps (45k // 128 per epoch here).
  steps_per_epoch = 45000 // c.batch_size
  total = int(steps_per_epoch * c.num_epochs)
  schedule = optim.make_schedule(c.schedule, steps_per_epoch, total)
  want_lr, want_momentum = _torch_values(total,
                                         dict(pct_start=0.6, div_factor=20.0, final_div_factor=5.0))
  with jax.enable_x64(True):
    np.testing.assert_allclose(np.asarray(schedule(jnp.arange(total))), want_lr, rtol=1e-7)
    np.testing.assert_allclose(np.asarray(schedule.momentum(jnp.arange(total))), want_momentum,
                               rtol=1e-7)
  # The arg grammar still takes (and ignores) an argument; a misspelt override fails loudly.
  assert vit_teacher_cifar10.get_config('').to_dict() == c.to_dict()
  with pytest.raises(AttributeError):
    c.schedule.pct_strat = 0.5
