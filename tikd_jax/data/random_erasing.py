"""timm RandomErasing (DeiT: `--reprob 0.25 --remode pixel --recount 1`) on device, batched.

A restatement of timm/data/random_erasing.py for one box per image (`max_count=1`). Per image,
timm does:

  with probability `probability`:
    up to 10 attempts: target_area ~ U(min_area, max_area) · H·W,
                       aspect ~ exp(U(log min_aspect, log max_aspect)),
                       h = round(√(target_area · aspect)), w = round(√(target_area / aspect));
                       the first attempt with h < H and w < W places the box at
                       top ~ U{0…H−h}, left ~ U{0…W−w} and fills it; if none fits, nothing.

Vectorised equivalent: all 10 attempts are drawn at once for every image ([B, 10]) and the first
one that fits is selected with `argmax`; attempts after it are ignored. Since timm's attempts are
independent draws, this has exactly timm's distribution (it only spends a few more random numbers),
and the whole thing is a fixed-shape, jit-able function. `round` is round-half-to-even in both
Python and `jnp.round`.

Mode 'pixel' fills the box with per-pixel, per-channel N(0, 1) noise *after* normalisation. Our
models normalise [0, 1] images inside (`(x − mean) / std`), so writing `mean + std · N(0, 1)` into
the [0, 1] image is the same thing: erased pixels are not clipped to [0, 1], on purpose.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

ATTEMPTS = 10  # timm's attempts per box


def erasing_boxes(rng: jax.Array, batch_size: int, height: int, width: int, *,
                  probability: float = 0.25, min_area: float = 0.02, max_area: float = 1 / 3,
                  min_aspect: float = 0.3, max_aspect: float | None = None):
  """One timm erasing box per image: (erase [B] bool, top, left, h, w [B] int32).

  `erase` is False for images timm would leave alone (probability miss or no attempt fits).
  """
  max_aspect = max_aspect or 1.0 / min_aspect
  a = ATTEMPTS
  # One flat draw, sliced (a flat shape compiles several times faster than [B, 2a + 3]).
  u = jax.random.uniform(rng, (batch_size * (2 * a + 3),)).reshape(batch_size, 2 * a + 3)
  area = (min_area + (max_area - min_area) * u[:, :a]) * (height * width)
  log_min, log_max = math.log(min_aspect), math.log(max_aspect)
  aspect = jnp.exp(log_min + (log_max - log_min) * u[:, a:2 * a])
  h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (h < height) & (w < width)
  first = jnp.argmax(fits, axis=1)  # first fitting attempt (0 if none fits)
  pick = lambda x: jnp.take_along_axis(x, first[:, None], axis=1)[:, 0]
  h, w = pick(h), pick(w)
  erase = (u[:, 2 * a] < probability) & jnp.any(fits, axis=1)
  # top ~ U{0, …, H − h} (timm random.randint is inclusive at both ends).
  top = jnp.floor(u[:, 2 * a + 1] * (height - h + 1)).astype(jnp.int32)
  left = jnp.floor(u[:, 2 * a + 2] * (width - w + 1)).astype(jnp.int32)
  top = jnp.clip(top, 0, jnp.maximum(height - h, 0))
  left = jnp.clip(left, 0, jnp.maximum(width - w, 0))
  return erase, top, left, h, w


def box_mask(erase, top, left, h, w, height: int, width: int) -> jax.Array:
  """[B, H, W] bool: True inside each image's box, all False where `erase` is False."""
  rows = jnp.arange(height)[None, :]
  cols = jnp.arange(width)[None, :]
  in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
  in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
  return in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None]


def random_erasing_and_mask(images: jax.Array, rng: jax.Array, *, probability: float = 0.25,
                            min_area: float = 0.02, max_area: float = 1 / 3,
                            min_aspect: float = 0.3, max_aspect: float | None = None,
                            mean: Sequence[float] = (0.0, 0.0, 0.0),
                            std: Sequence[float] = (1.0, 1.0, 1.0)):
  """`random_erasing` that also returns the [B, H, W] bool mask of erased pixels."""
  if images.ndim != 4:
    raise ValueError(f'random_erasing wants a [B, H, W, C] batch, got shape {images.shape}')
  batch, height, width, channels = images.shape
  if len(mean) != channels or len(std) != channels:
    raise ValueError(f'erasing mean {tuple(mean)} / std {tuple(std)} need {channels} values, one '
                     f'per image channel: pass the model normalisation')
  box_key, noise_key = jax.random.split(rng)
  mask = box_mask(
      *erasing_boxes(box_key, batch, height, width, probability=probability, min_area=min_area,
                     max_area=max_area, min_aspect=min_aspect, max_aspect=max_aspect), height,
      width)
  noise = jax.random.normal(noise_key, (images.size,), jnp.float32).reshape(images.shape)
  fill = jnp.asarray(mean, jnp.float32) + jnp.asarray(std, jnp.float32) * noise
  return jnp.where(mask[..., None], fill.astype(images.dtype), images), mask


def random_erasing(
    images: jax.Array, rng: jax.Array, *, probability: float = 0.25, min_area: float = 0.02,
    max_area: float = 1 / 3, min_aspect: float = 0.3, max_aspect: float | None = None,
    mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0)
) -> jax.Array:
  """timm RandomErasing(probability, mode='pixel', max_count=1) on float images [B, H, W, C].

  `images` are in [0, 1] (before the model's normalisation); `mean`/`std` must be that
  normalisation, so erased pixels are N(0, 1) once normalised, as in timm. With the defaults
  (0, 1) it works directly on already-normalised images.
  """
  return random_erasing_and_mask(images, rng, probability=probability, min_area=min_area,
                                 max_area=max_area, min_aspect=min_aspect, max_aspect=max_aspect,
                                 mean=mean, std=std)[0]
