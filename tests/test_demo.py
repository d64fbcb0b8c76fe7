"""The demo as an experiment: its runs, the hard-KD control, and the mean ± std table."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import main
from configs import common, demo
from tikd_jax import losses as terms
from tikd_jax.losses.kd import hard_oracle


def test_demo_runs_one_seed_and_every_design_with_seeds():
  one = demo.get_config('')
  assert one.run_order == ('teacher', 'student_none', 'student_hard', 'student_tikd_self_distill')
  three = demo.get_config('seeds=3')
  assert len(three.run_order) == 3 * (1 + 4 + len(demo.TIKD_DESIGNS))
  for name in three.run_order:
    run = three.runs[name]
    seed = int(name.rsplit('_seed', 1)[1])
    assert run.seed == seed and run.data.flip is False  # a mirrored 2 is not a 2
    if name.startswith('student'):
      assert run.teacher.checkpoint == f'{{workdir}}/teacher_seed{seed}'  # its own seed's teacher
      assert run.augment.mixup_alpha == 0.8 and run.augment.cutmix_alpha == 1.0
  designs = {n.rsplit('_seed', 1)[0]: three.runs[n].tikd for n in three.run_order if 'tikd' in n}
  assert designs['student_tikd_predicted'].fusion_text == 'predicted'
  assert designs['student_tikd_scheduled'].fusion_text == 'scheduled'
  assert designs['student_tikd_self_distill'].self_distill_weight == 1.0
  assert designs['student_tikd_self_distill'].eval_text == 'none'
  assert demo.get_config('regime=plain').runs.student_hard.augment.mixup_alpha == 0.0
  with pytest.raises(ValueError, match='seeds=N,regime=mix|plain'):
    demo.get_config('seed=3')


def test_epochs_and_core_rows_scale_every_student_and_keep_the_tikd_split():
  core = demo.get_config('seeds=5,epochs=60,rows=core')
  names = {n.rsplit('_seed', 1)[0] for n in core.run_order}
  assert names == {
      'teacher', 'student_none', 'student_soft', 'student_hard', 'student_hard_oracle',
      f'student_{demo.DEFAULT_TIKD}'
  }
  assert len(core.run_order) == 5 * 6
  for name in core.run_order:
    run = core.runs[name]
    if name.startswith('teacher'):
      assert run.num_epochs == 10.0  # the teacher's recipe does not move with the students'
    elif 'tikd' in name:
      assert [s['epochs'] for s in run.stages] == [20, 40]  # 1 : 2 vision warm-up : joint
    else:
      assert run.num_epochs == 60.0
  default = demo.get_config('seeds=2')
  assert all(default.runs[n].num_epochs == 30.0 for n in default.run_order if 'student' in n)
  later = demo.get_config('seeds=1,first_seed=3,rows=core')  # one process per seed
  assert later.run_order[0] == 'teacher_seed3' and later.runs.student_hard_seed3.seed == 3
  assert later.runs.student_hard_seed3.teacher.checkpoint == '{workdir}/teacher_seed3'
  on_soft = demo.get_config('seeds=2,rows=tikd,tikd_base=soft')
  assert on_soft.run_order == ('teacher_seed0', f'student_{demo.DEFAULT_TIKD}_seed0',
                               'teacher_seed1', f'student_{demo.DEFAULT_TIKD}_seed1')
  assert on_soft.runs[on_soft.run_order[1]].distill.method == 'soft'
  assert core.runs[f'student_{demo.DEFAULT_TIKD}_seed0'].distill.method == 'hard'
  gates = [
      demo.get_config(f'rows=tikd{g}').runs[f'student_{demo.DEFAULT_TIKD}_seed0'].tikd.fusion_gate
      for g in (',gate=0', ',gate=1', '')
  ]
  assert gates == [False, True, common.base().tikd.fusion_gate]
  named = demo.get_config('rows=none+soft,seeds=2,epochs=60')
  assert named.run_order == ('teacher_seed0', 'student_none_seed0', 'student_soft_seed0',
                             'teacher_seed1', 'student_none_seed1', 'student_soft_seed1')
  assert named.runs.student_none_seed1.num_epochs == 60.0
  pair = demo.get_config('rows=pair,tikd_base=soft')
  assert pair.run_order == ('teacher_seed0', 'student_soft_seed0',
                            f'student_{demo.DEFAULT_TIKD}_seed0')
  for bad in ('epochs=2', 'epochs=x', 'rows=some', 'first_seed=-1', 'tikd_base=kd', 'gate=2',
              'rows=none+kd'):
    with pytest.raises(ValueError):
      demo.get_config(bad)


def test_summary_groups_seeds_into_mean_and_sample_std():
  results = {
      'teacher_seed0': dict(top1=90.0, top5=100.0, loss=0.5, num_params=10),
      'teacher_seed1': dict(top1=94.0, top5=100.0, loss=0.3, num_params=10),
      'student_x': dict(top1=80.0, top5=99.0, loss=1.0, num_params=5),
  }
  table = main._summary(results, demo.get_config('seeds=3')).splitlines()  # pylint: disable=protected-access
  teacher = next(line for line in table if line.startswith('teacher '))
  assert '92.00 ± 2.83' in teacher and teacher.rstrip().endswith('2')  # stdev of (90, 94)
  assert next(line for line in table if line.startswith('student_x')).split()[2] == '80.00'


def test_summary_columns_line_up_with_long_run_names():
  """'student_tikd_self_distill' (25 characters) pushed its row one column right of the header."""
  row = dict(top1=90.0, top5=100.0, loss=0.5, num_params=159_748)
  table = main._summary(
      {'teacher': row, 'student_tikd_self_distill': row},  # pylint: disable=protected-access
      demo.get_config()).splitlines()[2:]
  ends = {
      line.index('params') + len('params') if line.startswith('run') else line.index('159,748') +
      len('159,748') for line in table
  }
  assert len(ends) == 1, '\n'.join(table)
  assert table[2].startswith('student_tikd_self_distill  ')


def test_hard_oracle_is_hard_distillation_with_the_datas_own_label():
  rng = np.random.default_rng(0)
  dist = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  targets = jax.nn.softmax(jnp.asarray(rng.normal(size=(6, 4)) * 3, jnp.float32))  # mixed
  ctx = terms.Context(out={'cls_logits': dist * 0, 'dist_logits': dist}, labels=None,
                      targets=targets, epoch=1.0, step=0)
  picked = jax.nn.log_softmax(dist)[np.arange(6), np.argmax(targets, -1)]
  np.testing.assert_allclose(hard_oracle(ctx)[0], -np.mean(picked), rtol=1e-6)
  smoothed = jax.nn.one_hot(np.argmax(targets, -1), 4) * 0.9 + 0.1 / 4
  np.testing.assert_allclose(
      hard_oracle(ctx, label_smoothing=0.1)[0],
      -np.mean(np.sum(smoothed * jax.nn.log_softmax(dist), -1)), rtol=1e-6)
  assert not terms.TERMS['hard_oracle'].needs_teacher  # no teacher is loaded for the control
