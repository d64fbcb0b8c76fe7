"""Per-channel input statistics (mean, std) of the data sets, defined once.

Every model owns its normalisation (its `mean` / `std` arguments); configs, the converters and
the PyTorch twins all take these values from here. `measure` measures them on a train split
instead (config.data.normalization='compute'); the run spec (train/spec.py) gives them to the
student and the teacher.
"""
import json
import math
import os
import time

# CIFAR-100 / CIFAR-10: the values of RepDistiller's and IRKD's data loaders.
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
# scikit-learn's digits, upsampled and repeated over RGB (computed over the train split).
DIGITS_MEAN, DIGITS_STD = (0.3061,) * 3, (0.3240,) * 3
# Tiny ImageNet (64 px, train split).
TINY_IMAGENET_MEAN, TINY_IMAGENET_STD = (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)
# ImageNet (torchvision / timm; Hugging Face DeiT checkpoints).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

BY_NAME = {
    'cifar100': (CIFAR100_MEAN, CIFAR100_STD),
    'cifar10': (CIFAR10_MEAN, CIFAR10_STD),
    'digits': (DIGITS_MEAN, DIGITS_STD),
    'tinyimagenet': (TINY_IMAGENET_MEAN, TINY_IMAGENET_STD),
    'imagenet': (IMAGENET_MEAN, IMAGENET_STD),
}

# ------------------------------------------------------------------ computed from the train split
# config.data.normalization: 'explicit' uses config.model / config.teacher mean and std as set;
# 'compute' measures them on the train split once, saves them as <workdir>/normalization.json and
# gives them to the student and the teacher (a resumed run reads the file back).
MODES = ('explicit', 'compute')
FILE = 'normalization.json'
_PROGRESS_SECONDS = 10.0


def channel_stats(source) -> tuple[tuple[float, ...], tuple[float, ...], int]:
  """(mean, std, pixels per channel) over every pixel of every image of `source`, in [0, 1].

  Streamed one image at a time: the sums of pixel values and of their squares are exact integers
  (uint8 values), so the result is the float64 mean / population std (ddof 0) of the whole split
  without ever holding it in memory.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  total, squares, count = None, None, 0
  start = last = time.time()
  for i in range(len(source)):
    image = np.asarray(source[i]['image'])
    pixels = image.reshape(-1, image.shape[-1]).astype(np.int64)
    s, q = [int(v) for v in pixels.sum(0)], [int(v) for v in (pixels * pixels).sum(0)]
    total = s if total is None else [a + b for a, b in zip(total, s)]
    squares = q if squares is None else [a + b for a, b in zip(squares, q)]
    count += pixels.shape[0]
    if time.time() - last > _PROGRESS_SECONDS:
      last = time.time()
      print(f'normalization: {i + 1}/{len(source)} images ({last - start:.0f}s)', flush=True)
  if not count:
    raise ValueError('normalization=compute needs a train split with at least one image')
  mean = [t / count for t in total]
  var = [max(q / count - m * m, 0.0) for q, m in zip(squares, mean)]
  return (tuple(m / 255.0 for m in mean), tuple(math.sqrt(v) / 255.0 for v in var), count)


def measure(mode: str, workdir: str | None, train_source) -> tuple[dict | None, list[str]]:
  """({'mean', 'std'} of the train split, notes) for `config.data.normalization` 'compute'
  (None and no notes for 'explicit'): read from <workdir>/normalization.json when an earlier
  start of this run saved it there, else computed and saved (by process 0)."""
  if mode not in MODES:
    raise ValueError(f'config.data.normalization={mode!r}: use one of {MODES}')
  if mode == 'explicit':
    return None, []
  path = os.path.join(workdir, FILE) if workdir else None
  fingerprint = train_source.fingerprint()
  if path and os.path.exists(path):
    stats, note = _read(path, fingerprint)
  else:
    t0 = time.time()
    mean, std, pixels = channel_stats(train_source)
    stats = dict(mean=list(mean), std=list(std), images=len(train_source), pixels=pixels,
                 split=train_source.split, fingerprint=fingerprint)
    if path:
      _write(path, stats)
    note = (f'normalization: mean {_fmt(mean)} std {_fmt(std)} computed from the '
            f'{len(train_source)} images of split {train_source.split!r} in '
            f'{time.time() - t0:.1f}s' + (f'; saved to {path}' if path else ''))
  return {'mean': tuple(stats['mean']), 'std': tuple(stats['std'])}, [note]


def _fmt(values) -> str:
  return '(' + ', '.join(f'{v:.4f}' for v in values) + ')'


def _read(path: str, fingerprint: str) -> tuple[dict, str]:
  """(the saved statistics, a note on them)."""
  with open(path) as f:
    stats = json.load(f)
  note = f'normalization: mean {_fmt(stats["mean"])} std {_fmt(stats["std"])} read from {path}'
  if stats.get('fingerprint') != fingerprint:
    # The checkpoints here were trained with the saved numbers: keep them, but say so.
    note += (f' (computed from another train split, fingerprint {stats.get("fingerprint")}, '
             f'this one {fingerprint}: kept, since this workdir was trained with them; use a '
             f'new --workdir to compute new ones)')
  return stats, note


def _write(path: str, stats: dict) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(stats, f, indent=2)
  os.replace(tmp, path)
