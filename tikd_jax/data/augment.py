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


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """Downscale a uint8 HWC image to size×size: torchvision `Resize(size)` on a PIL image (PIL's
  bilinear filter, widened by the scale factor, so a downscale averages every source pixel)."""
  if image.shape[0] == image.shape[1] == size:
    return image
  squeeze = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(pil.resize((size, size), Image.BILINEAR))
  return out[..., None] if squeeze else out
