"""CIFAR-10 / CIFAR-100 from the archives the authors distribute, read with NumPy only.

Accepted in `data_dir` (searched in this order): the python-pickle tarball
(`cifar-100-python.tar.gz`), its extracted folder (`cifar-100-python/`), the binary tarball
(`cifar-100-binary.tar.gz`) or its extracted folder (`cifar-100-binary/`); likewise `cifar-10-*`.
With `download=True` the python tarball is fetched from the authors' site and its MD5 checked.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
import zlib

import numpy as np

from tikd_jax.data.errors import DataError, DataNotFoundError
from tikd_jax.data.source import ArraySource

_URL = 'https://www.cs.toronto.edu/~kriz/'
_MD5 = {
    'cifar-10-python.tar.gz': 'c58f30108f718f92721af3b95e74349a',
    'cifar-100-python.tar.gz': 'eb9058c3a382ffc7106e4002c42a8d85',
}
_RECORD = 32 * 32 * 3


def _names(name: str) -> dict:
  if name == 'cifar10':
    return dict(python='cifar-10-python', binary='cifar-10-binary', py_dir='cifar-10-batches-py',
                bin_dir='cifar-10-batches-bin')
  if name == 'cifar100':
    return dict(python='cifar-100-python', binary='cifar-100-binary', py_dir='cifar-100-python',
                bin_dir='cifar-100-binary')
  raise ValueError(f'unknown CIFAR variant {name!r}')


class _Reader:
  """Reads members from a tarball or a folder by their base name."""

  def __init__(self, path: str):
    self.path = path
    self.tar = tarfile.open(path) if os.path.isfile(path) else None
    if self.tar is not None:
      self.members = {os.path.basename(m.name): m for m in self.tar.getmembers() if m.isfile()}
    else:
      self.members = {f: os.path.join(path, f) for f in os.listdir(path)}

  def read(self, base: str) -> bytes:
    if base not in self.members:
      raise FileNotFoundError(f'{self.path} has no member {base!r} (has: '
                              f'{sorted(self.members)[:12]}); the archive looks incomplete')
    if self.tar is not None:
      return self.tar.extractfile(self.members[base]).read()
    with open(self.members[base], 'rb') as f:
      return f.read()


def _unpickle(raw: bytes) -> dict:
  return pickle.load(io.BytesIO(raw), encoding='bytes')


def _from_pickle(reader: _Reader, name: str, split: str):
  to_hwc = lambda flat: flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  if name == 'cifar100':
    d = _unpickle(reader.read('train' if split == 'train' else 'test'))
    meta = _unpickle(reader.read('meta'))
    classes = [c.decode() for c in meta[b'fine_label_names']]
    return to_hwc(np.asarray(d[b'data'], np.uint8)), np.asarray(d[b'fine_labels']), classes
  files = [f'data_batch_{i}' for i in range(1, 6)] if split == 'train' else ['test_batch']
  batches = [_unpickle(reader.read(f)) for f in files]
  classes = [c.decode() for c in _unpickle(reader.read('batches.meta'))[b'label_names']]
  images = np.concatenate([np.asarray(b[b'data'], np.uint8) for b in batches])
  labels = np.concatenate([np.asarray(b[b'labels']) for b in batches])
  return to_hwc(images), labels, classes


def _from_binary(reader: _Reader, name: str, split: str):
  if name == 'cifar100':
    files, label_bytes, label_offset = ['train.bin' if split == 'train' else 'test.bin'], 2, 1
    classes = reader.read('fine_label_names.txt').decode().split()
  else:
    files = ([f'data_batch_{i}.bin' for i in range(1, 6)]
             if split == 'train' else ['test_batch.bin'])
    label_bytes, label_offset = 1, 0
    classes = reader.read('batches.meta.txt').decode().split()
  raw = np.concatenate([np.frombuffer(reader.read(f), np.uint8) for f in files])
  width = label_bytes + _RECORD
  if raw.size % width:
    raise ValueError(f'{reader.path}: binary CIFAR data of {raw.size} bytes is not a whole '
                     f'number of {width}-byte records; the file is truncated or corrupt')
  rows = raw.reshape(-1, width)
  images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, rows[:, label_offset].astype(np.int32), classes


def _md5(path: str) -> str:
  h = hashlib.md5()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def download(name: str, data_dir: str) -> str:
  """Fetches the python tarball into data_dir (atomically) and verifies its MD5."""
  fname = _names(name)['python'] + '.tar.gz'
  os.makedirs(data_dir, exist_ok=True)
  dest = os.path.join(data_dir, fname)
  tmp = dest + '.partial'
  print(f'downloading {_URL + fname} → {dest}', flush=True)
  urllib.request.urlretrieve(_URL + fname, tmp)
  if _md5(tmp) != _MD5[fname]:
    os.remove(tmp)
    raise ValueError(f'{fname}: MD5 mismatch after download; try again')
  os.replace(tmp, dest)
  return dest


def load(name: str, split: str, data_dir: str, allow_download: bool = False) -> ArraySource:
  if split not in ('train', 'test'):
    raise ValueError(f"{name} has splits 'train' and 'test', got {split!r}")
  n = _names(name)
  data_dir = os.path.expanduser(data_dir or '')
  candidates = [
      (os.path.join(data_dir, n['python'] + '.tar.gz'), _from_pickle),
      (os.path.join(data_dir, n['py_dir']), _from_pickle),
      (os.path.join(data_dir, n['binary'] + '.tar.gz'), _from_binary),
      (os.path.join(data_dir, n['bin_dir']), _from_binary),
  ]
  found = [(p, fn) for p, fn in candidates if os.path.exists(p)]
  if not found and allow_download:
    found = [(download(name, data_dir), _from_pickle)]
  if not found:
    searched = '\n  '.join(p for p, _ in candidates)
    raise DataNotFoundError(
        f'{name}: no archive found. Searched:\n  {searched}\n'
        f'Download {_URL}{n["python"]}.tar.gz into {data_dir or "a folder"} and set '
        f'--config.data.dir to it, or set --config.data.download=True on a machine with '
        f'internet access.')
  path, parse = found[0]
  try:
    images, labels, classes = parse(_Reader(path), name, split)
  except (tarfile.TarError, EOFError, pickle.UnpicklingError, KeyError, OSError,
          zlib.error) as e:  # zlib.error: a corrupt gzip stream inside a member
    raise DataError(f'{path}: cannot read {name} ({type(e).__name__}: {e}); the archive is '
                    f'corrupt or truncated: delete it and download it again') from e
  return ArraySource(np.ascontiguousarray(images), labels, classes, name, split)
