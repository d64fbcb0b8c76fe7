"""`root/<split>/<class>/<image>` folders (the layout of the TIKD README; Tiny ImageNet).

Every image is decoded once when the folder is opened (threads), so that a corrupt or unreadable
file is found before training: `bad_images='error'` (config.data.bad_images, the default) stops
with its path, 'skip' leaves it out with a warning and counts it in `notes`. Training decodes
lazily again (grain workers decode in parallel), converts to RGB and, when `image_size` is given,
resizes to it; otherwise every image must already have the same size. Class indices follow the
sorted class-folder names of the train split, like torchvision.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os

from absl import logging
import numpy as np

_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.ppm', '.gif', '.tif', '.tiff')
# config.data.bad_images: what a file that does not decode as an image does.
BAD_IMAGES = ('error', 'skip')
# config.data.eval_split='auto' on an image folder: the first of these sub-folders that exists.
AUTO_EVAL_SPLITS = ('val', 'test')
_SHOWN = 5  # bad or ignored files named in a note; the rest are counted


def auto_eval_split(root: str) -> str:
  """The eval split of `root` when config.data.eval_split is 'auto': val/ if it exists, else
  test/."""
  for split in AUTO_EVAL_SPLITS:
    if os.path.isdir(os.path.join(root, split)):
      return split
  looked = ' and '.join(os.path.join(root, s) for s in AUTO_EVAL_SPLITS)
  raise FileNotFoundError(f'no eval split in image folder {root!r}: looked for {looked}. Put the '
                          f'held-out images in {root}/val/<class>/*.png (the same class folders as '
                          f'train/), or name another sub-folder with '
                          f'--config.data.eval_split=<folder>')


def _decode_error(path: str) -> str | None:
  """None if `path` decodes fully as an image, else why not."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      im.convert('RGB').load()
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, … for broken files
    return f'{type(e).__name__}: {e}'
  return None


def _check_images(files: list[str], bad_images: str, split_dir: str) -> tuple[list[bool], list]:
  """(per file whether it decodes, [(path, reason)] of those that do not), by `bad_images`."""
  if bad_images not in BAD_IMAGES:
    raise ValueError(f'config.data.bad_images={bad_images!r}: use one of {BAD_IMAGES}')
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    errors = list(pool.map(_decode_error, files, chunksize=64))
  bad = [(f, e) for f, e in zip(files, errors) if e is not None]
  if bad and bad_images == 'error':
    listed = '; '.join(f'{f} ({e})' for f, e in bad[:_SHOWN])
    more = f' and {len(bad) - _SHOWN} more' if len(bad) > _SHOWN else ''
    raise ValueError(f'{len(bad)} of {len(files)} files in {split_dir} are not readable images: '
                     f'{listed}{more}. Delete or replace them, or leave them out of training with '
                     f"--config.data.bad_images=skip")
  for f, e in bad:
    logging.warning('skipping unreadable image %s (%s)', f, e)
  return [e is None for e in errors], bad


class ImageFolderSource:
  """One split of an image folder. `notes`: what a user should read about how it was opened
  (skipped images, files ignored for their extension); the trainer prints them."""

  def __init__(self, root: str, split: str, image_size: int | None = None,
               bad_images: str = 'error'):
    split_dir = os.path.join(root, split)
    train_dir = os.path.join(root, 'train')
    for d in (split_dir, train_dir):
      if not os.path.isdir(d):
        raise FileNotFoundError(f'image folder {d!r} does not exist; expected the layout '
                                f'{root}/train/<class>/*.png and {root}/val/<class>/*.png')
    self.class_names = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not self.class_names:
      raise ValueError(f'{train_dir} has no class folders')
    files, labels, ignored = self._list(split_dir)
    if not files:
      raise ValueError(f'{split_dir} holds no images with extensions {_EXTENSIONS}')
    readable, bad = _check_images(files, bad_images, split_dir)
    if not any(readable):
      raise ValueError(f'none of the {len(files)} images in {split_dir} is readable (first: '
                       f'{bad[0][0]}: {bad[0][1]})')
    self.files = [f for f, ok in zip(files, readable) if ok]
    self.labels = np.asarray([y for y, ok in zip(labels, readable) if ok], np.int32)
    self.skipped = [f for f, _ in bad]
    self.notes = _notes(split_dir, len(files), self.skipped, ignored)
    self.image_size = image_size
    self.name = os.path.basename(os.path.normpath(root))
    self.split = split
    first = self._decode(0)
    self.image_shape = first.shape

  def _list(self, split_dir: str) -> tuple[list[str], list[int], list[str]]:
    """(image files, their labels, files left out for their extension) of one split."""
    known = {c: i for i, c in enumerate(self.class_names)}
    files, labels, ignored = [], [], []
    for cls in sorted(e.name for e in os.scandir(split_dir) if e.is_dir()):
      if cls not in known:
        raise ValueError(f'{split_dir}/{cls} is not a class of the train split')
      for f in sorted(os.listdir(os.path.join(split_dir, cls))):
        path = os.path.join(split_dir, cls, f)
        if f.lower().endswith(_EXTENSIONS):
          files.append(path)
          labels.append(known[cls])
        elif not f.startswith('.'):  # hidden files (.DS_Store) are not meant as data
          ignored.append(path)
    return files, labels, ignored

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.files)

  def _decode(self, index: int) -> np.ndarray:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    try:
      with Image.open(self.files[index]) as im:
        im = im.convert('RGB')
        if self.image_size is not None and im.size != (self.image_size, self.image_size):
          im = im.resize((self.image_size, self.image_size), Image.BICUBIC)
        return np.asarray(im, np.uint8)
    except OSError as e:  # changed since the folder was opened and checked
      raise ValueError(f'{self.files[index]} is no longer a readable image ({e}); replace or '
                       f'delete it and rerun (the run resumes from its last checkpoint)') from e

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    image = self._decode(index)
    if image.shape != self.image_shape:
      raise ValueError(f'{self.files[index]} has shape {image.shape} but the first image of '
                       f'the split has {self.image_shape}; set --config.data.image_size to '
                       f'resize all images to one size')
    return {'image': image, 'label': self.labels[index], 'index': np.int32(index)}

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for f, y in zip(self.files, self.labels):
      h.update(f'{os.path.relpath(f, os.path.dirname(os.path.dirname(f)))}:{y};'.encode())
    return h.hexdigest()[:16]


def _notes(split_dir: str, total: int, skipped: list[str], ignored: list[str]) -> list[str]:
  notes = []
  if skipped:
    notes.append(f'{split_dir}: skipped {len(skipped)} of {total} images that do not decode '
                 f'(data.bad_images=skip): {_listed(skipped)}')
  if ignored:
    notes.append(f'{split_dir}: ignored {len(ignored)} file(s) without an image extension '
                 f'({", ".join(_EXTENSIONS)}): {_listed(ignored)}')
  return notes


def _listed(paths: list[str]) -> str:
  more = f' and {len(paths) - _SHOWN} more' if len(paths) > _SHOWN else ''
  return ', '.join(
      os.path.relpath(p, os.path.dirname(os.path.dirname(p))) for p in paths[:_SHOWN]) + more
