"""A prepared TensorFlow Datasets data set through `tfds.data_source` (ArrayRecord, no TF)."""
from __future__ import annotations

import hashlib

import numpy as np

# config.data.eval_split='auto' on a TFDS data set: the first of these splits it has.
AUTO_EVAL_SPLITS = ('test', 'validation')


def auto_eval_split(name: str, data_dir: str | None = None) -> str:
  """The eval split of TFDS data set `name` when config.data.eval_split is 'auto'."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    splits = list(tfds.builder(name, data_dir=data_dir or None).info.splits)
    if not splits:  # a known builder with nothing prepared
      raise FileNotFoundError('no prepared splits')
  except Exception as e:  # tfds raises many types for an unknown or unprepared set
    raise FileNotFoundError(
        f'tfds data set {name!r} is not prepared in {data_dir!r} ({type(e).__name__}: {e}). '
        f'Prepare it once with `tfds build {name} --data_dir={data_dir} '
        f'--file_format=array_record`.') from e
  for split in AUTO_EVAL_SPLITS:
    if split in splits:
      return split
  raise ValueError(f'tfds data set {name!r} has splits {sorted(splits)}, none of '
                   f'{AUTO_EVAL_SPLITS}: set --config.data.eval_split to one of its splits')


class TfdsSource:

  def __init__(self, name: str, split: str, data_dir: str | None = None, image_key: str = 'image',
               label_key: str = 'label'):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      # download=False: an unprepared set must fail here, not start a download-and-prepare run.
      self.source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
      builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # tfds raises many types for a missing preparation
      raise FileNotFoundError(
          f'tfds data set {name!r} split {split!r} is not prepared in {data_dir!r} '
          f'({type(e).__name__}: {e}). Prepare it once with `tfds build {name} '
          f'--data_dir={data_dir} --file_format=array_record`.') from e
    self.class_names = list(builder.info.features[label_key].names)
    self.image_key, self.label_key = image_key, label_key
    self.name, self.split = name, split
    self.image_shape = tuple(self[0]['image'].shape)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    record = self.source[index]
    image = np.asarray(record[self.image_key], np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    return {'image': image, 'label': np.int32(record[self.label_key]), 'index': np.int32(index)}

  def fingerprint(self) -> str:
    h = hashlib.sha256(f'{self.name}/{self.split}/{len(self)}'.encode())
    for i in range(0, len(self), max(1, len(self) // 64)):
      h.update(np.int64(self[i]['label']).tobytes())
    return h.hexdigest()[:16]
