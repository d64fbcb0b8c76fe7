"""TIKD's text fusion on IRKD's resolution curriculum (configs/tikd_irkd_cifar10.py): the config's
stages, and its digits variant run through main.py, stopped inside a fusing stage and resumed."""
import json
import re

import pytest

from configs import tikd_irkd_cifar10
from tests.test_train import _main

STOP_AT = 220  # inside the last stage (res16_joint, steps 176–264)


def test_cifar10_config_is_irkds_curriculum_with_fusion_from_16px():
  c = tikd_irkd_cifar10.get_config()
  assert (c.data.name, c.data.val_size, c.model.name,
          c.teacher.variant) == ('cifar10', 5000, 'irkd_vit', 'irkd_teacher')
  assert (c.distill.method, c.distill.alpha, c.distill.temperature) == ('kd', 0.5, 4.0)
  assert not c.curriculum.stages and c.saliency.kind == 'none'
  assert [s['resolution'] for s in c.stages] == [12, 16, 20, 24, 28, 32]
  assert [s['fuse_text'] for s in c.stages] == [False] + [True] * 5
  assert [s['text_predictor_weight'] for s in c.stages] == [0.0] + [1.0] * 5
  assert all(s['reset_optimizer'] and s['epochs'] == 10 for s in c.stages)
  assert c.num_epochs == 60
  assert tikd_irkd_cifar10.get_config('sal').saliency.kind == 'attention'
  late = tikd_irkd_cifar10.get_config('fuse_from=24').stages
  assert [s['fuse_text'] for s in late] == [False] * 3 + [True] * 3
  assert not any(s['fuse_text'] for s in tikd_irkd_cifar10.get_config('fuse_from=0').stages)
  for bad in ('fuse_from=18', 'digits,sal', 'kd'):
    with pytest.raises(ValueError, match='tikd_irkd_cifar10'):
      tikd_irkd_cifar10.get_config(bad)


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  """configs/tiny.py's resnet8 teacher, trained as the config's docstring says."""
  workdir = tmp_path_factory.mktemp('teacher')
  proc = _main([
      '--config=configs/tiny.py:teacher', f'--workdir={workdir}', '--config.num_epochs=2',
      '--config.xla_options=fast_compile'
  ], timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.load(open(workdir / 'final_eval.json'))['top1'] > 30.0  # chance: 10%
  return workdir


def test_digits_run_switches_fusion_on_with_the_resolution_and_resumes(tmp_path, teacher):
  workdir = tmp_path / 'run'
  args = [
      '--config=configs/tikd_irkd_cifar10.py:digits', f'--workdir={workdir}',
      f'--config.teacher.checkpoint={teacher}', f'--config.text.features_dir={tmp_path / "text"}'
  ]
  stopped = _main(args + [f'--config.stop_at_step={STOP_AT}'], timeout=600)
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  assert f'stopped at step {STOP_AT} of 264' in stopped.stdout + stopped.stderr
  resumed = _main(args, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'resumed at step {STOP_AT}' in resumed.stdout + resumed.stderr

  # The phases in order, each announced with its resolution and fusion switch.
  phases = re.findall(r'phase (\w+) \(steps (\d+)–(\d+), resolution (\d+), fuse_text (\w+)\)',
                      stopped.stdout + stopped.stderr + resumed.stdout + resumed.stderr)
  assert phases == [('res8_vision', '0', '88', '8', 'False'),
                    ('res12_joint', '88', '176', '12', 'True'),
                    ('res16_joint', '176', '264', '16', 'True'),
                    ('res16_joint', '176', '264', '16', 'True')]  # the resumed run re-enters it

  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  train = [r for r in rows if r['kind'] == 'train']
  assert [r['step'] for r in train] == sorted({r['step'] for r in train})  # no step twice
  assert [r['resolution'] for r in train] == sorted(r['resolution'] for r in train)
  assert {r['resolution'] for r in train} == {8, 12, 16}
  for r in train:  # TIKD's terms exactly where the stage fuses text (from 12 px on)
    fusing = r['resolution'] >= 12
    assert ('alignment_loss' in r) == fusing and ('text_predictor_loss' in r) == fusing, r
  assert all(0.0 < r['alignment_loss'] < 1.0 for r in train if r['resolution'] >= 12)

  evals = {r['step']: r for r in rows if r['kind'] == 'eval'}
  assert sorted(evals) == [88, 176, 264]
  # After a fusing stage the caption-free fused pass is the result, the first pass beside it.
  assert ['top1_no_text' in evals[s] for s in (88, 176, 264)] == [False, True, True]
  final = json.load(open(workdir / 'final_eval.json'))
  assert final['step'] == 264 and final['count'] == 360  # the whole test split at 16 px
  assert final['top1'] == evals[264]['top1']
  assert final['top1'] > 30.0, final  # chance is 10%
