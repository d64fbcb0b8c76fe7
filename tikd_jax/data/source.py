"""The record every data source yields, and an in-memory source over arrays.

A source is a grain random-access data source: `len(source)` and `source[i]` →
`{'image': uint8 [H, W, 3], 'label': int32, 'index': int32}`, where `index` is the example's
position in its split. The index is what ties an image to its own caption feature (README
"The text teacher").
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np


class ArraySource:
  """An image-classification split held in memory as uint8 NHWC arrays."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], name: str,
               split: str):
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f'{name}/{split}: images must be uint8 [N, H, W, 3], got '
                       f'{images.dtype} {images.shape}')
    if labels.shape != (images.shape[0],):
      raise ValueError(f'{name}/{split}: {images.shape[0]} images but labels have shape '
                       f'{labels.shape}')
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
      raise ValueError(f'{name}/{split}: labels must lie in [0, {len(class_names)}), got '
                       f'[{labels.min()}, {labels.max()}]')
    self.images = images
    self.labels = labels.astype(np.int32)
    self.class_names = list(class_names)
    self.name = name
    self.split = split

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])

  def __len__(self) -> int:
    return self.images.shape[0]

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    return {'image': self.images[index], 'label': self.labels[index], 'index': np.int32(index)}

  def subset(self, indices: np.ndarray, split: str) -> 'ArraySource':
    return ArraySource(self.images[indices], self.labels[indices], self.class_names, self.name,
                       split)

  def fingerprint(self) -> str:
    """A content hash of the split: labels, shape, and every 97th image (fast, order-sensitive)."""
    h = hashlib.sha256()
    h.update(f'{self.name}/{self.split}/{self.images.shape}'.encode())
    h.update(self.labels.tobytes())
    h.update(np.ascontiguousarray(self.images[::97]).tobytes())
    return h.hexdigest()[:16]


# How `split_train_val` draws the hold-out (config.data.val_split_method).
VAL_SPLIT_METHODS = ('numpy', 'torch')
# torch's randperm on CPU swaps element by element below this size and switches algorithm above.
_TORCH_RANDPERM_SWAP_LIMIT = (2**32 - 1) // 20


def torch_randperm(n: int, seed: int) -> np.ndarray:
  """`torch.randperm(n, generator=torch.Generator().manual_seed(seed))` on CPU, without torch.

  torch seeds a 32-bit Mersenne Twister exactly as NumPy's `RandomState(seed)` does, and for
  n < 2**32 / 20 shuffles `arange(n)` with `z = draw() % (n - i); swap(i, i + z)` for
  i = 0 … n - 2, one raw 32-bit draw each (aten/src/ATen/native/TensorFactories.cpp,
  `randperm_cpu`). tests/test_data.py checks the result against torch itself.
  """
  if not 0 <= seed < 2**32:
    raise ValueError(f'torch_randperm: seed must be in [0, 2**32), got {seed}')
  if not 0 <= n < _TORCH_RANDPERM_SWAP_LIMIT:
    raise ValueError(f'torch_randperm: n must be in [0, {_TORCH_RANDPERM_SWAP_LIMIT}), got {n}')
  _, key, pos, _, _ = np.random.RandomState(seed).get_state()
  bits = np.random.MT19937()
  bits.state = {'bit_generator': 'MT19937', 'state': {'key': key, 'pos': pos}}
  draws = bits.random_raw(max(n - 1, 0)).astype(np.int64)
  offsets = (draws % (n - np.arange(n - 1, dtype=np.int64))).tolist()
  perm = list(range(n))
  for i, z in enumerate(offsets):
    perm[i], perm[i + z] = perm[i + z], perm[i]
  return np.asarray(perm, np.int64)


def split_indices(n: int, val_size: int, seed: int,
                  method: str = 'numpy') -> tuple[np.ndarray, np.ndarray]:
  """(train, val) example indices of a fixed random hold-out of `val_size` out of `n`, each sorted.

  numpy: val = the first `val_size` of `np.random.RandomState(seed).permutation(n)`.
  torch: the indices of `torch.utils.data.random_split(range(n), [n - val_size, val_size],
         generator=torch.Generator().manual_seed(seed))` (IRKD's notebooks): train = the first
         n - val_size of torch's permutation, val = the rest.
  """
  if not 0 < val_size < n:
    raise ValueError(f'val_size must be in (0, {n}), got {val_size}')
  if method == 'numpy':
    perm = np.random.RandomState(seed).permutation(n)
    train, val = perm[val_size:], perm[:val_size]
  elif method == 'torch':
    perm = torch_randperm(n, seed)
    train, val = perm[:n - val_size], perm[n - val_size:]
  else:
    raise ValueError(f'unknown val_split_method {method!r}; use one of {VAL_SPLIT_METHODS}')
  return np.sort(train), np.sort(val)


def split_train_val(source: ArraySource, val_size: int, seed: int,
                    method: str = 'numpy') -> tuple[ArraySource, ArraySource]:
  """A fixed random hold-out: `val_size` examples for validation, the rest for training, each in
  the source's order (`split_indices` says which)."""
  train, val = split_indices(len(source), val_size, seed, method)
  return source.subset(train, 'train'), source.subset(val, 'val')
