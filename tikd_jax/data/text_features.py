"""Per-example caption features from the text teacher, checked against the split they serve.

`python -m tikd_jax.text_teacher` writes one folder per split (README "The text teacher"):

  captions.jsonl     {"index": i, "caption": "..."} per line, in example-index order
  caption_meta.json  how the captions were made (captioner or class-prompt template, data set)
  features.npy       [N, D] float16 or float32; row i is the feature of example i's caption
  meta.json          encoder, encoder_kind, dim, dtype, normalized, num_examples,
                     dataset {name, split, fingerprint}, features_sha256, the commands that made it

`load_text_features` refuses features that do not belong to the split (row count, data-set
fingerprint), that disagree with their metadata (dim, dtype) or whose file is truncated or corrupt,
and says which command regenerates them. NumPy only: the trainer never imports torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex

import numpy as np

from tikd_jax.data.errors import DataError

CAPTIONS_FILE = 'captions.jsonl'
CAPTION_META_FILE = 'caption_meta.json'
FEATURES_FILE = 'features.npy'
META_FILE = 'meta.json'
FORMAT_VERSION = 1
CLI = 'python -m tikd_jax.text_teacher'


class TextFeaturesError(DataError):
  """Text features that cannot serve the split they were asked for."""


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def read_meta(features_dir: str) -> dict:
  """meta.json of a features folder, or a TextFeaturesError saying how to make one."""
  path = os.path.join(features_dir, META_FILE)
  if not os.path.isfile(path):
    raise TextFeaturesError(
        f'no text features in {features_dir!r}: {META_FILE} is missing (found: '
        f'{_listing(features_dir)}). Make them with `{CLI} prompts ... --out {features_dir} '
        f'--encode --encoder PATH` (class prompts) or `{CLI} caption` then `{CLI} encode` '
        f'(VLM captions); see `{CLI} --help`.')
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise TextFeaturesError(f'{path} is not valid JSON ({e}); regenerate the features with '
                            f'`{CLI} encode ... --out {features_dir}`') from e
  missing = [k for k in ('dim', 'dtype', 'num_examples', 'dataset') if k not in meta]
  if missing:
    raise TextFeaturesError(f'{path} lacks the keys {missing}; it was not written by '
                            f'`{CLI} encode` (format {FORMAT_VERSION}): regenerate the features')
  return meta


def text_dim(features_dir: str) -> int:
  """Width D of the text features in `features_dir` (reads meta.json only)."""
  return int(read_meta(features_dir)['dim'])


def _listing(folder: str) -> str:
  if not os.path.isdir(folder):
    return 'the folder does not exist'
  names = sorted(os.listdir(folder))
  return ', '.join(names[:8]) + (' …' if len(names) > 8 else '') if names else 'nothing'


def _data_flags(source) -> str:
  """Best-effort data flags that describe `source` on the command line."""
  kind = type(source).__name__
  if kind == 'ImageFolderSource':
    root = os.path.dirname(os.path.dirname(os.path.dirname(source.files[0])))
    flags = ['--data.name', 'image_folder', '--data.dir', root]
  elif kind == 'TfdsSource':
    flags = ['--data.name', 'tfds', '--data.tfds_name', source.name]
  else:
    flags = ['--data.name', source.name]
    if source.name.startswith('cifar'):
      flags += ['--data.dir', 'DIR']
  return shlex.join(flags + ['--split', source.split])


def _regenerate(meta: dict | None, features_dir: str, source, what: str) -> str:
  """The commands that regenerate `what` ('captions' → captions and features, or 'features')."""
  commands = (meta or {}).get('commands') or {}
  if what == 'features' and commands.get('features'):
    return f're-run `{commands["features"]}`'
  if commands.get('captions') and commands.get('features'):
    caption_cmd = commands['captions']
    feature_cmd = commands['features']
    if caption_cmd == feature_cmd:  # class prompts with --encode: one command makes both
      return (f'regenerate captions and features for this split, with the data flags of the '
              f'split you train on: `{caption_cmd}`')
    return (f'regenerate captions and features for this split, with the data flags of the split '
            f'you train on: `{caption_cmd}` then `{feature_cmd}`')
  flags = _data_flags(source)
  return (f'regenerate them: `{CLI} prompts {flags} --out {features_dir} --encode --encoder PATH` '
          f'or `{CLI} caption {flags} --out {features_dir} --model PATH` then '
          f'`{CLI} encode {flags} --out {features_dir} --encoder PATH`')


def load_text_features(features_dir: str, source, *, verify_checksum: bool = True) -> np.ndarray:
  """The [N, D] float32 caption features of `source` (row i ↔ example index i), validated.

  Checks, in order: meta.json exists and parses; the data set name/split, number of examples and
  `source.fingerprint()` match; features.npy exists, is complete, has shape [N, dim] and the
  dtype meta.json records; its sha256 matches (`verify_checksum`); every value is finite.
  Every failure raises TextFeaturesError with expected vs found and the command to regenerate.
  """
  meta = read_meta(features_dir)
  n = len(source)
  found_ds = meta.get('dataset') or {}
  where = f'text features in {features_dir!r}'
  split_desc = f'the {source.split} split of {source.name}'
  if int(meta['num_examples']) != n:
    raise TextFeaturesError(
        f'{where} have {int(meta["num_examples"]):,} rows (made for '
        f'{found_ds.get("name")}/{found_ds.get("split")}) but {split_desc} has {n:,} examples; ' +
        _regenerate(meta, features_dir, source, 'captions'))
  fingerprint = source.fingerprint()
  if found_ds.get('fingerprint') != fingerprint:
    raise TextFeaturesError(
        f'{where} were made for data set {found_ds.get("name")}/{found_ds.get("split")} with '
        f'fingerprint {found_ds.get("fingerprint")} but {split_desc} has fingerprint '
        f'{fingerprint}: the captions describe other images (another data set, split, '
        f'val_size/val_seed, image size or file list); ' +
        _regenerate(meta, features_dir, source, 'captions'))
  path = os.path.join(features_dir, meta.get('features_file', FEATURES_FILE))
  fix = _regenerate(meta, features_dir, source, 'features')
  if not os.path.isfile(path):
    raise TextFeaturesError(f'{path} is missing although {META_FILE} describes it; {fix}')
  dim, dtype = int(meta['dim']), np.dtype(meta['dtype'])
  expected_bytes = n * dim * dtype.itemsize
  try:
    with open(path, 'rb') as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0
                     if version == (1, 0) else np.lib.format.read_array_header_2_0)
      shape, _, file_dtype = read_header(f)
      data_bytes = os.fstat(f.fileno()).st_size - f.tell()
  except (ValueError, OSError, EOFError) as e:
    raise TextFeaturesError(f'{path} is not a readable .npy file ({e}); {fix}') from e
  if tuple(shape) != (n, dim) or file_dtype != dtype:
    raise TextFeaturesError(
        f'{path} holds {file_dtype} {list(shape)} but {META_FILE} promises {dtype} [{n}, {dim}]; '
        f'the folder is inconsistent: {fix}')
  if data_bytes != expected_bytes:
    raise TextFeaturesError(
        f'{path} is truncated or corrupt: {data_bytes:,} bytes of data, expected '
        f'{expected_bytes:,} for {dtype} [{n}, {dim}]; {fix}')
  if verify_checksum and meta.get('features_sha256'):
    digest = file_sha256(path)
    if digest != meta['features_sha256']:
      raise TextFeaturesError(
          f'{path} is corrupt: sha256 {digest[:16]}… differs from {meta["features_sha256"][:16]}… '
          f'recorded in {META_FILE}; {fix}')
  features = np.load(path)
  if not np.all(np.isfinite(features)):
    bad = int(np.count_nonzero(~np.isfinite(features).all(axis=1)))
    raise TextFeaturesError(f'{path} has {bad:,} rows with NaN or inf values; {fix}')
  return np.asarray(features, np.float32)


__all__ = [
    'CAPTIONS_FILE', 'CAPTION_META_FILE', 'FEATURES_FILE', 'META_FILE', 'TextFeaturesError',
    'file_sha256', 'load_text_features', 'read_meta', 'text_dim'
]
