"""Loss terms (tikd_jax/losses/registry.py): a new method is one registered term and one config
line; distill.method expands to today's weights; unknown names fail with the known ones."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import irkd_cifar10, kd_cifar100, tikd_cifar100, tiny
from tikd_jax.losses import registry as terms
from tikd_jax.train import trainer
from tikd_jax.train.loss_config import term_settings
from tikd_jax.train.plan import build_phases
from tests.test_resume import _checkpoint
from tests.test_train import teacher_dir, tiny_config  # noqa: F401  (fixture)


# ----------------------------------------------------------------------------- a new method
def fitnet_init(rng, shapes):
  """A linear projector from the student's pre-logits to the teacher's (FitNets, Romero et al.
  2015, regress the teacher's hint features through a learned regressor)."""
  d_s = shapes['student_out']['pre_logits'].shape[-1]
  d_t = shapes['teacher_out']['pre_logits'].shape[-1]
  kernel = jax.random.normal(rng, (d_s, d_t), jnp.float32) / np.sqrt(d_s)
  return {'kernel': kernel, 'bias': jnp.zeros((d_t,), jnp.float32)}, {}


@terms.register('fitnet', init=fitnet_init, needs_teacher=True)
def fitnet(ctx):
  """Mean squared error of the projected student features to the teacher's penultimate ones."""
  pred = ctx.out['pre_logits'] @ ctx.params['kernel'] + ctx.params['bias']
  loss = jnp.mean(jnp.square(pred - ctx.teacher_out['pre_logits']))
  return loss, {'fitnet_loss': loss}


def test_a_registered_term_trains_through_the_trainer(tmp_path, teacher_dir):  # noqa: F811
  c = tiny_config('none', **{'teacher.checkpoint': teacher_dir, 'log_every_steps': 1})
  c.loss = (('ce', 1.0), ('fitnet', 1.0))  # the one line that adds the method
  workdir = str(tmp_path / 'fitnet')
  stop = c.copy_and_resolve_references()
  stop.stop_at_step = 1
  trainer.train_and_evaluate(stop, workdir)
  first = _checkpoint(workdir)
  result = trainer.train_and_evaluate(c, workdir)
  final = _checkpoint(workdir)
  assert np.isfinite(result['loss']) and final['step'] > first['step'] == 1
  for leaf in ('kernel', 'bias'):  # the projector is checkpointed, and it trained
    key = f'objective/fitnet/{leaf}'
    assert key in final['extra'], sorted(final['extra'])
    assert np.abs(final['extra'][key] - first['extra'][key]).max() > 1e-3
  assert final['extra']['objective/fitnet/kernel'].shape[1] == 64  # resnet8's features
  rows = [json.loads(l) for l in open(tmp_path / 'fitnet' / 'metrics.jsonl')]
  fit = [r['fitnet_loss'] for r in rows if 'fitnet_loss' in r]
  assert len(fit) == final['step'] and np.mean(fit[-3:]) < 0.5 * fit[0], fit


# ----------------------------------------------------------------------------- the shorthand
# tiny.py keeps DeiT's weights (α = 0.5); kd_cifar100.py the RepDistiller ones for kd / ctkd.
EXPANSIONS = {
    (tiny, 'none'): (('ce', 1.0),),
    (tiny, 'soft'): (('ce', 0.5), ('soft', 0.5)),
    (tiny, 'hard'): (('ce', 0.5), ('hard', 0.5)),
    (tiny, 'kd'): (('ce', 0.5), ('kd', 0.5)),
    (tiny, 'ctkd'): (('ce', 0.5), ('ctkd', 0.5)),
    (tiny, 'dkd'): (('ce', 1.0), ('dkd', 1.0)),
    (tiny, 'pkcd'): (('ce', 1.0), ('pkcd', 1.0)),
    (kd_cifar100, 'kd'): (('ce', 0.1), ('kd', 0.9)),
    (kd_cifar100, 'ctkd'): (('ce', 0.1), ('ctkd', 0.9)),
    (kd_cifar100, 'dkd'): (('ce', 1.0), ('dkd', 1.0)),
    (kd_cifar100, 'pkcd'): (('ce', 1.0), ('pkcd', 1.0)),
}


@pytest.mark.parametrize('config_module, method', EXPANSIONS,
                         ids=[f'{m.__name__.split(".")[-1]}:{k}' for m, k in EXPANSIONS])
def test_distill_method_expands_to_its_terms(config_module, method):
  (phase,) = build_phases(config_module.get_config(method), steps_per_epoch=10)
  assert phase.terms == EXPANSIONS[config_module, method]


def test_tikd_stages_and_irkd_saliency_add_their_terms():
  c = tikd_cifar100.get_config('small,hard')
  phases = build_phases(c, steps_per_epoch=10)
  assert phases[0].terms == (('ce', 0.5), ('hard', 0.5))  # no caption features: no predictor
  # The joint stage adds the alignment and, by default, design (c)'s self-distillation.
  assert phases[-1].terms == (('ce', 0.5), ('hard', 0.5), ('tikd_alignment', 0.1),
                              ('tikd_self_distill', 1.0))
  with c.unlocked():
    c.text.features_dir = '/features'
  assert build_phases(c, steps_per_epoch=10)[-1].terms[-1] == ('text_predictor', 1.0)
  irkd = build_phases(irkd_cifar10.get_config('kd_cl_sal,p4'), steps_per_epoch=10)
  assert all(p.terms[-1] == ('attention_saliency', 0.8) for p in irkd)


def test_config_loss_and_a_stage_override_replace_the_shorthand():
  c = tiny.get_config('hard')
  c.loss = (('ce', 1.0), ('kd', 0.3))
  with c.unlocked():
    c.stages = [dict(name='a', epochs=1), dict(name='b', epochs=1, loss=(('ce', 1.0),))]
  phases = build_phases(c, steps_per_epoch=10)
  assert [p.terms for p in phases] == [(('ce', 1.0), ('kd', 0.3)), (('ce', 1.0),)]


def test_loss_settings_add_to_and_override_the_distill_block():
  c = tiny.get_config('kd')
  with c.unlocked():
    c.loss_settings.kd = dict(temperature=2.0)
    c.loss_settings.fitnet = dict(scale=3.0)
  settings = term_settings(c)
  assert settings['kd'] == {'temperature': 2.0} and settings['fitnet'] == {'scale': 3.0}
  assert settings['dkd']['temperature'] == c.distill.temperature == 4.0


def test_unknown_term_lists_the_known_ones():
  with pytest.raises(
      ValueError, match=r"unknown loss term 'fitnett'; known terms: \[.*'ce'.*"
      r"'fitnet'.*'tikd_alignment'"):
    terms.Loss((('ce', 1.0), ('fitnett', 1.0)))
  with pytest.raises(ValueError, match='already registered'):
    terms.register('ce')(lambda ctx: (0.0, {}))
