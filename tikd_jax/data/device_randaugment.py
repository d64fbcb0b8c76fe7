"""timm's RandAugment as batched JAX ops, run inside the jitted train step
(`config.augment.randaugment_on='device'`), so that the host only decodes, crops and flips.

The same augmentation as `host_augment.rand_augment` (timm `rand-m9-mstd0.5-inc1`, DeiT's `--aa`):
the same op set (`INCREASING_OPS` / `DEFAULT_OPS`), the same magnitude → argument maps, the same
sampling per image (`num_ops` ops uniformly with replacement, each applied with probability `prob`,
magnitude ~ N(`magnitude`, `magnitude_std`) clipped to [0, `magnitude_max`], a random sign), and
Pillow's arithmetic per op. Only the random stream differs: draws come from the step's JAX key,
per image, not from grain's per-element NumPy generator.

Images are float32 [B, H, W, C] holding integer pixel values 0…255; every op returns integers
again, as Pillow's uint8 images do between ops. Per op slot the batch is computed branch-free:
- the point ops and the global enhancements (AutoContrast, Equalize, Invert, Posterize, Solarize,
  SolarizeAdd, Brightness, Contrast) are each a per-image, per-band 256-entry table, so the slot
  builds one table per image and looks every pixel up once;
- Color and Sharpness blend with the image's luma or its 3×3 SMOOTH filter (Pillow's float32
  blend, `host_augment._blend`);
- Rotate, ShearX/Y and TranslateX/YRel are one affine warp with per-image coefficients, Pillow's
  `Image.transform` (Geometry.c `affine_transform` and its bilinear / bicubic filters: pixel
  centres, a = −1 cubic, clamped edges, `fill` where the source lies outside the image).
Each image keeps the result of the op it drew, or its input when the op was skipped.

Inside jit, XLA turns divisions by a constant into products with its reciprocal and fuses
products into the sums that use them (FMA); `_divide` and `_times` keep Pillow's and Python's
roundings regardless, so the tests compare the jitted version, as the step runs it.

Where it is not bit-identical to the host version (tests/test_device_randaugment.py measures each):
- the warp computes source coordinates and the cubic in float32 where Pillow uses float64, so a
  value within float32 rounding of an integer can truncate one level apart;
- AutoContrast uses the exact integer quotient ⌊(v − lo) · 255 / (hi − lo)⌋; Pillow's float64
  `v · scale + offset` falls one level short of it where that quotient is an integer (0.43 % of
  the (lo, hi, v) triples with lo ≤ v ≤ hi);
- magnitude → argument maps round once in float32 where Python rounds in float64: the same at
  the round magnitudes of a fixed recipe, at most one float32 step apart for a drawn magnitude.
Interpolation 'nearest' takes Pillow's fixed-point path and is not restated: use the host.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from tikd_jax.data.host_augment import (DEFAULT_OPS, DEIT_FILL, INCREASING_OPS, LEVEL_DENOM,
                                        TRANSLATE_PCT, fill_from_mean)

INTERPOLATIONS = ('bilinear', 'bicubic', 'random')
_TABLE_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Posterize', 'PosterizeIncreasing', 'Solarize',
              'SolarizeIncreasing', 'SolarizeAdd', 'Brightness', 'BrightnessIncreasing', 'Contrast',
              'ContrastIncreasing')
_GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
_BLEND_OPS = ('Color', 'ColorIncreasing', 'Sharpness', 'SharpnessIncreasing')
KNOWN_OPS = _TABLE_OPS + _GEOMETRIC_OPS + _BLEND_OPS

# --- magnitude (0…10) → argument, as host_augment._LEVEL_TO_ARG, vectorised over images ---------


def _signed(value, negate):
  return jnp.where(negate, -value, value)


def _divide(x, denominator: float):
  """x / denominator, correctly rounded. XLA turns a division by a scalar (a constant, or any
  broadcast one) into a product with its inexact reciprocal; a full array of the denominator
  behind a barrier keeps the true division."""
  return x / jax.lax.optimization_barrier(jnp.full_like(x, denominator))


def _level(m, top):
  """timm's `m / 10 · top` as m · top / 10: exact for the round magnitudes of a fixed recipe
  (m · top has few bits), so the truncations below land where Python's float64 ones do."""
  return _divide(m * top, LEVEL_DENOM)


def _enhance_factor(m, negate, increasing: bool):
  """Enhancement factor, as (18 m + 10) / 100 = m/10 · 1.8 + 0.1 (increasing: (100 ± 9 m) / 100,
  at least 0.1): one rounding where Python's float64 rounds to float32 anyway."""
  if increasing:
    return jnp.maximum(0.1, _divide(100.0 + _signed(9.0 * m, negate), 100.0))
  return _divide(18.0 * m + 10.0, 100.0)


def _posterize_bits(m, increasing: bool):
  bits = jnp.floor(_level(m, 4.0)).astype(jnp.int32)
  return 4 - bits if increasing else bits


def _solarize_threshold(m, increasing: bool):
  threshold = jnp.minimum(256, jnp.floor(_level(m, 256.0)).astype(jnp.int32))
  return 256 - threshold if increasing else threshold


# --- pixel arithmetic shared with Pillow ---------------------------------------------------------


def _times(alpha, k):
  """float32 alpha · k rounded once, for an integer k with |k| < 2⁸, whether or not the compiler
  fuses the product into the sum that uses it (an FMA drops that rounding; XLA:CPU fuses, and an
  optimization barrier does not survive to stop it). alpha = hi + lo with 12 significant bits
  each, so hi·k and lo·k are exact in float32 and their sum, fused or not, rounds once."""
  bits = jax.lax.bitcast_convert_type(alpha, jnp.uint32) & jnp.uint32(0xFFFFF000)
  hi = jax.lax.bitcast_convert_type(bits, jnp.float32)
  return hi * k + (alpha - hi) * k


def _blend(degenerate, image, factor):
  """Image.blend(degenerate, image, factor): float32 d + α·(x − d), clipped, truncated
  (Blend.c). `factor` is [B]; the operands broadcast against [B, …]."""
  alpha = factor.reshape(factor.shape + (1,) * (jnp.ndim(image) - 1))
  out = degenerate + _times(alpha, image - degenerate)
  return jnp.trunc(jnp.clip(out, 0.0, 255.0))


def _luma(images):
  """Pillow RGB → L (Convert.c `L24`) per pixel, [B, H, W] int32; an L image is its own luma."""
  v = images.astype(jnp.int32)
  if v.shape[-1] == 1:
    return v[..., 0]
  return (v[..., 0] * 19595 + v[..., 1] * 38470 + v[..., 2] * 7471 + 0x8000) >> 16


def _smooth(images):
  """ImageFilter.SMOOTH as host_augment._smooth: interior ⌊(2n + 13) / 26⌋ with n the 3×3 sum
  plus 4 × the centre; border pixels and images under 3×3 unchanged."""
  h, w = images.shape[1:3]
  if h < 3 or w < 3:
    return images
  v = images.astype(jnp.int32)
  rows = v[:, :-2] + v[:, 1:-1] + v[:, 2:]
  n = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:] + 4 * v[:, 1:-1, 1:-1]
  inner = ((2 * n + 13) // 26).astype(images.dtype)
  return images.at[:, 1:-1, 1:-1].set(inner)


# --- the per-image tables ------------------------------------------------------------------------


def _levels():
  return jnp.arange(256, dtype=jnp.int32)


def _band_values(images):
  """[B, C, H·W] int32: each image's values, band by band."""
  b, h, w, c = images.shape
  return images.astype(jnp.int32).reshape(b, h * w, c).transpose(0, 2, 1)


def _autocontrast_table(images):
  """ImageOps.autocontrast (cutoff 0) per band: ⌊(v − lo)·255/(hi − lo)⌋ clipped, the identity
  for a constant band."""
  bands = _band_values(images)
  lo = bands.min(axis=2, keepdims=True)
  hi = bands.max(axis=2, keepdims=True)
  scaled = jnp.clip((_levels() - lo) * 255 // jnp.maximum(hi - lo, 1), 0, 255)
  return jnp.where(hi > lo, scaled, _levels())


def _equalize_table(images):
  """ImageOps.equalize per band (host_augment._equalize): step = (N − h[last]) // 255, entry
  v = (step // 2 + Σ_{j<v} h[j]) // step clipped to 255, the identity when step is 0."""
  bands = _band_values(images)
  hist = jax.vmap(jax.vmap(lambda v: jnp.bincount(v, length=256)))(bands)  # [B, C, 256]
  last = 255 - jnp.argmax(hist[..., ::-1] > 0, axis=-1)
  step = (bands.shape[-1] - jnp.take_along_axis(hist, last[..., None], axis=-1)) // 255
  below = jnp.cumsum(hist, axis=-1) - hist
  table = jnp.minimum((step // 2 + below) // jnp.maximum(step, 1), 255)
  return jnp.where(step > 0, table, _levels())


def _contrast_table(images, factor):
  """ImageEnhance.Contrast: blend every level with the rounded mean luma (ImageStat), a table."""
  luma = _luma(images)
  pixels = luma.shape[1] * luma.shape[2]
  total = luma.sum(axis=(1, 2))
  mean = (2 * total + pixels) // (2 * pixels)  # int(total / pixels + 0.5), exactly
  levels = _levels().astype(jnp.float32)
  return _blend(mean[:, None].astype(jnp.float32), levels[None], factor).astype(jnp.int32)


def _tables(images, ops: Sequence[str], index, m, negate):
  """[B, C, 256] int32: the table of the op each image drew (the identity for the others)."""
  b, c = images.shape[0], images.shape[-1]
  levels = jnp.broadcast_to(_levels(), (b, 256))
  table = jnp.broadcast_to(_levels(), (b, c, 256))
  for k, name in enumerate(ops):
    if name not in _TABLE_OPS:
      continue
    base = name.replace('Increasing', '')
    increasing = name.endswith('Increasing')
    if base == 'AutoContrast':
      op_table = _autocontrast_table(images)
    elif base == 'Equalize':
      op_table = _equalize_table(images)
    elif base == 'Contrast':
      op_table = _contrast_table(images, _enhance_factor(m, negate, increasing))[:, None]
    else:
      if base == 'Invert':
        per_image = 255 - levels
      elif base == 'Posterize':
        keep = 256 - 2**(8 - _posterize_bits(m, increasing))  # mask of the `bits` high bits
        per_image = levels & keep[:, None]
      elif base == 'Solarize':
        per_image = jnp.where(levels < _solarize_threshold(m, increasing)[:, None], levels,
                              255 - levels)
      elif base == 'SolarizeAdd':
        add = jnp.minimum(128, jnp.floor(_level(m, 110.0)).astype(jnp.int32))
        per_image = jnp.where(levels < 128, jnp.minimum(255, levels + add[:, None]), levels)
      else:  # Brightness: blend with black
        factor = _enhance_factor(m, negate, increasing)
        per_image = _blend(0.0, levels.astype(jnp.float32), factor).astype(jnp.int32)
      op_table = per_image[:, None]
    table = jnp.where((index == k)[:, None, None], op_table, table)
  return table


def _look_up(images, table):
  """Band c of each image through its table[c] (Pillow's `point`)."""
  b, h, w, c = images.shape
  out = jnp.take_along_axis(table, _band_values(images), axis=2)  # [B, C, H·W]
  return out.transpose(0, 2, 1).reshape(b, h, w, c).astype(images.dtype)


# --- the affine warp -----------------------------------------------------------------------------


def _affine_coefficients(ops: Sequence[str], index, m, negate, height: int, width: int):
  """[B, 6] Pillow AFFINE data (a, b, c, d, e, f): output pixel centre (x, y) samples the input
  at (a·x + b·y + c, d·x + e·y + f); the identity for images that drew another op."""
  one, zero = jnp.ones_like(m), jnp.zeros_like(m)
  coeffs = jnp.stack([one, zero, zero, zero, one, zero], axis=1)
  for k, name in enumerate(ops):
    if name not in _GEOMETRIC_OPS:
      continue
    if name == 'Rotate':  # Image.rotate(deg) about the centre, expand=False
      theta = -jnp.deg2rad(_signed(_level(m, 30.0), negate))
      cos, sin = jnp.cos(theta), jnp.sin(theta)
      cx, cy = width / 2.0, height / 2.0
      op = (cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)
    elif name == 'ShearX':
      op = (one, _signed(_level(m, 0.3), negate), zero, zero, one, zero)
    elif name == 'ShearY':
      op = (one, zero, zero, _signed(_level(m, 0.3), negate), one, zero)
    elif name == 'TranslateXRel':
      op = (one, zero, _signed(_level(m, TRANSLATE_PCT), negate) * width, zero, one, zero)
    else:  # TranslateYRel
      op = (one, zero, zero, zero, one, _signed(_level(m, TRANSLATE_PCT), negate) * height)
    coeffs = jnp.where((index == k)[:, None], jnp.stack(op, axis=1), coeffs)
  return coeffs


def _cubic(v1, v2, v3, v4, d):
  """Geometry.c BICUBIC: the a = −1 cubic through v2 (d = 0) and v3 (d = 1)."""
  p2 = -v1 + v3
  p3 = 2 * (v1 - v2) + v3 - v4
  p4 = -v1 + v2 - v3 + v4
  return v2 + d * (p2 + d * (p3 + d * p4))


def _warp(images, coeffs, bicubic, fill):
  """Image.transform(size, AFFINE, coeffs, resample, fillcolor=fill) for every image; `bicubic`
  [B] picks BICUBIC over BILINEAR per image, or one Python bool picks it for all (and only that
  filter is computed)."""
  b, h, w, c = images.shape
  ys, xs = jnp.meshgrid(
      jnp.arange(h, dtype=jnp.float32) + 0.5,
      jnp.arange(w, dtype=jnp.float32) + 0.5, indexing='ij')
  a = coeffs[:, :, None, None]
  src_x = a[:, 0] * xs + a[:, 1] * ys + a[:, 2]  # [B, H, W]
  src_y = a[:, 3] * xs + a[:, 4] * ys + a[:, 5]
  inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
  fx, fy = src_x - 0.5, src_y - 0.5
  x0, y0 = jnp.floor(fx), jnp.floor(fy)
  dx, dy = (fx - x0)[..., None], (fy - y0)[..., None]
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  flat = images.reshape(b, h * w, c)

  def tap(row, col):  # the clamped pixel (y0 + row, x0 + col) of every output pixel, [B, H, W, C]
    idx = jnp.clip(y0 + row, 0, h - 1) * w + jnp.clip(x0 + col, 0, w - 1)
    return jnp.take_along_axis(flat, idx.reshape(b, h * w, 1), axis=1).reshape(b, h, w, c)

  def cubic():
    rows = [_cubic(*(tap(r, k) for k in range(-1, 3)), dx) for r in range(-1, 3)]
    return jnp.trunc(jnp.clip(_cubic(*rows, dy), 0.0, 255.0))

  def linear():  # Geometry.c BILINEAR: p + (q − p)·t along x, then y

    def lerp(p, q, t):
      return p + (q - p) * t

    return jnp.trunc(lerp(lerp(tap(0, 0), tap(0, 1), dx), lerp(tap(1, 0), tap(1, 1), dx), dy))

  if isinstance(bicubic, bool):
    out = cubic() if bicubic else linear()
  else:  # 'random': both, per image (XLA computes the shared taps once)
    out = jnp.where(bicubic[:, None, None, None], cubic(), linear())
  return jnp.where(inside[..., None], out, jnp.asarray(fill, images.dtype))


# --- one op slot and the whole augmentation ------------------------------------------------------


def _drew(index, ops: Sequence[str], names) -> jax.Array:
  """[B] bool: image i drew one of the ops `names`."""
  picks = [k for k, name in enumerate(ops) if name in names]
  return jnp.isin(index, jnp.asarray(picks, jnp.int32))


def _per_image(mask):
  return mask[:, None, None, None]


def _luma_bands(images):
  return _luma(images)[..., None].astype(jnp.float32)


def apply_ops(images, ops: Sequence[str], index, magnitude, negate, applied, bicubic,
              fill: Sequence[int]):
  """One RandAugment slot: image i gets op `ops[index[i]]` at `magnitude[i]` (0…10) with sign
  `negate[i]` if `applied[i]`, resampling bicubically where `bicubic[i]`; [B] arguments (`bicubic`
  also one Python bool for every image)."""
  unknown = sorted(set(ops) - set(KNOWN_OPS))
  if unknown:
    raise ValueError(f'RandAugment ops {unknown} have no device version; known: '
                     f'{sorted(KNOWN_OPS)}')
  b, h, w, c = images.shape
  fill = tuple(fill[:1]) if c == 1 else tuple(fill)  # an L image takes the first (host's rule)
  if len(fill) != c:
    raise ValueError(f'fill {fill} has {len(fill)} values for {c}-band images')
  m = magnitude.astype(jnp.float32)
  out = images
  if any(name in _TABLE_OPS for name in ops):
    looked_up = _look_up(images, _tables(images, ops, index, m, negate))
    out = jnp.where(_per_image(_drew(index, ops, _TABLE_OPS)), looked_up, out)
  for base, degenerate in (('Color', _luma_bands), ('Sharpness', _smooth)):
    if not any(n.startswith(base) for n in ops) or (base == 'Color' and c == 1):
      continue  # (ImageEnhance.Color of an L image blends it with itself)
    increasing = _drew(index, ops, {base + 'Increasing'})
    factor = jnp.where(increasing, _enhance_factor(m, negate, True),
                       _enhance_factor(m, negate, False))
    blended = _blend(degenerate(images), images, factor)
    out = jnp.where(_per_image(_drew(index, ops, {base, base + 'Increasing'})), blended, out)
  if any(name in _GEOMETRIC_OPS for name in ops):
    warped = _warp(images, _affine_coefficients(ops, index, m, negate, h, w), bicubic, fill)
    out = jnp.where(_per_image(_drew(index, ops, _GEOMETRIC_OPS)), warped, out)
  return jnp.where(_per_image(applied), out, images)


def apply_op(images, name: str, magnitude: float, *, negate: bool = False,
             fill: Sequence[int] = DEIT_FILL, interpolation: str = 'bicubic'):
  """One op at a fixed magnitude and sign on every image (the device `host_augment.apply_op`)."""
  if interpolation not in ('bilinear', 'bicubic'):
    raise ValueError(f"interpolation {interpolation!r}: the fixed-op form takes 'bilinear' or "
                     "'bicubic'")
  b = images.shape[0]
  full = functools.partial(jnp.full, (b,))
  return apply_ops(images, (name,), full(0), full(magnitude, dtype=jnp.float32), full(negate),
                   full(True), interpolation == 'bicubic', fill)


def draw_ops(rng, batch: int, num_ops: int, num_choices: int, *, magnitude: float,
             magnitude_std: float, prob: float, magnitude_max: float, interpolation: str):
  """timm's per-image draws for `num_ops` slots, each [num_ops, B]: (op index,
  magnitude, negate, applied, bicubic), `apply_ops`'s order; `bicubic` is one bool unless
  `interpolation` is 'random'. timm `RandAugment.__call__` /
  `AugmentOp.__call__`."""
  keys = jax.random.split(rng, 6)
  shape = (num_ops, batch)
  index = jax.random.randint(keys[0], shape, 0, num_choices)
  applied = (jax.random.uniform(keys[1], shape) <= prob) if prob < 1.0 else jnp.ones(shape, bool)
  if magnitude_std == math.inf:
    m = jax.random.uniform(keys[2], shape, maxval=magnitude)
  elif magnitude_std > 0:
    m = magnitude + magnitude_std * jax.random.normal(keys[2], shape)
  else:
    m = jnp.full(shape, magnitude, jnp.float32)
  m = jnp.clip(m, 0.0, magnitude_max)
  negate = jax.random.uniform(keys[3], shape) > 0.5
  if interpolation == 'random':  # timm `_RANDOM_INTERPOLATION`, per op application
    bicubic = jax.random.bernoulli(keys[4], 0.5, shape)
  else:
    bicubic = interpolation == 'bicubic'
  return index, m, negate, applied, bicubic


def rand_augment(images, rng, *, num_ops: int = 2, magnitude: float = 9, magnitude_std: float = 0.5,
                 increasing: bool = True, prob: float = 0.5, magnitude_max: float = LEVEL_DENOM,
                 fill: Sequence[int] = DEIT_FILL, interpolation: str = 'bicubic',
                 ops: Sequence[str] | None = None):
  """timm RandAugment on a batch: float32 [B, H, W, C] pixel values 0…255 → the same.

  Arguments as `host_augment.rand_augment`; each image draws its own ops and magnitudes.
  """
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f'interpolation {interpolation!r} on the device: use one of '
                     f"{INTERPOLATIONS}, or config.augment.randaugment_on='host' for Pillow's "
                     'nearest')
  ops = tuple(ops or (INCREASING_OPS if increasing else DEFAULT_OPS))
  draws = draw_ops(rng, images.shape[0], num_ops, len(ops), magnitude=magnitude,
                   magnitude_std=magnitude_std, prob=prob, magnitude_max=magnitude_max,
                   interpolation=interpolation)
  index, m, negate, applied, bicubic = draws
  for slot in range(num_ops):
    images = apply_ops(images, ops, index[slot], m[slot], negate[slot], applied[slot],
                       bicubic if isinstance(bicubic, bool) else bicubic[slot], fill)
  return images


def make_device_randaugment(cfg):
  """`rand_augment` with `cfg`'s settings (the keys `host_augment.make_host_augment` reads)."""
  if cfg.interpolation not in INTERPOLATIONS:
    raise ValueError(f"config.augment.interpolation={cfg.interpolation!r} with randaugment_on="
                     f"'device': use one of {INTERPOLATIONS}, or randaugment_on='host'")
  return functools.partial(rand_augment, num_ops=int(cfg.randaugment_num_ops),
                           magnitude=float(cfg.randaugment_magnitude),
                           magnitude_std=float(cfg.randaugment_magnitude_std),
                           increasing=bool(cfg.randaugment_increasing),
                           interpolation=str(cfg.interpolation), fill=fill_from_mean(cfg.mean))
