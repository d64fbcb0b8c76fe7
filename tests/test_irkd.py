"""IRKD through the trainer: resolution curriculum with saliency alignment."""
import json

import numpy as np
import pytest
from flax import nnx

from configs import irkd_cifar10
from tikd_jax.models import build_model
from tikd_jax.models.variables import model_variables
from tikd_jax.train import checkpoint as ckpt_lib
from tikd_jax.train import trainer
from tests.test_train import tiny_config


@pytest.fixture(scope='module')
def vit_teacher(tmp_path_factory):
  """A plain micro ViT teacher (weights as a converted checkpoint would be stored)."""
  kwargs = dict(variant='micro', img_size=16, num_classes=10, mean=(0.3061,) * 3, std=(0.324,) * 3)
  model = build_model('vit', rngs=nnx.Rngs(7), **kwargs)
  path = str(tmp_path_factory.mktemp('vit_teacher'))
  ckpt_lib.save_weights(path, model_variables(model), {'model': {'name': 'vit', 'kwargs': kwargs}})
  return path


# Both saliency variants are checked against torch in test_saliency.py; through the trainer one
# suffices (the gradient variant shares the same plumbing).
def test_curriculum_visits_every_resolution_in_order_and_evaluates_at_full_size(
    tmp_path, vit_teacher, saliency='attention'):
  c = tiny_config(
      'kd', **{
          'model.name': 'irkd_vit', 'model.drop_path': 0.0, 'teacher.name': 'vit',
          'teacher.variant': 'micro', 'teacher.img_size': 16, 'teacher.checkpoint': vit_teacher,
          'saliency.kind': saliency, 'saliency.layers': '0,1' if saliency == 'gradient' else '',
          'log_every_steps': 4, 'checkpoint_every_steps': 100, 'curriculum.stages': [(8, 0.25),
                                                                                     (12, 0.25),
                                                                                     (16, 0.25)],
          'curriculum.reset_optimizer': True
      })
  result = trainer.train_and_evaluate(c, str(tmp_path))
  assert result['count'] == 360 and np.isfinite(result['loss'])  # eval at full 16 px
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  train = [r for r in rows if r['kind'] == 'train']
  resolutions = [r['resolution'] for r in train]
  assert resolutions == sorted(resolutions) and set(resolutions) == {8, 12, 16}
  assert all(np.isfinite(r['saliency_loss']) and r['saliency_loss'] >= 0 for r in train)


def test_irkd_configs_cover_the_paper_table():
  for row in irkd_cifar10.ROWS:
    for patch in ('p2', 'p4'):
      c = irkd_cifar10.get_config(f'{row},{patch}')
      assert (c.distill.method == 'kd') == row.startswith('kd')
      assert bool(c.curriculum.stages) == ('cl' in row)
      # the notebooks' saliency: the gradient SaliencyDistiller for p2, attention for p4
      assert (c.saliency.kind != 'none') == row.endswith('sal')
      if row.endswith('sal'):
        assert c.saliency.kind == ('gradient' if patch == 'p2' else 'attention')
      assert c.model.patch_size == (2 if patch == 'p2' else 4)
      assert c.data.val_size == 5000 and c.data.val_seed == 42
  with pytest.raises(ValueError, match='irkd_cifar10 takes'):
    irkd_cifar10.get_config('kd_sal')


def test_irkd_digits_runs_the_same_rows_scaled_down():
  from configs import irkd_digits  # pylint: disable=g-import-not-at-top
  c = irkd_digits.get_config()
  assert c.run_order == ('teacher',) + irkd_cifar10.ROWS
  for row in irkd_cifar10.ROWS:
    cifar, digits = irkd_cifar10.get_config(f'{row},p4'), c.runs[row]
    assert digits.data.name == 'digits' and digits.teacher.checkpoint == '{workdir}/teacher'
    assert (digits.distill.method, digits.saliency.kind) == (cifar.distill.method,
                                                             cifar.saliency.kind)
    assert [r for r, _ in digits.curriculum.stages] == [r for r, _ in cifar.curriculum.stages]
    assert sum(e for _, e in digits.curriculum.stages) in (0, digits.num_epochs)
  assert irkd_digits.get_config('ce,kd').run_order == ('teacher', 'ce', 'kd')
  with pytest.raises(ValueError, match='irkd_digits takes rows'):
    irkd_digits.get_config('kd_sal')


def test_curriculum_mode_reaches_the_trainers_input(tmp_path):
  """config.curriculum.mode through the trainer: the same seeds and augmentation draws, but
  'resize' feeds whole downscaled digits where 'crop' feeds 8 px windows, so training differs
  from the first low-resolution step on; both evaluate every test image at full size."""
  train = {}
  for mode in ('crop', 'resize'):
    c = tiny_config('teacher', log_every_steps=1, checkpoint_every_steps=100,
                    **{'curriculum.stages': [(8, 0.1), (16, 0.1)], 'curriculum.mode': mode})
    result = trainer.train_and_evaluate(c, str(tmp_path / mode))
    assert result['count'] == 360 and np.isfinite(result['loss'])
    train[mode] = [
        json.loads(l)
        for l in open(tmp_path / mode / 'metrics.jsonl')
        if json.loads(l)['kind'] == 'train'
    ]
  assert [r['resolution'] for r in train['crop']] == [r['resolution'] for r in train['resize']]
  assert [r['resolution'] for r in train['crop']] == [8] * 4 + [16] * 4
  assert train['crop'][0]['loss'] != train['resize'][0]['loss']
