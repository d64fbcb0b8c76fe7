"""Data sources by name (`config.data.name`) and the grain pipelines that feed the trainer."""
from __future__ import annotations

from tikd_jax.data import cifar, digits
from tikd_jax.data.image_folder import ImageFolderSource
from tikd_jax.data.source import ArraySource, split_train_val
from tikd_jax.data.tfds_source import TfdsSource

SOURCES = ('digits', 'cifar10', 'cifar100', 'image_folder', 'tfds')


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
  val_size = data_config.val_size
  if split == 'val' and not val_size and name in ('digits', 'cifar10', 'cifar100'):
    raise ValueError(f"split 'val' of {name} needs --config.data.val_size > 0")
  if name == 'image_folder':
    return ImageFolderSource(data_config.dir, split, data_config.image_size or None)
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


__all__ = ['ArraySource', 'ImageFolderSource', 'TfdsSource', 'build_source', 'SOURCES']
