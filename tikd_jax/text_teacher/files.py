"""Files of a text-teacher folder: atomic writes, caption shards that survive a kill, the merge.

Captioning appends JSON lines `{"index": i, "caption": "..."}` to one shard file per process
(`captions.shard-00000-of-00002.jsonl`). A kill can leave only the last line torn; reading drops
it (and the owner truncates it away before appending), so a restart redoes exactly the examples
whose line never completed. `merge_captions` writes `captions.jsonl` in index order once every
index is present.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile

import numpy as np

from tikd_jax.data.text_features import CAPTIONS_FILE

SHARD_GLOB = 'captions.shard-*.jsonl'


class TextTeacherError(RuntimeError):
  """A problem the user fixes (wrong folder, missing captions, mismatched data set)."""


# ------------------------------------------------------------------------------------------------
# Atomic writes: a temp file in the same folder, fsync, os.replace.
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_open(path: str, mode: str = 'w'):
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_json(path: str, obj) -> None:
  with atomic_open(path) as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write('\n')


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def save_npy(path: str, array: np.ndarray) -> None:
  with atomic_open(path, 'wb') as f:
    np.save(f, np.ascontiguousarray(array))


def caption_line(index: int, caption: str) -> str:
  return json.dumps({'index': int(index), 'caption': caption}, ensure_ascii=False) + '\n'


def write_captions(path: str, captions: list[str]) -> None:
  """captions.jsonl: line i holds example i."""
  with atomic_open(path) as f:
    for i, c in enumerate(captions):
      f.write(caption_line(i, c))


# ------------------------------------------------------------------------------------------------
# Shards.
# ------------------------------------------------------------------------------------------------
def shard_path(out_dir: str, shard_index: int, num_shards: int) -> str:
  return os.path.join(out_dir, f'captions.shard-{shard_index:05d}-of-{num_shards:05d}.jsonl')


def shard_indices(num_examples: int, shard_index: int, num_shards: int) -> np.ndarray:
  """The contiguous block of example indices that shard `shard_index` of `num_shards` captions."""
  if not 0 <= shard_index < num_shards:
    raise TextTeacherError(f'--shard_index must be in [0, {num_shards}), got {shard_index}')
  return np.array_split(np.arange(num_examples), num_shards)[shard_index]


def read_caption_lines(path: str, repair: bool = False) -> dict[int, str]:
  """index → caption of a JSON-lines file whose last line may be torn.

  A last line without its newline is a write cut short by a kill: it is dropped, and with `repair`
  (only the file's owner may do this) cut off the file. A complete line that does not parse is
  corruption and raises.
  """
  with open(path, 'rb') as f:
    data = f.read()
  captions, good_end, pos = {}, 0, 0
  while pos < len(data):
    end = data.find(b'\n', pos)
    if end == -1:  # torn
      break
    line = data[pos:end]
    try:
      record = json.loads(line)
      index, caption = int(record['index']), record['caption']
      if not isinstance(caption, str):
        raise ValueError('caption is not a string')
    except (ValueError, KeyError, TypeError) as e:
      lineno = data.count(b'\n', 0, pos) + 1
      raise TextTeacherError(f'{path}:{lineno} is not a caption line ({e}): {line[:80]!r}; '
                             f'the file is corrupt: delete it to redo its captions') from e
    captions[index] = caption
    pos = good_end = end + 1
  if repair and good_end < len(data):
    with open(path, 'r+b') as f:
      f.truncate(good_end)
  return captions


def read_all_shards(out_dir: str) -> dict[int, str]:
  """The union of every shard file in `out_dir` (first caption wins for a duplicate index)."""
  captions = {}
  for path in sorted(glob.glob(os.path.join(out_dir, SHARD_GLOB))):
    for index, caption in read_caption_lines(path).items():
      captions.setdefault(index, caption)
  return captions


def missing_message(missing: np.ndarray, num_examples: int) -> str:
  first = ', '.join(str(int(i)) for i in missing[:8])
  return (f'captions for {len(missing):,} of {num_examples:,} examples are missing '
          f'(first: {first}{", …" if len(missing) > 8 else ""})')


def merge_captions(out_dir: str, num_examples: int) -> str:
  """Writes captions.jsonl in index order from the shard files; refuses when indices are missing."""
  captions = read_all_shards(out_dir)
  missing = np.setdiff1d(np.arange(num_examples), np.fromiter(captions, np.int64, len(captions)))
  if len(missing):
    raise TextTeacherError(
        f'cannot merge {out_dir}: {missing_message(missing, num_examples)}. Run (or finish) '
        f'`caption` for every --shard_index, then merge again.')
  extra = [i for i in captions if not 0 <= i < num_examples]
  if extra:
    raise TextTeacherError(f'{out_dir} holds captions for indices outside [0, {num_examples}) '
                           f'(e.g. {sorted(extra)[:5]}): they belong to another data set')
  path = os.path.join(out_dir, CAPTIONS_FILE)
  write_captions(path, [captions[i] for i in range(num_examples)])
  return path


def read_captions(path: str, num_examples: int | None = None) -> list[str]:
  """captions.jsonl → captions in index order; every index 0..N-1 exactly once."""
  if not os.path.isfile(path):
    raise TextTeacherError(f'{path} does not exist: run `caption` (or `merge`) or `prompts` first')
  with open(path, 'rb') as f:
    size = f.seek(0, os.SEEK_END)
    if size:
      f.seek(size - 1)
      if f.read(1) != b'\n':
        raise TextTeacherError(f'{path} ends without a newline: it is truncated; re-run `merge`')
  captions = read_caption_lines(path)
  n = len(captions) if num_examples is None else num_examples
  missing = np.setdiff1d(np.arange(n), np.fromiter(captions, np.int64, len(captions)))
  if len(missing) or len(captions) != n:
    raise TextTeacherError(
        f'{path} has {len(captions):,} captions but the split has {n:,} examples' +
        (f'; {missing_message(missing, n)}' if len(missing) else '') +
        ': the captions belong to another split or are incomplete')
  return [captions[i] for i in range(n)]
