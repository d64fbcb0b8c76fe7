"""DeiT's repeated-augmentation sampler (`RASampler`, facebookresearch/deit samplers.py, also in
the released TIKD code) as an endless stream of example indices addressed by position.

DeiT, in epoch e, with P replicas (its GPUs, `num_replicas`) and R repeats (`num_repeats`, 3):
  1. shuffle the n example indices (DeiT: `torch.randperm(n)` seeded with e);
  2. repeat every index R times in place ([a, a, a, b, b, b, …]) and pad the list with its own
     first entries to ceil(n·R / P)·P entries;
  3. replica r takes entries r, r + P, r + 2P, … (a strided slice: the R copies of an image land
     on R different replicas when R ≤ P) and keeps the first floor((n // 256 · 256) / P) of them;
  4. each replica's DataLoader batches its slice and drops the last partial batch.
An epoch is thus about n/P examples per replica, as without the sampler, showing about n/R
distinct images R times each, under independent augmentations.

Here the global batch of step s is replica 0's batch s, then replica 1's, …, replica P−1's (each
B/P rows): with the per-row losses DeiT/TIKD use, DDP's averaged gradient is this batch's
gradient. Stream position k (global batch k // B, row k % B) maps to one example, so the stream
resumes exactly from a position and is the same for any number of JAX processes, each of which
holds a contiguous block of replicas (data/pipeline.py).
**Ours**: the shuffle of epoch e is seeded with (config.seed, e); DeiT seeds with e alone, so every
DeiT run sees the same order.
"""
from __future__ import annotations

import dataclasses
import sys

import numpy as np

# DeiT's epoch length rule: floor(n // 256 · 256 / P) examples per replica (samplers.py).
EPOCH_MULTIPLE = 256


def deit_epoch_indices(permutation: np.ndarray, num_repeats: int, num_replicas: int) -> np.ndarray:
  """[P, floor(n // 256 · 256 / P)]: row r = the indices replica r draws in an epoch whose
  shuffle is `permutation` (steps 2 and 3 of the module docstring)."""
  permutation = np.asarray(permutation, np.int64)
  if num_repeats < 1 or num_replicas < 1:
    raise ValueError(f'num_repeats ({num_repeats}) and num_replicas ({num_replicas}) must be ≥ 1')
  n = len(permutation)
  selected = (n // EPOCH_MULTIPLE * EPOCH_MULTIPLE) // num_replicas  # DeiT's num_selected_samples
  # Replica r keeps entries r, r + P, … r + (selected − 1)·P of the repeated list: its first
  # selected·P ≤ n ≤ n·R entries, so DeiT's padding (step 2) never reaches what is kept.
  kept = np.repeat(permutation, num_repeats)[:selected * num_replicas]
  return kept.reshape(selected, num_replicas).T


@dataclasses.dataclass(frozen=True)
class RepeatedAugmentation:
  """DeiT's sampler for a train split of `num_examples`, with a global batch of `batch_size`
  split over `num_replicas` replicas; `example_index(k)` is the example at stream position k."""
  num_examples: int
  batch_size: int  # global
  num_repeats: int = 3
  num_replicas: int = 1
  seed: int = 0

  def __post_init__(self):
    if self.num_repeats < 2:
      raise ValueError(f'repeated augmentation needs ≥ 2 repeats (DeiT: 3), got '
                       f'{self.num_repeats}; config.data.repeated_aug 0 or 1 turns it off')
    if self.batch_size % self.num_replicas:
      raise ValueError(f'batch_size {self.batch_size} does not split over the '
                       f'{self.num_replicas} replicas of config.data.repeated_aug_replicas: use a '
                       f'multiple of {self.num_replicas}')
    if self.steps_per_epoch == 0:
      raise ValueError(
          f'repeated augmentation takes floor({self.num_examples} // {EPOCH_MULTIPLE} · '
          f'{EPOCH_MULTIPLE} / {self.num_replicas}) = {self.per_replica} examples per replica '
          f'and epoch (DeiT\'s rule), fewer than a replica batch of {self.replica_batch}: use a '
          f'smaller batch or fewer replicas, or turn it off (config.data.repeated_aug=0)')

  @property
  def replica_batch(self) -> int:
    return self.batch_size // self.num_replicas

  @property
  def per_replica(self) -> int:
    """Examples per replica and epoch before batching (DeiT's `len(sampler)`)."""
    return (self.num_examples // EPOCH_MULTIPLE * EPOCH_MULTIPLE) // self.num_replicas

  @property
  def steps_per_epoch(self) -> int:
    """Global batches per epoch: each replica's DataLoader drops its partial last batch."""
    return self.per_replica // self.replica_batch

  def permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

  def epoch_batches(self, epoch: int) -> np.ndarray:
    """[steps_per_epoch, batch_size]: the example indices of each global batch of `epoch`."""
    table = deit_epoch_indices(self.permutation(epoch), self.num_repeats, self.num_replicas)
    used = table[:, :self.steps_per_epoch * self.replica_batch]
    per_step = used.reshape(self.num_replicas, self.steps_per_epoch, self.replica_batch)
    return per_step.transpose(1, 0, 2).reshape(self.steps_per_epoch, self.batch_size)

  def example_index(self, position: int) -> int:
    step, row = divmod(int(position), self.batch_size)
    epoch, step = divmod(step, self.steps_per_epoch)
    return int(self.epoch_batches(epoch)[step, row])


class RepeatedAugmentationSource:
  """A grain data source over the endless stream: `[k]` is the train example at position k."""

  def __init__(self, source, sampler: RepeatedAugmentation):
    if len(source) != sampler.num_examples:
      raise ValueError(f'the sampler was built for {sampler.num_examples} examples, the source '
                       f'has {len(source)}')
    self.source = source
    self.sampler = sampler
    # {epoch: its batches} for the newest two epochs; rebound whole, so reader threads never see
    # one epoch's number with another's batches.
    self._cache: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, position: int) -> dict:
    step, row = divmod(int(position), self.sampler.batch_size)
    epoch, step = divmod(step, self.sampler.steps_per_epoch)
    cache = self._cache
    batches = cache.get(epoch)
    if batches is None:
      batches = self.sampler.epoch_batches(epoch)
      self._cache = {**{e: b for e, b in cache.items() if abs(e - epoch) == 1}, epoch: batches}
    return self.source[int(batches[step, row])]

  def __getstate__(self):  # grain workers start with an empty cache
    return {'source': self.source, 'sampler': self.sampler}

  def __setstate__(self, state):
    self.__init__(state['source'], state['sampler'])
