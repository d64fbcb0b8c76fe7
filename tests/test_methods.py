"""Every distillation method through the real train step, with the weights of docs/methods.md."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import kd_cifar100, tikd_cifar100
from tikd_jax.data import build_source
from tikd_jax.models import build_model
from tikd_jax.models.variables import model_variables
from tests.method_loss import method_loss
from tikd_jax.train.state import init_train_state
from tikd_jax.train.step import StepOptions, make_train_step
from tests.test_train import tiny_config


@pytest.fixture(scope='module')
def setup():
  source = build_source(tiny_config().data, 'train')
  batch = {'image': jnp.asarray(source.images[:32]), 'label': jnp.asarray(source.labels[:32])}
  teacher = build_model('resnet8', num_classes=10, rngs=nnx.Rngs(5))
  tgraph, tparams, tstats = nnx.split(teacher, nnx.Param, nnx.BatchStat)
  teacher_vars = {'params': nnx.to_pure_dict(tparams), 'batch_stats': nnx.to_pure_dict(tstats)}
  return batch, tgraph, teacher_vars


def weights(method):
  """The (base, distill) weights the config gives each method on the CNN baseline."""
  c = kd_cifar100.get_config(method)
  return c.distill


@pytest.mark.parametrize('method', ['none', 'soft', 'hard', 'kd', 'dkd', 'ctkd', 'pkcd'])
def test_each_method_trains_on_digits_with_its_weights(setup, method):
  batch, tgraph, teacher_vars = setup
  cfg = weights(method)
  objective = method_loss(cfg)
  student = build_model('distilled_vit', variant='micro', img_size=16, num_classes=10,
                        drop_path=0.0, rngs=nnx.Rngs(0))
  graphdef, _, _ = nnx.split(student, nnx.Param, nnx.BatchStat)
  variables = model_variables(student)
  tx = optax.adam(3e-3)
  state = init_train_state(variables, objective, tx, rng=jax.random.key(0),
                           shapes={'rows': 32, 'num_classes': 10})
  # steps_per_epoch=1: the epoch advances every step, so DKD's warm-up and CTKD's λ move.
  step = jax.jit(
      make_train_step(graphdef=graphdef,
                      teacher_graphdef=tgraph if objective.needs_teacher else None, loss=objective,
                      tx=tx, frozen_mask=None, opts=StepOptions(num_classes=10, steps_per_epoch=1,
                                                                seed=0)))
  history = []
  for _ in range(25):
    state, m = step(state, batch, teacher_vars)
    history.append(jax.tree.map(float, m))
  losses = [h['loss'] for h in history]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  first = history[0]
  if method == 'none':
    assert first['loss'] == pytest.approx(first['base_loss'], abs=1e-6)
  elif method in ('soft', 'hard'):  # DeiT: (1 − α)·CE + α·distill, α = 0.5
    assert first['loss'] == pytest.approx(0.5 * first['base_loss'] + 0.5 * first['distill_loss'],
                                          abs=1e-5)
  elif method in ('kd', 'ctkd'):  # RepDistiller: 0.1·CE + 0.9·KD
    assert first['loss'] == pytest.approx(0.1 * first['base_loss'] + 0.9 * first['distill_loss'],
                                          abs=1e-5)
  elif method == 'dkd':  # CE + min(epoch/20, 1)·DKD, epoch 1-based
    assert first['dkd_warmup'] == pytest.approx(1 / 20)
    assert history[4]['dkd_warmup'] == pytest.approx(5 / 20)
    assert first['loss'] == pytest.approx(first['base_loss'] + first['distill_loss'] / 20, abs=1e-5)
  elif method == 'pkcd':  # CE + KD_soft + InfoNCE + intra-class
    assert first['loss'] == pytest.approx(first['base_loss'] + first['distill_loss'], abs=1e-5)
    assert history[1]['pkcd_cbcd_previous'] != 0.0  # the previous batch is used from step 2
  if method == 'ctkd':
    temps = [h['ctkd_temperature'] for h in history]
    assert history[0]['ctkd_lambda'] < history[-1]['ctkd_lambda']
    assert temps[-1] != temps[0]  # the temperature trains
    assert 'raw_temperature' in state.params['objective']['ctkd']


def test_tikd_config_accepts_every_method():
  for method in ('none', 'soft', 'hard', 'kd', 'dkd', 'ctkd', 'pkcd'):
    c = tikd_cifar100.get_config(f'small,{method}')
    assert c.distill.method == method and c.model.variant == 'small'
    method_loss(c.distill)
  assert tikd_cifar100.get_config('large').distill.method == 'hard'
  with pytest.raises(ValueError):
    kd_cifar100.get_config('fitnet')
