"""grain input pipelines: an endless, seeded, checkpointable train stream and exact eval batches.

Multi-host: the stream is batched into per-process batches and process p takes batches p, p + P,
p + 2P, … so the P per-process batches of one step are one contiguous global batch, and
`jax.make_array_from_process_local_data` assembles them into one sharded array.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, Iterator

import grain
import jax
from absl import flags
import numpy as np

from tikd_jax.data.host_augment import random_crop_flip, resize_image
from tikd_jax.data.repeated_aug import RepeatedAugmentation, RepeatedAugmentationSource


def resolve_num_workers(num_workers: int) -> int:
  """-1 → one worker per spare core (at most 16); 0 → decode in the main process."""
  if num_workers >= 0:
    return num_workers
  return max(0, min(16, (os.cpu_count() or 1) - 1))


# Which caption-feature rows a train batch carries (config.tikd.text_rows): 'index', each image
# its own caption's row; 'released', rows 0..B-1 of the feature file for every batch of B, as the
# released TIKD code does (JSJ515-Group/TIKD models.py: `set_text_features` once, then
# `self.text_features[:B]` in every forward).
TEXT_ROWS = ('index', 'released')


def _attach_text(element: dict, features: np.ndarray) -> dict:
  return {**element, 'text': np.asarray(features[element['index']], np.float32)}


def released_text_rows(features: np.ndarray, batch_size: int, process_index: int = 0,
                       process_count: int = 1, replica_batch: int | None = None) -> np.ndarray:
  """The released code's text for a global batch of B = batch_size · process_count rows, the part
  process `process_index` holds (its rows p·b … (p + 1)·b − 1). Each of the released code's GPUs
  took rows 0…b_gpu−1 for its batch of b_gpu: with `replica_batch` (the repeated-augmentation
  sampler's rows per replica, standing for those GPUs) global row j gets feature row
  j mod replica_batch; without it, the global batch is one GPU's and gets rows 0…B−1."""
  replica_batch = replica_batch or batch_size * process_count
  if len(features) < replica_batch:
    raise ValueError(f"text_rows='released' gives each batch of {replica_batch} rows 0.."
                     f"{replica_batch - 1} of the text features, which have only "
                     f"{len(features)} rows: use a smaller batch or text_rows='index'")
  rows = np.arange(process_index * batch_size, (process_index + 1) * batch_size) % replica_batch
  return np.asarray(features[rows], np.float32)


def released_rows(features: np.ndarray, num_examples: int, batch_size: int) -> np.ndarray:
  """The released code's text for `num_examples` examples in batches of `batch_size`: rows
  0…b−1 of the train feature file for every batch (JSJ515-Group/TIKD main.py calls
  `model.set_text_features` once with every caption, and the model takes the first B rows)."""
  return features[np.arange(num_examples) % batch_size]


def _with_text(batch: dict, rows: np.ndarray) -> dict:
  return {**batch, 'text': rows}


CROP_MODES = ('crop', 'resize')


def _augment(element: dict, rng: np.random.Generator, crop_size: int | None, padding: int,
             flip: bool, crop_mode: str) -> dict:
  if crop_mode == 'resize':  # the whole (shifted, flipped) image, downscaled to crop_size
    image = random_crop_flip(element['image'], rng, padding=padding, flip=flip)
    image = resize_image(image, crop_size) if crop_size else image
  else:  # a crop_size × crop_size window of the padded image
    image = random_crop_flip(element['image'], rng, size=crop_size, padding=padding, flip=flip)
  return {**element, 'image': image}


def train_dataset(source, *, batch_size: int, seed: int, crop_padding: int = 4,
                  crop_size: int | None = None, crop_mode: str = 'crop', flip: bool = True,
                  text_features: np.ndarray | None = None, text_rows: str = 'index',
                  extra_augment: Callable[[dict, np.random.Generator], dict] | None = None,
                  process_index: int = 0, process_count: int = 1,
                  sampler: RepeatedAugmentation | None = None) -> grain.MapDataset:
  """Shuffled (anew every epoch), repeated, augmented, batched train stream of one process.

  `batch_size` is the per-process batch. Augmentation randomness is a function of (seed, element
  position), so the stream is the same whatever the number of workers and resumes exactly.
  `crop_size` (IRKD's low resolution) with `crop_mode` 'crop' takes a crop_size window of the
  padded image (the original IRKD notebooks); 'resize' downscales the whole augmented image.
  With `text_features`, each batch carries `text`: the rows `text_rows` names (TEXT_ROWS).
  With `sampler` (DeiT's repeated augmentation, data/repeated_aug.py) the order of examples is
  the sampler's: global batch s holds its replicas' batches s in replica order, and process p the
  replicas p·R/P … (p + 1)·R/P − 1 (`sampler.num_replicas` a multiple of `process_count`).
  """
  if crop_mode not in CROP_MODES:
    raise ValueError(f'crop_mode {crop_mode!r}: use one of {CROP_MODES} '
                     f'(config.curriculum.mode)')
  if text_rows not in TEXT_ROWS:
    raise ValueError(f'text_rows {text_rows!r}: use one of {TEXT_ROWS} (config.tikd.text_rows)')
  if sampler is None:
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  else:
    if sampler.num_replicas % process_count or sampler.batch_size != batch_size * process_count:
      raise ValueError(f'the repeated-augmentation sampler has {sampler.num_replicas} replicas and '
                       f'a global batch of {sampler.batch_size}; {process_count} processes with '
                       f'batches of {batch_size} need a multiple of {process_count} replicas and '
                       f'a global batch of {batch_size * process_count}')
    ds = grain.MapDataset.source(RepeatedAugmentationSource(source, sampler)).seed(seed)
  if text_features is not None and text_rows == 'index':
    ds = ds.map(functools.partial(_attach_text, features=text_features))
  ds = ds.random_map(
      functools.partial(_augment, crop_size=crop_size, padding=crop_padding, flip=flip,
                        crop_mode=crop_mode))
  if extra_augment is not None:
    ds = ds.random_map(extra_augment)
  ds = ds.batch(batch_size, drop_remainder=True)
  if process_count > 1:
    # Process p takes per-process batches p, p + P, …: the P batches of one step are contiguous
    # elements, in order, so the global batch is exactly the single-process one (same rows, same
    # augmentation draws, same row order for the per-row randomness inside the step).
    ds = ds[process_index::process_count]
  if text_features is not None and text_rows == 'released':
    rows = released_text_rows(text_features, batch_size, process_index, process_count,
                              sampler.replica_batch if sampler else None)
    ds = ds.map(functools.partial(_with_text, rows=rows))
  return ds


def make_iterator(ds: grain.MapDataset, num_workers: int = 0,
                  prefetch: int = 2) -> grain.DatasetIterator:
  """A checkpointable iterator (`get_state`/`set_state`), optionally with worker processes."""
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch))
  workers = resolve_num_workers(num_workers)
  if workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain's workers read absl flags; outside main.py (a notebook, a library call) nothing
      # parsed them, and the workers would die with UnparsedFlagAccessError.
      flags.FLAGS.mark_as_parsed()
    _quiet_resource_tracker()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(it_ds)


# How the warning is named in a -W option of the tracker process (action::category:module).
_TRACKER_WARNING = 'ignore::UserWarning:multiprocessing.resource_tracker'


def _quiet_resource_tracker() -> None:
  """Keeps Python's resource tracker from warning of "leaked shared_memory objects" at exit.

  Stopping grain's worker processes mid-stream (an error, a stop request, a new phase's stream)
  can leave a batch or two that a worker had just written to shared memory; nothing will read
  them, and the tracker unlinks them when the program exits, warning as it does. That warning
  names no error of the user's, so the tracker process (started with the interpreter's -W
  options, on the first worker's queue) is told not to print it.
  """
  if _TRACKER_WARNING not in sys.warnoptions:
    sys.warnoptions.append(_TRACKER_WARNING)


def eval_batches(source, *, global_batch: int, process_index: int = 0, process_count: int = 1,
                 text_features: np.ndarray | None = None) -> Iterator[dict]:
  """Every example exactly once, in order; the last batch is padded and `mask` marks real rows.

  All processes yield the same number of batches (needed for the collective eval step).
  """
  if global_batch % process_count:
    raise ValueError(f'eval batch {global_batch} not divisible by {process_count} processes')
  n = len(source)
  num_batches = -(-n // global_batch)
  idx = np.full(num_batches * global_batch, -1, np.int64)
  idx[:n] = np.arange(n)
  local = global_batch // process_count
  rows = idx.reshape(num_batches, global_batch)[:,
                                                process_index * local:(process_index + 1) * local]
  shape = None
  for row in rows:
    elements = [source[int(i)] for i in row if i >= 0]
    if shape is None:
      shape = (elements or [source[0]])[0]['image'].shape
    batch = {
        'image': np.zeros((local,) + shape, np.uint8),
        'label': np.zeros((local,), np.int32),
        'index': np.zeros((local,), np.int32),
        'mask': np.zeros((local,), np.float32),
    }
    for j, e in enumerate(elements):
      batch['image'][j], batch['label'][j], batch['index'][j] = e['image'], e['label'], e['index']
      batch['mask'][j] = 1.0
    if text_features is not None:
      batch['text'] = np.asarray(text_features[batch['index']], np.float32)
    yield batch


def to_global(batch: dict[str, Any], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Per-process NumPy batch → global jax.Arrays sharded over the mesh's batch axes."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
