"""`caption`: one description per image of a split, resumable and shardable.

Shard k of K captions the k-th contiguous block of example indices and appends its lines to its
own shard file after every batch (flush + fsync). A restart skips every index already present in
any shard file of the folder; a torn last line (killed mid-write) is cut off and redone. When the
last shard finishes, captions.jsonl is written in index order (`merge` does the same by hand).
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import numpy as np

from tikd_jax.data.text_features import CAPTION_META_FILE
from tikd_jax.text_teacher import files
from tikd_jax.text_teacher.files import TextTeacherError
from tikd_jax.text_teacher.progress import Progress

log = logging.getLogger('tikd_jax.text_teacher')

# Keys of caption_meta.json that must agree for a restart (or another shard) to add captions.
IDENTITY_KEYS = ('captioner', 'captioner_kind', 'prompt', 'template', 'max_new_tokens', 'sampling',
                 'num_beams', 'image_size', 'dataset')


def check_or_write_caption_meta(out_dir: str, caption_meta: dict, overwrite: bool = False) -> None:
  """Refuses to mix captions made another way (or for another data set) in one folder."""
  path = os.path.join(out_dir, CAPTION_META_FILE)
  if os.path.isfile(path) and not overwrite:
    old = files.read_json(path)
    diff = [k for k in IDENTITY_KEYS if old.get(k) != caption_meta.get(k)]
    if diff:
      details = '; '.join(
          f'{k}: folder has {old.get(k)!r}, this run {caption_meta.get(k)!r}' for k in diff)
      raise TextTeacherError(
          f'{out_dir} already holds captions made differently ({details}). Use another --out, '
          f'or delete {out_dir}/captions* and {CAPTION_META_FILE} to start over.')
    return
  files.write_json(path, caption_meta)


def to_pil(image: np.ndarray, size: int = 0):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pil = Image.fromarray(np.asarray(image, np.uint8))
  if size and pil.size != (size, size):
    pil = pil.resize((size, size), Image.BICUBIC)
  return pil


def caption_split(source, out_dir: str, load_captioner: Callable[[], Callable], *, prompt: str,
                  caption_meta: dict, batch_size: int = 8, num_shards: int = 1,
                  shard_index: int = 0, limit: int = 0, image_size: int = 0,
                  seed: int | None = None, progress_interval: float = 30.0) -> dict:
  """Captions this shard's missing examples; merges when the whole split is done.

  `load_captioner()` is called only if there is work, and returns `(images, prompt) -> captions`.
  `limit` > 0 stops after that many new captions (a time-boxed job; the next run continues).
  `seed` (sampling captioners) seeds torch per batch from the batch's first index.
  Returns {'captioned', 'shard_done', 'complete', 'missing'}.
  """
  n = len(source)
  os.makedirs(out_dir, exist_ok=True)
  check_or_write_caption_meta(out_dir, caption_meta)
  own = files.shard_path(out_dir, shard_index, num_shards)
  if os.path.exists(own):
    files.read_caption_lines(own, repair=True)  # cut a torn last line before appending
  done = files.read_all_shards(out_dir)
  mine = files.shard_indices(n, shard_index, num_shards)
  todo = [int(i) for i in mine if int(i) not in done]
  already = len(mine) - len(todo)
  if limit > 0:
    todo = todo[:limit]
  log.info('shard %d/%d: %s examples, %s already captioned, %s to do this run', shard_index,
           num_shards, f'{len(mine):,}', f'{already:,}', f'{len(todo):,}')
  if todo:
    captioner = load_captioner()
    progress = Progress(len(mine), f'caption shard {shard_index}/{num_shards}', 'images',
                        initial=already, interval=progress_interval)
    with open(own, 'a', encoding='utf-8') as f, progress:
      for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        images = [to_pil(source[i]['image'], image_size) for i in batch]
        if seed is not None:
          import torch  # pylint: disable=g-import-not-at-top
          torch.manual_seed(seed + batch[0])
        captions = captioner(images, prompt)
        if len(captions) != len(batch):
          raise RuntimeError(f'captioner returned {len(captions)} captions for {len(batch)} images')
        f.write(''.join(files.caption_line(i, c) for i, c in zip(batch, captions)))
        f.flush()
        os.fsync(f.fileno())
        for i, c in zip(batch, captions):
          done[i] = c
        progress.update(len(batch))
  empty = sum(1 for i in todo if not done[i])
  if empty:
    log.warning('%d captions are empty strings (the encoder sees only its special tokens)', empty)
  shard_missing = [int(i) for i in mine if int(i) not in done]
  done = files.read_all_shards(out_dir)  # other shards may have finished meanwhile
  missing = np.setdiff1d(np.arange(n), np.fromiter(done, np.int64, len(done)))
  status = {
      'captioned': len(todo), 'shard_done': not shard_missing, 'complete': not len(missing),
      'missing': int(len(missing))
  }
  if not len(missing):
    path = files.merge_captions(out_dir, n)
    log.info('all %s examples captioned: wrote %s', f'{n:,}', path)
  elif not shard_missing:
    log.info(
        'shard %d/%d is done; %s. Run `merge` (or this command again) once the other shards '
        'finish.', shard_index, num_shards, files.missing_message(missing, n))
  else:
    log.info('stopped after %s new captions (--limit); %s', f'{len(todo):,}',
             files.missing_message(missing, n))
  return status
