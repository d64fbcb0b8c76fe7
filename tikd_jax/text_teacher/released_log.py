"""`import-log`: a released TIKD description log → captions.jsonl, aligned by example index.

The released repository ships its captions as the console log of its captioning run
(`description/model_train_descriptions_*.txt`), read by `extract_descriptions` in its
`text_encoder.py`: every line is stripped; the text after "Model response:" is added to the
description being collected (several in one block are joined by a space); a line that starts with
"Batch" closes that description; any other line is skipped; an empty description is dropped.
Description k, in file order, is the caption of example k. Two layouts give one description per
image under that parser, and both are read here:

  Batch 1 ...                              Batch 1 ... Model response: A cat on a sofa.
  Model response: A cat on a sofa.         Batch 2 ... Model response: A red truck.
  Batch 2 ...
  Model response: A red truck.

Wherever the released parser would give a list of descriptions, `parse_released_log` gives the
same list, except where that list is wrong for the images: it stops, naming the line, where the
released parser would silently move every later caption onto another image (a "Batch" block with
no response, an empty response, a response before the first "Batch" line) or merge two images'
captions (a layout change mid-file). Lines that are neither kind (a response that spans several
lines, or other console output) are an error by default; `other_lines='ignore'` skips them as the
released parser does, `'join'` adds them to the response above.
"""
from __future__ import annotations

import logging
import os

from tikd_jax.data.text_features import (CAPTION_META_FILE, CAPTIONS_FILE, FEATURES_FILE, META_FILE,
                                         file_sha256)
from tikd_jax.text_teacher import data, files
from tikd_jax.text_teacher.caption import check_or_write_caption_meta
from tikd_jax.text_teacher.files import TextTeacherError

log = logging.getLogger('tikd_jax.text_teacher')

RESPONSE_MARK = 'Model response:'
BATCH_PREFIX = 'Batch'
OTHER_LINES = ('error', 'ignore', 'join')
CAPTIONER = 'released_log'


def _clip(line: str, n: int = 80) -> str:
  return repr(line if len(line) <= n else line[:n] + '…')


def parse_released_log(path: str, other_lines: str = 'error') -> list[tuple[int, str]]:
  """(first line number, description) per image of a released description log, in file order.

  Raises TextTeacherError naming the line and what was expected there (module docstring).
  """
  if other_lines not in OTHER_LINES:
    raise ValueError(f'other_lines must be one of {OTHER_LINES}, got {other_lines!r}')
  if not os.path.isfile(path):
    raise TextTeacherError(f'{path} does not exist: pass the released description log, e.g. '
                           f'TIKD/description/model_train_descriptions_cifar10.txt')
  descriptions: list[tuple[int, str]] = []
  block_line, block_parts, block_inline = 0, None, False  # the open "Batch" block, if any

  def close(at: str) -> None:
    if block_parts is None:
      return
    if not block_parts:
      raise TextTeacherError(
          f'{path}:{block_line}: this "{BATCH_PREFIX} …" line has no "{RESPONSE_MARK} …" line '
          f'before {at}: the image of that block has no description, and dropping it (as the '
          f'released parser does) would give every later image the caption of the next one. '
          f'Restore the missing response, or delete the block and the image it stands for')
    descriptions.append((block_line, ' '.join(block_parts)))

  with open(path, encoding='utf-8') as f:
    try:
      for lineno, raw in enumerate(f, 1):
        line = raw.strip()
        marks = line.count(RESPONSE_MARK)
        if marks > 1:
          raise TextTeacherError(
              f'{path}:{lineno}: "{RESPONSE_MARK}" appears {marks} times in {_clip(line)}; '
              f'expected one response per line. Split the line, or remove the extra marker')
        text = line.split(RESPONSE_MARK, 1)[1].strip() if marks else None
        if text == '':
          raise TextTeacherError(
              f'{path}:{lineno}: "{RESPONSE_MARK}" is followed by no text; expected the image\'s '
              f'description. Re-caption that image or write its description on this line')
        if line.startswith(BATCH_PREFIX):
          if text is not None and block_parts and not block_inline:
            raise TextTeacherError(
                f'{path}:{lineno}: this "{BATCH_PREFIX} …" line carries its own response, but the '
                f'block of line {block_line} (response on its own line) is still open: the '
                f'released parser would merge the two captions. Use one layout for the whole log')
          close(f'the next "{BATCH_PREFIX} …" line (line {lineno})')
          block_line, block_inline = lineno, text is not None
          block_parts = [] if text is None else [text]
        elif text is not None:
          if block_parts is None or block_inline:
            where = ('before the first "Batch …" line' if block_parts is None else
                     f'after line {block_line}, whose "{BATCH_PREFIX} …" line carries its own '
                     f'response')
            raise TextTeacherError(
                f'{path}:{lineno}: a "{RESPONSE_MARK} …" line {where}; expected a '
                f'"{BATCH_PREFIX} …" line first (the released parser would add this text to '
                f'the next image\'s caption). Check that the log is complete from its start')
          block_parts.append(text)
        elif line:
          if other_lines == 'ignore':
            continue
          if other_lines == 'join' and block_parts:
            block_parts.append(line)
            continue
          expected = (f'a "{BATCH_PREFIX} …" line or a "{RESPONSE_MARK} …" line'
                      if other_lines == 'error' else
                      f'a "{RESPONSE_MARK} …" line before text joined to a response')
          raise TextTeacherError(
              f'{path}:{lineno}: {_clip(line)} is neither kind of line; expected {expected}. If it '
              f'continues the response above, pass --other_lines join to keep it in the caption; '
              f'--other_lines ignore drops every such line, as the released extract_descriptions '
              f'does')
    except UnicodeDecodeError as e:
      raise TextTeacherError(f'{path} is not UTF-8 text ({e}): pass the description log itself, '
                             f'uncompressed') from e
  close('the end of the file (the log may be cut short)')
  return descriptions


def import_released_log(source, log_path: str, out_dir: str, *, data_config,
                        other_lines: str = 'error', overwrite: bool = False) -> str:
  """Writes out_dir/captions.jsonl (line i = description i of the log = example i of `source`) and
  caption_meta.json; returns the captions path. Refuses a log whose count differs from the split's.

  Features encoded from other captions (meta.json, features.npy) are removed: run `encode` next.
  """
  descriptions = parse_released_log(log_path, other_lines)
  n = len(source)
  if len(descriptions) != n:
    last = f'; the last one starts at line {descriptions[-1][0]}' if descriptions else ''
    why = ('it describes a larger split or another data set' if len(descriptions) > n else
           'the log is cut short, or it describes another split or data set')
    raise TextTeacherError(
        f'{log_path} holds {len(descriptions):,} descriptions{last}, but {source.name}/'
        f'{source.split} has {n:,} examples: {why}. Description k is the caption of example k, '
        f'so the counts must be equal: pass the --data.* and --split of the split the log was '
        f'made for (the released logs cover a whole train split: --data.val_size 0)')
  meta_path = os.path.join(out_dir, CAPTION_META_FILE)
  if not overwrite and os.path.isfile(meta_path):
    made_by = files.read_json(meta_path).get('captioner')
    if made_by != CAPTIONER:
      raise TextTeacherError(
          f'{out_dir} already holds captions made by {made_by!r}; importing would replace them. '
          f'Use another --out, or pass --overwrite')
  log_abs = os.path.abspath(log_path)
  out_abs = os.path.abspath(out_dir)
  caption_meta = {
      'captioner':
          CAPTIONER, 'captioner_kind':
              CAPTIONER, 'prompt':
                  None, 'template':
                      None, 'max_new_tokens':
                          None, 'sampling':
                              None, 'num_beams':
                                  None, 'image_size':
                                      None, 'dataset':
                                          data.describe(source), 'data_config':
                                              data.data_config_dict(data_config),
      'log': {'path': log_abs, 'sha256': file_sha256(log_path),
              'other_lines': other_lines}, 'command':
                  data.command('import-log', data_config, source.split, '--log', log_abs, '--out',
                               out_abs, '--other_lines', other_lines), 'created':
                                   data.now()
  }
  os.makedirs(out_dir, exist_ok=True)
  check_or_write_caption_meta(out_dir, caption_meta, overwrite=True)
  path = os.path.join(out_dir, CAPTIONS_FILE)
  files.write_captions(path, [text for _, text in descriptions])
  _drop_stale_features(out_dir, file_sha256(path))
  log.info('wrote %s: %s captions from %s', path, f'{n:,}', log_path)
  return path


def _drop_stale_features(out_dir: str, captions_sha256: str) -> None:
  meta_path = os.path.join(out_dir, META_FILE)
  features_path = os.path.join(out_dir, FEATURES_FILE)
  if not os.path.isfile(meta_path) and not os.path.isfile(features_path):
    return
  if (os.path.isfile(meta_path)
      and files.read_json(meta_path).get('captions_sha256') == captions_sha256):
    return
  for p in (meta_path, features_path):
    if os.path.isfile(p):
      os.remove(p)
  log.info('removed the features of other captions from %s: run `encode` on it', out_dir)
