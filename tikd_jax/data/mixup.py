"""timm Mixup / CutMix in 'batch' mode (DeiT: mixup 0.8, cutmix 1.0, switch 0.5, prob 1.0,
smoothing 0.1) as jit-able JAX, and the train step's `batch_augment` (random erasing → mix).

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

import jax
import jax.numpy as jnp

from tikd_jax.data.random_erasing import random_erasing
from tikd_jax.losses.classification import one_hot_smoothed


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


def _batch_augment(images, labels, num_classes, rng, *, erasing_prob, mean, std, **mix_kwargs):
  erase_key, mix_key = jax.random.split(rng)
  if erasing_prob > 0:
    images = random_erasing(images, erase_key, probability=erasing_prob, mean=mean, std=std)
  return mixup_cutmix(images, labels, num_classes, mix_key, **mix_kwargs)


def make_batch_augment(cfg):
  """`StepOptions.batch_augment`: (images [B,H,W,C] in [0,1], labels, num_classes, rng) →
  (images, targets [B, C]), run inside the jitted train step.

  Order as in DeiT: random erasing first (timm puts it in the per-sample transform, after
  normalisation), then mixup/cutmix on the batch (DeiT's `mixup_fn` in the train loop), so an
  erased patch can be mixed into the partner image just as in DeiT. Mixing [0, 1] images before
  the model's (affine) normalisation equals DeiT's mixing of normalised images, as λ + (1 − λ) = 1.

  Reads `mixup_alpha`, `cutmix_alpha`, `switch_prob`, `mix_prob`, `correct_lam`,
  `label_smoothing`, `erasing_prob` and `mean`/`std` (the student's normalisation, for the erasing
  noise). Build it once and reuse it: the step is compiled per distinct callable.
  """
  return functools.partial(_batch_augment, erasing_prob=float(cfg.erasing_prob),
                           mean=tuple(float(v) for v in cfg.mean),
                           std=tuple(float(v) for v in cfg.std), mixup_alpha=float(cfg.mixup_alpha),
                           cutmix_alpha=float(cfg.cutmix_alpha), switch_prob=float(cfg.switch_prob),
                           prob=float(cfg.mix_prob), label_smoothing=float(cfg.label_smoothing),
                           correct_lam=bool(cfg.correct_lam))
