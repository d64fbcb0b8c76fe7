"""Per-stage validation with early stopping (`curriculum.val_transform`, IRKD's notebooks).

Through the trainer on digits, IRKD's student, two stages (8 px × 4 epochs, 16 px × 3), patience
1: one `stage_val` row per stage and epoch whose numbers are the hold-out's top-1 of that epoch's
weights at the stage's resolution (recomputed here from the checkpoints); a stage that stops
early on patience, the step moving to the next stage; the weights entering the next stage (and
the final test, at full size) are the stage's best epoch's; a run stopped mid-stage (where the
record decides what happens next) resumes bit for bit. The validation transforms against
torchvision's rules.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import irkd_cifar10, irkd_digits
from tikd_jax.data import build_source
from tikd_jax.data.host_augment import center_crop
from tikd_jax.models.variables import abstract_model
from tikd_jax.train import stage_val, trainer
from tikd_jax.train.step import make_eval_step
from tikd_jax.tree import fill_template
from tests.test_resume import _checkpoint, _stop_and_resume
from tests.test_train import tiny_config

SPE = 20  # 1,337 train examples (100 held out) // batch 64
STAGES = [(8, 4), (16, 3)]  # steps 0–80 at 8 px, 80–140 at 16 px


def _config(**overrides):
  return tiny_config(
      'none',
      **dict(
          {
              'mesh': (('data', 1),), 'model.name': 'irkd_vit', 'model.drop_path':
                  0.0, 'model.dropout': 0.1, 'data.val_size': 100, 'data.val_split_method': 'torch',
              'batch_size': 64, 'curriculum.stages': STAGES, 'curriculum.reset_optimizer': True,
              'curriculum.val_transform': 'resize', 'curriculum.patience': 1, 'schedule.name':
                  'constant', 'schedule.lr': 3e-3, 'eval_every_epochs': 100.0,
              'checkpoint_every_steps': SPE, 'keep_checkpoints': 100, 'log_every_steps': SPE
          }, **overrides))


def _rows(workdir, kind):
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [{k: v for k, v in r.items() if k != 'time'} for r in rows if r['kind'] == kind]


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  c = _config()
  workdir = tmp_path_factory.mktemp('straight')
  return c, (workdir, trainer.train_and_evaluate(c, str(workdir)))


def _val_top1(config, flat, resolution):
  """Top-1 of the flat weights on the hold-out, every image resized to `resolution` by PIL's
  bilinear filter (torchvision Resize on a PIL image), computed here from scratch."""
  graphdef, template = abstract_model('irkd_vit', variant='micro', img_size=16, num_classes=10,
                                      drop_path=0.0, dropout=0.1, mean=config.model.mean,
                                      std=config.model.std)
  tree = fill_template(template, flat, 'weights')
  val = build_source(config.data, 'val')
  images = np.stack([
      np.asarray(Image.fromarray(val[i]['image']).resize((resolution, resolution), Image.BILINEAR))
      for i in range(len(val))
  ])
  step = jax.jit(make_eval_step(graphdef=graphdef))
  out = step({'student': tree['params']}, tree['batch_stats'],
             {'image': images, 'label': val.labels, 'mask': np.ones(len(val), np.float32)})
  return 100.0 * float(out['top1_sum']) / len(val)


def test_stages_validate_stop_early_and_hand_on_their_best_weights(straight):
  c, (workdir, result) = straight
  rows = _rows(workdir, 'stage_val')
  by_stage = {}
  for r in rows:
    by_stage.setdefault(r['stage'], []).append(r)
  assert list(by_stage) == ['res8', 'res16']
  starts = {'res8': 0, 'res16': 80}
  for (resolution, epochs), (name, stage_rows) in zip(STAGES, by_stage.items()):
    # One row per epoch run, at its epoch's end, at the stage's resolution.
    assert [r['stage_epoch'] for r in stage_rows] == list(range(1, len(stage_rows) + 1))
    assert [r['step'] for r in stage_rows
           ] == [starts[name] + SPE * e for e in range(1,
                                                       len(stage_rows) + 1)]
    assert all(r['resolution'] == resolution for r in stage_rows)
    # The record: the best so far (strictly better only) and the epochs since it; patience 1.
    best, bad = -1.0, 0
    for r in stage_rows:
      best, bad = (r['val_top1'], 0) if r['val_top1'] > best else (best, bad + 1)
      assert (r['best_val_top1'], r['bad_epochs']) == (best, bad), r
    assert [r['early_stop'] for r in stage_rows[:-1]] == [False] * (len(stage_rows) - 1)
  # res8 ran out of patience after its third epoch (of four): it stopped early, and training
  # went on at the 16-px stage's first step.
  res8 = by_stage['res8']
  assert len(res8) == 3 and res8[-1]['early_stop'] and res8[-1]['bad_epochs'] == 1
  train_steps = [r['step'] for r in _rows(workdir, 'train')]
  assert 70 not in train_steps and min(s for s in train_steps if s > 60) > 80
  assert result['step'] == 140 and result['count'] == 360  # final test: the full 16-px test split

  # The logged validation numbers are those epochs' weights' (a checkpoint every epoch; none at
  # step 60, where the stage stopped and the step moved on to 80).
  ckpt = {s: _checkpoint(workdir, s)['model'] for s in (20, 40, 100, 120)}
  for r in rows:
    if r['step'] in ckpt:
      assert _val_top1(c, ckpt[r['step']], r['resolution']) == pytest.approx(r['val_top1']), r
  # The weights entering the next stage are the best epoch's (step 40), bit for bit; at 8 px
  # they score the best top-1, not the last epoch's.
  best = max(res8, key=lambda r: (r['val_top1'], -r['step']))
  assert best['step'] == 40 and res8[-1]['val_top1'] < best['val_top1']
  entering = _checkpoint(workdir, 80)['model']
  for key, value in ckpt[40].items():
    np.testing.assert_array_equal(entering[key], value, err_msg=key)
  assert _val_top1(c, entering, 8) == pytest.approx(best['val_top1'])
  # The final test sees the last stage's best weights (res16 ends out of patience at 140).
  res16 = by_stage['res16']
  res16_best = max(res16, key=lambda r: (r['val_top1'], -r['step']))['step']
  assert res16_best in ckpt and res16[-1]['val_top1'] < res16[-2]['val_top1']
  final = _checkpoint(workdir, 140)['model']
  for key, value in ckpt[res16_best].items():
    np.testing.assert_array_equal(final[key], value, err_msg=key)
  assert not res16[-1]['early_stop']  # out of patience at its last epoch: its natural end


def test_a_run_stopped_mid_stage_resumes_its_record_exactly(tmp_path, straight):
  """Stops after epoch 2 of res8 (best so far: its epoch 2) and after epoch 2 of res16: without
  the saved record the resumed stage would take its next epoch as the best, not stop early and
  hand on other weights."""
  c, (straight_dir, straight_result) = straight
  resumed = _stop_and_resume(c, tmp_path, [50, 130])
  assert resumed == straight_result
  assert _rows(tmp_path, 'stage_val') == _rows(straight_dir, 'stage_val')
  # Train rows over the same steps (a row averages the steps since the last one: after a stop
  # those differ), every saved array of the checkpoints at the handed-on weights (80) and at
  # the end (140), the stage record in `extra` included.
  train_a = {r['step']: r for r in _rows(straight_dir, 'train')}
  train_b = {r['step']: r for r in _rows(tmp_path, 'train')}
  assert all(train_a[s] == train_b[s] for s in (20, 40, 100, 120))
  for step in (80, 140):
    a, b = _checkpoint(straight_dir, step), _checkpoint(tmp_path, step)
    for item in ('model', 'extra', 'optimizer'):
      assert a[item].keys() == b[item].keys(), item
      for key in a[item]:
        np.testing.assert_array_equal(a[item][key], b[item][key], err_msg=f'{step} {item} {key}')
  assert any(k.startswith('stage_val/best/') for k in a['extra'])


def test_a_fusing_stage_is_validated_on_its_fused_pass(tmp_path):
  """TIKD on the curriculum (configs/tikd_irkd_cifar10.py): a text-fusing stage's validation is
  its fused pass with the text predictor's guess (no captions for the hold-out), the number the
  final caption-free test reports, here recomputed from the checkpoint on center crops."""
  # Ungated fusion: after 10 steps a zero-initialised gate leaves the two passes nearly equal.
  c = _config(
      **{'curriculum.val_transform': 'center_crop', 'batch_size': 128, 'tikd.fusion_gate': False})
  source = build_source(c.data, 'train')
  features = np.random.default_rng(0).standard_normal((len(source), 24)).astype(np.float32)
  np.save(tmp_path / 'features.npy', features)
  (tmp_path / 'meta.json').write_text(
      json.dumps({
          'dim': 24, 'dtype': 'float32', 'num_examples': len(source), 'dataset': {
              'name': source.name, 'split': source.split, 'fingerprint': source.fingerprint()
          }
      }))
  with c.unlocked():
    c.text.features_dir = str(tmp_path)
    c.curriculum.stages = []
    c.stages = [dict(name='fused12', epochs=1.0, resolution=12, fuse_text=True)]
  trainer.train_and_evaluate(c, str(tmp_path / 'run'))
  (row,) = _rows(tmp_path / 'run', 'stage_val')
  assert (row['stage'], row['resolution'], row['step']) == ('fused12', 12, 10)
  graphdef, template = abstract_model('irkd_vit', variant='micro', img_size=16, num_classes=10,
                                      drop_path=0.0, dropout=0.1, text_dim=24, mean=c.model.mean,
                                      std=c.model.std)
  tree = fill_template(template, _checkpoint(tmp_path / 'run', 10)['model'], 'weights')
  val = build_source(c.data, 'val')
  batch = {
      'image': np.stack([val[i]['image'][2:14, 2:14] for i in range(len(val))]),  # (16 − 12) / 2
      'label': val.labels,
      'mask': np.ones(len(val), np.float32)
  }
  top1 = {}
  for fuse in (True, False):
    out = jax.jit(make_eval_step(graphdef=graphdef, fuse_text=fuse))({'student': tree['params']},
                                                                     tree['batch_stats'], batch)
    top1[fuse] = 100.0 * float(out['top1_sum']) / len(val)
  assert row['val_top1'] == pytest.approx(top1[True]) and top1[True] != top1[False]


def test_record_needs_a_strictly_better_epoch():
  """The notebooks' `if val_acc > best_val_acc`: an equal epoch is not better, counts against
  patience, and the first of equal epochs keeps its weights."""
  weights = lambda v: {'params': {'w': jnp.full((2,), v)}, 'batch_stats': {}}
  record = stage_val.fresh(weights(0.0))
  assert float(record['best_top1']) == -1.0  # any first validation is better
  record, stop = stage_val.update(record, weights(1.0), 50.0, patience=2)
  assert not stop and (float(record['best_top1']), int(record['bad_epochs'])) == (50.0, 0)
  record, stop = stage_val.update(record, weights(2.0), 50.0, patience=2)  # equal: not better
  assert not stop and int(record['bad_epochs']) == 1
  record, stop = stage_val.update(record, weights(3.0), 49.0, patience=2)
  assert stop and int(record['bad_epochs']) == 2 and int(record['epochs']) == 3
  np.testing.assert_array_equal(record['best']['params']['w'], [1.0, 1.0])
  record, stop = stage_val.update(record, weights(4.0), 51.0, patience=2)  # better: counter reset
  assert not stop and int(record['bad_epochs']) == 0
  np.testing.assert_array_equal(record['best']['params']['w'], [4.0, 4.0])


def test_center_crop_is_torchvision_s_window():
  image = np.arange(32 * 32 * 3, dtype=np.int64).reshape(32, 32, 3).astype(np.uint8)
  # top = round((32 − size) / 2) with Python's rounding (half to even): 10, 10, 8.
  for size, top in ((12, 10), (13, 10), (15, 8), (32, 0)):
    np.testing.assert_array_equal(center_crop(image, size), image[top:top + size, top:top + size])
  with pytest.raises(ValueError, match='must fit'):
    center_crop(image, 40)


def test_irkd_configs_validate_their_curriculum_stages():
  for row in irkd_cifar10.ROWS:
    for patch, transform in (('p2', 'center_crop'), ('p4', 'resize')):
      c = irkd_cifar10.get_config(f'{row},{patch}')
      curriculum = bool(c.curriculum.stages)
      assert c.curriculum.val_transform == (transform if curriculum else ''), (row, patch)
      assert c.curriculum.patience == 3 and c.curriculum.val_split == 'val'
      assert c.data.val_size == 5000
  digits = irkd_digits.get_config()
  for row in ('cl', 'kd_cl', 'kd_cl_sal'):
    assert digits.runs[row].curriculum.val_transform == 'resize'
    assert digits.runs[row].data.val_size == irkd_digits.VAL_SIZE
  # One hold-out for every run of the table, the teacher included.
  assert {(r.data.val_size, r.data.val_split_method) for r in digits.runs.values()
         } == {(irkd_digits.VAL_SIZE, 'torch')}


def test_bad_settings_fail_before_training(tmp_path):
  with pytest.raises(ValueError, match="val_transform='crop'"):
    trainer.train_and_evaluate(_config(**{'curriculum.val_transform': 'crop'}), str(tmp_path / 'a'))
  with pytest.raises(ValueError, match='patience=0'):
    trainer.train_and_evaluate(_config(**{'curriculum.patience': 0}), str(tmp_path / 'b'))
  with pytest.raises(ValueError, match="split 'val'.*val_size"):
    trainer.train_and_evaluate(_config(**{'data.val_size': 0}), str(tmp_path / 'c'))
