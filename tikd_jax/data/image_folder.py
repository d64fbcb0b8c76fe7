"""`root/<split>/<class>/<image>` folders (the layout of the TIKD README; Tiny ImageNet).

Images are decoded lazily (grain workers decode in parallel), converted to RGB and, when
`image_size` is given, resized to it; otherwise every image must already have the same size.
Class indices follow the sorted class-folder names of the train split, like torchvision.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.ppm', '.gif', '.tif', '.tiff')


class ImageFolderSource:

  def __init__(self, root: str, split: str, image_size: int | None = None):
    split_dir = os.path.join(root, split)
    train_dir = os.path.join(root, 'train')
    for d in (split_dir, train_dir):
      if not os.path.isdir(d):
        raise FileNotFoundError(f'image folder {d!r} does not exist; expected the layout '
                                f'{root}/train/<class>/*.png and {root}/val/<class>/*.png')
    self.class_names = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not self.class_names:
      raise ValueError(f'{train_dir} has no class folders')
    known = {c: i for i, c in enumerate(self.class_names)}
    files, labels = [], []
    for cls in sorted(e.name for e in os.scandir(split_dir) if e.is_dir()):
      if cls not in known:
        raise ValueError(f'{split_dir}/{cls} is not a class of the train split')
      for f in sorted(os.listdir(os.path.join(split_dir, cls))):
        if f.lower().endswith(_EXTENSIONS):
          files.append(os.path.join(split_dir, cls, f))
          labels.append(known[cls])
    if not files:
      raise ValueError(f'{split_dir} holds no images with extensions {_EXTENSIONS}')
    self.files = files
    self.labels = np.asarray(labels, np.int32)
    self.image_size = image_size
    self.name = os.path.basename(os.path.normpath(root))
    self.split = split
    first = self._decode(0)
    self.image_shape = first.shape

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.files)

  def _decode(self, index: int) -> np.ndarray:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(self.files[index]) as im:
      im = im.convert('RGB')
      if self.image_size is not None and im.size != (self.image_size, self.image_size):
        im = im.resize((self.image_size, self.image_size), Image.BICUBIC)
      return np.asarray(im, np.uint8)

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
