"""Per-example augmentations on uint8 HWC images, run on the host by grain with a seeded RNG:
torchvision's crop / flip / resize, and timm's RandAugment.

Every draw comes from the NumPy `Generator` grain seeds per element, so the stream is the same
whatever the number of workers and resumes exactly.

RandAugment (`rand-m9-mstd0.5-inc1`, DeiT's `--aa`) restates timm/data/auto_augment.py
(`rand_augment_transform`, `AugmentOp`, the `*_level_to_arg` functions): the point ops and
enhancements in NumPy, restating Pillow's arithmetic bit for bit, the geometric ops in Pillow. Per
image:
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
from PIL import Image


def random_crop_flip(image: np.ndarray, rng: np.random.Generator, *, size: int | None = None,
                     padding: int = 4, flip: bool = True) -> np.ndarray:
  """torchvision RandomCrop(size, padding, fill 0) then RandomHorizontalFlip(0.5).

  `size` smaller than the image gives IRKD's low-resolution crops (a res×res window of the
  zero-padded full image, not a downscale).
  """
  h, w, _ = image.shape
  th, tw = (size, size) if size else (h, w)  # default: the image's own (possibly non-square) size
  # Zeros and one copy: what np.pad gives, at a twentieth of its per-image cost.
  padded = np.zeros((h + 2 * padding, w + 2 * padding) + image.shape[2:], image.dtype)
  padded[padding:padding + h, padding:padding + w] = image
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


# --- the ops -----------------------------------------------------------------------------------
# The point ops and the enhancements run on NumPy arrays and restate Pillow's arithmetic bit for
# bit: its lookup tables (ImageOps), its float32 blend (libImaging/Blend.c: in1 + α·(in2 − in1),
# clipped, truncated), its RGB → L weights (Convert.c `L24`) and its 3×3 SMOOTH filter
# (Filter.c; exactly an integer formula, see `_smooth`). The geometric ops stay Pillow's affine
# transform (a NumPy restatement of its bicubic filter was 2× slower at 32 px); the image crosses
# to Pillow and back only around them. tests/test_randaugment_speedup.py holds the former
# all-Pillow implementation and asserts equal outputs, op by op on every pixel value and end to
# end over many images and seeds.

_IDENTITY_LUT = np.arange(256, dtype=np.uint8)
_INVERT_LUT = (255 - np.arange(256)).astype(np.uint8)
_INF = float('inf')


@functools.cache
def _posterize_lut(bits: int) -> np.ndarray:
  """Keep the `bits` most significant bits. Pillow ≥ 12 rejects bits = 0, which older Pillow (and
  so timm/DeiT) turned into a black image; PosterizeIncreasing reaches 0 bits at magnitude 10."""
  if bits >= 8:
    return _IDENTITY_LUT
  return (np.arange(256) & (~(2**(8 - bits) - 1) & 0xFF)).astype(np.uint8)


@functools.cache
def _solarize_lut(threshold: int) -> np.ndarray:  # ImageOps.solarize
  i = np.arange(256)
  return np.where(i < threshold, i, 255 - i).astype(np.uint8)


@functools.cache
def _solarize_add_lut(add: int, threshold: int = 128) -> np.ndarray:  # timm `solarize_add`
  i = np.arange(256)
  return np.where(i < threshold, np.minimum(255, i + add), i).astype(np.uint8)


@functools.cache
def _autocontrast_lut(lo: int, hi: int) -> np.ndarray:
  """ImageOps.autocontrast (cutoff 0) for a band whose values span [lo, hi]: Python's float
  `int(ix · scale + offset)`, which float64 NumPy computes alike."""
  if hi <= lo:
    return _IDENTITY_LUT
  scale = 255.0 / (hi - lo)
  offset = -lo * scale
  return np.clip(np.trunc(np.arange(256) * scale + offset), 0, 255).astype(np.uint8)


@functools.cache
def _band_offsets(pixels: int, channels: int) -> np.ndarray:
  """256 · band index for every value of a flattened HWC image (one contiguous add beats a
  broadcast over a last axis of 3)."""
  return np.tile(np.arange(channels, dtype=np.uint16) * 256, pixels)


def _banded(img: np.ndarray) -> np.ndarray:
  """The flattened image with each value offset into its band's 256-entry block."""
  return img.ravel() + _band_offsets(img.size // img.shape[-1], img.shape[-1])


def _apply_luts(img: np.ndarray, luts) -> np.ndarray:
  """Band c of `img` through `luts[c]` (Pillow's `point` with a 256·bands table); `luts` a list
  of 256-entry tables or a bands × 256 array."""
  if len(luts) == 1 or all(lut is luts[0] for lut in luts):
    return np.take(luts[0], img)
  return np.take(np.concatenate(luts), _banded(img)).reshape(img.shape)


def _luma(img: np.ndarray) -> np.ndarray:
  """Pillow's RGB → L (Convert.c `L24`): (19595 R + 38470 G + 7471 B + 0x8000) >> 16; an H×W×1
  image is already L."""
  if img.shape[-1] == 1:
    return img[..., 0]
  rgb = img.astype(np.int32)
  return ((rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16).astype(
      np.uint8)


def _blend(degenerate, img: np.ndarray, factor: float) -> np.ndarray:
  """Image.blend(degenerate, img, factor): float32 in1 + α·(in2 − in1), clipped to 0…255 and
  truncated (Blend.c); `degenerate` is an array broadcastable to `img` or a scalar."""
  alpha = np.float32(factor)
  base = np.asarray(degenerate, np.float32)
  out = base + alpha * (img.astype(np.float32) - base)
  return np.minimum(np.maximum(out, 0, out=out), 255, out=out).astype(np.uint8)


def _smooth(img: np.ndarray) -> np.ndarray:
  """`img.filter(ImageFilter.SMOOTH)` in integers: Filter.c sums k·v in float32 with k = 1/13 (5/13
  at the centre) on top of a 0.5 rounding offset and truncates. The exact sum is 0.5 + n/13 for
  the integer n = 3×3 box sum + 4·centre, which is never an integer and lies at least 1/26 from
  one, while float32's error on it stays under 1e-3: the truncation is floor((2n + 13) / 26).
  The border rows and columns are copied; images under 3×3 come back unchanged."""
  h, w = img.shape[:2]
  if h < 3 or w < 3:
    return img
  v = img.astype(np.uint16)
  rows = v[:-2] + v[1:-1] + v[2:]
  n = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:] + 4 * v[1:-1, 1:-1]  # ≤ 13·255
  out = img.copy()
  out[1:-1, 1:-1] = (2 * n + 13) // 26
  return out


def _autocontrast(img: np.ndarray, arg) -> np.ndarray:
  bands = np.ascontiguousarray(img.reshape(-1, img.shape[-1]).T)  # fast contiguous reductions
  lo, hi = bands.min(axis=1), bands.max(axis=1)
  return _apply_luts(img, [_autocontrast_lut(int(a), int(b)) for a, b in zip(lo, hi)])


def _equalize(img: np.ndarray, arg) -> np.ndarray:
  """ImageOps.equalize, its integer arithmetic vectorised over the bands: with h a band's
  histogram and `last` its highest value present, step = (Σh − h[last]) // 255 and table entry i
  = (step // 2 + Σ_{j<i} h[j]) // step, clipped to 255 by `point`; step 0 (one value present,
  or too few pixels) leaves the band unchanged."""
  channels = img.shape[-1]
  hist = np.bincount(_banded(img), minlength=256 * channels).reshape(channels, 256)
  last = 255 - np.argmax(hist[:, ::-1] > 0, axis=1)
  step = (hist.sum(axis=1) - hist[np.arange(channels), last]) // 255
  n = (step // 2)[:, None] + np.cumsum(hist, axis=1) - hist
  luts = np.minimum(n // np.maximum(step, 1)[:, None], 255).astype(np.uint8)
  luts[step == 0] = _IDENTITY_LUT
  return _apply_luts(img, luts)


def _color(img: np.ndarray, factor: float) -> np.ndarray:
  if img.shape[-1] == 1:  # ImageEnhance.Color of an L image blends it with itself
    return img
  return _blend(_luma(img)[..., None], img, factor)


def _contrast(img: np.ndarray, factor: float) -> np.ndarray:
  luma = _luma(img)
  mean = int(int(luma.sum(dtype=np.int64)) / luma.size + 0.5)  # ImageStat mean, rounded
  return np.take(_blend(mean, _IDENTITY_LUT, factor), img)  # a constant degenerate: a table


_ARRAY_OPS: dict[str, Callable[[np.ndarray, object], np.ndarray]] = {
    'AutoContrast': _autocontrast,
    'Equalize': _equalize,
    'Invert': lambda img, arg: np.take(_INVERT_LUT, img),
    'Posterize': lambda img, bits: np.take(_posterize_lut(int(bits)), img),
    'Solarize': lambda img, threshold: np.take(_solarize_lut(int(threshold)), img),
    'SolarizeAdd': lambda img, add: np.take(_solarize_add_lut(int(add)), img),
    'Color': _color,
    'Contrast': _contrast,
    'Brightness': lambda img, factor: np.take(_blend(0, _IDENTITY_LUT, factor), img),
    'Sharpness': lambda img, factor: _blend(_smooth(img), img, factor),
}


def _affine(img: Image.Image, coeffs, fill, resample) -> Image.Image:
  return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=resample, fillcolor=fill)


_PIL_OPS: dict[str, Callable[[Image.Image, float, object, object], Image.Image]] = {
    'Rotate':
        lambda img, deg, fill, res: img.rotate(deg, resample=res, fillcolor=fill),
    'ShearX':
        lambda img, s, fill, res: _affine(img, (1, s, 0, 0, 1, 0), fill, res),
    'ShearY':
        lambda img, s, fill, res: _affine(img, (1, 0, 0, s, 1, 0), fill, res),
    'TranslateXRel':
        lambda img, t, fill, res: _affine(img, (1, 0, t * img.size[0], 0, 1, 0), fill, res),
    'TranslateYRel':
        lambda img, t, fill, res: _affine(img, (1, 0, 0, 0, 1, t * img.size[1]), fill, res),
}
# Every op name (the `*Increasing` variants included) → (runs on arrays, its function).
_OPS = {
    name: (base in _ARRAY_OPS, _ARRAY_OPS.get(base) or _PIL_OPS[base]) for name in _LEVEL_TO_ARG
    for base in (name.removesuffix('Increasing'),)
}


def _check_image(image: np.ndarray) -> None:
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f'RandAugment wants a uint8 HWC image with 1 or 3 channels, got '
                     f'{image.dtype} {image.shape}: augment before converting to float')


def _as_pil(img: np.ndarray | Image.Image) -> Image.Image:
  if isinstance(img, Image.Image):
    return img
  h, w, channels = img.shape
  return Image.frombytes('L' if channels == 1 else 'RGB', (w, h), np.ascontiguousarray(img))


def _as_array(img: np.ndarray | Image.Image, channels: int) -> np.ndarray:
  if isinstance(img, np.ndarray):
    return img
  w, h = img.size
  return np.frombuffer(img.tobytes(), np.uint8).reshape(h, w, channels)


def _apply(img: np.ndarray | Image.Image, name: str, arg, fill, resample,
           channels: int) -> np.ndarray | Image.Image:
  """One op on an array or a Pillow image (whichever the op runs on; converted only if needed)."""
  if name not in _OPS:
    raise ValueError(f'unknown RandAugment op {name!r}; known ops: {sorted(_LEVEL_TO_ARG)}')
  on_arrays, fn = _OPS[name]
  if on_arrays:
    return fn(_as_array(img, channels), arg)
  return fn(_as_pil(img), arg, _pil_fill(fill, channels), resample)


def _pil_fill(fill: Sequence[int], channels: int):
  return int(fill[0]) if channels == 1 else tuple(int(v) for v in fill)


def _resample(interpolation: str, rng: np.random.Generator | None = None):
  if interpolation == 'random':  # timm `_RANDOM_INTERPOLATION`, chosen per op application
    return (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[int(rng.integers(2))]
  if interpolation not in _RESAMPLE:
    raise ValueError(f"interpolation {interpolation!r} not one of {sorted(_RESAMPLE)} or 'random'")
  return _RESAMPLE[interpolation]


def _result(img: np.ndarray | Image.Image, image: np.ndarray) -> np.ndarray:
  out = _as_array(img, image.shape[-1])
  return out.copy() if out is image else out  # never hand back the caller's array


def apply_op(image: np.ndarray, name: str, magnitude: float, *, negate: bool = False,
             fill: Sequence[int] = DEIT_FILL, interpolation: str = 'bicubic') -> np.ndarray:
  """One RandAugment op at a fixed magnitude and sign, always applied (uint8 HWC → uint8 HWC)."""
  _check_image(image)
  channels = image.shape[-1]
  img = _apply(image, name, op_argument(name, magnitude, negate), fill, _resample(interpolation),
               channels)
  return _result(img, image)


def rand_augment(image: np.ndarray, rng: np.random.Generator, *, num_ops: int = 2,
                 magnitude: float = 9, magnitude_std: float = 0.5, increasing: bool = True,
                 prob: float = 0.5, magnitude_max: float = LEVEL_DENOM,
                 fill: Sequence[int] = DEIT_FILL, interpolation: str = 'bicubic',
                 ops: Sequence[str] | None = None) -> np.ndarray:
  """timm RandAugment (`rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}-inc{increasing}`).

  `image` is uint8 HWC (1 or 3 channels); the result has the same shape and dtype. `ops`
  overrides the op set (default: `INCREASING_OPS` or `DEFAULT_OPS`). The draws from `rng`, in
  order: the op indices, then per op its skip, magnitude, sign (and with 'random' interpolation
  its filter), as before the ops moved to NumPy, so a seed gives the same image.
  """
  ops = tuple(ops or (INCREASING_OPS if increasing else DEFAULT_OPS))
  _check_image(image)
  channels = image.shape[-1]
  img = image
  # k scalar draws take the same values and generator state as timm's one draw of size k, in a
  # third of the time (tests/test_randaugment_speedup.py checks it).
  for index in [rng.integers(0, len(ops)) for _ in range(num_ops)]:
    if prob < 1.0 and rng.random() > prob:
      continue
    m = magnitude
    if magnitude_std == _INF:
      m = rng.uniform(0.0, magnitude)
    elif magnitude_std > 0:
      m = rng.normal(magnitude, magnitude_std)
    m = max(0.0, min(float(m), magnitude_max))
    negate = bool(rng.random() > 0.5)
    name = ops[int(index)]
    img = _apply(img, name, op_argument(name, m, negate), fill, _resample(interpolation, rng),
                 channels)
  return _result(img, image)


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
