"""Data sources by name (`config.data.name`) and the grain pipelines that feed the trainer."""
from __future__ import annotations

from tikd_jax.data import cifar, digits, image_folder, tfds_source
from tikd_jax.data.image_folder import ImageFolderSource
from tikd_jax.data.source import ArraySource, split_train_val
from tikd_jax.data.tfds_source import TfdsSource

SOURCES = ('digits', 'cifar10', 'cifar100', 'image_folder', 'tfds')
# config.data.eval_split='auto' (the default): an image folder's val/ (else test/), a TFDS set's
# 'test' (else 'validation'), the in-memory sets' 'test'.
AUTO = 'auto'


def resolve_split(data_config, split: str) -> str:
  """`split`, or for 'auto' the split it stands for in this data set (AUTO above)."""
  if split != AUTO:
    return split
  if data_config.name == 'image_folder':
    return image_folder.auto_eval_split(data_config.dir)
  if data_config.name == 'tfds':
    return tfds_source.auto_eval_split(data_config.tfds_name, data_config.dir or None)
  return 'test'


def build_source(data_config, split: str):
  """The source for `split` of `data_config.name`.

  For the in-memory sources, `data_config.val_size > 0` holds out a fixed random part of the train
  split (seed `val_seed`, drawn as `val_split_method` says: 'numpy' or 'torch', the latter
  torch's `random_split` as IRKD's notebooks): 'train' is then the rest and 'val' the held-out
  part (IRKD's 45k/5k).
  """
  name = data_config.name
  if name not in SOURCES:
    raise ValueError(f'unknown data source {name!r}; known sources: {SOURCES}')
  source = _build(data_config, resolve_split(data_config, split))
  if split == AUTO and name in ('image_folder', 'tfds'):
    where = data_config.dir if name == 'image_folder' else data_config.tfds_name
    source.notes = [
        f"eval split: {source.split!r} of {where} (data.eval_split='auto'; set "
        f"--config.data.eval_split to choose another)"
    ] + list(getattr(source, 'notes', []))
  return source


def _build(data_config, split: str):
  name = data_config.name
  val_size = data_config.val_size
  if split == 'val' and not val_size and name in ('digits', 'cifar10', 'cifar100'):
    raise ValueError(f"split 'val' of {name} needs --config.data.val_size > 0")
  if name == 'image_folder':
    # A workdir's config.json from before `bad_images` existed: the old behaviour, an error.
    return ImageFolderSource(data_config.dir, split, data_config.image_size or None,
                             data_config.get('bad_images', 'error'))
  if name == 'tfds':
    return TfdsSource(data_config.tfds_name, split, data_config.dir or None)
  base_split = 'train' if split in ('train', 'val') else split
  if name == 'digits':
    source = digits.load(base_split, data_config.image_size or 32)
  else:
    source = cifar.load(name, base_split, data_config.dir, data_config.download)
  if base_split == 'train' and val_size:
    # A workdir's config.json from before `val_split_method` existed was split with numpy.
    method = data_config.get('val_split_method', 'numpy')
    train, val = split_train_val(source, val_size, data_config.val_seed, method)
    source = val if split == 'val' else train
  return source


__all__ = [
    'ArraySource', 'ImageFolderSource', 'TfdsSource', 'build_source', 'resolve_split', 'SOURCES',
    'AUTO'
]
