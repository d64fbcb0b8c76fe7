"""A prepared TensorFlow Datasets data set through `tfds.data_source` (ArrayRecord, no TF)."""
from __future__ import annotations

import contextlib
import hashlib
import logging

import numpy as np

from tikd_jax.data.errors import DataError, DataNotFoundError

# config.data.eval_split='auto' on a TFDS data set: the first of these splits it has.
AUTO_EVAL_SPLITS = ('test', 'validation')


@contextlib.contextmanager
def _quiet_absl():
  """tfds warns "Variant folder … has no dataset_info.json" for an unprepared set: the errors
  below say that, and what to do."""
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


def _first_line(e: Exception) -> str:
  """'<type>: <first line of the message>' (tfds's messages run to pages)."""
  lines = str(e).strip().splitlines()
  return f'{type(e).__name__}: {lines[0] if lines else ""}'


def _prepared_builder(name: str, data_dir: str | None):
  """The TFDS builder of `name` in `data_dir`; DataNotFoundError, with the command that prepares
  it, for an unknown or unprepared set."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = data_dir or '~/tensorflow_datasets (config.data.dir is empty)'
  prepare = (f'Prepare it once with `tfds build {name} --data_dir={data_dir or "DIR"} '
             f'--file_format=array_record`' +
             ('' if data_dir else ' and pass --config.data.dir=DIR'))
  try:
    with _quiet_absl():
      builder = tfds.builder(name, data_dir=data_dir or None)
      splits = list(builder.info.splits)
  except Exception as e:  # tfds raises many types for an unknown name or a broken folder
    if type(e).__name__ == 'DatasetNotFoundError':  # its message lists every known data set
      raise DataNotFoundError(f'tfds knows no data set {name!r} (config.data.tfds_name) and '
                              f'none of that name is prepared in {where}: check the name, or '
                              f'{prepare[0].lower()}{prepare[1:]}.') from None
    raise DataNotFoundError(f'tfds data set {name!r} cannot be opened in {where} '
                            f'({_first_line(e)}). {prepare}.') from None
  if not splits:  # a known builder with nothing prepared
    raise DataNotFoundError(f'tfds data set {name!r} is not prepared in {where}. {prepare}.')
  return builder


def auto_eval_split(name: str, data_dir: str | None = None) -> str:
  """The eval split of TFDS data set `name` when config.data.eval_split is 'auto'."""
  splits = list(_prepared_builder(name, data_dir).info.splits)
  for split in AUTO_EVAL_SPLITS:
    if split in splits:
      return split
  raise DataError(f'tfds data set {name!r} has splits {sorted(splits)}, none of '
                  f'{AUTO_EVAL_SPLITS}: set --config.data.eval_split to one of its splits')


class TfdsSource:

  def __init__(self, name: str, split: str, data_dir: str | None = None, image_key: str = 'image',
               label_key: str = 'label'):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      # download=False: an unprepared set must fail here, not start a download-and-prepare run.
      with _quiet_absl():
        self.source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # tfds raises many types: say which of the cases it is
      builder = _prepared_builder(name, data_dir)  # unknown or unprepared: raises
      splits = sorted(builder.info.splits)
      if split not in splits:
        raise DataError(f'tfds data set {name!r} in {data_dir!r} has splits {splits}, not '
                        f'{split!r}: set --config.data.train_split / --config.data.eval_split to '
                        f'one of them') from None
      raise DataNotFoundError(
          f'tfds data set {name!r} split {split!r} in {data_dir!r} cannot be read by index '
          f'({_first_line(e)}). Prepare it once with `tfds build {name} '
          f'--data_dir={data_dir} --file_format=array_record`.') from None
    with _quiet_absl():
      builder = tfds.builder(name, data_dir=data_dir or None)
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
