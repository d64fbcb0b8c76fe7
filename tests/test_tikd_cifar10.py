"""configs/tikd_cifar10.py: tikd_cifar100's recipe on CIFAR-10 with CIFAR-10 normalisation, and
the path its docstring gives, run end to end on a CIFAR-10 archive of digits: captions imported
from a log in the released layout (`import-log`), encoded, and the student trained through main.py
in its two stages; the CIFAR-10 teacher config of configs/teacher_cifar100.py."""
import json
import pickle
import re

import numpy as np
import pytest

from configs import teacher_cifar100, tikd_cifar10, tikd_cifar100
from tests.test_train import _main
from tikd_jax.data import digits

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
NAMES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
PER_BATCH, N_TEST, BATCH = 64, 120, 32  # 5 × 64 = 320 train images: 10 steps of 32 per epoch


def _flat(d, prefix=''):
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
  return out


@pytest.mark.parametrize('arg', ['large', 'small,dkd', 'medium,notext', 'large,hard,released'])
def test_config_is_the_cifar100_recipe_on_cifar10(arg):
  c10, c100 = _flat(tikd_cifar10.get_config(arg).to_dict()), _flat(
      tikd_cifar100.get_config(arg).to_dict())
  changed = {k for k in c10 if c10[k] != c100.get(k)}
  assert changed == {'name', 'data.name', 'model.mean', 'model.std', 'teacher.mean', 'teacher.std'}
  assert c10['data.name'] == 'cifar10' and c10['name'].startswith('tikd_cifar10_')
  for who in ('model', 'teacher'):
    assert (c10[f'{who}.mean'], c10[f'{who}.std']) == (CIFAR10_MEAN, CIFAR10_STD)


def test_default_stages_and_epoch_arguments():
  c = tikd_cifar10.get_config()
  assert (c.model.variant, c.distill.method, c.teacher.name) == ('large', 'hard', 'resnet32x4')
  assert [(s['name'], s['epochs'], s['fuse_text']) for s in c.stages] == [('vision_warmup', 50.0,
                                                                           False),
                                                                          ('joint', 250.0, True)]
  assert c.num_epochs == 300.0 and c.schedule.lr == 5e-4 * 256 / 512
  c = tikd_cifar10.get_config('small,warmup=2,joint=3')
  assert [s['epochs'] for s in c.stages] == [2.0, 3.0] and c.num_epochs == 5.0
  for bad, says in (('huge', 'tikd_cifar10 takes'), ('small,warmup=0', 'E > 0'),
                    ('small,epochs=3', 'warmup=E and joint=E'), ('small,released,joint=3',
                                                                 'do not have')):
    with pytest.raises(ValueError, match=says):
      tikd_cifar10.get_config(bad)


def test_teacher_config_takes_cifar10():
  c = teacher_cifar100.get_config('resnet32x4,cifar10')
  assert (c.data.name, c.model.name, c.model.mean, c.model.std) == ('cifar10', 'resnet32x4',
                                                                    CIFAR10_MEAN, CIFAR10_STD)
  assert teacher_cifar100.get_config().data.name == 'cifar100'
  with pytest.raises(ValueError, match='ARCH'):
    teacher_cifar100.get_config('resnet8x4,mnist')


def _write_cifar10(root) -> tuple[np.ndarray, np.ndarray]:
  """cifar-10-batches-py/ (the authors' pickles) holding 32-px digits; returns the train labels."""
  folder = root / 'cifar-10-batches-py'
  folder.mkdir(parents=True)
  train, test = digits.load('train', 32), digits.load('test', 32)
  chw = lambda images: images.transpose(0, 3, 1, 2).reshape(len(images), -1)

  def dump(name, images, labels):
    with open(folder / name, 'wb') as f:
      pickle.dump({b'data': chw(images), b'labels': [int(y) for y in labels]}, f)

  for b in range(5):
    part = slice(b * PER_BATCH, (b + 1) * PER_BATCH)
    dump(f'data_batch_{b + 1}', train.images[part], train.labels[part])
  dump('test_batch', test.images[:N_TEST], test.labels[:N_TEST])
  with open(folder / 'batches.meta', 'wb') as f:
    pickle.dump({b'label_names': [n.encode() for n in NAMES]}, f)
  return train.labels[:5 * PER_BATCH]


def _write_released_log(path, labels) -> None:
  """One block per train image in index order, as the released description logs."""
  with open(path, 'w', encoding='utf-8') as f:
    for i, y in enumerate(labels):
      f.write(f'Batch {i + 1}/{len(labels)}\nModel response: A handwritten digit {NAMES[y]} in '
              f'white strokes on a black background.\n')


@pytest.mark.slow
def test_docstring_path_trains_the_student_on_imported_captions(tmp_path):
  """Steps 2 and 3 of the docstring, CPU-sized (a micro student, 3 epochs of 10 steps). Without
  a teacher (`none`): the teacher's configs are checked above, hard KD in tests/test_methods.py;
  the 60 steps of this run are too few for an accuracy above chance under DeiT's augmentation."""
  from tikd_jax import text_teacher
  from tikd_jax.text_teacher.__main__ import main as text_teacher_main
  data_dir = tmp_path / 'cifar'
  labels = _write_cifar10(data_dir)
  text = tmp_path / 'text'
  _write_released_log(tmp_path / 'log.txt', labels)
  flags = ['--data.name', 'cifar10', '--data.dir', str(data_dir), '--split', 'train']
  assert text_teacher_main(
      ['import-log', *flags, '--log',
       str(tmp_path / 'log.txt'), '--out',
       str(text)]) == 0
  assert text_teacher_main([
      'encode', *flags, '--out',
      str(text), '--encoder',
      text_teacher.minilm_folder(), '--encoder_kind', 'mean_pool', '--normalize'
  ]) == 0
  with open(text / 'captions.jsonl') as f:
    assert json.loads(
        f.readlines()[7])['caption'].startswith(f'A handwritten digit {NAMES[labels[7]]} ')

  workdir = tmp_path / 'student'
  proc = _main([
      '--config=configs/tikd_cifar10.py:small,none,warmup=1,joint=2', f'--workdir={workdir}',
      f'--config.data.dir={data_dir}', f'--config.text.features_dir={text}',
      '--config.model.variant=micro', f'--config.batch_size={BATCH}', '--config.eval_batch_size=60',
      '--config.eval_every_epochs=3', '--config.log_every_steps=5',
      '--config.xla_options=fast_compile', '--config.data.num_workers=0'
  ], timeout=900)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  steps = 5 * PER_BATCH // BATCH
  assert f'320 train / {N_TEST} eval examples; {steps} steps per epoch' in out
  phases = re.findall(r'phase (\w+) \(steps (\d+)–(\d+), resolution full, fuse_text (\w+)', out)
  assert phases == [('vision_warmup', '0', str(steps), 'False'),
                    ('joint', str(steps), str(3 * steps), 'True')], out[-3000:]
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  train = [r for r in rows if r['kind'] == 'train']
  assert {r['step'] for r in train} == set(range(5, 3 * steps + 1, 5))
  for r in train:  # TIKD's text terms exactly in the joint stage
    assert ('alignment_loss' in r) == (r['step'] > steps), r
  assert all(0.0 < r['alignment_loss'] < 1.0 for r in train if r['step'] > steps)
  final = json.load(open(workdir / 'final_eval.json'))
  assert final['count'] == N_TEST and 'top5' in final  # the CIFAR-10 test batch, 10 classes
