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


def split_train_val(source: ArraySource, val_size: int,
                    seed: int) -> tuple[ArraySource, ArraySource]:
  """A fixed random hold-out: `val_size` examples for validation, the rest for training."""
  if not 0 < val_size < len(source):
    raise ValueError(f'val_size must be in (0, {len(source)}), got {val_size}')
  perm = np.random.RandomState(seed).permutation(len(source))
  return (source.subset(np.sort(perm[val_size:]),
                        'train'), source.subset(np.sort(perm[:val_size]), 'val'))
