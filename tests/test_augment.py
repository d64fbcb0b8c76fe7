"""Tests for the DeiT augmentations: RandAugment (host, PIL), RandomErasing and Mixup/CutMix (JAX).

RandAugment ops are checked one by one against PIL / NumPy re-statements with the arguments
worked out by hand from timm's level functions at magnitude 9; erasing and mixing are checked for
their exact invariants (untouched pixels, box areas, λ mixtures) and, statistically, for their
rates over large batches.
"""
import functools
import pickle

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from tikd_jax.data import mixup, randaugment, random_erasing
from tikd_jax.data.pipeline import train_dataset
from tikd_jax.data.source import ArraySource

FILL = (124, 116, 104)
BICUBIC = Image.Resampling.BICUBIC
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def _image(seed=0, size=32, channels=3):
  img = np.random.default_rng(seed).integers(0, 256, (size, size, channels), dtype=np.uint8)
  img[8:20, 4:28] = 200  # some structure for equalize / autocontrast / sharpness
  return img


# --- RandAugment ------------------------------------------------------------------------------

def _affine(img, coeffs):
  return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=BICUBIC,
                       fillcolor=FILL)


# (op, negate) → re-statement at magnitude 9 with the argument computed by hand.
M9_RESTATED = {
    ('AutoContrast', False): lambda im: ImageOps.autocontrast(im),
    ('Equalize', False): lambda im: ImageOps.equalize(im),
    ('Invert', False): lambda im: Image.fromarray(255 - np.asarray(im)),
    ('Rotate', False): lambda im: im.rotate(27.0, resample=BICUBIC, fillcolor=FILL),
    ('Rotate', True): lambda im: im.rotate(-27.0, resample=BICUBIC, fillcolor=FILL),
    # 4 − int(0.9·4) = 1 bit kept
    ('PosterizeIncreasing', False): lambda im: Image.fromarray(np.asarray(im) & 0x80),
    # 256 − int(0.9·256) = 26: pixels ≥ 26 inverted
    ('SolarizeIncreasing', False): lambda im: Image.fromarray(
        np.where(np.asarray(im) >= 26, 255 - np.asarray(im), np.asarray(im)).astype(np.uint8)),
    # add min(128, int(0.9·110)) = 99 below 128
    ('SolarizeAdd', False): lambda im: Image.fromarray(np.where(
        np.asarray(im) < 128, np.minimum(255, np.asarray(im).astype(int) + 99),
        np.asarray(im)).astype(np.uint8)),
    ('ColorIncreasing', False): lambda im: ImageEnhance.Color(im).enhance(1.81),
    ('ColorIncreasing', True): lambda im: ImageEnhance.Color(im).enhance(0.19),
    ('ContrastIncreasing', False): lambda im: ImageEnhance.Contrast(im).enhance(1.81),
    ('BrightnessIncreasing', True): lambda im: ImageEnhance.Brightness(im).enhance(0.19),
    ('SharpnessIncreasing', False): lambda im: ImageEnhance.Sharpness(im).enhance(1.81),
    ('ShearX', False): lambda im: _affine(im, (1, 0.27, 0, 0, 1, 0)),
    ('ShearY', True): lambda im: _affine(im, (1, 0, 0, -0.27, 1, 0)),
    ('TranslateXRel', False): lambda im: _affine(im, (1, 0, 0.405 * 32, 0, 1, 0)),
    ('TranslateYRel', True): lambda im: _affine(im, (1, 0, 0, 0, 1, -0.405 * 32)),
    # non-increasing variants (inc0)
    ('Posterize', False): lambda im: Image.fromarray(np.asarray(im) & 0xE0),       # int(3.6) = 3 bits
    ('Solarize', False): lambda im: ImageOps.solarize(im, 230),                   # int(0.9·256)
    ('Contrast', False): lambda im: ImageEnhance.Contrast(im).enhance(1.72),       # 0.9·1.8 + 0.1
}


@pytest.mark.parametrize('name,negate', sorted(M9_RESTATED))
def test_op_at_magnitude_9_matches_restatement(name, negate):
  img = _image()
  got = randaugment.apply_op(img, name, 9, negate=negate, fill=FILL, interpolation='bicubic')
  want = np.asarray(M9_RESTATED[name, negate](Image.fromarray(img)))
  assert got.shape == (32, 32, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, want)
  assert name in randaugment.INCREASING_OPS + randaugment.DEFAULT_OPS


def test_op_arguments_and_posterize_zero_bits():
  assert randaugment.op_argument('Rotate', 10, negate=True) == -30.0
  assert randaugment.op_argument('PosterizeIncreasing', 10) == 0
  assert randaugment.op_argument('SolarizeIncreasing', 0) == 256
  assert randaugment.op_argument('BrightnessIncreasing', 10, negate=True) == pytest.approx(0.1)
  assert randaugment.op_argument('TranslateXRel', 5) == pytest.approx(0.225)
  # magnitude 10 keeps 0 bits: a black image (old-Pillow / timm behaviour)
  out = randaugment.apply_op(_image(), 'PosterizeIncreasing', 10)
  assert out.max() == 0
  with pytest.raises(ValueError, match='unknown RandAugment op'):
    randaugment.op_argument('Cutout', 5)


def test_op_set_is_timm_inc1():
  assert len(randaugment.INCREASING_OPS) == 15 == len(set(randaugment.INCREASING_OPS))
  assert {'PosterizeIncreasing', 'SolarizeIncreasing', 'SolarizeAdd', 'TranslateXRel'} <= set(
      randaugment.INCREASING_OPS)
  assert 'Posterize' not in randaugment.INCREASING_OPS


def test_rand_augment_shape_dtype_determinism():
  img = _image()
  run = lambda seed: [randaugment.rand_augment(img, rng) for rng in
                      [np.random.default_rng(seed)] for _ in range(8)]
  a, b, c = run(0), run(0), run(1)
  for out in a:
    assert out.shape == img.shape and out.dtype == np.uint8
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  gray = randaugment.rand_augment(_image(channels=1), np.random.default_rng(0))
  assert gray.shape == (32, 32, 1) and gray.dtype == np.uint8


def test_rand_augment_op_probability_and_count():
  img = _image()
  rng = np.random.default_rng(0)
  kw = dict(ops=('Invert',), magnitude_std=0.0)
  inverted = [np.array_equal(randaugment.rand_augment(img, rng, num_ops=1, **kw), 255 - img)
              for _ in range(2000)]
  assert abs(np.mean(inverted) - 0.5) < 0.05              # each op applied with prob 0.5
  # prob 1: two Inverts cancel, one inverts
  np.testing.assert_array_equal(
      randaugment.rand_augment(img, rng, num_ops=2, prob=1.0, **kw), img)
  np.testing.assert_array_equal(
      randaugment.rand_augment(img, rng, num_ops=1, prob=1.0, **kw), 255 - img)


def test_make_host_augment_element_and_pipeline():
  cfg = ml_collections.ConfigDict(dict(randaugment=True, randaugment_num_ops=2,
                                       randaugment_magnitude=9, randaugment_magnitude_std=0.5,
                                       randaugment_increasing=True, interpolation='bicubic',
                                       mean=MEAN))
  augment = randaugment.make_host_augment(cfg)
  assert augment.keywords['fill'] == (129, 124, 112)       # round(255 · CIFAR-100 mean)
  assert randaugment.fill_from_mean((0.485, 0.456, 0.406)) == FILL  # DeiT's ImageNet value
  augment = pickle.loads(pickle.dumps(augment))            # grain workers pickle it
  element = {'image': _image(), 'label': np.int32(3), 'index': np.int32(7)}
  out = augment(element, np.random.default_rng(5))
  assert out['label'] == 3 and out['index'] == 7 and out['image'].shape == (32, 32, 3)
  np.testing.assert_array_equal(out['image'], augment(element, np.random.default_rng(5))['image'])
  assert randaugment.make_host_augment(ml_collections.ConfigDict(dict(randaugment=False))) is None

  images = np.stack([_image(i) for i in range(16)])
  source = ArraySource(images, np.arange(16) % 4, list('abcd'), 'toy', 'train')
  plain = train_dataset(source, batch_size=8, seed=0)[0]['image']
  batch = train_dataset(source, batch_size=8, seed=0, extra_augment=augment)[0]
  again = train_dataset(source, batch_size=8, seed=0, extra_augment=augment)[0]
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.uint8
  np.testing.assert_array_equal(batch['image'], again['image'])
  assert not np.array_equal(batch['image'], plain)


# --- RandomErasing ----------------------------------------------------------------------------

def test_erasing_rate_areas_and_untouched_pixels():
  b, h, w = 2048, 32, 32
  images = jax.random.uniform(jax.random.key(1), (b, h, w, 3))
  key = jax.random.key(0)
  out, mask = random_erasing.random_erasing_and_mask(images, key, probability=0.25,
                                                     mean=MEAN, std=STD)
  out, mask, images = np.asarray(out), np.asarray(mask), np.asarray(images)
  erased = mask.any(axis=(1, 2))
  assert abs(erased.mean() - 0.25) < 0.04                  # 4σ of a binomial rate at n = 2048
  np.testing.assert_array_equal(out[~mask], images[~mask])  # every untouched pixel is unchanged
  noise = (out[mask] - np.asarray(MEAN)) / np.asarray(STD)  # N(0, 1) after normalisation
  assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1.0) < 0.02

  erase, top, left, bh, bw = map(np.asarray, random_erasing.erasing_boxes(
      jax.random.split(key)[0], b, h, w, probability=0.25))
  np.testing.assert_array_equal(erase, erased)
  area = mask.sum(axis=(1, 2))
  np.testing.assert_array_equal(area[erase], (bh * bw)[erase])     # one solid h × w box
  assert np.all(top[erase] + bh[erase] <= h) and np.all(left[erase] + bw[erase] <= w)
  assert np.all(bh[erase] < h) and np.all(bw[erase] < w)
  # h, w are roundings of √(t·a), √(t/a), so the target area t lies in [(h−½)(w−½), (h+½)(w+½)]
  # and must meet [0.02, 1/3]·H·W.
  lo, hi = (bh - 0.5) * (bw - 0.5), (bh + 0.5) * (bw + 0.5)
  assert np.all(lo[erase] <= h * w / 3) and np.all(hi[erase] >= 0.02 * h * w)
  frac = area[erase] / (h * w)
  assert 0.015 < frac.min() and frac.max() < 0.36          # [0.02, 1/3] up to rounding
  assert abs(frac.mean() - 0.175) < 0.01                   # ≈ (0.02 + 1/3)/2, timm gives 0.1755


def test_erasing_rate_tight_and_determinism():
  erase = np.asarray(random_erasing.erasing_boxes(jax.random.key(3), 40000, 32, 32,
                                                  probability=0.25)[0])
  assert abs(erase.mean() - 0.25) < 0.009                  # 4σ at n = 40000
  images = jnp.full((8, 16, 16, 3), 0.5)
  fn = jax.jit(functools.partial(random_erasing.random_erasing, probability=0.5, mean=MEAN,
                                 std=STD))
  a, b = fn(images, jax.random.key(0)), fn(images, jax.random.key(0))
  c = fn(images, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  untouched = random_erasing.random_erasing(images, jax.random.key(0), probability=0.0)
  np.testing.assert_array_equal(np.asarray(untouched), np.asarray(images))


# --- Mixup / CutMix ---------------------------------------------------------------------------

def _smooth(labels, c, s):
  y = np.full((len(labels), c), s / c)
  y[np.arange(len(labels)), labels] = 1 - s + s / c
  return y


def test_mixup_images_and_targets():
  b, c = 8, 10
  images = jax.random.uniform(jax.random.key(0), (b, 8, 8, 3))
  labels = jnp.arange(b) % c
  fn = jax.jit(functools.partial(mixup.mixup_cutmix_and_lam, cutmix_alpha=0.0), static_argnums=2)
  for seed in range(5):
    out, targets, lam, cut = fn(images, labels, c, jax.random.key(seed))
    lam = float(lam)
    assert not bool(cut) and 0.0 < lam < 1.0
    x = np.asarray(images)
    np.testing.assert_allclose(np.asarray(out), lam * x + (1 - lam) * x[::-1], rtol=1e-6,
                               atol=1e-6)
    y = _smooth(np.asarray(labels), c, 0.1)
    np.testing.assert_allclose(np.asarray(targets), lam * y + (1 - lam) * y[::-1], atol=1e-6)
    np.testing.assert_allclose(np.asarray(targets).sum(1), 1.0, atol=1e-6)


def test_cutmix_box_area_is_one_minus_lam():
  b, h, w, c = 6, 16, 16, 5
  images = jnp.broadcast_to(jnp.arange(b, dtype=jnp.float32)[:, None, None, None], (b, h, w, 3))
  labels = jnp.array([0, 1, 2, 3, 4, 0])
  fn = jax.jit(functools.partial(mixup.mixup_cutmix_and_lam, mixup_alpha=0.0), static_argnums=2)
  seen_partial = 0
  for seed in range(20):
    out, targets, lam, cut = map(np.asarray, fn(images, labels, c, jax.random.key(seed)))
    assert cut
    from_partner = out[..., 0] == np.arange(b)[::-1, None, None]   # pixels pasted from flip(x)
    pasted = from_partner.mean(axis=(1, 2))
    np.testing.assert_allclose(pasted, 1.0 - lam, atol=1e-6)        # same box for every image
    rows, cols = from_partner[0].any(1), from_partner[0].any(0)
    assert from_partner[0].sum() == rows.sum() * cols.sum()         # a rectangle
    y = _smooth(np.asarray(labels), c, 0.1)
    np.testing.assert_allclose(targets, lam * y + (1 - lam) * y[::-1], atol=1e-6)
    seen_partial += 0 < lam < 1
  assert seen_partial >= 15


def test_rand_bbox_sides():
  h = w = 32
  lam = 0.5
  cut = int(32 * np.sqrt(0.5))  # 22 → half-side 11
  boxes = jax.vmap(lambda k: jnp.stack(mixup.rand_bbox(k, h, w, lam)))(
      jax.random.split(jax.random.key(0), 500))
  yl, yh, xl, xh = np.asarray(boxes).T
  assert np.all(yh - yl <= 2 * (cut // 2)) and np.all(yl >= 0) and np.all(yh <= h)
  inside = (yl > 0) & (yh < h)
  assert inside.sum() > 100 and np.all((yh - yl)[inside] == 22)


def test_mix_statistics_match_timm_batch_mode():
  keys = jax.random.split(jax.random.key(1), 4000)
  images = jnp.zeros((4, 16, 16, 3))
  f = jax.jit(jax.vmap(lambda k: mixup.mixup_cutmix_and_lam(images, jnp.arange(4), 10, k)[2:]))
  lam, cut = map(np.asarray, f(keys))
  assert abs(cut.mean() - 0.5) < 0.035                     # switch_prob 0.5
  mix = lam[~cut]                                          # Beta(0.8, 0.8): mean ½, var 1/10.4
  assert abs(mix.mean() - 0.5) < 0.025 and abs(mix.var() - 1 / 10.4) < 0.01
  assert np.all((lam >= 0) & (lam <= 1))
  never, _ = map(np.asarray, jax.vmap(lambda k: mixup.mixup_cutmix_and_lam(
      images, jnp.arange(4), 10, k, prob=0.0)[2:])(keys[:50]))
  np.testing.assert_array_equal(never, 1.0)


def test_alphas_zero_give_smoothed_one_hot():
  images = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
  labels = jnp.array([0, 3, 99, 3])
  out, targets = mixup.mixup_cutmix(images, labels, 100, jax.random.key(0), mixup_alpha=0.0,
                                    cutmix_alpha=0.0, label_smoothing=0.1)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(images))
  t = np.asarray(targets)
  assert t.shape == (4, 100)
  np.testing.assert_allclose(t[np.arange(4), np.asarray(labels)], 0.901, rtol=1e-6)
  np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)
  assert np.isclose(t[0, 1], 0.001) and np.isclose(t[2, 0], 0.001)


def _cfg(**overrides):
  cfg = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, mix_prob=1.0,
             label_smoothing=0.1, erasing_prob=0.25, mean=MEAN, std=STD)
  return ml_collections.ConfigDict({**cfg, **overrides})


def test_make_batch_augment_step_signature_jit_determinism():
  images = jax.random.uniform(jax.random.key(0), (8, 16, 16, 3))
  labels = jnp.arange(8) % 10
  aug = mixup.make_batch_augment(_cfg())
  step = jax.jit(lambda x, y, k: aug(x, y, 10, k))         # as StepOptions.batch_augment
  a_img, a_t = step(images, labels, jax.random.key(0))
  b_img, b_t = step(images, labels, jax.random.key(0))
  c_img, _ = step(images, labels, jax.random.key(1))
  assert a_img.shape == images.shape and a_img.dtype == jnp.float32 and a_t.shape == (8, 10)
  np.testing.assert_array_equal(np.asarray(a_img), np.asarray(b_img))
  np.testing.assert_array_equal(np.asarray(a_t), np.asarray(b_t))
  assert not np.array_equal(np.asarray(a_img), np.asarray(c_img))
  np.testing.assert_allclose(np.asarray(a_t).sum(1), 1.0, atol=1e-6)

  off = mixup.make_batch_augment(_cfg(mixup_alpha=0.0, cutmix_alpha=0.0, erasing_prob=0.0))
  img, t = off(images, labels, 10, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(img), np.asarray(images))
  np.testing.assert_allclose(np.asarray(t), _smooth(np.asarray(labels), 10, 0.1), atol=1e-7)

  erase_only = mixup.make_batch_augment(_cfg(mixup_alpha=0.0, cutmix_alpha=0.0, erasing_prob=1.0))
  img, t = erase_only(images, labels, 10, jax.random.key(0))
  changed = np.asarray(img != images).any(axis=(1, 2, 3))
  assert changed.all()                                     # every image erased, labels intact
  np.testing.assert_allclose(np.asarray(t), _smooth(np.asarray(labels), 10, 0.1), atol=1e-7)
