"""Per-example augmentations on uint8 HWC images, run on the host by grain with a seeded RNG."""
from __future__ import annotations

import numpy as np
from PIL import Image


def random_crop_flip(image: np.ndarray, rng: np.random.Generator, *, size: int | None = None,
                     padding: int = 4, flip: bool = True) -> np.ndarray:
  """torchvision RandomCrop(size, padding, fill 0) then RandomHorizontalFlip(0.5).

  `size` smaller than the image gives IRKD's low-resolution crops (a res×res window of the
  zero-padded full image, not a downscale).
  """
  h, w, _ = image.shape
  th, tw = (size, size) if size else (h, w)  # default: the image's own (possibly non-square) size
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  top = rng.integers(0, h + 2 * padding - th + 1)
  left = rng.integers(0, w + 2 * padding - tw + 1)
  out = padded[top:top + th, left:left + tw]
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision `CenterCrop(size)` of a uint8 HWC image at least `size` on each side: the window
  starts at round((H − size) / 2), round((W − size) / 2) (Python's round, as torchvision's)."""
  h, w = image.shape[:2]
  if size > h or size > w:
    raise ValueError(f'center crop of {size} px from a {h}×{w} image: the crop must fit')
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return np.ascontiguousarray(image[top:top + size, left:left + size])


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """Downscale a uint8 HWC image to size×size: torchvision `Resize(size)` on a PIL image (PIL's
  bilinear filter, widened by the scale factor, so a downscale averages every source pixel)."""
  if image.shape[0] == image.shape[1] == size:
    return image
  squeeze = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(pil.resize((size, size), Image.BILINEAR))
  return out[..., None] if squeeze else out
