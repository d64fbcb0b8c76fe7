"""Per-example augmentations on uint8 HWC images, run on the host by grain with a seeded RNG:
torchvision's crop / flip / resize, and timm's RandAugment.

Every draw comes from the NumPy `Generator` grain seeds per element, so the stream is the same
whatever the number of workers and resumes exactly.

RandAugment (`rand-m9-mstd0.5-inc1`, DeiT's `--aa`) restates timm/data/auto_augment.py
(`rand_augment_transform`, `AugmentOp`, the `*_level_to_arg` functions) with PIL:
- pick `num_ops` ops uniformly *with* replacement from the op set (timm `np.random.choice`);
- each picked op is skipped with probability 1 − `prob` (timm `random.random() > prob`, prob 0.5);
- its magnitude is drawn from N(`magnitude`, `magnitude_std`) (`mstd0.5`; `inf` → U(0, magnitude))
  and clipped to [0, `magnitude_max`] (timm's default upper bound 10 = `_LEVEL_DENOM`);
- the magnitude is mapped to the op's argument on the 0…10 scale; signed ops (rotate, shear,
  translate, the `*Increasing` enhancements) flip the sign with probability 0.5.

Geometric ops fill uncovered pixels with `fill`; timm sets it to `img_mean = round(255 · mean)` of
the *normalisation* mean. DeiT normalises with the ImageNet mean even on CIFAR, hence
`DEIT_FILL = (124, 116, 104)`; `make_host_augment` derives it from the configured mean instead
(`fill_from_mean`), i.e. timm's rule applied to this project's normalisation. DeiT passes
`--train-interpolation bicubic`, so geometric ops resample bicubically ('random' picks bilinear or
bicubic per op, timm's behaviour when no interpolation is given).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


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


# ------------------------------------------------------------------------------ RandAugment
LEVEL_DENOM = 10.0  # timm `_LEVEL_DENOM`: magnitudes live on a 0…10 scale
TRANSLATE_PCT = 0.45  # timm `translate_pct` default for TranslateX/YRel
DEIT_FILL = (124, 116, 104)  # round(255 · IMAGENET_DEFAULT_MEAN), DeiT's hparams['img_mean']

# timm `_RAND_INCREASING_TRANSFORMS` (`inc1`): severity grows with magnitude for every op.
INCREASING_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
                  'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
                  'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY',
                  'TranslateXRel', 'TranslateYRel')
# timm `_RAND_TRANSFORMS` (no `inc1`).
DEFAULT_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
               'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
               'TranslateXRel', 'TranslateYRel')

_RESAMPLE = {
    'bilinear': Image.Resampling.BILINEAR, 'bicubic': Image.Resampling.BICUBIC,
    'nearest': Image.Resampling.NEAREST
}

# --- magnitude (0…10) → op argument, as timm's `*_level_to_arg` ------------------------------


def _signed(value: float, negate: bool) -> float:
  return -value if negate else value


def _posterize_bits(m: float) -> int:  # [0, 4] bits kept, severity falls with m
  return int(m / LEVEL_DENOM * 4)


def _solarize_threshold(m: float) -> int:  # [0, 256], severity falls with m
  return min(256, int(m / LEVEL_DENOM * 256))


def _enhance_factor(m: float) -> float:  # [0.1, 1.9], 1.0 (no change) at m = 5
  return m / LEVEL_DENOM * 1.8 + 0.1


def _enhance_increasing_factor(m: float, negate: bool) -> float:  # 1 ± 0.9·m/10, ≥ 0.1
  return max(0.1, 1.0 + _signed(m / LEVEL_DENOM * 0.9, negate))


_LEVEL_TO_ARG: dict[str, Callable[[float, bool], float | int | None]] = {
    'AutoContrast': lambda m, neg: None,
    'Equalize': lambda m, neg: None,
    'Invert': lambda m, neg: None,
    'Rotate': lambda m, neg: _signed(m / LEVEL_DENOM * 30.0, neg),  # degrees, ±30
    'Posterize': lambda m, neg: _posterize_bits(m),
    'PosterizeIncreasing': lambda m, neg: 4 - _posterize_bits(m),  # bits, 4 → 0
    'Solarize': lambda m, neg: _solarize_threshold(m),
    'SolarizeIncreasing': lambda m, neg: 256 - _solarize_threshold(m),  # threshold, 256 → 0
    'SolarizeAdd': lambda m, neg: min(128, int(m / LEVEL_DENOM * 110)),  # added, 0 → 110
    'Color': lambda m, neg: _enhance_factor(m),
    'Contrast': lambda m, neg: _enhance_factor(m),
    'Brightness': lambda m, neg: _enhance_factor(m),
    'Sharpness': lambda m, neg: _enhance_factor(m),
    'ColorIncreasing': _enhance_increasing_factor,
    'ContrastIncreasing': _enhance_increasing_factor,
    'BrightnessIncreasing': _enhance_increasing_factor,
    'SharpnessIncreasing': _enhance_increasing_factor,
    'ShearX': lambda m, neg: _signed(m / LEVEL_DENOM * 0.3, neg),  # shear factor, ±0.3
    'ShearY': lambda m, neg: _signed(m / LEVEL_DENOM * 0.3, neg),
    'TranslateXRel': lambda m, neg: _signed(m / LEVEL_DENOM * TRANSLATE_PCT, neg),  # of width
    'TranslateYRel': lambda m, neg: _signed(m / LEVEL_DENOM * TRANSLATE_PCT, neg),  # of height
}


def op_argument(name: str, magnitude: float, negate: bool = False) -> float | int | None:
  """The argument timm passes to op `name` at `magnitude` (0…10); `negate` is the random sign."""
  if name not in _LEVEL_TO_ARG:
    raise ValueError(f'unknown RandAugment op {name!r}; known ops: {sorted(_LEVEL_TO_ARG)}')
  return _LEVEL_TO_ARG[name](float(magnitude), negate)


# --- the ops on PIL images ------------------------------------------------------------------


def _affine(img: Image.Image, coeffs, fill, resample) -> Image.Image:
  return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=resample, fillcolor=fill)


def _solarize_add(img: Image.Image, add: int, threshold: int = 128) -> Image.Image:
  lut = [min(255, i + add) if i < threshold else i for i in range(256)]
  return img.point(lut * len(img.getbands()))


def _posterize(img: Image.Image, bits: int) -> Image.Image:
  """Keep the `bits` most significant bits. Pillow ≥ 12 rejects bits = 0, which older Pillow (and
  so timm/DeiT) turned into a black image; PosterizeIncreasing reaches 0 bits at magnitude 10."""
  if bits >= 8:
    return img
  mask = ~(2**(8 - bits) - 1) & 0xFF
  return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _pil_op(img: Image.Image, name: str, arg, fill, resample) -> Image.Image:
  base = name.removesuffix('Increasing')
  if base == 'AutoContrast':
    return ImageOps.autocontrast(img)
  if base == 'Equalize':
    return ImageOps.equalize(img)
  if base == 'Invert':
    return ImageOps.invert(img)
  if base == 'Rotate':
    return img.rotate(arg, resample=resample, fillcolor=fill)
  if base == 'Posterize':
    return _posterize(img, arg)
  if base == 'Solarize':
    return ImageOps.solarize(img, arg)
  if base == 'SolarizeAdd':
    return _solarize_add(img, arg)
  if base in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return getattr(ImageEnhance, base)(img).enhance(arg)
  if base == 'ShearX':
    return _affine(img, (1, arg, 0, 0, 1, 0), fill, resample)
  if base == 'ShearY':
    return _affine(img, (1, 0, 0, arg, 1, 0), fill, resample)
  if base == 'TranslateXRel':
    return _affine(img, (1, 0, arg * img.size[0], 0, 1, 0), fill, resample)
  if base == 'TranslateYRel':
    return _affine(img, (1, 0, 0, 0, 1, arg * img.size[1]), fill, resample)
  raise ValueError(f'unknown RandAugment op {name!r}; known ops: {sorted(_LEVEL_TO_ARG)}')


def _to_pil(image: np.ndarray) -> Image.Image:
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f'RandAugment wants a uint8 HWC image with 1 or 3 channels, got '
                     f'{image.dtype} {image.shape}: augment before converting to float')
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(img: Image.Image, channels: int) -> np.ndarray:
  out = np.asarray(img, np.uint8)
  return out[..., None] if channels == 1 else out


def _pil_fill(fill: Sequence[int], channels: int):
  return int(fill[0]) if channels == 1 else tuple(int(v) for v in fill)


def _resample(interpolation: str, rng: np.random.Generator | None = None):
  if interpolation == 'random':  # timm `_RANDOM_INTERPOLATION`, chosen per op application
    return (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[int(rng.integers(2))]
  if interpolation not in _RESAMPLE:
    raise ValueError(f"interpolation {interpolation!r} not one of {sorted(_RESAMPLE)} or 'random'")
  return _RESAMPLE[interpolation]


def apply_op(image: np.ndarray, name: str, magnitude: float, *, negate: bool = False,
             fill: Sequence[int] = DEIT_FILL, interpolation: str = 'bicubic') -> np.ndarray:
  """One RandAugment op at a fixed magnitude and sign, always applied (uint8 HWC → uint8 HWC)."""
  channels = image.shape[-1]
  img = _pil_op(_to_pil(image), name, op_argument(name, magnitude, negate),
                _pil_fill(fill, channels), _resample(interpolation))
  return _from_pil(img, channels)


def rand_augment(image: np.ndarray, rng: np.random.Generator, *, num_ops: int = 2,
                 magnitude: float = 9, magnitude_std: float = 0.5, increasing: bool = True,
                 prob: float = 0.5, magnitude_max: float = LEVEL_DENOM,
                 fill: Sequence[int] = DEIT_FILL, interpolation: str = 'bicubic',
                 ops: Sequence[str] | None = None) -> np.ndarray:
  """timm RandAugment (`rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}-inc{increasing}`).

  `image` is uint8 HWC (1 or 3 channels); the result has the same shape and dtype. `ops`
  overrides the op set (default: `INCREASING_OPS` or `DEFAULT_OPS`).
  """
  ops = tuple(ops or (INCREASING_OPS if increasing else DEFAULT_OPS))
  channels = image.shape[-1]
  img = _to_pil(image)
  pil_fill = _pil_fill(fill, channels)
  for index in rng.integers(0, len(ops), size=num_ops):
    if prob < 1.0 and rng.random() > prob:
      continue
    m = magnitude
    if magnitude_std == float('inf'):
      m = rng.uniform(0.0, magnitude)
    elif magnitude_std > 0:
      m = rng.normal(magnitude, magnitude_std)
    m = max(0.0, min(float(m), magnitude_max))
    negate = bool(rng.random() > 0.5)
    name = ops[int(index)]
    img = _pil_op(img, name, op_argument(name, m, negate), pil_fill, _resample(interpolation, rng))
  return _from_pil(img, channels)


def fill_from_mean(mean: Sequence[float]) -> tuple[int, ...]:
  """timm's `img_mean`: the normalisation mean as uint8 pixel values (round, capped at 255)."""
  return tuple(min(255, round(255 * float(v))) for v in mean)


def _augment_element(element: dict, rng: np.random.Generator, **kwargs) -> dict:
  return {**element, 'image': rand_augment(element['image'], rng, **kwargs)}


def make_host_augment(cfg) -> Callable[[dict, np.random.Generator], dict] | None:
  """`pipeline.train_dataset(extra_augment=...)`: RandAugment on `element['image']`, or None.

  Reads `randaugment` (bool, off → None), `randaugment_num_ops`, `randaugment_magnitude`,
  `randaugment_magnitude_std`, `randaugment_increasing`, `interpolation` and `mean` (→ fill via
  `fill_from_mean`). The result is a `functools.partial` of a module-level function, so grain
  worker processes can pickle it.
  """
  if not cfg.randaugment:
    return None
  return functools.partial(_augment_element, num_ops=int(cfg.randaugment_num_ops),
                           magnitude=float(cfg.randaugment_magnitude),
                           magnitude_std=float(cfg.randaugment_magnitude_std),
                           increasing=bool(cfg.randaugment_increasing),
                           interpolation=str(cfg.interpolation), fill=fill_from_mean(cfg.mean))
