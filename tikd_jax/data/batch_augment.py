"""On-device batch augmentation inside the jitted train step (DeiT's recipe as timm does it):
random erasing, then Mixup / CutMix; `make_batch_augment` builds the step's `batch_augment`.
Teacher and student see the same augmented batch.

## Random erasing
timm RandomErasing (DeiT: `--reprob 0.25 --remode pixel --recount 1`) on device, batched.

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

## Mixup / CutMix
timm Mixup / CutMix in 'batch' mode (DeiT: mixup 0.8, cutmix 1.0, switch 0.5, prob 1.0,
smoothing 0.1).

A restatement of timm/data/mixup.py (`Mixup._params_per_batch`, `_mix_batch`, `rand_bbox`,
`cutmix_bbox_and_lam`, `mixup_target`). One λ for the whole batch; every image is mixed with the
image at the mirrored position (`x.flip(0)`):

  with probability `prob`:  (otherwise λ = 1, no mixing)
    if both alphas > 0: cutmix with probability `switch_prob`, else mixup;
    λ ~ Beta(α, α) of the chosen method;
    mixup:  x ← λ·x + (1 − λ)·flip(x)
    cutmix: a box of side ⌊H·√(1−λ)⌋ × ⌊W·√(1−λ)⌋ centred at a uniform pixel, clipped to the
            image (timm `rand_bbox`, half-sides rounded down), is pasted from flip(x); with
            `correct_lam` λ ← 1 − box area / (H·W), the true fraction of own pixels.
  targets = λ·smooth(y) + (1 − λ)·smooth(flip(y)); smooth: one-hot, off = s/C, on = 1 − s + s/C.

Both branches are computed and selected with `jnp.where` (cheap at these image sizes; keeps the
function branch-free). An odd batch is allowed (the middle image mixes with itself); timm asserts
an even one.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from tikd_jax.losses.classification import one_hot_smoothed

ATTEMPTS = 10  # timm's attempts per box
# config.augment.randaugment_on: in the grain workers on uint8 images (Pillow: timm's arithmetic
# bit for bit) or at the start of the jitted step (data/device_randaugment.py), for hosts with too
# few cores to feed the accelerator (docs/scaling_out.md).
RANDAUGMENT_ON = ('host', 'device')


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


# ------------------------------------------------------------------------------ Mixup / CutMix
def mixup_target(labels: jax.Array, num_classes: int, lam, smoothing: float = 0.0) -> jax.Array:
  """timm `mixup_target`: λ·smooth(y) + (1 − λ)·smooth(flip(y)), float32 [B, C]."""
  y = one_hot_smoothed(labels, num_classes, smoothing)
  return lam * y + (1.0 - lam) * y[::-1]


def _bbox(u_y, u_x, height: int, width: int, lam):
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jnp.minimum(jnp.floor(u_y * height), height - 1).astype(jnp.int32)  # U{0, …, H − 1}
  cx = jnp.minimum(jnp.floor(u_x * width), width - 1).astype(jnp.int32)
  yl = jnp.clip(cy - cut_h // 2, 0, height)
  yh = jnp.clip(cy + cut_h // 2, 0, height)
  xl = jnp.clip(cx - cut_w // 2, 0, width)
  xh = jnp.clip(cx + cut_w // 2, 0, width)
  return yl, yh, xl, xh


def rand_bbox(rng: jax.Array, height: int, width: int, lam):
  """timm `rand_bbox` (no margin): (y_low, y_high, x_low, x_high) int32 scalars, high exclusive."""
  u = jax.random.uniform(rng, (2,))
  return _bbox(u[0], u[1], height, width, lam)


def mixup_cutmix_and_lam(images: jax.Array, labels: jax.Array, num_classes: int, rng: jax.Array, *,
                         mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                         switch_prob: float = 0.5, prob: float = 1.0, label_smoothing: float = 0.1,
                         correct_lam: bool = True):
  """`mixup_cutmix` that also returns λ (after correction) and whether cutmix was used."""
  if images.ndim != 4:
    raise ValueError(f'mixup_cutmix wants a [B, H, W, C] batch, got shape {images.shape}')
  if (mixup_alpha <= 0 and cutmix_alpha <= 0) or prob <= 0:  # never mixes (timm asserts on
    # both alphas 0; we fall back to the plain smoothed targets)
    return (images, one_hot_smoothed(labels, num_classes,
                                     label_smoothing), jnp.float32(1.0), jnp.bool_(False))
  _, height, width, _ = images.shape
  # Few, flat random draws keep the compile short: u = (apply, switch, box y, box x), and one
  # Beta sample whose α is the chosen method's (same law as timm's two separate samplers).
  k_u, k_beta = jax.random.split(rng)
  u = jax.random.uniform(k_u, (4,))
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = u[1] < switch_prob
  else:
    use_cutmix = jnp.bool_(cutmix_alpha > 0)
  alpha = jnp.where(use_cutmix, jnp.float32(cutmix_alpha), jnp.float32(mixup_alpha))
  lam = jax.random.beta(k_beta, alpha, alpha)
  apply = u[0] < prob
  lam = jnp.where(apply, lam.astype(jnp.float32), 1.0)
  use_cutmix = use_cutmix & apply

  flipped = images[::-1]
  mixed = (lam * images + (1.0 - lam) * flipped).astype(images.dtype)
  yl, yh, xl, xh = _bbox(u[2], u[3], height, width, lam)
  rows, cols = jnp.arange(height), jnp.arange(width)
  box = (((rows >= yl) & (rows < yh))[:, None] & ((cols >= xl) & (cols < xh))[None, :])
  cut = jnp.where(box[None, :, :, None], flipped, images)
  lam_cut = 1.0 - ((yh - yl) * (xh - xl)).astype(jnp.float32) / (height * width)
  lam_cut = lam_cut if correct_lam else lam

  images = jnp.where(use_cutmix, cut, mixed)
  lam = jnp.where(use_cutmix, lam_cut, lam)
  return images, mixup_target(labels, num_classes, lam, label_smoothing), lam, use_cutmix


def mixup_cutmix(images: jax.Array, labels: jax.Array, num_classes: int, rng: jax.Array, *,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
                 prob: float = 1.0, label_smoothing: float = 0.1, correct_lam: bool = True):
  """timm Mixup(mode='batch') on images [B, H, W, C] and int labels [B] → (images, targets [B, C]).

  With both alphas 0 (or `prob` 0) it returns the images untouched and smoothed one-hot targets.
  """
  return mixup_cutmix_and_lam(images, labels, num_classes, rng, mixup_alpha=mixup_alpha,
                              cutmix_alpha=cutmix_alpha, switch_prob=switch_prob, prob=prob,
                              label_smoothing=label_smoothing, correct_lam=correct_lam)[:2]


def _batch_augment(images, labels, num_classes, rng, *, randaugment, erasing_prob, mean, std,
                   **mix_kwargs):
  if randaugment is not None:  # timm's per-sample order: RandAugment on pixels, then erasing
    pixels = jnp.round(images * 255.0)  # the uint8 values again, exactly
    images = randaugment(pixels, jax.random.fold_in(rng, 3)) / 255.0
  erase_key, mix_key = jax.random.split(rng)
  if erasing_prob > 0:
    images = random_erasing_and_mask(images, erase_key, probability=erasing_prob, mean=mean,
                                     std=std)[0]
  return mixup_cutmix_and_lam(images, labels, num_classes, mix_key, **mix_kwargs)[:2]


def make_batch_augment(cfg):
  """`StepOptions.batch_augment`: (images [B,H,W,C] in [0,1], labels, num_classes, rng) →
  (images, targets [B, C]), run inside the jitted train step.

  Order as in DeiT: random erasing first (timm puts it in the per-sample transform, after
  normalisation), then mixup/cutmix on the batch (DeiT's `mixup_fn` in the train loop), so an
  erased patch can be mixed into the partner image just as in DeiT. Mixing [0, 1] images before
  the model's (affine) normalisation equals DeiT's mixing of normalised images, as λ + (1 − λ) = 1.

  With `randaugment` on and `randaugment_on='device'`, timm's RandAugment comes first
  (data/device_randaugment.py), where the host would have applied it.

  Reads `mixup_alpha`, `cutmix_alpha`, `switch_prob`, `mix_prob`, `correct_lam`,
  `label_smoothing`, `erasing_prob`, `mean`/`std` (the student's normalisation, for the erasing
  noise) and the RandAugment keys. Build it once and reuse it: the step is compiled per distinct
  callable.
  """
  randaugment = None
  if cfg.get('randaugment') and cfg.randaugment_on == 'device':
    from tikd_jax.data.device_randaugment import make_device_randaugment  # pylint: disable=g-import-not-at-top
    randaugment = make_device_randaugment(cfg)
  mix = dict(mixup_alpha=float(cfg.mixup_alpha), cutmix_alpha=float(cfg.cutmix_alpha),
             switch_prob=float(cfg.switch_prob), prob=float(cfg.mix_prob),
             label_smoothing=float(cfg.label_smoothing), correct_lam=bool(cfg.correct_lam))
  return functools.partial(_batch_augment, randaugment=randaugment,
                           erasing_prob=float(cfg.erasing_prob),
                           mean=tuple(float(v) for v in cfg.mean),
                           std=tuple(float(v) for v in cfg.std), **mix)
