"""`encode`: captions.jsonl → features.npy [N, D] in example-index order + meta.json."""
from __future__ import annotations

import logging
import os

import numpy as np

from tikd_jax.data.text_features import (CAPTION_META_FILE, CAPTIONS_FILE, FEATURES_FILE,
                                         FORMAT_VERSION, META_FILE, file_sha256)
from tikd_jax.text_teacher import data, files
from tikd_jax.text_teacher.files import TextTeacherError
from tikd_jax.text_teacher.progress import Progress

log = logging.getLogger('tikd_jax.text_teacher')

DTYPES = ('float32', 'float16')


def encode_command(data_config, split: str, out_dir: str, encoder: str, encoder_kind: str,
                   normalize: bool, dtype: str, captions: str | None = None) -> str:
  rest = [
      '--out',
      os.path.abspath(out_dir), '--encoder', encoder, '--encoder_kind', encoder_kind, '--dtype',
      dtype
  ]
  rest += ['--normalize'] if normalize else []
  rest += ['--captions', os.path.abspath(captions)] if captions else []
  return data.command('encode', data_config, split, *rest)


def encode_folder(out_dir: str, source, encoder, *, data_config, normalize: bool = False,
                  dtype: str = 'float32', batch_size: int = 256, captions_path: str | None = None,
                  command: str | None = None, progress_interval: float = 30.0) -> dict:
  """Encodes the captions of `source` in `out_dir` with `encoder` (a loaded TextEncoder).

  The captions must cover exactly the examples of `source` (and, when caption_meta.json exists,
  have been made for the same data-set fingerprint). Writes features.npy, then meta.json, each
  atomically. Returns the metadata.
  """
  if dtype not in DTYPES:
    raise ValueError(f'--dtype must be one of {DTYPES}, got {dtype!r}')
  from tikd_jax.text_teacher.encoders import encode_texts  # pylint: disable=g-import-not-at-top
  dataset = data.describe(source)
  captions_path = captions_path or os.path.join(out_dir, CAPTIONS_FILE)
  caption_meta_path = os.path.join(os.path.dirname(captions_path) or '.', CAPTION_META_FILE)
  caption_meta = files.read_json(caption_meta_path) if os.path.isfile(caption_meta_path) else {}
  made_for = caption_meta.get('dataset') or {}
  if made_for and made_for.get('fingerprint') != dataset['fingerprint']:
    raise TextTeacherError(
        f'{captions_path} was made for {made_for.get("name")}/{made_for.get("split")} '
        f'(fingerprint {made_for.get("fingerprint")}, {made_for.get("num_examples")} examples) but '
        f'the data flags describe {dataset["name"]}/{dataset["split"]} (fingerprint '
        f'{dataset["fingerprint"]}, {dataset["num_examples"]} examples): pass the same --data.* '
        f'and --split as the caption run')
  captions = files.read_captions(captions_path, len(source))
  with Progress(len(captions), 'encode', 'captions', interval=progress_interval) as progress:
    features, stats = encode_texts(encoder, captions, batch_size=batch_size, normalize=normalize,
                                   progress=progress)
  features = features.astype(dtype)
  if not np.all(np.isfinite(features)):
    raise TextTeacherError(f'{int(np.sum(~np.isfinite(features)))} feature values are not finite '
                           f'in {dtype} (overflow?): use --dtype float32 or --normalize')
  os.makedirs(out_dir, exist_ok=True)
  features_path = os.path.join(out_dir, FEATURES_FILE)
  files.save_npy(features_path, features)
  if command is None:
    command = encode_command(
        data_config, source.split, out_dir, encoder.name, encoder.kind, normalize, dtype,
        None if captions_path == os.path.join(out_dir, CAPTIONS_FILE) else captions_path)
  meta = {
      'format': FORMAT_VERSION,
      'encoder': encoder.name,
      'encoder_kind': encoder.kind,
      'dim': int(features.shape[1]),
      'dtype': dtype,
      'normalized': bool(normalize),
      'num_examples': len(source),
      'dataset': {k: dataset[k] for k in ('name', 'split', 'fingerprint')},
      'data_config': data.data_config_dict(data_config),
      'captioner': caption_meta.get('captioner'),
      'captioner_kind': caption_meta.get('captioner_kind'),
      'prompt': caption_meta.get('prompt'),
      'template': caption_meta.get('template'),
      **stats,
      'captions_file': os.path.relpath(captions_path, out_dir),
      'captions_sha256': file_sha256(captions_path),
      'features_file': FEATURES_FILE,
      'features_sha256': file_sha256(features_path),
      'commands': {'captions': caption_meta.get('command'), 'features': command},
      'created': data.now(),
  }
  files.write_json(os.path.join(out_dir, META_FILE), meta)
  log.info('wrote %s: %s [%d, %d] (%s, %.1f MB) from %s captions with %s (%s)', features_path,
           dtype, features.shape[0], features.shape[1],
           'L2-normalized' if normalize else 'unnormalized',
           os.path.getsize(features_path) / 1e6, f'{len(captions):,}', encoder.name, encoder.kind)
  return meta
