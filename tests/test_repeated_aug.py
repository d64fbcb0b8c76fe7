"""DeiT's repeated-augmentation sampler (tikd_jax/data/repeated_aug.py) and its grain stream:
DeiT's RASampler (facebookresearch/deit samplers.py) re-stated with Python lists, the copies of
each image across replicas, disjoint process slices, the (seed, epoch) shuffle, exact resume,
and the trainer's `config.data.repeated_aug`."""
import collections
import math
import types

import numpy as np
import pytest

from configs import tiny
from tikd_jax.data import pipeline
from tikd_jax.data.repeated_aug import RepeatedAugmentation, deit_epoch_indices
from tikd_jax.data.source import ArraySource
from tikd_jax.train import loop
from tikd_jax.train.run import load_data, repeated_augmentation
from tikd_jax.train.spec import resolve as resolve_spec


def deit_rasampler(permutation, num_replicas, rank, num_repeats=3):
  """RASampler.__iter__ of DeiT's samplers.py for one rank, given the epoch's shuffle."""
  n = len(permutation)
  num_samples = int(math.ceil(n * num_repeats / num_replicas))
  total_size = num_samples * num_replicas
  num_selected = int(math.floor(n // 256 * 256 / num_replicas))
  indices = []
  for i in permutation.tolist():  # torch.repeat_interleave(perm, repeats=3)
    indices += [i] * num_repeats
  indices += indices[:total_size - len(indices)]
  assert len(indices) == total_size
  indices = indices[rank:total_size:num_replicas]
  assert len(indices) == num_samples
  return indices[:num_selected]


@pytest.mark.parametrize('n, replicas, repeats', [(768, 4, 3), (1000, 4, 3), (1437, 1, 3),
                                                  (50000, 4, 3), (601, 3, 2), (530, 2, 5)])
def test_epoch_indices_equal_deit_for_a_given_permutation(n, replicas, repeats):
  perm = np.random.default_rng(n).permutation(n)
  got = deit_epoch_indices(perm, repeats, replicas)
  want = [deit_rasampler(perm, replicas, r, repeats) for r in range(replicas)]
  assert got.shape == (replicas, len(want[0]))
  assert got.tolist() == want


def test_each_image_three_times_on_three_replicas():
  """768 = 3 · 256 images over 4 replicas: each replica takes 192 per epoch, which together are
  the first 256 images of the shuffle, each three times, on three different replicas."""
  perm = np.random.default_rng(0).permutation(768)
  table = deit_epoch_indices(perm, 3, 4)
  assert table.shape == (4, 192)
  where = collections.defaultdict(list)
  for replica, row in enumerate(table):
    for i in row:
      where[int(i)].append(replica)
  assert sorted(where) == sorted(perm[:256].tolist())
  assert all(len(r) == 3 and len(set(r)) == 3 for r in where.values())
  # 600 images over 2 replicas: 2 × 256 entries, the first 512 of the repeated shuffle: 170
  # images 3 times, and DeiT's cut leaves the 171st with 2 of its copies.
  perm = np.random.default_rng(1).permutation(600)
  counts = collections.Counter(deit_epoch_indices(perm, 3, 2).reshape(-1).tolist())
  assert counts == {**{int(i): 3 for i in perm[:170]}, int(perm[170]): 2}


N = 600  # 512 examples per epoch (DeiT's 256 rule), 88 never drawn in a given epoch


def _source(n=N):
  rng = np.random.default_rng(0)
  return ArraySource(rng.integers(0, 256, (n, 8, 8, 3),
                                  dtype=np.uint8), (np.arange(n) % 10).astype(np.int32),
                     [str(i) for i in range(10)], 'toy', 'train')


def _sampler(replicas=2, batch=32, seed=0):
  return RepeatedAugmentation(num_examples=N, batch_size=batch, num_repeats=3,
                              num_replicas=replicas, seed=seed)


def _stream(sampler, process_index=0, process_count=1, seed=5):
  return pipeline.train_dataset(_source(), batch_size=sampler.batch_size // process_count,
                                seed=seed, crop_padding=2, sampler=sampler,
                                process_index=process_index, process_count=process_count)


def test_two_processes_take_disjoint_strided_slices():
  sampler = _sampler(replicas=2)
  assert (sampler.per_replica, sampler.steps_per_epoch) == (256, 16)  # 512 // 2, 256 // 16
  perm = sampler.permutation(0)
  processes = [_stream(sampler, p, 2) for p in range(2)]
  for p, ds in enumerate(processes):
    drawn = np.concatenate([ds[s]['index'] for s in range(16)])
    assert drawn.tolist() == deit_rasampler(perm, 2, p)  # process p = DeiT's rank p, in order
  # Together: the entries 0 … 511 of the repeated shuffle, each drawn by exactly one process.
  interleaved = np.stack([np.concatenate([ds[s]['index'] for s in range(16)]) for ds in processes],
                         1).reshape(-1)
  assert interleaved.tolist() == np.repeat(perm, 3)[:512].tolist()
  # The global batch is the same stream whether one process or two hold the two replicas.
  one = _stream(sampler)
  for s in (0, 7, 16, 21):
    both = [ds[s] for ds in processes]
    np.testing.assert_array_equal(one[s]['index'], np.concatenate([b['index'] for b in both]))
    np.testing.assert_array_equal(one[s]['image'], np.concatenate([b['image'] for b in both]))


def test_copies_of_an_image_are_augmented_independently():
  ds = _stream(_sampler(replicas=1))  # one replica: the copies sit side by side in a batch
  b = ds[0]
  assert b['index'][0] == b['index'][1] == b['index'][2]
  copies = b['image'][:3]
  assert not (np.array_equal(copies[0], copies[1]) and np.array_equal(copies[1], copies[2]))


def test_shuffle_is_seeded_by_seed_and_epoch():
  a, b = _sampler(seed=0), _sampler(seed=1)
  assert np.array_equal(a.epoch_batches(3), _sampler(seed=0).epoch_batches(3))
  assert not np.array_equal(a.epoch_batches(0), a.epoch_batches(1))
  assert not np.array_equal(a.epoch_batches(0), b.epoch_batches(0))
  np.testing.assert_array_equal(a.permutation(2), np.random.default_rng([0, 2]).permutation(N))
  # Stream position → epoch: step 16 is the first global batch of epoch 1.
  np.testing.assert_array_equal(_stream(a)[16]['index'], a.epoch_batches(1)[0])


def _take(it, k):
  return [{key: np.array(v) for key, v in next(it).items()} for _ in range(k)]


@pytest.mark.parametrize('num_workers', [0, 1])
def test_resume_mid_epoch_and_across_the_epoch_boundary(num_workers):
  ds = _stream(_sampler(replicas=2))
  it = pipeline.make_iterator(ds, num_workers=num_workers)
  resumed = None
  try:
    _take(it, 12)
    state = it.get_state()  # mid-epoch 0 (16 steps per epoch)
    after = _take(it, 8)  # steps 12 … 19: the last of epoch 0 and the first of epoch 1
    resumed = pipeline.make_iterator(ds, num_workers=num_workers)
    resumed.set_state(state)
    again = _take(resumed, 8)
  finally:
    for i in (it, resumed):
      getattr(i, 'close', lambda: None)()
  for x, y in zip(after, again):
    for key in ('index', 'image', 'label'):
      np.testing.assert_array_equal(x[key], y[key])
  sampler = _sampler(replicas=2)  # read in order, the stream enters epoch 1 at step 16
  want = np.concatenate([sampler.epoch_batches(0)[12:], sampler.epoch_batches(1)[:4]])
  np.testing.assert_array_equal(np.stack([b['index'] for b in after]), want)
  by_position = pipeline.make_iterator(ds[12:])  # the trainer's resume by position
  np.testing.assert_array_equal(next(by_position)['image'], after[0]['image'])


def test_config_turns_it_on_and_sets_the_epoch_length():
  c = tiny.get_config('none')
  assert repeated_augmentation(resolve_spec(c), 1437) is None  # off by default
  with c.unlocked():
    c.data.repeated_aug = 1
  assert repeated_augmentation(resolve_spec(c), 1437) is None  # 1: off
  with c.unlocked():
    c.data.repeated_aug, c.batch_size = 3, 32
  s = repeated_augmentation(resolve_spec(c), 1437)  # one process: one replica
  assert (s.num_repeats, s.num_replicas, s.steps_per_epoch) == (3, 1, 40)  # 1280 // 32, not 44
  with c.unlocked():
    c.data.repeated_aug_replicas = 4
  assert repeated_augmentation(resolve_spec(c), 1437).steps_per_epoch == 40  # 320 per replica // 8
  with c.unlocked():
    c.batch_size = 30
  with pytest.raises(ValueError, match='multiple of 4'):
    repeated_augmentation(resolve_spec(c), 1437)
  with c.unlocked():
    c.batch_size = 1600
  with pytest.raises(
      ValueError, match='= 320 examples per replica and epoch .* fewer than a '
      'replica batch of 400'):
    repeated_augmentation(resolve_spec(c), 1437)


def test_train_stream_draws_from_the_configs_sampler():
  c = tiny.get_config('none')
  with c.unlocked():
    c.batch_size, c.data.repeated_aug, c.data.repeated_aug_replicas = 32, 3, 2
  sampler = repeated_augmentation(resolve_spec(c), N)
  assert load_data(resolve_spec(c),
                   (_source(), _source())).steps_per_epoch == 16  # 512 // 2 // 16, not 18
  data = types.SimpleNamespace(train=_source(), text_features=None, host_augment=None,
                               num_workers=0, sampler=sampler)
  stream = loop.train_stream(types.SimpleNamespace(spec=resolve_spec(c), data=data),
                             types.SimpleNamespace(resolution=None), 17)
  np.testing.assert_array_equal(next(stream.iterator)['index'], sampler.epoch_batches(1)[1])


@pytest.mark.slow
def test_trainer_resumes_a_repeated_augmentation_run_exactly(tmp_path):
  """configs/tiny.py with repeated_aug 3 over 2 replicas (640 digits per replica and epoch, 40
  steps of 32): stopped mid-epoch off the checkpoint cadence and resumed, it ends on the
  uninterrupted run's checkpoint, metrics and evaluation (tests/test_resume.py's comparison)."""
  from tests.test_resume import _assert_same_run, _config, _stop_and_resume
  from tikd_jax.train import trainer
  c = _config('none', **{'data.repeated_aug': 3, 'data.repeated_aug_replicas': 2})
  straight = tmp_path / 'straight'
  result = trainer.train_and_evaluate(c, str(straight))
  assert result['step'] == 20  # half of 40 steps per epoch (44 without the sampler)
  resumed = _stop_and_resume(c, tmp_path / 'resumed', [13])
  _assert_same_run((straight, result), tmp_path / 'resumed', resumed)
