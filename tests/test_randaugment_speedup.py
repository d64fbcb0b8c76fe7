"""RandAugment's NumPy ops give exactly what the all-Pillow implementation (6f12d78) gave.

`_reference_*` below is that implementation, kept verbatim as the reference: every op through
PIL.ImageOps / ImageEnhance / Image.transform, the image converted to Pillow and back once per
call. The checks: each op on every pixel value 0…255 and on images built to reach its corner
cases (constant bands, narrow ranges, tiny sizes, one channel), the float32 blend over all
(degenerate, image) value pairs at many factors, and whole `rand_augment` calls over many images
and seeds, with every setting the configs reach. `test_identity_check_is_sensitive` breaks the
new blend's rounding on purpose and asserts the comparison sees it. Also: the integer SMOOTH
filter against Pillow's, and the op-index draws one by one against one sized draw.
"""

import json

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from tikd_jax.data import host_augment as randaugment

# --- the reference: randaugment.py at 6f12d78 (ops and draw order) ------------------------------


def _reference_affine(img, coeffs, fill, resample):
  return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=resample, fillcolor=fill)


def _reference_solarize_add(img, add, threshold=128):
  lut = [min(255, i + add) if i < threshold else i for i in range(256)]
  return img.point(lut * len(img.getbands()))


def _reference_posterize(img, bits):
  if bits >= 8:
    return img
  mask = ~(2**(8 - bits) - 1) & 0xFF
  return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _reference_pil_op(img, name, arg, fill, resample):
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
    return _reference_posterize(img, arg)
  if base == 'Solarize':
    return ImageOps.solarize(img, arg)
  if base == 'SolarizeAdd':
    return _reference_solarize_add(img, arg)
  if base in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return getattr(ImageEnhance, base)(img).enhance(arg)
  if base == 'ShearX':
    return _reference_affine(img, (1, arg, 0, 0, 1, 0), fill, resample)
  if base == 'ShearY':
    return _reference_affine(img, (1, 0, 0, arg, 1, 0), fill, resample)
  if base == 'TranslateXRel':
    return _reference_affine(img, (1, 0, arg * img.size[0], 0, 1, 0), fill, resample)
  if base == 'TranslateYRel':
    return _reference_affine(img, (1, 0, 0, 0, 1, arg * img.size[1]), fill, resample)
  raise ValueError(name)


def _reference_to_pil(image):
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _reference_from_pil(img, channels):
  out = np.asarray(img, np.uint8)
  return out[..., None] if channels == 1 else out


def _reference_resample(interpolation, rng=None):
  if interpolation == 'random':
    return (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[int(rng.integers(2))]
  return {
      'bilinear': Image.Resampling.BILINEAR, 'bicubic': Image.Resampling.BICUBIC,
      'nearest': Image.Resampling.NEAREST
  }[interpolation]


def reference_apply_op(image, name, magnitude, *, negate=False, fill=randaugment.DEIT_FILL,
                       interpolation='bicubic'):
  channels = image.shape[-1]
  pil_fill = int(fill[0]) if channels == 1 else tuple(int(v) for v in fill)
  img = _reference_pil_op(_reference_to_pil(image), name,
                          randaugment.op_argument(name, magnitude, negate), pil_fill,
                          _reference_resample(interpolation))
  return _reference_from_pil(img, channels)


def _reference_magnitude(rng, magnitude, magnitude_std, magnitude_max):
  """timm's `_randomly_negate`-free magnitude draw: N(m, std) (U(0, m) for inf), clipped."""
  if magnitude_std == float('inf'):
    return max(0.0, min(float(rng.uniform(0.0, magnitude)), magnitude_max))
  m = rng.normal(magnitude, magnitude_std) if magnitude_std > 0 else magnitude
  return max(0.0, min(float(m), magnitude_max))


def reference_rand_augment(image, rng, *, num_ops=2, magnitude=9, magnitude_std=0.5,
                           increasing=True, prob=0.5, magnitude_max=randaugment.LEVEL_DENOM,
                           fill=randaugment.DEIT_FILL, interpolation='bicubic', ops=None):
  ops = tuple(ops or (randaugment.INCREASING_OPS if increasing else randaugment.DEFAULT_OPS))
  channels = image.shape[-1]
  img = _reference_to_pil(image)
  pil_fill = int(fill[0]) if channels == 1 else tuple(int(v) for v in fill)
  for index in rng.integers(0, len(ops), size=num_ops):
    if prob < 1.0 and rng.random() > prob:
      continue
    m = _reference_magnitude(rng, magnitude, magnitude_std, magnitude_max)
    name = ops[int(index)]
    arg = randaugment.op_argument(name, m, negate=bool(rng.random() > 0.5))
    img = _reference_pil_op(img, name, arg, pil_fill, _reference_resample(interpolation, rng))
  return _reference_from_pil(img, channels)


# --- images that reach the ops' corner cases -----------------------------------------------------

ALL_OPS = tuple(dict.fromkeys(randaugment.INCREASING_OPS + randaugment.DEFAULT_OPS))
CIFAR_FILL = randaugment.fill_from_mean((0.5071, 0.4865, 0.4409))


def _images(seed: int, size=(32, 32), channels: int = 3) -> list[np.ndarray]:
  """Uniform noise; every value 0…255 in each band; smooth gradients (CIFAR-like); narrow and
  single-value bands (AutoContrast's hi ≤ lo, Equalize's one-bin and step-0 cases); two
  values; a band at 0 beside a band at 255."""
  rng = np.random.default_rng(seed)
  h, w = size
  shape = (h, w, channels)
  every_value = np.resize(np.arange(256, dtype=np.uint8), h * w * channels)
  every_value = rng.permutation(every_value).reshape(shape)
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  smooth = np.stack(
      [(127 + 120 * np.sin(6 * xx + c) * np.cos(4 * yy - c)) for c in range(channels)], -1)
  narrow = rng.integers(100, 104, shape).astype(np.uint8)
  narrow[..., 0] = 77  # one constant band
  two_values = np.where(rng.random(shape) < 0.03, 250, 3).astype(np.uint8)
  split = np.zeros(shape, np.uint8)
  split[..., -1] = 255
  return [
      rng.integers(0, 256, shape, dtype=np.uint8), every_value,
      np.clip(smooth + rng.normal(0, 4, shape), 0, 255).astype(np.uint8), narrow, two_values, split,
      np.full(shape, rng.integers(256), np.uint8)
  ]


SHAPES = [((32, 32), 3), ((32, 32), 1), ((7, 5), 3), ((2, 9), 3), ((1, 1), 1)]


@pytest.mark.parametrize('name', ALL_OPS)
def test_each_op_matches_pillow_reference(name):
  magnitudes = np.concatenate([np.linspace(0, 10, 21), np.random.default_rng(0).uniform(0, 10, 12)])
  for size, channels in SHAPES:
    for seed, image in enumerate(_images(hash(name) % 1000, size, channels)):
      for k, magnitude in enumerate(magnitudes):
        negate = bool(k % 2)
        for interpolation in ('bicubic', 'bilinear', 'nearest'):
          if interpolation != 'bicubic' and name not in ('Rotate', 'ShearX', 'ShearY',
                                                         'TranslateXRel', 'TranslateYRel'):
            continue
          kw = dict(negate=negate, fill=CIFAR_FILL, interpolation=interpolation)
          want = reference_apply_op(image, name, magnitude, **kw)
          got = randaugment.apply_op(image, name, magnitude, **kw)
          assert got.shape == want.shape and got.dtype == np.uint8
          if not np.array_equal(got, want):
            diff = np.argwhere(got != want)[0]
            pytest.fail(f'{name} magnitude {magnitude} negate {negate} {interpolation} on image '
                        f'{seed} {image.shape}: first difference at {diff.tolist()}: '
                        f'{got[tuple(diff)]} vs Pillow {want[tuple(diff)]}')
          assert got is not image


@pytest.mark.parametrize('op', ['Brightness', 'Color', 'Contrast', 'Sharpness'])
def test_enhance_blend_every_value_pair(op):
  """Pillow's blend on all 65,536 (degenerate, image) value pairs: for Brightness the degenerate
  is 0, so an image of every value covers it; for the others every pair of (grey, value) is
  reached through a two-column image whose Color/Contrast/Smooth degenerate is known."""
  factors = [0.1, 0.5, 0.999, 1.0, 1.0001, 1.3, 1.72, 1.9, 0.37, 1 / 3, 0.0, 2.0]
  factors += list(np.random.default_rng(1).uniform(0.1, 1.9, 24))
  values = np.arange(256, dtype=np.uint8)
  images = [np.stack([np.tile(values, (256, 1))] * 3, -1)]  # every value, rows alike
  rng = np.random.default_rng(2)
  images += [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(2)]
  for image in images:
    for factor in factors:
      want = np.asarray(getattr(ImageEnhance, op)(Image.fromarray(image)).enhance(factor))
      got = randaugment._ARRAY_OPS[op](image, factor)  # pylint: disable=protected-access
      np.testing.assert_array_equal(got, want, err_msg=f'{op} factor {factor}')


def test_blend_formula_exhaustive():
  """The float32 blend itself on every (in1, in2) pair, against Image.blend."""
  a = np.repeat(np.arange(256, dtype=np.uint8), 256).reshape(256, 256)
  b = np.tile(np.arange(256, dtype=np.uint8), 256).reshape(256, 256)
  for factor in [0.1, 0.2, 0.7, 0.9, 1.1, 1.25, 1.9, 1 / 3, 1 / 7, 5 / 13]:
    want = np.asarray(Image.blend(Image.fromarray(a), Image.fromarray(b), factor))
    got = randaugment._blend(a[..., None], b[..., None], factor)  # pylint: disable=protected-access
    got = got[..., 0]
    np.testing.assert_array_equal(got, want, err_msg=f'factor {factor}')


def test_smooth_matches_pillow_filter():
  rng = np.random.default_rng(4)
  for size, channels in SHAPES + [((256, 256), 3), ((3, 3), 1)]:
    for image in _images(int(rng.integers(1000)), size, channels) + [
        rng.integers(0, 256, size + (channels,), dtype=np.uint8) for _ in range(20)
    ]:
      want = _reference_from_pil(_reference_to_pil(image).filter(ImageFilter.SMOOTH), channels)
      got = randaugment._smooth(image)  # pylint: disable=protected-access
      np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('num_ops', [0, 1, 2, 3, 5])
def test_scalar_index_draws_match_one_sized_draw(num_ops):
  """rand_augment draws its op indices one by one; timm's (and 6f12d78's) one `size=num_ops` draw
  gives the same values and leaves the generator in the same state."""
  for n in (1, 2, 3, 14, 15, 16, 255, 2**31 + 5):
    for seed in range(200):
      one, each = np.random.default_rng(seed), np.random.default_rng(seed)
      assert list(one.integers(0, n, size=num_ops)) == [each.integers(0, n) for _ in range(num_ops)]
      assert one.random() == each.random()  # the same state after
      assert one.bit_generator.state == each.bit_generator.state


RECIPE = dict(num_ops=2, magnitude=9, magnitude_std=0.5, increasing=True, interpolation='bicubic',
              fill=CIFAR_FILL)
SETTINGS = [
    RECIPE,
    dict(RECIPE, fill=randaugment.DEIT_FILL),
    dict(RECIPE, increasing=False),
    dict(RECIPE, interpolation='random'),
    dict(RECIPE, num_ops=3, prob=1.0, magnitude=10, magnitude_std=float('inf')),
    dict(RECIPE, magnitude_std=0.0, magnitude=5),
]


@pytest.mark.parametrize('setting', range(len(SETTINGS)))
def test_rand_augment_matches_reference_over_images_and_seeds(setting):
  kw = SETTINGS[setting]
  images = [im for seed in range(3) for im in _images(seed)]
  images += [im for im in _images(7, (32, 32), 1)] + _images(8, (9, 13), 3)
  n = 0
  for seed in range(60 if setting == 0 else 20):
    new_rng, ref_rng = np.random.default_rng(seed), np.random.default_rng(seed)
    for i, image in enumerate(images):
      want = reference_rand_augment(image, ref_rng, **kw)
      got = randaugment.rand_augment(image, new_rng, **kw)
      assert got.shape == want.shape and got.dtype == np.uint8
      assert np.array_equal(got, want), f'setting {kw} seed {seed} image {i}'
      n += 1
    # the same draws were taken: the generators are in the same state
    assert new_rng.bit_generator.state == ref_rng.bit_generator.state
  assert n >= 20 * len(images)


def test_recipe_augment_matches_reference_on_a_pipeline_stream():
  """`make_host_augment` as the TIKD recipe builds it, per-element generators as grain seeds
  them: 2,000 images, each with its own generator."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(
      dict(randaugment=True, randaugment_num_ops=2, randaugment_magnitude=9,
           randaugment_magnitude_std=0.5, randaugment_increasing=True, interpolation='bicubic',
           mean=(0.5071, 0.4865, 0.4409)))
  augment = randaugment.make_host_augment(cfg)
  images = np.random.default_rng(11).integers(0, 256, (2000, 32, 32, 3), dtype=np.uint8)
  for i, image in enumerate(images):
    got = augment({'image': image, 'label': 0}, np.random.default_rng([3, i]))['image']
    want = reference_rand_augment(image, np.random.default_rng([3, i]), fill=CIFAR_FILL)
    assert np.array_equal(got, want), f'image {i}'


def test_identity_check_is_sensitive(monkeypatch):
  """Blend rounding to nearest instead of truncating: the comparison must catch it."""

  def rounding_blend(degenerate, img, factor):
    base = np.asarray(degenerate, np.float32)
    out = base + np.float32(factor) * (img.astype(np.float32) - base)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)

  monkeypatch.setattr(randaugment, '_blend', rounding_blend)
  monkeypatch.setitem(
      randaugment._ARRAY_OPS,
      'Brightness',  # pylint: disable=protected-access
      lambda img, factor: rounding_blend(0, img, factor))
  image = _images(0)[0]
  rng, ref = np.random.default_rng(0), np.random.default_rng(0)
  same = [
      np.array_equal(randaugment.rand_augment(image, rng, **RECIPE),
                     reference_rand_augment(image, ref, **RECIPE)) for _ in range(200)
  ]
  assert not all(same)


def test_input_pipeline_benchmark_measures_the_recipe(tmp_path, capsys):
  """`benchmarks/input_pipeline.py --recipe tikd_cifar100`: rows for the preset's own stream
  (RandAugment included) and its crop/flip-only stream, with positive rates."""
  from benchmarks import input_pipeline  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'rows.jsonl'
  input_pipeline.main([
      '--recipe', 'tikd_cifar100', '--batches', '2', '--runs', '1', '--workers', '0', '--batch',
      '32', f'--out={out}'
  ])
  rows = {r['pipeline']: r for r in map(json.loads, out.read_text().splitlines())}
  assert capsys.readouterr().out.count('"input_pipeline"') == 2 and set(rows) == {
      'recipe', 'crop_flip'
  }
  for row in rows.values():
    assert (row['recipe'], row['config_name'], row['workers'],
            row['batch']) == ('tikd_cifar100', 'tikd_large', 0, 32)
    assert row['median_images_per_s'] > 0 and row['images_per_s'][0] > 0
