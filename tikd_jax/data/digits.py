"""scikit-learn's bundled handwritten digits as a 32×32 RGB data set: the offline default.

1,797 real 8×8 images (values 0..16), upsampled bilinearly to 32×32 and repeated over RGB, split
once with a fixed seed into 1,437 train / 360 test (stratified by class).
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np

from tikd_jax.data.source import ArraySource

NUM_TEST = 360
_SPLIT_SEED = 0


def _digits_8x8() -> tuple[np.ndarray, np.ndarray]:
  """`sklearn.datasets.load_digits()`'s images [1797, 8, 8] and labels, read from the CSV that
  scikit-learn ships (rows: 64 pixels, then the label), without importing scikit-learn: its import
  takes ~1.7 s, a tenth of a smoke run. load_digits() itself where the file is not found."""
  spec = importlib.util.find_spec('sklearn')  # locates the package without running it
  csv = Path(spec.origin).parent / 'datasets' / 'data' / 'digits.csv.gz' if spec else None
  if csv is None or not csv.is_file():
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    return digits.images, digits.target
  with gzip.open(csv, 'rt') as f:
    table = np.loadtxt(f, delimiter=',')
  return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


@functools.lru_cache(maxsize=4)
def _load(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images, labels = _digits_8x8()
  small = (images / 16.0 * 255.0).round().astype(np.uint8)
  big = np.stack([
      np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.BILINEAR))
      for im in small
  ])
  return np.repeat(big[..., None], 3, axis=-1), labels.astype(np.int32)


def _test_indices(labels: np.ndarray) -> np.ndarray:
  rng = np.random.RandomState(_SPLIT_SEED)
  per_class = NUM_TEST // 10
  picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(10)]
  return np.sort(np.concatenate(picks))


def load(split: str, image_size: int = 32) -> ArraySource:
  if split not in ('train', 'test'):
    raise ValueError(f"digits has splits 'train' and 'test', got {split!r}")
  images, labels = _load(image_size)
  test = _test_indices(labels)
  mask = np.zeros(len(labels), bool)
  mask[test] = True
  keep = mask if split == 'test' else ~mask
  return ArraySource(images[keep], labels[keep], [str(i) for i in range(10)], 'digits', split)
