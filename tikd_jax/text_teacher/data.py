"""The data set a text-teacher command works on: `--data.*` flags ↔ build_source's ConfigDict."""
from __future__ import annotations

import argparse
import datetime
import os
import shlex

import ml_collections

from tikd_jax.data import SOURCES, build_source
from tikd_jax.data.errors import DataError
from tikd_jax.data.source import VAL_SPLIT_METHODS

# key → (type, default): the keys and defaults of the trainer's `config.data` (configs/common.py;
# tikd_jax does not import configs, so tests/test_text_teacher.py pins them equal), so the same
# flags give the same split (and fingerprint) here and in training.
DATA_FIELDS = {
    'name': (str, 'digits'),
    'dir': (str, ''),
    'image_size': (int, 32),
    'val_size': (int, 0),
    'val_seed': (int, 42),
    'val_split_method': (str, 'numpy'),
    'tfds_name': (str, ''),
    'download': (bool, False),
}


def add_data_flags(parser: argparse.ArgumentParser) -> None:
  default = {k: d for k, (_, d) in DATA_FIELDS.items()}
  group = parser.add_argument_group('data set (the same meaning as --config.data.* in training)')
  group.add_argument('--data.name', dest='data_name', choices=SOURCES, default=default['name'])
  group.add_argument('--data.dir', dest='data_dir', metavar='DIR', default=default['dir'],
                     help='folder of the CIFAR archives / image folder root / tfds data_dir')
  group.add_argument(
      '--data.image_size', dest='data_image_size', metavar='PIXELS', type=int,
      default=default['image_size'],
      help='image size of digits / image_folder (the trainer default, '
      '%(default)s); 0 = image_folder images as stored')
  group.add_argument('--data.val_size', dest='data_val_size', metavar='N', type=int,
                     default=default['val_size'],
                     help='hold out this many train examples as the val split')
  group.add_argument('--data.val_seed', dest='data_val_seed', metavar='SEED', type=int,
                     default=default['val_seed'])
  group.add_argument('--data.val_split_method', dest='data_val_split_method',
                     choices=VAL_SPLIT_METHODS, default=default['val_split_method'],
                     help='how the val examples are drawn: numpy, or torch (random_split)')
  group.add_argument('--data.tfds_name', dest='data_tfds_name', metavar='NAME',
                     default=default['tfds_name'])
  group.add_argument('--data.download', dest='data_download', action='store_true',
                     help='download CIFAR if it is not in --data.dir')
  group.add_argument('--split', default='train', help='train | val | test (image_folder: any)')


def data_config_from_args(args: argparse.Namespace) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({k: getattr(args, f'data_{k}') for k in DATA_FIELDS})


def data_config_dict(data_config) -> dict:
  """The text-teacher fields of a (possibly larger) data config, as plain JSON-able values."""
  out = {}
  for key, (kind, default) in DATA_FIELDS.items():
    value = data_config[key]
    out[key] = default if value is None else kind(value)
  return out


def data_flags(data_config, split: str) -> list[str]:
  """Command-line flags that rebuild the same source (non-default fields only)."""
  cfg = data_config_dict(data_config)
  flags = ['--data.name', cfg['name']]
  for key, (_, default) in DATA_FIELDS.items():
    if key == 'name' or cfg[key] == default:
      continue
    value = os.path.abspath(cfg[key]) if key == 'dir' else str(cfg[key])
    flags += [f'--data.{key}'] if key == 'download' else [f'--data.{key}', value]
  return flags + ['--split', split]


def command(subcommand: str, data_config, split: str, *rest: str) -> str:
  return shlex.join(
      ['python', '-m', 'tikd_jax.text_teacher', subcommand, *data_flags(data_config, split), *rest])


def load_source(data_config, split: str):
  try:
    return build_source(data_config, split)
  except DataError as e:  # the data modules name the trainer's flags; say this command's
    raise type(e)(as_data_flags(str(e))) from e


def as_data_flags(message: str) -> str:
  """A data error's advice in this command's flags (`--data.dir`, not `--config.data.dir`)."""
  return message.replace('--config.data.download=True',
                         '--data.download').replace('--config.data.', '--data.')


def describe(source) -> dict:
  return {
      'name': source.name, 'split': source.split, 'fingerprint': source.fingerprint(),
      'num_examples': len(source)
  }


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
