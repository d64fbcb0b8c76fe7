"""The registry decides what a config trains (tikd_jax/losses/registry.py, train/loss_config.py):
each preset's (term, weight) lists, the method list the configs accept, the terms' settings from
the command line, config.extra_loss and config.loss, the weight-decay exemptions, and the one
argument parser of the configs (configs/common.py `Args`)."""
import importlib
import types

import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from configs import (common, custom, demo, irkd_cifar10, kd_cifar100, teacher_cifar100,
                     tikd_cifar10, tikd_cifar100, tikd_irkd_cifar10, tiny)
from tikd_jax import losses
from tikd_jax.losses import registry
from tikd_jax.train import optim
from tikd_jax.train.loss_config import term_settings
from tikd_jax.train.plan import build_phases
from tikd_jax.tree import flatten

CE, HARD, KD = ('ce', 0.5), ('hard', 0.5), ('kd', 0.5)
FUSED = (('tikd_alignment', 0.1), ('tikd_self_distill', 1.0))
SAL = ('attention_saliency', 0.8)
# Each preset's distinct phase losses, in phase order (pinned as of the registry's introduction:
# the same lists the hand-written method table gave).
PRESETS = {
    ('kd_cifar100', 'kd'): [(('ce', 0.1), ('kd', 0.9))],
    ('kd_cifar100', 'ctkd'): [(('ce', 0.1), ('ctkd', 0.9))],
    ('kd_cifar100', 'dkd'): [(('ce', 1.0), ('dkd', 1.0))],
    ('kd_cifar100', 'pkcd'): [(('ce', 1.0), ('pkcd', 1.0))],
    ('kd_cifar100', 'soft'): [(CE, ('soft', 0.5))],
    ('kd_cifar100', 'none'): [(('ce', 1.0),)],
    ('custom', 'hard'): [(CE, HARD)],
    ('custom', 'teacher'): [(('ce', 1.0),)],
    ('tikd_cifar100', 'small,hard'): [(CE, HARD), (CE, HARD) + FUSED],
    ('tikd_cifar100', 'small,soft,notext'): [(CE, ('soft', 0.5))],
    ('tikd_cifar100', 'large,dkd,released'): [(('ce', 1.0), ('dkd', 1.0))],
    ('tikd_cifar10', 'small,kd'): [(CE, KD), (CE, KD) + FUSED],
    ('tikd_tinyimagenet', 'hard'): [(CE, HARD), (CE, HARD) + FUSED],
    ('irkd_cifar10', 'kd_cl_sal,p4'): [(CE, KD, SAL)],
    ('irkd_cifar10', 'ce,p2'): [(('ce', 1.0),)],
    ('tikd_irkd_cifar10', 'sal'): [(CE, KD, SAL), (CE, KD) + FUSED + (SAL,)],
    ('tikd_irkd_cifar10', 'digits'): [(CE, KD), (CE, KD) + FUSED],
    ('teacher_cifar100', 'resnet32x4'): [(('ce', 1.0),)],
}


def _phase_losses(c):
  losses_ = [p.terms for p in build_phases(c, steps_per_epoch=10)]
  return sorted(set(losses_), key=losses_.index)


@pytest.mark.parametrize('preset', PRESETS, ids=[f'{m}:{a}' for m, a in PRESETS])
def test_presets_expand_to_their_pinned_terms(preset):
  module, arg = preset
  assert _phase_losses(importlib.import_module(f'configs.{module}').get_config(arg)) == \
      PRESETS[preset]


def test_method_list_is_the_registry_and_every_config_takes_each_method():
  assert tuple(losses.METHODS) == ('none', 'soft', 'hard', 'hard_oracle', 'kd', 'ctkd', 'dkd',
                                   'pkcd')
  for method in losses.METHODS:
    assert custom.get_config(method).distill.method == method
    assert kd_cifar100.get_config(method).distill.method == method
    assert tikd_cifar100.get_config(f'small,{method}').distill.method == method


@pytest.fixture
def my_method():
  """A term registered as a method with DeiT's weights, removed again afterwards."""

  @registry.register('my_kd', needs_teacher=True, method=registry.alpha_weighted,
                     settings=lambda config: {'temperature': config.distill.temperature})
  def my_kd(ctx, temperature: float = 2.0):
    loss = losses.kd_loss(ctx.distill_logits, ctx.teacher_logits, temperature)
    return loss, {'distill_loss': loss}

  yield my_kd
  registry.TERMS.pop('my_kd')
  registry.METHODS.pop('my_kd')


def test_a_registered_method_is_taken_by_the_configs_with_its_settings(my_method):
  del my_method
  c = tikd_cifar100.get_config('small,my_kd,notext')
  assert _phase_losses(c) == [(CE, ('my_kd', 0.5))]
  assert term_settings(c)['my_kd'] == {'temperature': 4.0}
  assert 'my_kd' in c.loss_settings  # a config built after the registration can set it
  c = kd_cifar100.get_config('my_kd')
  assert _phase_losses(c) == [(CE, ('my_kd', 0.5))]


# ----------------------------------------------------------------------------- settings
def _parse_flags(argv):
  """The config main.py's flags give for `argv`."""
  argv, values = ['main.py'] + argv, flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def test_loss_settings_are_set_from_the_command_line():
  c = _parse_flags([
      '--config=configs/tiny.py:dkd', '--config.loss_settings.dkd.beta=2',
      '--config.loss_settings.hard.label_smoothing=0.1'
  ])
  settings = term_settings(c)
  assert settings['dkd']['beta'] == 2.0 and settings['dkd']['alpha'] == c.distill.dkd_alpha
  assert settings['hard'] == {'label_smoothing': 0.1}
  assert term_settings(tiny.get_config('dkd'))['dkd']['beta'] == 8.0  # unset: the distill block
  with pytest.raises(AttributeError, match='betta'):  # a misspelt setting fails loudly
    _parse_flags(['--config=configs/tiny.py:dkd', '--config.loss_settings.dkd.betta=2'])


# ----------------------------------------------------------------------------- extra / explicit
def test_extra_loss_appends_to_the_method_tikd_and_saliency_terms():
  c = tikd_cifar100.get_config('small,hard')
  c.extra_loss = (('kd', 0.2),)
  assert _phase_losses(c) == [(CE, HARD, ('kd', 0.2)), (CE, HARD) + FUSED + (('kd', 0.2),)]
  c = irkd_cifar10.get_config('kd_cl_sal,p4')
  c.extra_loss = (('hard', 0.3),)
  assert _phase_losses(c) == [(CE, KD, SAL, ('hard', 0.3))]
  c.extra_loss = (('kd', 0.3),)
  with pytest.raises(ValueError, match=r"extra_loss names \['kd'\], which the loss"):
    build_phases(c, steps_per_epoch=10)


def test_an_explicit_loss_that_drops_the_tikd_or_saliency_terms_says_so():
  c = tikd_cifar100.get_config('small,hard')
  c.loss = (('ce', 0.5), ('kd', 0.5))
  with pytest.raises(
      ValueError, match=r"leaves out \['tikd_alignment', 'tikd_self_distill'\].*"
      r'config.extra_loss'):
    build_phases(c, steps_per_epoch=10)
  c.loss = (('ce', 0.5), ('kd', 0.5), ('tikd_alignment', 0.2), ('tikd_self_distill', 1.0))
  assert _phase_losses(c) == [c.loss]  # it names them: the list is the loss, in every stage
  c = irkd_cifar10.get_config('kd_cl_sal,p4')
  c.loss = (('ce', 1.0),)
  with pytest.raises(ValueError, match=r"leaves out \['attention_saliency'\]"):
    build_phases(c, steps_per_epoch=10)


# ----------------------------------------------------------------------------- weight decay
def _params():
  return {
      'student': {'head': {'kernel': jnp.ones(2), 'bias': jnp.ones(2)}, 'text_gate': jnp.ones(())},
      'objective': {'ctkd': {'raw_temperature': jnp.ones(())}, 'fitnet': {'kernel': jnp.ones(2)}}
  }


@pytest.mark.parametrize(
    'config', [tiny.get_config('ctkd'), kd_cifar100.get_config('ctkd')], ids=['adamw', 'sgd'])
def test_weight_decay_spares_what_the_model_and_the_terms_name(config):
  mask = flatten(optim.weight_decay_mask(config.optimizer, _params()))
  assert mask['objective/ctkd/raw_temperature'] is False  # CTKD's registration says so
  assert mask['objective/fitnet/kernel'] and mask['student/head/kernel']
  # The model's names come from optimizer.wd_exclude: DeiT spares biases, SGD decays them.
  assert mask['student/head/bias'] is (config.optimizer.name == 'sgd')
  assert 'ctkd/raw_temperature' not in ''.join(common.NO_DECAY)


def test_a_terms_no_decay_names_are_scoped_to_its_parameters():
  registry.register('scaled', init=lambda rng, shapes: ({'scale': jnp.ones(())}, {}),
                    no_decay=('scale',))(lambda ctx: (0.0, {}))
  try:
    params = {'objective': {'scaled': {'scale': 0.0}, 'other': {'scale': 0.0}}}
    mask = flatten(optim.weight_decay_mask(types.SimpleNamespace(wd_exclude=()), params))
    assert mask == {'objective/scaled/scale': False, 'objective/other/scale': True}
  finally:
    registry.TERMS.pop('scaled')


# ----------------------------------------------------------------------------- the :arg parser
BAD_ARGS = [
    (demo, 'seed=3', r'configs/demo.py takes \[seeds=N\].*unknown option'),
    (demo, 'epochs=2', 'epochs=2: N >= 3'),
    (irkd_cifar10, 'kd,p3', r'irkd_cifar10 takes ce\|cl\|kd\|kd_cl\|kd_cl_sal\[,p2\|p4\]'),
    (tikd_cifar10, 'small,warmup=x', r'tikd_cifar10 takes small\|medium\|large.*E > 0'),
    (tikd_cifar100, 'small,kd,dkd', r'tikd_cifar100 takes .*\(method: none\|.*one method at most'),
    (tikd_cifar100, 'small,notext,released', 'notext and released exclude each other'),
    (tikd_irkd_cifar10, 'sal,huge', r"tikd_irkd_cifar10 takes \[sal\].*\['huge'\] not understood"),
    (teacher_cifar100, 'resnet8,cifar10,x', r"teacher_cifar100 takes \[ARCH\].*\['x'\]"),
    (custom, 'teacher,kd', 'custom takes teacher or a method'),
    (kd_cifar100, 'fitnet', r'kd_cifar100 takes \[method\]'),
]


@pytest.mark.parametrize('module, arg, says', BAD_ARGS, ids=[a for _, a, _ in BAD_ARGS])
def test_every_config_argument_error_says_what_is_allowed(module, arg, says):
  with pytest.raises(ValueError, match=says):
    module.get_config(arg)


def test_the_parser_reads_positionals_methods_flags_and_options():
  args = common.Args('x', positional=(('size', ('s', 'l'), None), ('data', None, 'c10')),
                     method='hard', flags=('notext',),
                     options={'epochs': common.number(float, 2.0, 0, 'E')})
  assert args.parse('l,dkd,notext,epochs=3,c100') == dict(size='l', data='c100', method='dkd',
                                                          notext=True, epochs=3.0)
  assert args.parse('s') == dict(size='s', data='c10', method='hard', notext=False, epochs=2.0)
