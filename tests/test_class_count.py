"""Any class count from 2 up: top-k only for k ≤ classes (no `top5` key below 5 classes, '–' in
the final line and table), and the eval step checked on one batch before training starts."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.test_train import REPO, tiny_config
from tikd_jax.data.digits import _load
from tikd_jax.train import evaluate as evaluate_lib
from tikd_jax.train import trainer
from tikd_jax.visualize import figures
from tikd_jax.visualize.workdir import read_metrics

TRAIN_PER_CLASS = 128  # the rest of each digit's ~180 images is the val split


def _write_folder(root, classes: int) -> str:
  """`root/{train,val}/digit<c>/*.png` for digits 0 … classes − 1 at 16 px."""
  images, labels = _load(16)
  for c in range(classes):
    index = np.flatnonzero(labels == c)
    for split, part in (('train', index[:TRAIN_PER_CLASS]), ('val', index[TRAIN_PER_CLASS:])):
      folder = os.path.join(root, split, f'digit{c}')
      os.makedirs(folder, exist_ok=True)
      for i in part:
        Image.fromarray(images[i]).save(os.path.join(folder, f'{i}.png'))
  return str(root)


def _folder_overrides(folder: str) -> dict:
  return {'data.name': 'image_folder', 'data.dir': folder, 'data.eval_split': 'val'}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The tiny resnet8 config on a 2- and a 3-class image folder through main.py, 3 epochs (24 /
  36 steps), evaluated every epoch. Both run at once (each mostly uses one core)."""
  procs = {}
  for classes in (2, 3):
    base = tmp_path_factory.mktemp(f'classes{classes}')
    folder = _write_folder(base / 'data', classes)
    workdir = str(base / 'workdir')
    flags = {
        **_folder_overrides(folder),
        'xla_options': 'fast_compile',
        'num_epochs': 3,
        'checkpoint_every_steps': 0  # at the evals only
    }
    args = [
        sys.executable,
        os.path.join(REPO, 'main.py'), '--config=configs/tiny.py:teacher', f'--workdir={workdir}'
    ] + [f'--config.{k}={v}' for k, v in flags.items()]
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
    procs[classes] = (subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True), workdir)
  out = {}
  for classes, (proc, workdir) in procs.items():
    stdout, _ = proc.communicate(timeout=600)
    out[classes] = (proc.returncode, stdout, workdir)
  return out


@pytest.mark.parametrize('classes', [2, 3])
def test_few_classes_train_through_main_with_top1_only(runs, classes):
  returncode, stdout, workdir = runs[classes]
  assert returncode == 0, stdout[-3000:]
  final = re.findall(r'^\* Acc@1 ([\d.]+) Acc@5 (\S+) loss [\d.]+$', stdout, re.M)
  assert final and final[-1][1] == '–', stdout[-3000:]
  assert float(final[-1][0]) > 100.0 / classes + 25.0, stdout[-3000:]  # far above chance
  with open(os.path.join(workdir, 'final_eval.json')) as f:
    result = json.load(f)
  assert 'top1' in result and 'top5' not in result, result
  assert result['top1'] == pytest.approx(float(final[-1][0]), abs=1e-3)
  evals = read_metrics(workdir).eval
  assert len(evals) == 3 and all('top1' in r and 'top5' not in r for r in evals), evals
  events = b''.join(
      open(os.path.join(d, f), 'rb').read()
      for d, _, files in os.walk(os.path.join(workdir, 'tensorboard'))
      for f in files)
  assert b'eval/top1' in events and b'top5' not in events


def test_curves_of_a_two_class_run_draw_top1_only(runs):
  m = read_metrics(runs[2][2])
  fig = figures.training_curves(m.train, m.eval, m.resumes, 'two classes')
  labels = fig.axes[1].get_legend_handles_labels()[1]
  assert 'eval top-1' in labels and not any('top-5' in label for label in labels), labels


def test_final_table_shows_a_dash_where_acc5_does_not_apply():
  import main  # pylint: disable=g-import-not-at-top  (its flags are defined once per process)
  row = {'loss': 0.5, 'num_params': 1000}
  table = main._summary(
      {
          'two_seed0': dict(row, top1=90.0), 'two_seed1': dict(row, top1=92.0), 'ten': dict(
              row, top1=80.0, top5=99.0)
      }, {})
  lines = {line.split()[0]: line.split() for line in table.splitlines()[3:]}
  assert lines['two'][2:7] == ['91.00', '±', '1.41', '–', '0.500'], table
  assert lines['ten'][2:4] == ['80.00', '99.00'], table
  assert evaluate_lib.format_eval({'top1': 90.0,
                                   'loss': 0.25}) == ('* Acc@1 90.000 Acc@5 – loss 0.250')


def test_best_metric_top5_with_two_classes_fails_at_setup(tmp_path):
  config = tiny_config(best_metric='top5', **_folder_overrides(_write_folder(tmp_path / 'd', 2)))
  with pytest.raises(ValueError, match=r"best_metric='top5'.*2 classes.*best_metric=top1"):
    trainer.train_and_evaluate(config, str(tmp_path / 'workdir'))


def test_a_broken_evaluation_fails_before_the_first_train_step(tmp_path, monkeypatch):

  def broken_eval_step(**kwargs):
    raise RuntimeError('broken evaluation')

  monkeypatch.setattr(evaluate_lib, 'make_eval_step', broken_eval_step)
  workdir = tmp_path / 'workdir'
  with pytest.raises(RuntimeError, match='broken evaluation') as e:
    trainer.train_and_evaluate(tiny_config(checkpoint_every_steps=1), str(workdir))
  assert any('before the first train step' in note for note in e.value.__notes__)
  assert not [d for d in os.listdir(workdir / 'checkpoints') if d.isdigit()]
  with open(workdir / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  assert not [r for r in rows if r.get('kind') == 'train'], rows
