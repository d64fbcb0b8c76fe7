"""Tiny ImageNet: the ResNet32x4 teacher at 64 px (configs/teacher_tinyimagenet.py) and the
released-recipe student (configs/tikd_tinyimagenet.py:hard,released) train and evaluate through
main.py on a tiny 64 px image folder (2 classes), the student shrunk to `micro`, one epoch each."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import teacher_tinyimagenet, tikd_tinyimagenet
from tikd_jax.models import build_model, count_params
from tikd_jax.train.run import model_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_presets_are_64_px_and_the_released_student_counts_16_55m():
  teacher = teacher_tinyimagenet.get_config()
  assert (teacher.model.name, teacher.data.image_size) == ('resnet32x4', 64)
  c = tikd_tinyimagenet.get_config('hard,released')
  assert (c.data.image_size, c.model.img_size, c.model.variant) == (64, 64, 'large')
  assert (c.model.heads, c.model.text_predictor, c.model.text_proj_layout) == (8, False,
                                                                               'per_block')
  name, kwargs = model_spec(c.model, 200)
  model = nnx.eval_shape(lambda: build_model(name, text_dim=512, rngs=nnx.Rngs(0), **kwargs))
  # The released large model at 64 px, patch 4, 200 classes (test_models.released_count):
  # the model zoo's 16.55M.
  assert count_params(model) == 16_553_168


def _folder(root, size=64, per_class=(('train', 4), ('val', 2))):
  rng = np.random.default_rng(0)
  for split, n in per_class:
    for cls in ('n01443537', 'n01629819'):
      os.makedirs(f'{root}/{split}/{cls}', exist_ok=True)
      for k in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3),
                                     dtype=np.uint8)).save(f'{root}/{split}/{cls}/{k}.JPEG',
                                                           format='PNG')
  return str(root)


def _main(args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  done = subprocess.run([sys.executable, os.path.join(REPO, 'main.py')] + args, cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return done


@pytest.mark.slow
def test_teacher_then_released_student_through_main(tmp_path):
  from tikd_jax.text_teacher.__main__ import main as text_teacher  # pylint: disable=g-import-not-at-top
  from tikd_jax.text_teacher.tiny import save_tiny_blip, save_tiny_clip  # pylint: disable=g-import-not-at-top
  root = _folder(tmp_path / 'tin')
  common = [
      '--config.xla_options=fast_compile', '--config.num_epochs=1', f'--config.data.dir={root}',
      '--config.data.num_workers=0', '--config.eval_batch_size=4'
  ]
  teacher = tmp_path / 'teacher'
  _main([
      '--config=configs/teacher_tinyimagenet.py', f'--workdir={teacher}', '--config.batch_size=4',
      *common
  ])
  with open(teacher / 'final_eval.json') as f:
    assert json.load(f)['count'] == 4

  blip, clip = save_tiny_blip(str(tmp_path / 'blip')), save_tiny_clip(str(tmp_path / 'clip'))
  features = str(tmp_path / 'features')
  flags = ['--data.name', 'image_folder', '--data.dir', root, '--split', 'train', '--out', features]
  assert text_teacher([
      'caption', *flags, '--model', blip, '--batch_size', '8', '--device', 'cpu',
      '--max_new_tokens', '4'
  ]) == 0
  assert text_teacher(['encode', *flags, '--encoder', clip, '--device', 'cpu']) == 0

  student = tmp_path / 'student'
  _main([
      '--config=configs/tikd_tinyimagenet.py:hard,released',
      f'--workdir={student}',
      '--config.model.variant=micro',
      f'--config.teacher.checkpoint={teacher}',
      f'--config.text.features_dir={features}',
      '--config.batch_size=8',
      '--config.data.repeated_aug=0',
      *common  # DeiT's RASampler needs >= 256 images
  ])
  with open(student / 'final_eval.json') as f:
    result = json.load(f)
  assert result['count'] == 4
  # No text predictor in the released model: no caption-free ('predicted') evaluation.
  assert 'top1_no_text' in result and 'top1_released' in result
  assert not any(k.endswith('_predicted') for k in result), sorted(result)
  # --mode=eval's path reads the checkpoint's metadata (text_predictor False): the same inputs.
  from tikd_jax.train.evaluate import evaluate_checkpoint  # pylint: disable=g-import-not-at-top
  config = tikd_tinyimagenet.get_config('hard,released')
  with config.unlocked():
    config.data.dir, config.data.num_workers, config.eval_batch_size = root, 0, 8
    config.text.features_dir, config.xla_options = features, 'fast_compile'
  again = evaluate_checkpoint(config, str(student), ema='off')
  assert again['top1_released'] == result['top1_released'] and 'top1_no_text' in again
  assert not any(k.endswith('_predicted') for k in again), sorted(again)
