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

from tikd_jax.data import batch_augment, host_augment
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
  return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=BICUBIC, fillcolor=FILL)


# (op, negate) → re-statement at magnitude 9 with the argument computed by hand.
M9_RESTATED = {
    ('AutoContrast', False):
        lambda im: ImageOps.autocontrast(im),
    ('Equalize', False):
        lambda im: ImageOps.equalize(im),
    ('Invert', False):
        lambda im: Image.fromarray(255 - np.asarray(im)),
    ('Rotate', False):
        lambda im: im.rotate(27.0, resample=BICUBIC, fillcolor=FILL),
    ('Rotate', True):
        lambda im: im.rotate(-27.0, resample=BICUBIC, fillcolor=FILL),
    # 4 − int(0.9·4) = 1 bit kept
    ('PosterizeIncreasing', False):
        lambda im: Image.fromarray(np.asarray(im) & 0x80),
    # 256 − int(0.9·256) = 26: pixels ≥ 26 inverted
    ('SolarizeIncreasing', False):
        lambda im: Image.fromarray(
            np.where(np.asarray(im) >= 26, 255 - np.asarray(im), np.asarray(im)).astype(np.uint8)),
    # add min(128, int(0.9·110)) = 99 below 128
    ('SolarizeAdd', False):
        lambda im: Image.fromarray(
            np.where(
                np.asarray(im) < 128, np.minimum(255,
                                                 np.asarray(im).astype(int) + 99), np.asarray(im)).
            astype(np.uint8)),
    ('ColorIncreasing', False):
        lambda im: ImageEnhance.Color(im).enhance(1.81),
    ('ColorIncreasing', True):
        lambda im: ImageEnhance.Color(im).enhance(0.19),
    ('ContrastIncreasing', False):
        lambda im: ImageEnhance.Contrast(im).enhance(1.81),
    ('BrightnessIncreasing', True):
        lambda im: ImageEnhance.Brightness(im).enhance(0.19),
    ('SharpnessIncreasing', False):
        lambda im: ImageEnhance.Sharpness(im).enhance(1.81),
    ('ShearX', False):
        lambda im: _affine(im, (1, 0.27, 0, 0, 1, 0)),
    ('ShearY', True):
        lambda im: _affine(im, (1, 0, 0, -0.27, 1, 0)),
    ('TranslateXRel', False):
        lambda im: _affine(im, (1, 0, 0.405 * 32, 0, 1, 0)),
    ('TranslateYRel', True):
        lambda im: _affine(im, (1, 0, 0, 0, 1, -0.405 * 32)),
    # non-increasing variants (inc0)
    ('Posterize', False):
        lambda im: Image.fromarray(np.asarray(im) & 0xE0),  # int(3.6) = 3 bits
    ('Solarize', False):
        lambda im: ImageOps.solarize(im, 230),  # int(0.9·256)
    ('Contrast', False):
        lambda im: ImageEnhance.Contrast(im).enhance(1.72),  # 0.9·1.8 + 0.1
}


@pytest.mark.parametrize('name,negate', sorted(M9_RESTATED))
def test_op_at_magnitude_9_matches_restatement(name, negate):
  img = _image()
  got = host_augment.apply_op(img, name, 9, negate=negate, fill=FILL, interpolation='bicubic')
  want = np.asarray(M9_RESTATED[name, negate](Image.fromarray(img)))
  assert got.shape == (32, 32, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, want)
  assert name in host_augment.INCREASING_OPS + host_augment.DEFAULT_OPS


def test_op_arguments_and_posterize_zero_bits():
  assert host_augment.op_argument('Rotate', 10, negate=True) == -30.0
  assert host_augment.op_argument('PosterizeIncreasing', 10) == 0
  assert host_augment.op_argument('SolarizeIncreasing', 0) == 256
  assert host_augment.op_argument('BrightnessIncreasing', 10, negate=True) == pytest.approx(0.1)
  assert host_augment.op_argument('TranslateXRel', 5) == pytest.approx(0.225)
  # magnitude 10 keeps 0 bits: a black image (old-Pillow / timm behaviour)
  out = host_augment.apply_op(_image(), 'PosterizeIncreasing', 10)
  assert out.max() == 0
  with pytest.raises(ValueError, match='unknown RandAugment op'):
    host_augment.op_argument('Cutout', 5)


def test_op_set_is_timm_inc1():
  assert len(host_augment.INCREASING_OPS) == 15 == len(set(host_augment.INCREASING_OPS))
  assert {'PosterizeIncreasing', 'SolarizeIncreasing', 'SolarizeAdd',
          'TranslateXRel'} <= set(host_augment.INCREASING_OPS)
  assert 'Posterize' not in host_augment.INCREASING_OPS


def test_rand_augment_shape_dtype_determinism():
  img = _image()

  def run(seed):  # 8 successive draws from one generator
    rng = np.random.default_rng(seed)
    return [host_augment.rand_augment(img, rng) for _ in range(8)]

  a, b, c = run(0), run(0), run(1)
  for out in a:
    assert out.shape == img.shape and out.dtype == np.uint8
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  gray = host_augment.rand_augment(_image(channels=1), np.random.default_rng(0))
  assert gray.shape == (32, 32, 1) and gray.dtype == np.uint8


def test_rand_augment_op_probability_and_count():
  img = _image()
  rng = np.random.default_rng(0)
  kw = dict(ops=('Invert',), magnitude_std=0.0)
  inverted = [
      np.array_equal(host_augment.rand_augment(img, rng, num_ops=1, **kw), 255 - img)
      for _ in range(2000)
  ]
  assert abs(np.mean(inverted) - 0.5) < 0.05  # each op applied with prob 0.5
  # prob 1: two Inverts cancel, one inverts
  np.testing.assert_array_equal(host_augment.rand_augment(img, rng, num_ops=2, prob=1.0, **kw), img)
  np.testing.assert_array_equal(host_augment.rand_augment(img, rng, num_ops=1, prob=1.0, **kw),
                                255 - img)


def test_make_host_augment_element_and_pipeline():
  cfg = ml_collections.ConfigDict(
      dict(randaugment=True, randaugment_num_ops=2, randaugment_magnitude=9,
           randaugment_magnitude_std=0.5, randaugment_increasing=True, interpolation='bicubic',
           mean=MEAN))
  augment = host_augment.make_host_augment(cfg)
  assert augment.keywords['fill'] == (129, 124, 112)  # round(255 · CIFAR-100 mean)
  assert host_augment.fill_from_mean((0.485, 0.456, 0.406)) == FILL  # DeiT's ImageNet value
  augment = pickle.loads(pickle.dumps(augment))  # grain workers pickle it
  element = {'image': _image(), 'label': np.int32(3), 'index': np.int32(7)}
  out = augment(element, np.random.default_rng(5))
  assert out['label'] == 3 and out['index'] == 7 and out['image'].shape == (32, 32, 3)
  np.testing.assert_array_equal(out['image'], augment(element, np.random.default_rng(5))['image'])
  assert host_augment.make_host_augment(ml_collections.ConfigDict(dict(randaugment=False))) is None

  images = np.stack([_image(i) for i in range(16)])
  source = ArraySource(images, np.arange(16) % 4, list('abcd'), 'toy', 'train')
  plain = train_dataset(source, batch_size=8, seed=0)[0]['image']
  batch = train_dataset(source, batch_size=8, seed=0, extra_augment=augment)[0]
  again = train_dataset(source, batch_size=8, seed=0, extra_augment=augment)[0]
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.uint8
  np.testing.assert_array_equal(batch['image'], again['image'])
  assert not np.array_equal(batch['image'], plain)


# --- RandomErasing ----------------------------------------------------------------------------

ERASE_BATCH = 1024


@functools.cache
def _erase_fn():  # one compiled program shared by the erasing tests
  return jax.jit(
      functools.partial(batch_augment.random_erasing_and_mask, probability=0.25, mean=MEAN,
                        std=STD))


def test_erasing_rate_areas_and_untouched_pixels():
  b, h, w = ERASE_BATCH, 32, 32
  images = np.random.default_rng(0).random((b, h, w, 3), dtype=np.float32)
  out, mask = map(np.asarray, _erase_fn()(images, jax.random.key(0)))
  erase = mask.any(axis=(1, 2))
  assert abs(erase.mean() - 0.25) < 0.055  # 4σ of a binomial rate at n = 1024
  np.testing.assert_array_equal(out[~mask], images[~mask])  # every untouched pixel is unchanged
  noise = (out[mask] - np.asarray(MEAN)) / np.asarray(STD)  # N(0, 1) after normalisation
  assert abs(noise.mean()) < 0.03 and abs(noise.std() - 1.0) < 0.03

  m = mask[erase]
  bh, bw = m.any(axis=2).sum(1), m.any(axis=1).sum(1)  # box height / width
  area = m.sum(axis=(1, 2))
  np.testing.assert_array_equal(area, bh * bw)  # one solid h × w box per image
  assert np.all(bh < h) and np.all(bw < w)  # timm keeps boxes with h < H, w < W
  # h, w are roundings of √(t·a), √(t/a), so the target area t lies in [(h−½)(w−½), (h+½)(w+½)],
  # which must meet [0.02, 1/3]·H·W.
  assert np.all((bh - 0.5) * (bw - 0.5) <= h * w / 3)
  assert np.all((bh + 0.5) * (bw + 0.5) >= 0.02 * h * w)
  frac = area / (h * w)
  assert 0.015 < frac.min() and frac.max() < 0.36  # [0.02, 1/3] up to rounding
  assert abs(frac.mean() - 0.175) < 0.02  # ≈ (0.02 + 1/3)/2; timm gives 0.1755


def test_erasing_rate_over_large_batch_and_determinism():
  erase, top, left, bh, bw = map(
      np.asarray,
      jax.jit(
          functools.partial(batch_augment.erasing_boxes, batch_size=40000, height=32, width=32,
                            probability=0.25))(jax.random.key(3)))
  assert abs(erase.mean() - 0.25) < 0.009  # 4σ at n = 40000
  assert np.all(top + bh <= 32) and np.all(left + bw <= 32) and top.min() == 0
  heights, counts = np.unique(bh[erase], return_counts=True)
  for hh in heights[np.argsort(counts)[-5:]]:  # top ~ U{0, …, H − h}, both ends
    assert top[erase & (bh == hh)].min() == 0 and top[erase & (bh == hh)].max() == 32 - hh
  images = np.full((ERASE_BATCH, 32, 32, 3), 0.5, np.float32)
  a, b, c = (np.asarray(_erase_fn()(images, jax.random.key(k))[0]) for k in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


# --- Mixup / CutMix ---------------------------------------------------------------------------

MIX_KEYS, MIX_B, MIX_C = 2000, 4, 5


def _smooth(labels, c, s):
  y = np.full((len(labels), c), s / c)
  y[np.arange(len(labels)), labels] = 1 - s + s / c
  return y


@functools.cache
def _mixed():
  """DeiT's Mixup over MIX_KEYS keys, one compile: image i is i + U[0, ½) per pixel."""
  x = np.arange(MIX_B, dtype=np.float32)[:, None, None,
                                         None] + 0.5 * np.random.default_rng(0).random(
                                             (MIX_B, 8, 8, 3), dtype=np.float32)
  labels = np.array([0, 3, 4, 3])
  f = jax.jit(jax.vmap(lambda k: batch_augment.mixup_cutmix_and_lam(x, labels, MIX_C, k)))
  out = tuple(map(np.asarray, f(jax.random.split(jax.random.key(0), MIX_KEYS))))
  return x, labels, out


def test_mixup_images_and_targets():
  x, labels, (images, targets, lam, cut) = _mixed()
  y = _smooth(labels, MIX_C, 0.1)
  np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(targets, lam[:, None, None] * y + (1 - lam[:, None, None]) * y[::-1],
                             atol=1e-6)
  for i in np.flatnonzero(~cut)[:20]:
    np.testing.assert_allclose(images[i], lam[i] * x + (1 - lam[i]) * x[::-1], atol=1e-6)
  assert np.all((lam[~cut] > 0) & (lam[~cut] < 1))


def test_cutmix_box_area_is_one_minus_lam():
  x, _, (images, _, lam, cut) = _mixed()
  partner = np.arange(MIX_B)[::-1, None, None]
  for i in np.flatnonzero(cut)[:50]:
    source = np.floor(images[i, ..., 0])  # which image each pixel came from
    own, pasted = source == np.arange(MIX_B)[:, None, None], source == partner
    assert np.all(own | pasted)
    np.testing.assert_allclose(pasted.mean(axis=(1, 2)), 1.0 - lam[i], atol=1e-6)
    rows, cols = pasted[0].any(1), pasted[0].any(0)
    assert pasted[0].sum() == rows.sum() * cols.sum()  # a rectangle, same for every image
    np.testing.assert_array_equal(images[i][pasted], x[::-1][pasted])
    np.testing.assert_array_equal(images[i][own], x[own])


def test_mix_statistics_match_timm_batch_mode():
  _, _, (_, _, lam, cut) = _mixed()
  assert abs(cut.mean() - 0.5) < 0.045  # switch_prob 0.5, 4σ at n = 2000
  mix = lam[~cut]  # Beta(0.8, 0.8): mean ½, var 1/10.4
  assert abs(mix.mean() - 0.5) < 0.04 and abs(mix.var() - 1 / 10.4) < 0.012
  # corrected cutmix λ: timm gives mean ≈ 0.70 at 32 px; at 8 px the boxes are coarser
  assert np.all((lam[cut] >= 0) & (lam[cut] <= 1)) and 0.6 < lam[cut].mean() < 0.85


def test_rand_bbox_sides():
  cut = int(32 * np.sqrt(0.5))  # 22 → half-side 11
  boxes = jax.jit(jax.vmap(lambda k: jnp.stack(batch_augment.rand_bbox(k, 32, 32, 0.5))))(
      jax.random.split(jax.random.key(0), 500))
  yl, yh, xl, xh = np.asarray(boxes).T
  assert np.all(yh - yl <= 2 * (cut // 2)) and np.all(yl >= 0) and np.all(yh <= 32)
  inside = (yl > 0) & (yh < 32)
  assert inside.sum() > 100 and np.all((yh - yl)[inside] == 22)
  assert np.all((xh - xl)[(xl > 0) & (xh < 32)] == 22)


def test_alphas_zero_give_smoothed_one_hot():
  images = np.random.default_rng(0).random((4, 8, 8, 3), dtype=np.float32)
  labels = jnp.array([0, 3, 99, 3])
  out, targets = jax.jit(
      functools.partial(batch_augment.mixup_cutmix, mixup_alpha=0.0, cutmix_alpha=0.0,
                        label_smoothing=0.1), static_argnums=2)(images, labels, 100,
                                                                jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(out), images)
  t = np.asarray(targets)
  assert t.shape == (4, 100)
  np.testing.assert_allclose(t[np.arange(4), np.asarray(labels)], 0.901, rtol=1e-6)
  np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)
  assert np.isclose(t[0, 1], 0.001) and np.isclose(t[2, 0], 0.001)


def _cfg(**overrides):
  cfg = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, mix_prob=1.0, correct_lam=True,
             label_smoothing=0.1, erasing_prob=0.25, mean=MEAN, std=STD)
  return ml_collections.ConfigDict({**cfg, **overrides})


def test_make_batch_augment_step_signature_jit_determinism():
  images = np.random.default_rng(0).random((8, 16, 16, 3), dtype=np.float32)
  labels = jnp.arange(8) % 10
  smooth = _smooth(np.asarray(labels), 10, 0.1)
  aug = batch_augment.make_batch_augment(_cfg())
  step = jax.jit(lambda x, y, k: aug(x, y, 10, k))  # as StepOptions.batch_augment
  a_img, a_t = map(np.asarray, step(images, labels, jax.random.key(0)))
  b_img, b_t = map(np.asarray, step(images, labels, jax.random.key(0)))
  c_img, _ = map(np.asarray, step(images, labels, jax.random.key(1)))
  assert a_img.shape == images.shape and a_img.dtype == np.float32 and a_t.shape == (8, 10)
  np.testing.assert_array_equal(a_img, b_img)
  np.testing.assert_array_equal(a_t, b_t)
  assert not np.array_equal(a_img, c_img)
  np.testing.assert_allclose(a_t.sum(1), 1.0, atol=1e-6)

  for cfg in (_cfg(mixup_alpha=0.0, cutmix_alpha=0.0,
                   erasing_prob=0.0), _cfg(mix_prob=0.0, erasing_prob=0.0)):
    off = batch_augment.make_batch_augment(cfg)
    img, t = jax.jit(lambda x, y, k: off(x, y, 10, k))(images, labels, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(img), images)
    np.testing.assert_allclose(np.asarray(t), smooth, atol=1e-7)

  erase_only = batch_augment.make_batch_augment(
      _cfg(mixup_alpha=0.0, cutmix_alpha=0.0, erasing_prob=1.0))
  img, t = jax.jit(lambda x, y, k: erase_only(x, y, 10, k))(images, labels, jax.random.key(0))
  assert np.asarray(img != images).any(axis=(1, 2, 3)).all()  # every image erased
  np.testing.assert_allclose(np.asarray(t), smooth, atol=1e-7)


@pytest.mark.parametrize('shape,padding,size', [((32, 32, 3), 4, None), ((16, 16, 3), 2, 12),
                                                ((8, 8, 1), 4, 16)])
def test_random_crop_flip_is_a_window_of_the_zero_padded_image(shape, padding, size):
  """torchvision RandomCrop(size, padding, fill 0) + RandomHorizontalFlip, restated with np.pad."""
  image = np.random.default_rng(0).integers(1, 256, shape, dtype=np.uint8)  # no zero pixels
  h, w, _ = shape
  th, tw = (size, size) if size else (h, w)
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  for seed in range(40):
    rng = np.random.default_rng(seed)
    top, left = rng.integers(0, h + 2 * padding - th + 1), rng.integers(0, w + 2 * padding - tw + 1)
    want = padded[top:top + th, left:left + tw]
    want = want[:, ::-1] if rng.random() < 0.5 else want
    np.testing.assert_array_equal(
        host_augment.random_crop_flip(image, np.random.default_rng(seed), size=size,
                                      padding=padding), want)
