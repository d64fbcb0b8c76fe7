"""Device RandAugment (data/device_randaugment.py) against the host version, which is Pillow's
arithmetic bit for bit (tests/test_randaugment_speedup.py): op by op at fixed magnitudes and signs,
slot by slot at fixed draws, timm's sampling, and the switch `augment.randaugment_on`."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from tikd_jax.data import batch_augment, device_randaugment, host_augment

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
MAGNITUDES = (0.0, 2.5, 7.3, 9.0, 10.0)
ALL_OPS = sorted(set(host_augment.INCREASING_OPS) | set(host_augment.DEFAULT_OPS))
GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


@functools.cache
def _images(count=16, size=32):
  """Smooth (upsampled) colour images, some low in contrast, some pure noise: the cases that
  exercise the tables (a narrow value range), the cubic (gradients) and the filters."""
  rng = np.random.default_rng(0)
  out = []
  for i in range(count):
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    if i % 4 == 1:
      img = (img // 4 + 100).astype(np.uint8)
    elif i % 4 == 2:
      img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    out.append(img)
  return np.stack(out)


def _host(name, magnitude, negate, interpolation='bicubic'):
  return np.stack([
      host_augment.apply_op(img, name, magnitude, negate=negate, interpolation=interpolation)
      for img in _images()
  ]).astype(np.float32)


@functools.cache
def _slot():
  """One jitted slot, as the step runs it (XLA fuses and rewrites what eager ops leave alone)."""
  return jax.jit(device_randaugment.apply_ops, static_argnames=('ops', 'fill'))


def _device(name, magnitude, negate, interpolation='bicubic'):
  b = len(_images())
  return np.asarray(_slot()(jnp.asarray(_images(),
                                        jnp.float32), ops=(name,), index=jnp.zeros(b, jnp.int32),
                            magnitude=jnp.full(b, magnitude,
                                               jnp.float32), negate=jnp.full(b, negate),
                            applied=jnp.ones(b,
                                             bool), bicubic=jnp.full(b, interpolation == 'bicubic'),
                            fill=host_augment.DEIT_FILL))


@pytest.mark.parametrize('name', [n for n in ALL_OPS if n not in GEOMETRIC + ('AutoContrast',)])
def test_table_and_blend_ops_equal_pillow(name):
  for magnitude in MAGNITUDES:
    for negate in (False, True):
      np.testing.assert_array_equal(_device(name, magnitude, negate),
                                    _host(name, magnitude, negate), err_msg=f'{name} {magnitude}')


def test_autocontrast_is_the_exact_quotient():
  """Device: ⌊(v − lo)·255/(hi − lo)⌋. Pillow's float64 table falls one short of it exactly where
  that quotient is an integer (and v·scale + offset rounds below it); nowhere else may they
  differ."""
  device, host = _device('AutoContrast', 9.0, False), _host('AutoContrast', 9.0, False)
  images = _images().astype(np.int64)
  lo = images.min(axis=(1, 2), keepdims=True)
  hi = images.max(axis=(1, 2), keepdims=True)
  exact = (images - lo) * 255 % np.maximum(hi - lo, 1) == 0
  diff = device - host
  assert set(np.unique(diff)) <= {0.0, 1.0}
  assert diff.any()  # the images reach such levels; a float table would not be told apart
  assert exact[diff != 0].all()


def test_autocontrast_table_differs_from_pillow_at_0_43_percent():
  """Over every band range lo < hi and every level lo ≤ v ≤ hi the band can hold: the device
  table is the exact quotient, and Pillow's float64 `int(v · scale + offset)` is one below it at
  12,094 of the 2,828,800 (0.43 %), all where the quotient is an integer (docs/scaling_out.md)."""
  lo, hi = np.triu_indices(256, k=1)
  v = np.arange(256)
  scale = 255.0 / (hi - lo)
  pillow = np.trunc(v[None] * scale[:, None] + (-lo * scale)[:, None])
  exact = (v[None] - lo[:, None]) * 255 // (hi - lo)[:, None]
  reachable = (v[None] >= lo[:, None]) & (v[None] <= hi[:, None])
  # The device's table for a band spanning [lo, hi]: images holding exactly those two values.
  band = np.stack([lo, hi], axis=1).astype(np.float32)[:, :, None, None]  # [pairs, 2, 1, 1]
  device = np.asarray(jax.jit(device_randaugment._autocontrast_table)(jnp.asarray(band)))[:, 0]  # pylint: disable=protected-access
  np.testing.assert_array_equal(device[reachable], exact[reachable])
  short = reachable & (pillow != exact)
  assert short.sum() == 12_094 and reachable.sum() == 2_828_800
  assert (exact - pillow)[short].max() == 1 and (exact * (hi - lo)[:, None]
                                                 == (v[None] - lo[:, None]) * 255)[short].all()


@pytest.mark.parametrize('interpolation,tolerance', [('bicubic', 2e-3), ('bilinear', 4e-2)])
@pytest.mark.parametrize('name', GEOMETRIC)
def test_warps_equal_pillow_up_to_float32_rounding(name, interpolation, tolerance):
  """Source coordinates and the cubic in float32 (Pillow: float64): a value within rounding of an
  integer truncates one level apart, at a small fraction of the pixels; fill, clamping and the
  filter are Pillow's (a wrong one moves most pixels by many levels)."""
  off = total = 0
  for magnitude in MAGNITUDES:
    for negate in (False, True):
      host = _host(name, magnitude, negate, interpolation)
      device = _device(name, magnitude, negate, interpolation)
      assert np.abs(device - host).max() <= 1, (name, magnitude, negate)
      off += np.count_nonzero(device != host)
      total += host.size
  assert off / total <= tolerance


def test_slots_compose_like_the_host():
  """Two slots at fixed draws, image by image: the device result is the host's op sequence."""
  images = _images()
  rng = np.random.default_rng(1)
  ops = host_augment.INCREASING_OPS
  b = len(images)
  index = rng.integers(0, len(ops), (2, b))
  applied = rng.random((2, b)) < 0.8
  magnitude = np.clip(rng.normal(9.0, 0.5, (2, b)), 0, 10).astype(np.float32)
  negate = rng.random((2, b)) > 0.5
  out = jnp.asarray(images, jnp.float32)
  for s in range(2):
    out = _slot()(out, ops=ops, index=index[s], magnitude=magnitude[s], negate=negate[s],
                  applied=applied[s], bicubic=np.ones(b, bool), fill=host_augment.DEIT_FILL)
  for i, img in enumerate(images):
    for s in range(2):
      if applied[s, i]:
        img = host_augment.apply_op(img, ops[index[s, i]], float(magnitude[s, i]),
                                    negate=bool(negate[s, i]))
    diff = np.abs(np.asarray(out[i]) - img)
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.02, (i, [ops[k] for k in index[:, i]])


def test_draws_follow_timm():
  """timm RandAugment: ops uniform with replacement, each applied with prob 0.5, magnitude
  N(9, 0.5) clipped to [0, 10], sign ±1 evenly; mstd inf: U(0, 9)."""
  n = 20000
  kw = dict(magnitude=9.0, prob=0.5, magnitude_max=10.0, interpolation='random')
  index, m, negate, applied, bicubic = map(
      np.asarray, device_randaugment.draw_ops(jax.random.key(0), n, 2, 15, magnitude_std=0.5, **kw))
  assert index.shape == (2, n) and index.min() == 0 and index.max() == 14
  counts = np.bincount(index.ravel(), minlength=15)
  assert np.abs(counts / (2 * n) - 1 / 15).max() < 0.006
  assert abs(applied.mean() - 0.5) < 0.01 and abs(negate.mean() - 0.5) < 0.01
  assert abs(bicubic.mean() - 0.5) < 0.01
  assert abs(np.mean(index[0] == index[1]) - 1 / 15) < 0.006  # with replacement (timm)
  clipped = np.clip(np.random.default_rng(0).normal(9.0, 0.5, 10**6), 0, 10)  # timm's law
  assert abs(m.mean() - clipped.mean()) < 0.01 and abs(m.std() - clipped.std()) < 0.01
  assert m.max() == 10.0 and abs(np.mean(m == 10.0) - np.mean(clipped == 10.0)) < 0.005
  assert not np.array_equal(index[0], index[1])  # the two slots draw independently
  m_uniform = np.asarray(
      device_randaugment.draw_ops(jax.random.key(1), n, 1, 15, magnitude_std=np.inf, **kw)[1])
  assert abs(m_uniform.mean() - 4.5) < 0.05 and m_uniform.min() >= 0 and m_uniform.max() <= 9


def test_whole_augmentation_matches_the_host_in_distribution():
  """The same images through both versions, each with its own random stream: how often an image
  comes out untouched and how far the rest move agree (a different op set, probability or
  magnitude scale moves either)."""
  images = np.concatenate([_images()] * 64)  # 1,024
  host = np.stack([
      host_augment.rand_augment(img, np.random.default_rng(i)) for i, img in enumerate(images)
  ]).astype(np.float32)
  device = np.asarray(
      jax.jit(device_randaugment.rand_augment)(jnp.asarray(images, jnp.float32), jax.random.key(0)))

  def stats(out):
    change = np.abs(out - images).mean(axis=(1, 2, 3))
    return np.mean(change == 0), change[change > 0].mean()

  (host_same, host_change), (device_same, device_change) = stats(host), stats(device)
  assert 0.2 < host_same < 0.45  # both slots skipped (1/4) or an identity op drawn
  assert abs(device_same - host_same) < 0.05  # σ of the difference ≈ 0.02
  assert abs(device_change / host_change - 1) < 0.1


def _augment_cfg(**overrides):
  return ml_collections.ConfigDict({
      **dict(randaugment=True, randaugment_num_ops=2, randaugment_magnitude=9.0, randaugment_magnitude_std=0.5, randaugment_increasing=True, randaugment_on='device', interpolation='bicubic', mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5, mix_prob=1.0, correct_lam=True, erasing_prob=0.0, label_smoothing=0.0, mean=MEAN, std=STD),
      **overrides
  })


def test_switch_moves_randaugment_into_the_step():
  """randaugment_on='device': the step's batch augmentation is RandAugment (the same images as
  `rand_augment` under the step's key) and keeps [0, 1] pixel values on the uint8 grid."""
  images = _images()[:8]
  aug = batch_augment.make_batch_augment(_augment_cfg())
  step = jax.jit(lambda x, k: aug(x, jnp.zeros(8, jnp.int32), 10, k)[0])
  key = jax.random.key(3)
  out = np.asarray(step(jnp.asarray(images, jnp.float32) / 255.0, key))
  direct = jax.jit(device_randaugment.make_device_randaugment(_augment_cfg()))(jnp.asarray(
      images, jnp.float32), jax.random.fold_in(key, 3))
  off = np.abs(out * 255.0 - np.asarray(direct))
  # Fused into the step, the warps' float32 coordinates may round apart: one level, rarely.
  assert off.max() <= 1.001 and np.mean(off > 1e-3) < 1e-3
  assert not np.allclose(out * 255.0, images)
  np.testing.assert_allclose(out * 255.0, np.round(out * 255.0), atol=1e-3)
  host_cfg = _augment_cfg(randaugment_on='host')
  plain = batch_augment.make_batch_augment(host_cfg)
  assert plain.keywords['randaugment'] is None  # the host does it (make_host_augment)
  assert host_augment.make_host_augment(host_cfg) is not None


def test_bad_settings_say_what_to_do():
  with pytest.raises(ValueError, match="randaugment_on='host'"):
    device_randaugment.make_device_randaugment(_augment_cfg(interpolation='nearest'))
  with pytest.raises(ValueError, match='no device version'):
    device_randaugment.apply_op(jnp.zeros((1, 8, 8, 3)), 'Cutout', 5.0)
  with pytest.raises(ValueError, match='3-band'):
    device_randaugment.apply_op(jnp.zeros((1, 8, 8, 3)), 'Rotate', 5.0, fill=(0, 0))


def test_randaugment_comes_before_erasing():
  """timm's per-sample order: RandAugment, then random erasing on its result, so an erased box
  holds the erasing noise untouched (the other order would warp or recolour it)."""
  images = jnp.asarray(_images()[:8], jnp.float32) / 255.0
  labels = jnp.zeros(8, jnp.int32)
  key = jax.random.key(5)
  cfg = _augment_cfg(erasing_prob=1.0)
  step = jax.jit(lambda x, k: batch_augment.make_batch_augment(cfg)(x, labels, 10, k)[0])
  out = np.asarray(step(images, key))
  augmented = jax.jit(device_randaugment.make_device_randaugment(cfg))(jnp.round(
      images * 255.0), jax.random.fold_in(key, 3)) / 255.0
  erase_key = jax.random.split(key)[0]
  erased, box = batch_augment.random_erasing_and_mask(augmented, erase_key, probability=1.0,
                                                      mean=MEAN, std=STD)
  # Fused into the step, the warps' float32 coordinates may round apart: one level, rarely.
  off = np.abs(out - np.asarray(erased))
  assert off.max() <= 1 / 255 + 1e-6 and np.mean(off > 1e-6) < 1e-3
  box = np.asarray(box, bool)
  np.testing.assert_allclose(out[box], np.asarray(erased)[box], atol=1e-6)
  assert box.any() and not np.isclose(out[box], np.round(out[box] * 255) / 255, atol=1e-4).all()


def test_the_recipe_switch_reaches_the_trainer():
  """`--config.augment.randaugment_on=device` on the TIKD CIFAR-100 recipe: no RandAugment in the
  grain workers, RandAugment first in the step's batch augmentation (with the recipe's fill)."""
  from configs import tikd_cifar100  # pylint: disable=g-import-not-at-top
  from tikd_jax.train.run import build_augmentations  # pylint: disable=g-import-not-at-top
  from tikd_jax.train.spec import resolve  # pylint: disable=g-import-not-at-top
  config = tikd_cifar100.get_config('small,hard')
  host, step = build_augmentations(resolve(config))
  assert host is not None and step.keywords['randaugment'] is None
  config.augment.randaugment_on = 'device'
  host, step = build_augmentations(resolve(config))
  assert host is None and step.keywords['randaugment'].keywords['fill'] == (129, 124, 112)
  config.augment.randaugment_on = 'gpu'
  with pytest.raises(ValueError, match=r"randaugment_on='gpu': use one of \('host', 'device'\)"):
    build_augmentations(resolve(config))


def test_input_pipeline_benchmark_moves_randaugment_to_the_device(tmp_path):
  """`benchmarks/input_pipeline.py --recipe tikd_cifar100 --randaugment_on device`: the host
  stream builds no RandAugment, and a device_randaugment row times the moved work."""
  import json  # pylint: disable=g-import-not-at-top

  from benchmarks import input_pipeline  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'rows.jsonl'
  input_pipeline.main([
      '--recipe', 'tikd_cifar100', '--batches', '2', '--runs', '1', '--workers', '0', '--batch',
      '32', '--randaugment_on', 'device', f'--out={out}'
  ])
  rows = {r['pipeline']: r for r in map(json.loads, out.read_text().splitlines())}
  assert set(rows) == {'device_randaugment', 'recipe', 'crop_flip'}
  assert rows['recipe']['randaugment_on'] == 'device'
  assert rows['device_randaugment']['backend'] == 'cpu'
  assert all(r['median_images_per_s'] > 0 for r in rows.values())
  _, _, config = input_pipeline.load_recipe('tikd_cifar100', 32, 'device')
  assert not input_pipeline.RecipeStreams(config,
                                          input_pipeline.synthetic_source(n=64)).has_host_augment


def test_single_band_images_follow_pillow_l_mode():
  """L images: Color leaves them as they are, the tables and the warp work on the one band."""
  gray = _images()[..., :1]
  x = jnp.asarray(gray, jnp.float32)
  for name in ('Color', 'Equalize', 'ContrastIncreasing', 'Sharpness', 'Rotate'):
    host = np.stack([host_augment.apply_op(img, name, 9.0, fill=(128,)) for img in gray])
    device = np.asarray(device_randaugment.apply_op(x, name, 9.0, fill=(128,)))
    assert np.abs(device - host).max() <= (1 if name == 'Rotate' else 0), name
  np.testing.assert_array_equal(np.asarray(device_randaugment.apply_op(x, 'Color', 2.0)[..., 0]),
                                gray[..., 0])
