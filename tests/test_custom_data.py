"""Your own images (README "Train on your own images"): the eval split an image folder or a TFDS
set defaults to, mean/std measured on the train split (and read back on resume), corrupt or
non-image files stopped or skipped and counted, through the sources and through `main.py`."""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from configs import common
from tests.test_class_count import TRAIN_PER_CLASS, _write_folder
from tests.test_train import REPO, tiny_config
from tikd_jax import normalization
from tikd_jax.data import DataError, build_source
from tikd_jax.train import run as run_lib


def _data(**kw) -> ConfigDict:
  """The trainer's `config.data` (configs/common.py) with `kw` changed."""
  return ConfigDict(dict(common.base().data, **kw))


def _random_folder(root, splits=(('train', 5), ('val', 2)), size=(6, 6), seed=0) -> dict:
  """`root/<split>/{cat,dog}/<k>.png` of random RGB pixels; {path: pixels}."""
  rng = np.random.default_rng(seed)
  written = {}
  for split, per_class in splits:
    for cls in ('cat', 'dog'):
      os.makedirs(f'{root}/{split}/{cls}', exist_ok=True)
      for k in range(per_class):
        pixels = rng.integers(0, 256, size + (3,), dtype=np.uint8)
        pixels[..., 2] //= 4  # channels with different statistics
        path = f'{root}/{split}/{cls}/{k}.png'
        Image.fromarray(pixels).save(path)
        written[path] = pixels
  return written


def _truncate(path: str) -> None:
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])


# -------------------------------------------------------------------------------- eval split
def test_image_folder_eval_split_defaults_to_val_then_test(tmp_path):
  root = str(tmp_path / 'pets')
  _random_folder(root, (('train', 2), ('val', 3), ('test', 1)))
  source = build_source(_data(name='image_folder', dir=root, image_size=0), 'auto')
  assert (source.split, len(source)) == ('val', 6)
  assert any("eval split: 'val'" in n and 'data.eval_split' in n for n in source.notes)
  explicit = build_source(_data(name='image_folder', dir=root, image_size=0), 'test')
  assert (explicit.split, len(explicit)) == ('test', 2)  # a split the user names is kept
  os.rename(f'{root}/val', f'{root}/held_out')
  source = build_source(_data(name='image_folder', dir=root, image_size=0), 'auto')
  assert (source.split, len(source)) == ('test', 2)
  os.rename(f'{root}/test', f'{root}/other')
  with pytest.raises(FileNotFoundError) as e:
    build_source(_data(name='image_folder', dir=root, image_size=0), 'auto')
  message = str(e.value)
  assert f'{root}/val' in message and f'{root}/test' in message
  assert '--config.data.eval_split' in message


def test_tfds_eval_split_defaults_to_validation_without_test(tmp_path):
  """A TFDS set prepared here (ArrayRecord, no TensorFlow) with train and validation only."""
  tfds = pytest.importorskip('tensorflow_datasets')

  class TwoSplits(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              'image': tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
              'label': tfds.features.ClassLabel(names=['a', 'b', 'c'])
          }))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(6), 'validation': self._generate_examples(4)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {'image': np.full((8, 8, 3), 10 * i, np.uint8), 'label': i % 3}

  TwoSplits(data_dir=str(tmp_path)).download_and_prepare(file_format='array_record')
  data = _data(name='tfds', tfds_name='two_splits', dir=str(tmp_path))
  source = build_source(data, 'auto')
  assert (source.split, len(source), source.num_classes) == ('validation', 4, 3)
  # the validation examples (pixel 10·i, i < 4; tfds shuffles them when preparing)
  assert sorted(int(source[i]['image'][0, 0, 0]) for i in range(4)) == [0, 10, 20, 30]
  assert any("eval split: 'validation'" in n for n in source.notes)
  assert build_source(data, 'train').split == 'train'
  with pytest.raises(DataError, match=r"has splits \['train', 'validation'\], not 'test'"):
    build_source(data, 'test')


def test_tfds_not_prepared_says_how_to_prepare_it(tmp_path, caplog):
  """docs/custom_data.md's TFDS commands with nothing prepared in data.dir: one sentence with the
  `tfds build` command, not tfds' list of every data set or its warning about dataset_info.json."""
  pytest.importorskip('tensorflow_datasets')
  empty = str(tmp_path / 'tfds')
  with caplog.at_level(logging.WARNING), pytest.raises(FileNotFoundError) as e:
    build_source(_data(name='tfds', tfds_name='cifar10', dir=empty), 'auto')
  assert str(
      e.value) == (f"tfds data set 'cifar10' is not prepared in {empty}. Prepare it once "
                   f'with `tfds build cifar10 --data_dir={empty} --file_format=array_record`.')
  assert isinstance(e.value, DataError)
  assert not [r for r in caplog.records if 'dataset_info.json' in r.getMessage()]
  with pytest.raises(DataError) as e:
    build_source(_data(name='tfds', tfds_name='cifar_ten', dir=empty), 'train')
  assert "tfds knows no data set 'cifar_ten' (config.data.tfds_name)" in str(e.value)
  assert 'Available datasets' not in str(e.value) and len(str(e.value)) < 400


# -------------------------------------------------------------------------------- bad images
@pytest.fixture
def broken_folder(tmp_path):
  """5 + 5 train images of which one is a truncated PNG and one a text file named .png, and a
  notes.txt that is not an image by its extension."""
  root = str(tmp_path / 'pets')
  _random_folder(root)
  _truncate(f'{root}/train/cat/1.png')
  with open(f'{root}/train/dog/3.png', 'w') as f:
    f.write('not an image')
  with open(f'{root}/train/dog/notes.txt', 'w') as f:
    f.write('labelled by hand')
  return root


def test_bad_images_error_names_each_file_and_the_switch(broken_folder):
  with pytest.raises(ValueError) as e:
    build_source(_data(name='image_folder', dir=broken_folder, image_size=0), 'train')
  message = str(e.value)
  assert message.startswith(f'2 of 10 files in {broken_folder}/train are not readable')
  assert f'{broken_folder}/train/cat/1.png' in message and 'truncated' in message
  assert f'{broken_folder}/train/dog/3.png' in message
  assert '--config.data.bad_images=skip' in message


def test_bad_images_skip_leaves_them_out_with_warnings_and_a_count(broken_folder, caplog):
  data = _data(name='image_folder', dir=broken_folder, image_size=0, bad_images='skip')
  with caplog.at_level(logging.WARNING):
    source = build_source(data, 'train')
  assert len(source) == 8 and source.labels.tolist() == [0] * 4 + [1] * 4
  assert sorted(
      source.skipped) == [f'{broken_folder}/train/cat/1.png', f'{broken_folder}/train/dog/3.png']
  assert not any(f in source.files for f in source.skipped)
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert sum('cat/1.png' in w for w in warned) == 1 and sum('dog/3.png' in w for w in warned) == 1
  assert any('skipped 2 of 10 images' in n and 'cat/1.png' in n for n in source.notes)
  assert any('ignored 1 file(s)' in n and 'dog/notes.txt' in n for n in source.notes)
  for i in range(len(source)):  # every image left decodes
    assert source[i]['image'].shape == (6, 6, 3)
  with pytest.raises(ValueError, match="bad_images='maybe': use one of"):
    build_source(_data(name='image_folder', dir=broken_folder, image_size=0, bad_images='maybe'),
                 'train')


def test_bad_images_unchecked_opens_without_decoding_and_names_the_file_when_read(
    broken_folder, monkeypatch):
  """'unchecked' (ImageNet-sized folders): no decode at open, every file with an image extension
  listed; reading a bad one raises DataError naming the file and the switches."""
  from tikd_jax.data import image_folder

  def no_check(path):
    raise AssertionError(f'{path} decoded at open')

  monkeypatch.setattr(image_folder, '_decode_error', no_check)
  data = _data(name='image_folder', dir=broken_folder, image_size=0, bad_images='unchecked')
  source = build_source(data, 'train')
  assert len(source) == 10 and source.skipped == []
  assert any('ignored 1 file(s)' in n for n in source.notes)  # notes.txt: not an image by name
  good = source.files.index(f'{broken_folder}/train/cat/0.png')
  assert source[good]['image'].shape == (6, 6, 3)
  for name, why in (('cat/1.png', 'truncated'), ('dog/3.png', 'UnidentifiedImageError')):
    with pytest.raises(DataError) as e:
      source[source.files.index(f'{broken_folder}/train/{name}')]
    message = str(e.value)
    assert message.startswith(f'{broken_folder}/train/{name} is not a readable image')
    assert why in message
    assert "data.bad_images='unchecked'" in message and '--config.data.bad_images=skip' in message


def test_bad_images_checked_file_that_breaks_later_is_named(broken_folder):
  """'skip' checked the folder at open; a file broken after that stops the read with its path."""
  data = _data(name='image_folder', dir=broken_folder, image_size=0, bad_images='skip')
  source = build_source(data, 'train')
  _truncate(source.files[2])
  with pytest.raises(DataError, match=f'^{source.files[2]} is no longer a readable image'):
    source[2]


# -------------------------------------------------------------------------------- mean / std
def test_channel_stats_equal_numpy_over_the_whole_split(tmp_path):
  root = str(tmp_path / 'pets')
  written = _random_folder(root, (('train', 7), ('val', 1)), size=(5, 9))
  source = build_source(_data(name='image_folder', dir=root, image_size=0), 'train')
  mean, std, pixels = normalization.channel_stats(source)
  train = np.stack([p for path, p in written.items() if '/train/' in path]).astype(np.float64)
  want_mean = (train / 255.0).mean(axis=(0, 1, 2))
  want_std = (train / 255.0).std(axis=(0, 1, 2))
  assert pixels == 14 * 5 * 9
  np.testing.assert_allclose(mean, want_mean, rtol=0, atol=1e-12)
  np.testing.assert_allclose(std, want_std, rtol=0, atol=1e-12)
  assert std[2] < 0.5 * std[0]  # the quartered blue channel: per channel, not one number


def _folder_config(root: str, **kw):
  """configs/tiny.py on an image folder (nothing trains; `setup` reads its data)."""
  return tiny_config(
      'none', **{
          'data.name': 'image_folder', 'data.dir': root, 'data.image_size': 0,
          'data.normalization': 'compute', 'batch_size': 8, 'eval_batch_size': 8, **kw
      })


def test_compute_saves_the_numbers_and_a_resumed_run_reads_them(tmp_path, monkeypatch):
  root = str(tmp_path / 'pets')
  written = _random_folder(root)
  config = _folder_config(root)
  workdir = str(tmp_path / 'run')
  run = run_lib.setup(config, workdir)
  train = np.stack([p for path, p in written.items() if '/train/' in path]) / 255.0
  want_mean, want_std = train.mean(axis=(0, 1, 2)), train.std(axis=(0, 1, 2))
  with open(os.path.join(workdir, 'normalization.json')) as f:
    saved = json.load(f)
  np.testing.assert_allclose(saved['mean'], want_mean, atol=1e-12)
  np.testing.assert_allclose(saved['std'], want_std, atol=1e-12)
  assert saved['images'] == 10 and saved['split'] == 'train'
  for block in (run.config.model, run.config.teacher):  # the student and the teacher see them
    np.testing.assert_allclose(block.mean, want_mean, atol=1e-12)
    np.testing.assert_allclose(block.std, want_std, atol=1e-12)
  np.testing.assert_allclose(run.student.kwargs['mean'], want_mean, atol=1e-12)
  assert tuple(config.model.mean) == common.DIGITS_MEAN  # the caller's config is not changed
  assert any('computed from the 10 images' in n for n in run.data.notes)

  # A resumed run: the saved numbers, not new ones (the file is edited to tell them apart).
  saved['mean'], saved['std'] = [0.25, 0.5, 0.75], [0.1, 0.2, 0.3]
  with open(os.path.join(workdir, 'normalization.json'), 'w') as f:
    json.dump(saved, f)

  def no_recompute(source):
    raise AssertionError('resume recomputed the statistics')

  monkeypatch.setattr(normalization, 'channel_stats', no_recompute)
  resumed = run_lib.setup(config, workdir)
  assert resumed.student.kwargs['mean'] == [0.25, 0.5, 0.75]
  assert tuple(resumed.config.teacher.std) == (0.1, 0.2, 0.3)
  assert any('read from' in n and 'normalization.json' in n for n in resumed.data.notes)
  explicit = run_lib.setup(_folder_config(root, **{'data.normalization': 'explicit'}),
                           str(tmp_path / 'explicit'))
  assert explicit.student.kwargs['mean'] == list(common.DIGITS_MEAN)
  assert not os.path.exists(str(tmp_path / 'explicit' / 'normalization.json'))


# -------------------------------------------------------------------------------- main.py
def _main(args: list[str]) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run([sys.executable, os.path.join(REPO, 'main.py')] + args, cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_main_on_a_folder_with_a_corrupt_image(tmp_path):
  """configs/tiny.py:teacher on a 3-class digits folder (train/, val/ and a smaller test/) with a
  truncated PNG in train/ and a text file named .png in val/: the default stops at once naming
  the file; with bad_images=skip it trains, evaluates on val/ (the default), and uses mean/std
  measured on the readable train images."""
  folder = _write_folder(tmp_path / 'data', 3)
  os.makedirs(f'{folder}/test/digit0')
  Image.open(f'{folder}/val/digit0/{os.listdir(f"{folder}/val/digit0")[0]}').save(
      f'{folder}/test/digit0/0.png')
  train_files = sorted(os.path.join(d, f) for d, _, fs in os.walk(f'{folder}/train') for f in fs)
  _truncate(train_files[0])
  with open(f'{folder}/val/digit1/readme.png', 'w') as f:
    f.write('not an image')
  flags = [
      '--config=configs/tiny.py:teacher', '--config.data.name=image_folder',
      f'--config.data.dir={folder}', '--config.data.normalization=compute',
      '--config.xla_options=fast_compile', '--config.num_epochs=1'
  ]
  failed = _main(flags + [f'--workdir={tmp_path / "stopped"}'])
  assert failed.returncode == 2  # tikd_jax.data.errors.EXIT_USER_ERROR
  # Our message alone: the path and the switch, no traceback above it.
  assert failed.stderr.startswith('error: 1 of ') or '\nerror: 1 of ' in failed.stderr
  assert train_files[0] in failed.stderr and '--config.data.bad_images=skip' in failed.stderr
  assert 'Traceback' not in failed.stderr + failed.stdout
  assert not os.path.exists(tmp_path / 'stopped' / 'checkpoints')

  workdir = tmp_path / 'run'
  done = _main(flags + [f'--workdir={workdir}', '--config.data.bad_images=skip'])
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert f'skipping unreadable image {train_files[0]}' in done.stderr
  assert f'skipping unreadable image {folder}/val/digit1/readme.png' in done.stderr
  assert f'{folder}/train: skipped 1 of {3 * TRAIN_PER_CLASS} images' in done.stdout
  assert f'{folder}/val: skipped 1 of' in done.stdout
  assert "eval split: 'val'" in done.stdout and '3 classes;' in done.stdout
  with open(workdir / 'final_eval.json') as f:
    result = json.load(f)
  val_count = sum(len(os.listdir(f'{folder}/val/digit{c}')) for c in range(3)) - 1
  assert result['count'] == val_count  # val/ (not the one-image test/), the bad file left out
  readable = np.stack([np.asarray(Image.open(f).convert('RGB')) for f in train_files[1:]]) / 255.0
  with open(workdir / 'normalization.json') as f:
    saved = json.load(f)
  np.testing.assert_allclose(saved['mean'], readable.mean(axis=(0, 1, 2)), atol=1e-12)
  np.testing.assert_allclose(saved['std'], readable.std(axis=(0, 1, 2)), atol=1e-12)
  with open(workdir / 'config.json') as f:  # the config as run holds the measured numbers
    np.testing.assert_allclose(json.load(f)['model']['mean'], saved['mean'], atol=1e-12)
  assert 'normalization: mean' in done.stdout and 'computed from the 383 images' in done.stdout


def test_main_unchecked_folder_stops_at_the_bad_image_with_workers(tmp_path):
  """bad_images='unchecked' with two grain worker processes: the truncated PNG is found when
  training reads it; main.py prints only our message (exit 2), no traceback, no grain noise."""
  folder = _write_folder(tmp_path / 'data', 2)
  bad = sorted(os.listdir(f'{folder}/train/digit1'))[50]
  _truncate(f'{folder}/train/digit1/{bad}')
  workdir = tmp_path / 'run'
  failed = _main([
      '--config=configs/tiny.py:teacher', '--config.data.name=image_folder',
      f'--config.data.dir={folder}', '--config.data.bad_images=unchecked',
      '--config.data.num_workers=2', '--config.xla_options=fast_compile', '--config.num_epochs=1',
      f'--workdir={workdir}'
  ])
  assert failed.returncode == 2, failed.stdout[-3000:] + failed.stderr[-3000:]
  assert failed.stderr.startswith(f'error: {folder}/train/digit1/{bad} is not a readable image')
  assert '--config.data.bad_images=skip' in failed.stderr
  assert failed.stderr.count('\n') == 1  # one line: no traceback, no leaked-memory warning
  assert 'phase main: first step' in failed.stdout  # found mid-training, not at open
  assert not os.path.exists(workdir / 'final_eval.json')


@pytest.mark.parametrize('case', ['no_cifar', 'no_teacher', 'eval_no_workdir'])
def test_main_missing_inputs_are_one_message_without_a_traceback(tmp_path, case):
  """README commands pointing at nothing (CIFAR-100 data, the teacher's workdir, the workdir
  to evaluate): the error says where it looked and what to do, with no traceback (exit 2)."""
  nowhere = str(tmp_path / 'nowhere')
  folder = str(tmp_path / 'pets')
  _random_folder(folder, size=(8, 8))
  args, starts, says = {
      'no_cifar': (['--config=configs/teacher_cifar100.py', f'--config.data.dir={nowhere}'],
                   'error: cifar100: no archive found. Searched:', '--config.data.download=True'),
      'no_teacher': ([
          '--config=configs/custom.py:hard', f'--config.data.dir={folder}',
          f'--config.teacher.checkpoint={nowhere}', '--config.batch_size=8'
      ], f'error: config.teacher.checkpoint: checkpoint path {nowhere} does not exist',
                     'Train the teacher first'),
      'eval_no_workdir':
          (['--config=configs/custom.py:hard', f'--config.data.dir={folder}',
            '--mode=eval'], f'error: --mode=eval: workdir {nowhere} does not exist', 'train first'),
  }[case]
  workdir = nowhere if case == 'eval_no_workdir' else str(tmp_path / 'run')
  failed = _main(args + [f'--workdir={workdir}', '--config.xla_options=fast_compile'])
  assert failed.returncode == 2, failed.stdout[-3000:] + failed.stderr[-3000:]
  assert failed.stderr.startswith(starts), failed.stderr[-3000:]
  assert says in failed.stderr
  assert 'Traceback' not in failed.stderr + failed.stdout


def test_main_misspelt_override_is_one_line(tmp_path):
  """`--config.data.bad_image=skip` (no such field): ml_collections' suggestion on one line,
  exit 2, not the two chained tracebacks absl's flag parsing would print."""
  failed = _main([
      '--config=configs/custom.py:hard', '--config.data.bad_image=skip',
      f'--workdir={tmp_path / "run"}'
  ])
  assert failed.returncode == 2, failed.stderr[-3000:]
  assert failed.stderr == ('error: --config.data.bad_image: the config has no field '
                           '\'bad_image\'. Did you mean "bad_images" instead of "bad_image"?\n')


def test_custom_config_measures_the_data_and_follows_the_image_size():
  """configs/custom.py (the README's commands): image folder, measured mean/std, eval split
  'auto'; the student ViT's img_size follows data.image_size (a 64-px folder builds a 64-px
  ViT, not a 32-px one that would fail on the first batch)."""
  from configs import custom
  teacher, student = custom.get_config('teacher'), custom.get_config('hard')
  for c in (teacher, student):
    assert (c.data.name, c.data.normalization, c.data.eval_split) == ('image_folder', 'compute',
                                                                      'auto')
    assert 'mean' in c.model and 'mean' in c.teacher  # what setup measures (normalization.measure)
  assert (teacher.model.name, teacher.distill.method) == ('resnet20', 'none')
  assert (student.model.name, student.distill.method) == ('distilled_vit', 'hard')
  student.data.image_size = 64
  assert run_lib.model_spec(student.model, 3)[1]['img_size'] == 64
  with pytest.raises(ValueError, match='custom takes teacher or a method'):
    custom.get_config('small')
