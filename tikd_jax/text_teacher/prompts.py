"""`prompts`: the fallback without a VLM: each example's caption is a template of its class name."""
from __future__ import annotations

import logging
import os

import numpy as np

from tikd_jax.data.text_features import (CAPTION_META_FILE, CAPTIONS_FILE, META_FILE,
                                         TextFeaturesError, load_text_features)
from tikd_jax.text_teacher import data, files
from tikd_jax.text_teacher.caption import check_or_write_caption_meta

log = logging.getLogger('tikd_jax.text_teacher')

DEFAULT_TEMPLATE = 'a photo of a {name}.'


def class_prompt(template: str, class_name: str) -> str:
  """'a photo of a {name}.' + 'aquarium_fish' → 'a photo of a aquarium fish.'"""
  return template.format(name=str(class_name).replace('_', ' '))


def labels_of(source) -> np.ndarray:
  labels = getattr(source, 'labels', None)
  if labels is not None and len(labels) == len(source):
    return np.asarray(labels, np.int64)
  return np.asarray([int(source[i]['label']) for i in range(len(source))], np.int64)


def class_prompt_captions(source, template: str = DEFAULT_TEMPLATE) -> list[str]:
  if '{name}' not in template:
    raise ValueError(f'the template must contain {{name}}, got {template!r}')
  per_class = [class_prompt(template, c) for c in source.class_names]
  return [per_class[y] for y in labels_of(source)]


def prompts_command(data_config, split: str, out_dir: str, template: str,
                    encode_flags: list[str] | None = None) -> str:
  rest = ['--out', os.path.abspath(out_dir), '--template', template]
  if encode_flags is not None:
    rest += ['--encode', *encode_flags]
  return data.command('prompts', data_config, split, *rest)


def write_class_prompts(source, out_dir: str, *, data_config, template: str = DEFAULT_TEMPLATE,
                        overwrite: bool = False, command: str | None = None) -> str:
  """captions.jsonl with one class prompt per example, and its caption_meta.json."""
  dataset = data.describe(source)
  command = command or prompts_command(data_config, source.split, out_dir, template)
  caption_meta = {
      'captioner': 'class_prompts', 'captioner_kind': 'class_prompts', 'prompt': None,
      'template': template, 'max_new_tokens': None, 'sampling': None, 'num_beams': None,
      'image_size': None, 'dataset': dataset, 'data_config': data.data_config_dict(data_config),
      'command': command, 'created': data.now()
  }
  os.makedirs(out_dir, exist_ok=True)
  check_or_write_caption_meta(out_dir, caption_meta, overwrite=overwrite)
  path = os.path.join(out_dir, CAPTIONS_FILE)
  files.write_captions(path, class_prompt_captions(source, template))
  log.info('wrote %s: %s class prompts (%d classes, template %r)', path, f'{len(source):,}',
           len(source.class_names), template)
  return path


def _cached(out_dir: str, source, *, encoder: str, encoder_kind: str, template: str,
            normalize: bool, dtype: str) -> bool:
  meta_path = os.path.join(out_dir, META_FILE)
  if not os.path.isfile(meta_path):
    return False
  meta = files.read_json(meta_path)
  from tikd_jax.text_teacher.encoders import encoder_name  # pylint: disable=g-import-not-at-top
  wanted = {
      'captioner': 'class_prompts', 'template': template, 'encoder': encoder_name(encoder),
      'encoder_kind': encoder_kind, 'normalized': normalize, 'dtype': dtype
  }
  if any(meta.get(k) != v for k, v in wanted.items()):
    return False
  try:
    load_text_features(out_dir, source)
  except TextFeaturesError:
    return False
  return True


def build_class_prompt_features(data_config, split: str, out_dir: str, encoder_path: str,
                                template: str = DEFAULT_TEMPLATE, *, encoder_kind: str = 'auto',
                                normalize: bool = True, dtype: str = 'float32',
                                batch_size: int = 256, device: str = 'cpu', source=None) -> str:
  """Class-prompt captions + their features for `split`, in-process; returns `out_dir`.

  Does nothing when `out_dir` already holds valid features with the same data set, template,
  encoder, kind, normalization and dtype. Pass `source` to skip rebuilding it. Then:
  `load_text_features(out_dir, source)`.
  """
  from tikd_jax.text_teacher import encoders  # pylint: disable=g-import-not-at-top
  from tikd_jax.text_teacher.encode import encode_folder  # pylint: disable=g-import-not-at-top
  source = source if source is not None else data.load_source(data_config, split)
  kind = encoders.resolve_kind(encoder_path, encoder_kind)
  if _cached(out_dir, source, encoder=encoder_path, encoder_kind=kind, template=template,
             normalize=normalize, dtype=dtype):
    log.info('class-prompt features in %s are up to date', out_dir)
    return out_dir
  encode_flags = [
      '--encoder',
      encoders.encoder_name(encoder_path), '--encoder_kind', kind, '--dtype', dtype
  ] + (['--normalize'] if normalize else [])
  command = prompts_command(data_config, split, out_dir, template, encode_flags)
  write_class_prompts(source, out_dir, data_config=data_config, template=template,
                      overwrite=only_class_prompts(out_dir), command=command)
  encoder = encoders.TextEncoder(encoder_path, kind, device)
  encode_folder(out_dir, source, encoder, data_config=data_config, normalize=normalize, dtype=dtype,
                batch_size=batch_size, command=command)
  return out_dir


def only_class_prompts(out_dir: str) -> bool:
  """Class-prompt captions are cheap to remake; VLM captions are not and are never overwritten."""
  path = os.path.join(out_dir, CAPTION_META_FILE)
  return not os.path.isfile(path) or files.read_json(path).get('captioner') == 'class_prompts'
