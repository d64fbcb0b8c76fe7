"""Tests for tikd_jax.data: every source through build_source, augmentation and the grain pipelines.

Offline: digits come from scikit-learn; CIFAR archives (pickle and binary, tarball and folder) and
image folders are written by the tests into tmp_path; TFDS uses `tfds.testing.mock_data`.
"""
import io
import multiprocessing
import os
import pickle
import sys
import tarfile
import zlib

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from configs import common
from tikd_jax.data import build_source
from tikd_jax.data import pipeline
from tikd_jax.data.host_augment import random_crop_flip, resize_image
from tikd_jax.data.source import ArraySource, split_indices, torch_randperm
from tikd_jax.train import loop


def _cfg(**kw):
  """The trainer's `config.data` (configs/common.py) with `kw` changed."""
  return ConfigDict(dict(common.base().data, **kw))


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------

SKLEARN_DIGIT_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_digits_are_read_as_sklearn_loads_them():
  """tikd_jax reads scikit-learn's digits file itself (importing sklearn costs ~2 s a run)."""
  from sklearn.datasets import load_digits
  from tikd_jax.data import digits
  images, labels = digits._digits_8x8()
  reference = load_digits()
  np.testing.assert_array_equal(images, reference.images)
  np.testing.assert_array_equal(labels, reference.target)


def test_digits_splits_shapes_and_balance():
  train = build_source(_cfg(name='digits'), 'train')
  test = build_source(_cfg(name='digits'), 'test')
  assert (len(train), len(test)) == (1437, 360)
  assert train.image_shape == test.image_shape == (32, 32, 3)
  assert train.images.dtype == np.uint8 and test.images.dtype == np.uint8
  assert train.num_classes == test.num_classes == 10
  assert train.class_names == [str(i) for i in range(10)]
  assert np.bincount(test.labels, minlength=10).tolist() == [36] * 10
  assert np.bincount(train.labels, minlength=10).tolist() == [c - 36 for c in SKLEARN_DIGIT_COUNTS]
  # Grey digits repeated over RGB, full 0..255 range.
  assert np.array_equal(train.images[..., 0], train.images[..., 1])
  assert np.array_equal(train.images[..., 0], train.images[..., 2])
  assert train.images.min() == 0 and train.images.max() == 255
  # The record of one example.
  rec = test[7]
  assert rec['image'].shape == (32, 32, 3) and rec['image'].dtype == np.uint8
  assert rec['label'] == test.labels[7] and rec['index'] == 7
  assert rec['index'].dtype == np.int32 and rec['label'].dtype == np.int32


def test_digits_split_fixed_across_calls_and_sizes():
  a = build_source(_cfg(name='digits'), 'test')
  b = build_source(_cfg(name='digits'), 'test')
  assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
  assert a.fingerprint() == b.fingerprint()
  small = build_source(_cfg(name='digits', image_size=16), 'test')
  assert small.image_shape == (16, 16, 3) and len(small) == 360
  assert np.array_equal(small.labels, a.labels)  # the same examples at another resolution
  small_train = build_source(_cfg(name='digits', image_size=16), 'train')
  assert small_train.image_shape == (16, 16, 3) and len(small_train) == 1437


def test_digits_native_size_is_exactly_sklearn_data():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  want = (d.images / 16.0 * 255.0).round().astype(np.uint8)
  train = build_source(_cfg(name='digits', image_size=8), 'train')
  test = build_source(_cfg(name='digits', image_size=8), 'test')
  got = np.concatenate([train.images[..., 0], test.images[..., 0]])
  got_labels = np.concatenate([train.labels, test.labels])
  key = lambda ims, ys: sorted(im.tobytes() + bytes([y]) for im, y in zip(ims, ys))
  assert key(got, got_labels) == key(want, d.target)  # train ∪ test = the whole set, once


def test_digits_val_split():
  train = build_source(_cfg(name='digits', val_size=100), 'train')
  val = build_source(_cfg(name='digits', val_size=100), 'val')
  assert (len(train), len(val)) == (1337, 100)
  assert val.split == 'val' and val[99]['index'] == 99
  with pytest.raises(ValueError, match='val_size'):
    build_source(_cfg(name='digits'), 'val')
  with pytest.raises(ValueError, match='unknown data source'):
    build_source(_cfg(name='mnist'), 'train')


# --------------------------------------------------------------------------------------------
# CIFAR archives written by the test
# --------------------------------------------------------------------------------------------

N_TRAIN = {'cifar10': 15, 'cifar100': 12}  # cifar10: 5 batches of 3
N_TEST = 5


def _cifar_data(name):
  """Channels-first uint8 pixels and labels for train and test (deterministic, all distinct)."""
  rng = np.random.RandomState(0 if name == 'cifar10' else 1)
  k = 10 if name == 'cifar10' else 100
  out = {}
  for split, n in (('train', N_TRAIN[name]), ('test', N_TEST)):
    chw = rng.randint(0, 256, (n, 3, 32, 32)).astype(np.uint8)
    out[split] = (chw, rng.randint(0, k, n).astype(np.int64), rng.randint(0, 20, n))
  names = [f'class_{i:02d}' for i in range(k)]
  return out, names


def _tar_bytes(files):
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode='w') as t:
    for member, raw in files.items():
      info = tarfile.TarInfo(member)
      info.size = len(raw)
      t.addfile(info, io.BytesIO(raw))
  return buf.getvalue()


def _write_tgz(path, files):
  with tarfile.open(path, 'w:gz') as t:
    for member, raw in files.items():
      info = tarfile.TarInfo(member)
      info.size = len(raw)
      t.addfile(info, io.BytesIO(raw))


def _write_folder(root, files):
  for member, raw in files.items():
    p = os.path.join(root, member)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, 'wb') as f:
      f.write(raw)


def _cifar_files(name, form):
  """{member path: bytes} in the layout of the authors' archives; returns (files, stem)."""
  data, names = _cifar_data(name)
  (tr, ytr, ctr), (te, yte, cte) = data['train'], data['test']
  files = {}
  if name == 'cifar100' and form == 'pickle':
    d = 'cifar-100-python'
    files[f'{d}/train'] = pickle.dumps({
        b'data': tr.reshape(len(tr), -1), b'fine_labels': ytr.tolist(),
        b'coarse_labels': ctr.tolist()
    })
    files[f'{d}/test'] = pickle.dumps({
        b'data': te.reshape(len(te), -1), b'fine_labels': yte.tolist(),
        b'coarse_labels': cte.tolist()
    })
    files[f'{d}/meta'] = pickle.dumps({
        b'fine_label_names': [n.encode() for n in names],
        b'coarse_label_names': [b'c%d' % i for i in range(20)]
    })
    return files, 'cifar-100-python', d
  if name == 'cifar100':
    d = 'cifar-100-binary'
    rec = lambda x, y, c: np.concatenate(
        [np.stack([c, y], 1).astype(np.uint8),
         x.reshape(len(x), -1)], 1).tobytes()
    files[f'{d}/train.bin'] = rec(tr, ytr, ctr)
    files[f'{d}/test.bin'] = rec(te, yte, cte)
    files[f'{d}/fine_label_names.txt'] = ('\n'.join(names) + '\n').encode()
    files[f'{d}/coarse_label_names.txt'] = b'\n'.join(b'c%d' % i for i in range(20))
    return files, 'cifar-100-binary', d
  if form == 'pickle':
    d = 'cifar-10-batches-py'
    for i in range(5):
      sl = slice(3 * i, 3 * i + 3)
      files[f'{d}/data_batch_{i + 1}'] = pickle.dumps(
          {b'data': tr[sl].reshape(3, -1), b'labels': ytr[sl].tolist()})
    files[f'{d}/test_batch'] = pickle.dumps(
        {b'data': te.reshape(len(te), -1), b'labels': yte.tolist()})
    files[f'{d}/batches.meta'] = pickle.dumps({b'label_names': [n.encode() for n in names]})
    files[f'{d}/readme.html'] = b'<html></html>'
    return files, 'cifar-10-python', d
  d = 'cifar-10-batches-bin'
  rec = lambda x, y: np.concatenate([y[:, None].astype(np.uint8),
                                     x.reshape(len(x), -1)], 1).tobytes()
  for i in range(5):
    sl = slice(3 * i, 3 * i + 3)
    files[f'{d}/data_batch_{i + 1}.bin'] = rec(tr[sl], ytr[sl])
  files[f'{d}/test_batch.bin'] = rec(te, yte)
  files[f'{d}/batches.meta.txt'] = ('\n'.join(names) + '\n\n').encode()
  return files, 'cifar-10-binary', d


def _write_cifar(root, name, form, container):
  files, stem, _ = _cifar_files(name, form)
  if container == 'tarball':
    path = os.path.join(root, stem + '.tar.gz')
    _write_tgz(path, files)
  else:
    _write_folder(root, files)
    path = os.path.join(root, next(iter(files)).split('/')[0])
  return path


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
@pytest.mark.parametrize('form', ['pickle', 'binary'])
@pytest.mark.parametrize('container', ['tarball', 'folder'])
def test_cifar_round_trip(tmp_path, name, form, container):
  _write_cifar(str(tmp_path), name, form, container)
  data, names = _cifar_data(name)
  for split in ('train', 'test'):
    src = build_source(_cfg(name=name, dir=str(tmp_path)), split)
    chw, labels, _ = data[split]
    assert isinstance(src, ArraySource)
    assert len(src) == len(chw) and src.image_shape == (32, 32, 3)
    assert src.images.dtype == np.uint8 and src.images.flags.c_contiguous
    assert np.array_equal(src.images, chw.transpose(0, 2, 3, 1))  # channels first → HWC
    # A few pixels by hand: image[row, col, channel] = record[channel * 1024 + row * 32 + col].
    flat = chw.reshape(len(chw), -1)
    for i, r, c, ch in ((0, 0, 0, 0), (1, 2, 5, 1), (len(chw) - 1, 31, 30, 2)):
      assert src[i]['image'][r, c, ch] == flat[i, ch * 1024 + r * 32 + c]
    assert src.labels.tolist() == labels.tolist()
    assert src[3]['label'] == labels[3] and src[3]['index'] == 3
    assert src.class_names == names and src.num_classes == (10 if name == 'cifar10' else 100)


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_cifar_missing_archive_names_every_path(tmp_path, name):
  stem = 'cifar-10' if name == 'cifar10' else 'cifar-100'
  with pytest.raises(FileNotFoundError) as e:
    build_source(_cfg(name=name, dir=str(tmp_path)), 'train')
  msg = str(e.value)
  searched = ([
      f'{stem}-python.tar.gz', f'{stem}-batches-py', f'{stem}-binary.tar.gz', f'{stem}-batches-bin'
  ] if name == 'cifar10' else [
      f'{stem}-python.tar.gz', f'{stem}-python', f'{stem}-binary.tar.gz', f'{stem}-binary'
  ])
  for s in searched:
    assert os.path.join(str(tmp_path), s) in msg
  assert f'https://www.cs.toronto.edu/~kriz/{stem}-python.tar.gz' in msg
  assert 'data.dir' in msg and 'download=True' in msg


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_cifar_truncated_binary_record(tmp_path, name):
  files, _, d = _cifar_files(name, 'binary')
  member = f'{d}/data_batch_3.bin' if name == 'cifar10' else f'{d}/train.bin'
  width = 3073 if name == 'cifar10' else 3074
  files[member] = files[member][:width + 1000]  # one whole record, then 1000 bytes of the next
  _write_folder(str(tmp_path), files)
  with pytest.raises(
      ValueError, match=r'not a whole number of %d-byte records; the file is '
      r'truncated or corrupt' % width) as e:
    build_source(_cfg(name=name, dir=str(tmp_path)), 'train')
  assert os.path.join(str(tmp_path), d) in str(e.value)
  # The test split, untouched, still loads.
  assert len(build_source(_cfg(name=name, dir=str(tmp_path)), 'test')) == N_TEST


def _gzip_with_bad_block(raw, good=20000):
  """A gzip stream whose deflate data turns invalid after `good` bytes of `raw` (a corrupt disk
  block): tarfile opens it and reads the first header, then zlib fails inside the first member."""
  comp = zlib.compressobj(6, zlib.DEFLATED, -15)
  first = comp.compress(raw[:good]) + comp.flush(zlib.Z_FULL_FLUSH)  # byte-aligned block start
  rest = bytearray(comp.compress(raw[good:]) + comp.flush())
  rest[0] |= 0b110  # BTYPE = 11: reserved, "invalid block type"
  header = b'\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff'
  trailer = zlib.crc32(raw).to_bytes(4, 'little') + (len(raw) % 2**32).to_bytes(4, 'little')
  return header + first + bytes(rest) + trailer


@pytest.mark.parametrize('corruption', ['truncated', 'garbage', 'bad_deflate_block'])
def test_cifar_corrupt_tarball(tmp_path, corruption):
  files, stem, d = _cifar_files('cifar100', 'pickle')
  assert len(files[f'{d}/train']) > 30000  # the bad deflate block lies inside the first member
  path = os.path.join(str(tmp_path), stem + '.tar.gz')
  _write_tgz(path, files)
  with open(path, 'rb') as f:
    good = f.read()
  bad = {
      'truncated': good[:len(good) // 2], 'garbage': b'<html>404 Not Found</html>' * 40,
      'bad_deflate_block': _gzip_with_bad_block(_tar_bytes(files))
  }[corruption]
  with open(path, 'wb') as f:
    f.write(bad)
  with pytest.raises(
      ValueError, match=r'(?s)cannot read cifar100 .*the archive is corrupt or '
      r'truncated: delete it and download it again') as e:
    build_source(_cfg(name='cifar100', dir=str(tmp_path)), 'train')
  assert path in str(e.value)


def test_cifar_incomplete_tarball(tmp_path):
  files, stem, d = _cifar_files('cifar100', 'pickle')
  del files[f'{d}/meta']
  _write_tgz(os.path.join(str(tmp_path), stem + '.tar.gz'), files)
  with pytest.raises(ValueError, match=r"has no member 'meta'.*incomplete"):
    build_source(_cfg(name='cifar100', dir=str(tmp_path)), 'test')


def test_cifar_val_split_disjoint_and_covering(tmp_path):
  _write_cifar(str(tmp_path), 'cifar100', 'binary', 'tarball')
  full = build_source(_cfg(name='cifar100', dir=str(tmp_path)), 'train')
  cfg = _cfg(name='cifar100', dir=str(tmp_path), val_size=4)
  train, val = build_source(cfg, 'train'), build_source(cfg, 'val')
  assert (len(train), len(val)) == (8, 4)
  assert (train.split, val.split) == ('train', 'val')
  row = {im.tobytes(): i for i, im in enumerate(full.images)}
  train_rows = [row[im.tobytes()] for im in train.images]
  val_rows = [row[im.tobytes()] for im in val.images]
  assert not set(train_rows) & set(val_rows)
  assert sorted(train_rows + val_rows) == list(range(12))
  perm = np.random.RandomState(42).permutation(12)  # the default val_seed
  assert val_rows == sorted(perm[:4].tolist()) and train_rows == sorted(perm[4:].tolist())
  assert np.array_equal(val.labels, full.labels[val_rows])
  assert [val[i]['index'] for i in range(4)] == [0, 1, 2, 3]  # positions within the split
  again = build_source(cfg, 'val')
  assert np.array_equal(again.images, val.images)  # fixed across calls
  other = build_source(_cfg(name='cifar100', dir=str(tmp_path), val_size=4, val_seed=7), 'val')
  other_rows = [row[im.tobytes()] for im in other.images]
  assert other_rows == sorted(np.random.RandomState(7).permutation(12)[:4].tolist())


def _torch_random_split(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
  """IRKD's notebooks: the (train, val) Subset indices of torch's random_split."""
  import torch  # pylint: disable=g-import-not-at-top
  train, val = torch.utils.data.random_split(range(n), [n - val_size, val_size],
                                             generator=torch.Generator().manual_seed(seed))
  return list(train.indices), list(val.indices)


@pytest.mark.parametrize('n,val_size,seed', [(50000, 5000, 42), (12, 4, 42), (2, 1, 0),
                                             (1000, 999, 7), (777, 100, 2**32 - 1)])
def test_torch_val_split_equals_torch_random_split(n, val_size, seed):
  """val_split_method='torch' holds out exactly the examples torch's random_split does (IRKD's
  45k/5k with manual_seed(42) among them); the numpy default draws a different subset."""
  want_train, want_val = _torch_random_split(n, val_size, seed)
  train, val = split_indices(n, val_size, seed, 'torch')
  assert train.tolist() == sorted(want_train) and val.tolist() == sorted(want_val)
  perm = torch_randperm(n, seed)
  assert perm[:n - val_size].tolist() == want_train and perm[n - val_size:].tolist() == want_val
  if n > 100:
    assert split_indices(n, val_size, seed, 'numpy')[1].tolist() != val.tolist()


def test_torch_val_split_through_build_source(tmp_path):
  _write_cifar(str(tmp_path), 'cifar10', 'binary', 'tarball')
  full = build_source(_cfg(name='cifar10', dir=str(tmp_path)), 'train')
  cfg = _cfg(name='cifar10', dir=str(tmp_path), val_size=4, val_split_method='torch')
  train, val = build_source(cfg, 'train'), build_source(cfg, 'val')
  row = {im.tobytes(): i for i, im in enumerate(full.images)}
  assert len(row) == len(full) == 15
  want_train, want_val = _torch_random_split(15, 4, 42)
  assert [row[im.tobytes()] for im in val.images] == sorted(want_val)
  assert [row[im.tobytes()] for im in train.images] == sorted(want_train)
  with pytest.raises(ValueError, match=r"unknown val_split_method 'tensorflow'.*numpy.*torch"):
    build_source(_cfg(name='cifar10', dir=str(tmp_path), val_size=4, val_split_method='tensorflow'),
                 'val')


def test_irkd_configs_hold_out_torch_random_split():
  from configs import irkd_cifar10  # pylint: disable=g-import-not-at-top
  for row in irkd_cifar10.ROWS:
    data = irkd_cifar10.get_config(f'{row},p4').data
    assert (data.val_size, data.val_seed, data.val_split_method) == (5000, 42, 'torch')
  assert common.base().data.val_split_method == 'numpy'  # the default is unchanged


def test_torch_randperm_refuses_what_it_cannot_reproduce():
  with pytest.raises(ValueError, match=r'seed must be in \[0, 2\*\*32\)'):
    torch_randperm(10, 2**32)
  with pytest.raises(ValueError, match='n must be in'):
    torch_randperm(2**32 // 20, 0)


# --------------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------------


def _png(path, rgb, size=(6, 6)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  arr = np.zeros(size + (3,), np.uint8)
  arr[...] = rgb
  arr[0, 0] = (255 - rgb[0], 1, 2)  # one distinctive pixel
  Image.fromarray(arr).save(path)
  return arr


def test_image_folder_labels_and_pixels(tmp_path):
  root = str(tmp_path / 'shapes')
  # Written out of order on purpose: labels follow sorted class names.
  want = {}
  for split, per_class in (('train', 3), ('val', 2)):
    for cls, base in (('zebra', 200), ('apple', 10), ('mango', 100)):
      for k in range(per_class):
        want[(split, cls, k)] = _png(f'{root}/{split}/{cls}/img_{k}.png', (base + k, base, k))
  with open(f'{root}/train/apple/notes.txt', 'w') as f:
    f.write('not an image')
  train = build_source(_cfg(name='image_folder', dir=root, image_size=0), 'train')
  val = build_source(_cfg(name='image_folder', dir=root, image_size=0), 'val')
  assert train.class_names == val.class_names == ['apple', 'mango', 'zebra']
  assert train.num_classes == 3 and (len(train), len(val)) == (9, 6)
  assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  assert val.labels.tolist() == [0, 0, 1, 1, 2, 2]
  assert train.image_shape == (6, 6, 3) and train.name == 'shapes'
  order = [(c, k) for c in ('apple', 'mango', 'zebra') for k in range(2)]
  for i, (cls, k) in enumerate(order):
    rec = val[i]
    assert rec['image'].dtype == np.uint8 and rec['image'].shape == (6, 6, 3)
    assert np.array_equal(rec['image'], want[('val', cls, k)])
    assert rec['index'] == i and rec['label'] == ['apple', 'mango', 'zebra'].index(cls)
  assert tuple(train[4]['image'][3, 3]) == (101, 100, 1)  # mango/img_1


def test_image_folder_grey_and_other_size(tmp_path):
  root = str(tmp_path / 'data')
  _png(f'{root}/train/a/0.png', (40, 50, 60))
  Image.fromarray(np.full((6, 6), 77, np.uint8)).save(f'{root}/train/a/1.png')  # mode L
  _png(f'{root}/train/b/0.png', (90, 80, 70), size=(9, 7))
  src = build_source(_cfg(name='image_folder', dir=root, image_size=0), 'train')
  assert np.array_equal(src[1]['image'], np.full((6, 6, 3), 77, np.uint8))  # grey → RGB
  with pytest.raises(
      ValueError, match=r'has shape \(9, 7, 3\) but the first image of the split '
      r'has \(6, 6, 3\); set --config.data.image_size'):
    src[2]  # pylint: disable=pointless-statement
  resized = build_source(_cfg(name='image_folder', dir=root, image_size=5), 'train')
  assert resized.image_shape == (5, 5, 3)
  for i in range(3):
    assert resized[i]['image'].shape == (5, 5, 3)
  flat = resized[1]['image']
  assert np.array_equal(flat, np.full((5, 5, 3), 77, np.uint8))  # a constant image stays constant


def test_image_folder_errors(tmp_path):
  root = str(tmp_path / 'd')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    build_source(_cfg(name='image_folder', dir=root, image_size=0), 'train')
  os.makedirs(f'{root}/train')
  os.makedirs(f'{root}/val')
  with pytest.raises(ValueError, match='no class folders'):
    build_source(_cfg(name='image_folder', dir=root, image_size=0), 'train')
  _png(f'{root}/train/cat/0.png', (1, 2, 3))
  os.makedirs(f'{root}/val/cat')
  with pytest.raises(ValueError, match='holds no images'):  # val has a class folder but no images
    build_source(_cfg(name='image_folder', dir=root, image_size=0), 'val')
  _png(f'{root}/val/cat/0.png', (1, 2, 3))
  _png(f'{root}/val/dog/0.png', (1, 2, 3))
  with pytest.raises(ValueError, match=r'val/dog is not a class of the train split'):
    build_source(_cfg(name='image_folder', dir=root, image_size=0), 'val')


# --------------------------------------------------------------------------------------------
# TFDS (mock data: no TensorFlow, no download)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize('tfds_name,size,classes', [('mnist', 28, 10), ('cifar100', 32, 100)])
def test_tfds_source_with_mock_data(tfds_name, size, classes):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=6):
    src = build_source(_cfg(name='tfds', tfds_name=tfds_name), 'train')
    raw = tfds.data_source(tfds_name, split='train')
    assert len(src) == 6 and src.image_shape == (size, size, 3) and src.num_classes == classes
    assert src.class_names == list(tfds.builder(tfds_name).info.features['label'].names)
    for i in range(6):
      rec, ref = src[i], raw[i]
      assert rec['image'].dtype == np.uint8 and rec['image'].shape == (size, size, 3)
      ref_image = np.asarray(ref['image'])
      if ref_image.shape[-1] == 1:
        ref_image = np.repeat(ref_image, 3, -1)  # grey → 3 equal channels
      assert np.array_equal(rec['image'], ref_image)
      assert rec['label'].dtype == np.int32 and rec['label'] == int(ref['label'])
      assert rec['index'] == i
    assert len(src.fingerprint()) == 16


def test_tfds_unprepared_fails_fast(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(FileNotFoundError, match=r"(?s)'mnist' is not prepared in .*tfds "
                     r'build mnist'):
    build_source(_cfg(name='tfds', tfds_name='mnist', dir=str(tmp_path)), 'train')
  assert not (tmp_path / 'downloads').exists()  # no download-and-prepare was started


# --------------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------------


class _FixedRng:
  """Stands in for np.random.Generator with known draws."""

  def __init__(self, ints, uniform):
    self.ints, self.uniform, self.calls = list(ints), uniform, []

  def integers(self, low, high):
    self.calls.append((low, high))
    return self.ints.pop(0)

  def random(self):
    return self.uniform


def test_random_crop_flip_by_hand():
  image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)  # non-square on purpose
  # top 1, left 6 in the 4-zero-padded 12×13 image; no flip (0.7 ≥ 0.5).
  rng = _FixedRng([1, 6], 0.7)
  out = random_crop_flip(image, rng, padding=4)
  assert rng.calls == [(0, 9), (0, 9)]  # offsets 0..8 in each dimension
  assert out.shape == (4, 5, 3)
  want = np.zeros((4, 5, 3), np.uint8)
  want[3, 0:3] = image[0, 2:5]  # padded row 4 = image row 0; padded cols 6..8 = image cols 2..4
  assert np.array_equal(out, want)
  assert out[3, 0].tolist() == [6, 7, 8] and out[3, 2].tolist() == [12, 13, 14]
  # Flip (0.2 < 0.5): the same window mirrored left-right.
  flipped = random_crop_flip(image, _FixedRng([1, 6], 0.2), padding=4)
  assert np.array_equal(flipped, want[:, ::-1]) and flipped.flags.c_contiguous
  assert flipped[3, 4].tolist() == [6, 7, 8]
  # Offset (4, 4) is the identity crop.
  assert np.array_equal(random_crop_flip(image, _FixedRng([4, 4], 0.9)), image)
  assert np.array_equal(random_crop_flip(image, _FixedRng([4, 4], 0.0), flip=False), image)


def test_random_crop_flip_real_generator_draws():
  """np.random.default_rng(2024) draws top 2, left 6, then 0.214 (< 0.5: flip); seed 7 draws
  top 8, left 5, then 0.897 (no flip). The crops follow from the 4-zero-padded 40×40 image."""
  image = np.random.RandomState(1).randint(1, 256, (32, 32, 3)).astype(np.uint8)
  out = random_crop_flip(image, np.random.default_rng(2024))
  # rows 2..33 of the padded image = image rows -2..29; cols 6..37 = image cols 2..33.
  want = np.zeros((32, 32, 3), np.uint8)
  want[2:32, 0:30] = image[0:30, 2:32]
  assert np.array_equal(out, want[:, ::-1])
  out = random_crop_flip(image, np.random.default_rng(7))
  want = np.zeros((32, 32, 3), np.uint8)
  want[0:28, 0:31] = image[4:32, 1:32]  # rows 8..39 = image rows 4..35; cols 5..36 = 1..32
  assert np.array_equal(out, want)


def test_random_crop_low_res_window():
  image = np.random.RandomState(0).randint(1, 256, (32, 32, 3)).astype(np.uint8)
  rng = _FixedRng([34, 2], 0.9)  # straddles the bottom-left corner of the padded 40×40 image
  out = random_crop_flip(image, rng, size=3, padding=4)
  assert rng.calls == [(0, 38), (0, 38)]
  assert out.shape == (3, 3, 3)
  want = np.zeros((3, 3, 3), np.uint8)
  want[0:2, 2] = image[30:32, 0]  # padded rows 34, 35 = image rows 30, 31; padded col 4 = col 0
  assert np.array_equal(out, want)
  out2 = random_crop_flip(image, _FixedRng([4, 24], 0.9), size=16, padding=4)
  assert out2.shape == (16, 16, 3)
  assert np.array_equal(out2[:, :12], image[0:16, 20:32]) and not out2[:, 12:].any()
  # With a real generator: always a size×size window of the zero-padded image.
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  g = np.random.default_rng(5)
  for _ in range(20):
    w = random_crop_flip(image, g, size=8)
    assert w.shape == (8, 8, 3)
    found = any(
        np.array_equal(cand, padded[t:t + 8, l:l + 8])
        for t in range(33)
        for l in range(33)
        for cand in (w, w[:, ::-1]))
    assert found


# --------------------------------------------------------------------------------------------
# pipelines
# --------------------------------------------------------------------------------------------


def _toy_source(n=40, size=8):
  rng = np.random.RandomState(0)
  return ArraySource(
      rng.randint(1, 256, (n, size, size, 3)).astype(np.uint8),
      np.arange(n) % 4, list('abcd'), 'toy', 'train')


def _take(ds, steps):
  return [ds[k] for k in range(steps)]


def _equal_batches(a, b):
  return all(set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_train_dataset_seeded_and_reshuffled():
  src = _toy_source()
  a = _take(pipeline.train_dataset(src, batch_size=8, seed=5), 10)
  b = _take(pipeline.train_dataset(src, batch_size=8, seed=5), 10)
  c = _take(pipeline.train_dataset(src, batch_size=8, seed=6), 10)
  assert _equal_batches(a, b)
  assert not any(np.array_equal(x['index'], y['index']) for x, y in zip(a, c))
  assert not any(np.array_equal(x['image'], y['image']) for x, y in zip(a, c))
  for batch in a:
    assert batch['image'].shape == (8, 8, 8, 3) and batch['image'].dtype == np.uint8
    assert np.array_equal(batch['label'], src.labels[batch['index']])
  # Each epoch (5 steps) sees every example once, in a new order.
  epoch1 = np.concatenate([x['index'] for x in a[:5]])
  epoch2 = np.concatenate([x['index'] for x in a[5:]])
  assert sorted(epoch1) == sorted(epoch2) == list(range(40))
  assert not np.array_equal(epoch1, epoch2)
  # Augmentation really happened (pad 4 on 8×8 images: most crops are shifted).
  changed = [not np.array_equal(im, src.images[i]) for im, i in zip(a[0]['image'], a[0]['index'])]
  assert sum(changed) >= 4
  # Same seed, no augmentation: exactly the source images.
  plain = pipeline.train_dataset(src, batch_size=8, seed=5, crop_padding=0, flip=False)[0]
  assert np.array_equal(plain['index'], a[0]['index'])
  assert np.array_equal(plain['image'], src.images[plain['index']])


def test_train_dataset_low_res_crops_and_text():
  src = _toy_source(n=16, size=32)
  text = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  batch = pipeline.train_dataset(src, batch_size=4, seed=0, crop_size=16, text_features=text)[0]
  assert batch['image'].shape == (4, 16, 16, 3)
  assert np.array_equal(batch['text'], text[batch['index']])


def test_train_dataset_two_processes_partition_the_global_batch():
  src = _toy_source()
  full = pipeline.train_dataset(src, batch_size=8, seed=3)
  p0 = pipeline.train_dataset(src, batch_size=4, seed=3, process_index=0, process_count=2)
  p1 = pipeline.train_dataset(src, batch_size=4, seed=3, process_index=1, process_count=2)
  for step in range(7):  # crosses the epoch boundary at step 5
    g, a, b = full[step], p0[step], p1[step]
    assert not set(a['index'].tolist()) & set(b['index'].tolist())
    assert set(a['index'].tolist()) | set(b['index'].tolist()) == set(g['index'].tolist())
    # Process p holds the p-th contiguous block: concatenated, exactly the single-process batch
    # (rows in the same order, so per-row randomness in the step matches too).
    assert np.array_equal(np.concatenate([a['index'], b['index']]), g['index'])
    assert np.array_equal(np.concatenate([a['image'], b['image']]), g['image'])


def _close(it):
  close = getattr(it, 'close', None)
  if close is not None:
    close()


@pytest.mark.parametrize('num_workers', [0, 1])
def test_iterator_state_resumes_exactly(num_workers):
  """With workers too: make_iterator itself marks absl's flags parsed for grain's workers."""
  src = _toy_source()
  ds = pipeline.train_dataset(src, batch_size=8, seed=11)
  want = _take(ds, 5)
  it = pipeline.make_iterator(ds, num_workers=num_workers)
  resumed = None
  try:
    got = [{k: np.array(v) for k, v in next(it).items()} for _ in range(3)]
    state = it.get_state()
    after = [{k: np.array(v) for k, v in next(it).items()} for _ in range(2)]
    assert _equal_batches(got + after, want)  # the same stream whatever the number of workers
    resumed = pipeline.make_iterator(ds, num_workers=num_workers)
    resumed.set_state(state)
    again = [{k: np.array(v) for k, v in next(resumed).items()} for _ in range(2)]
    assert _equal_batches(again, after)
  finally:
    _close(it)
    if resumed is not None:
      _close(resumed)


def test_closing_a_stream_mid_epoch_stops_its_workers_and_quiets_the_tracker():
  """The training loop closes its input stream when it ends or fails (train/loop.py): grain's
  worker processes stop at once, not at exit, and the resource tracker's exit warning about
  batches still in shared memory is off (tikd_jax/data/pipeline.py)."""
  ds = pipeline.train_dataset(_toy_source(), batch_size=8, seed=11)
  stream = loop.Stream(pipeline.make_iterator(ds, num_workers=2), start=0)
  next(stream.iterator)
  assert len(multiprocessing.active_children()) >= 2  # grain's two workers
  stream.close()
  stream.close()  # idempotent: the trainer's finally closes what train_loop may have closed
  assert multiprocessing.active_children() == []
  assert 'ignore::UserWarning:multiprocessing.resource_tracker' in sys.warnoptions


def _collect_eval(src, global_batch, process_index=0, process_count=1, text=None):
  return list(
      pipeline.eval_batches(src, global_batch=global_batch, process_index=process_index,
                            process_count=process_count, text_features=text))


def test_eval_batches_cover_every_example_once():
  src = _toy_source(n=21)
  text = np.arange(21 * 2, dtype=np.float32).reshape(21, 2)
  batches = _collect_eval(src, 8, text=text)
  assert len(batches) == 3
  masks = np.concatenate([b['mask'] for b in batches])
  assert masks.tolist() == [1.0] * 21 + [0.0] * 3
  idx = np.concatenate([b['index'] for b in batches])[masks > 0]
  assert idx.tolist() == list(range(21))
  last = batches[-1]
  assert last['image'].shape == (8, 8, 8, 3) and last['mask'].dtype == np.float32
  assert np.array_equal(last['image'][:5], src.images[16:21]) and not last['image'][5:].any()
  assert np.array_equal(last['label'][:5], src.labels[16:21])
  assert np.array_equal(last['text'][:5], text[16:21])
  # Two processes: the same number of batches, halves of each global batch, everything once.
  halves = [_collect_eval(src, 8, p, 2) for p in (0, 1)]
  assert len(halves[0]) == len(halves[1]) == 3
  seen = []
  for p, hb in enumerate(halves):
    for step, b in enumerate(hb):
      assert b['image'].shape == (4, 8, 8, 3)
      start = step * 8 + p * 4
      real = [i for i in range(start, start + 4) if i < 21]
      assert b['mask'].tolist() == [1.0] * len(real) + [0.0] * (4 - len(real))
      assert b['index'][:len(real)].tolist() == real
      assert np.array_equal(b['image'][:len(real)], src.images[real])
      seen += real
  assert sorted(seen) == list(range(21))
  assert halves[1][2]['mask'].sum() == 1 and halves[0][2]['mask'].sum() == 4  # 16..19 | 20
  with pytest.raises(ValueError, match='not divisible'):
    _collect_eval(src, 7, 0, 2)


def test_to_global_shards_batch_over_data_axis():
  from tikd_jax.sharding import batch_sharding, make_mesh  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8
  mesh = make_mesh([('data', -1)])
  sharding = batch_sharding(mesh)
  src = _toy_source(n=16)
  batch = _collect_eval(src, 16)[0]
  arrays = pipeline.to_global(batch, sharding)
  assert set(arrays) == {'image', 'label', 'index', 'mask'}
  for key, arr in arrays.items():
    assert isinstance(arr, jax.Array) and arr.shape == batch[key].shape
    assert arr.dtype == batch[key].dtype
    assert arr.sharding.spec == jax.sharding.PartitionSpec(('data',))
    assert np.array_equal(np.asarray(arr), batch[key])
    shards = sorted(arr.addressable_shards, key=lambda s: s.index[0].start)
    assert len(shards) == 8 and len({s.device for s in shards}) == 8
    for d, shard in enumerate(shards):
      assert shard.data.shape[0] == 2
      assert np.array_equal(np.asarray(shard.data), batch[key][2 * d:2 * d + 2])


def test_resize_image_matches_antialiased_bilinear():
  """PIL's bilinear downscale (torchvision Resize on PIL) = torch's antialiased bilinear to ±1
  (uint8 rounding); the identity size is returned untouched and grey images keep their axis."""
  import torch
  image = np.random.RandomState(3).randint(0, 256, (32, 32, 3)).astype(np.uint8)
  for size in (12, 16, 20):
    out = resize_image(image, size)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None].double(), size=(size, size), mode='bilinear',
        antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(np.float64) - want).max() <= 1.0
  assert resize_image(image, 32) is image
  assert resize_image(np.full((32, 32, 1), 77, np.uint8), 8).tolist() == [[[77]] * 8] * 8


def test_train_dataset_resize_mode_downscales_the_whole_augmented_image():
  src = _toy_source(n=16, size=32)
  full = pipeline.train_dataset(src, batch_size=4, seed=0)[0]
  small = pipeline.train_dataset(src, batch_size=4, seed=0, crop_size=16, crop_mode='resize')[0]
  crop = pipeline.train_dataset(src, batch_size=4, seed=0, crop_size=16)[0]
  assert np.array_equal(small['index'], full['index'])
  assert small['image'].shape == crop['image'].shape == (4, 16, 16, 3)
  # Same augmentation draws (offsets, flip) as the full-size stream, then the downscale.
  assert np.array_equal(small['image'], np.stack([resize_image(im, 16) for im in full['image']]))
  assert not np.array_equal(small['image'], crop['image'])
  with pytest.raises(ValueError, match="crop_mode 'zoom'.*config.curriculum.mode"):
    pipeline.train_dataset(src, batch_size=4, seed=0, crop_size=16, crop_mode='zoom')
