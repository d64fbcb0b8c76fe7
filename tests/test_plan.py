"""The run as phases (tikd_jax/train/plan.py): stages, curriculum, and their errors."""
import pytest
from ml_collections import ConfigDict

from configs import common, irkd_cifar10, tikd_cifar100
from tikd_jax.train.plan import build_phases, phase_at


def test_curriculum_phases_cover_the_run_in_order():
  c = irkd_cifar10.get_config('kd_cl,p4')
  phases = build_phases(c, steps_per_epoch=351)
  assert [p.resolution for p in phases] == [12, 16, 20, 24, 28, 32]
  assert [p.start_step for p in phases] == [i * 3510 for i in range(6)]
  assert phases[-1].end_step == 6 * 3510
  assert [p.reset_optimizer for p in phases] == [False] + [True] * 5  # first stage: fresh anyway
  assert len({p.switches for p in phases}) == 6  # one compiled step per resolution
  assert phase_at(phases, 0) == 0 and phase_at(phases, 3509) == 0 and phase_at(phases, 3510) == 1
  assert phase_at(phases, 6 * 3510) == 5  # the end belongs to the last phase


def test_tikd_stages_share_compiles_by_switches():
  c = tikd_cifar100.get_config('small')
  phases = build_phases(c, steps_per_epoch=10)
  assert phases[0].start_step == 0 and phases[-1].end_step == sum(
      round(float(s['epochs']) * 10) for s in c.stages)
  assert all(a.end_step == b.start_step for a, b in zip(phases, phases[1:]))
  assert any(p.fuse_text for p in phases) and not phases[0].fuse_text


def test_plain_run_is_one_phase_at_full_size():
  c = common.base()
  c.num_epochs = 3
  (phase,) = build_phases(c, steps_per_epoch=7)
  assert (phase.start_step, phase.end_step, phase.resolution) == (0, 21, None)


@pytest.mark.parametrize('change, message', [
    (dict(curriculum=dict(stages=[(12, 1)], mode='zoom', reset_optimizer=False)),
     "curriculum.mode='zoom'.*'crop'.*'resize'"),
    (dict(curriculum=dict(stages=[(12, 1)], mode='crop', reset_optimizer=False),
          stages=[dict(name='a', epochs=1)]), 'cannot both be set'),
    (dict(stages=[dict(name='a', epochs=1, fuse=True)]), r"unknown keys \['fuse'\]"),
    (dict(stages=[dict(name='a', epochs=0.01)]), 'at least one step'),
])
def test_bad_plans_say_what_to_change(change, message):
  c = common.base()
  for key, value in change.items():
    c[key] = ConfigDict(value) if isinstance(value, dict) else value
  with pytest.raises(ValueError, match=message):
    build_phases(c, steps_per_epoch=10)
