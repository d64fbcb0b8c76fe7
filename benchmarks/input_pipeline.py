r"""Throughput of the grain train pipeline (images/s): is the input ever the bottleneck?

  python benchmarks/input_pipeline.py [--batch 128] [--batches 100] [--runs 3] [--workers 0,1]
      [--out benchmarks/results/input_pipeline.jsonl]

The pipeline is the trainer's: `pipeline.train_dataset` (global shuffle, repeat, random crop with
4 px zero padding + horizontal flip per image, batching) + `pipeline.make_iterator` (2 read
threads, prefetch 2, optionally `--workers` grain worker processes). Sources: the offline digits
train split (1,437 images, 32 px) and a synthetic in-memory 50,000 × 32 × 32 × 3 uint8
`ArraySource` (CIFAR's size). Each (source, workers) row: one fresh iterator per run, the first
batch (start-up, worker spawn) timed apart, then `--batches` batches; median / p10 / p90 images/s
over `--runs` runs, plus the 1-minute load average. One JSON line per row to stdout (and --out).
A train step of the ViT students takes seconds per 128 images on this CPU (train_step.py), i.e.
tens of images/s: the pipeline only has to stay well above that.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report  # noqa: E402  pylint: disable=g-import-not-at-top


def synthetic_source(n: int = 50_000, size: int = 32, num_classes: int = 100, seed: int = 0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tikd_jax.data.source import ArraySource  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, num_classes, (n,)).astype(np.int32)
  return ArraySource(images, labels, [str(i) for i in range(num_classes)], 'synthetic', 'train')


def digits_source():
  from tikd_jax.data import digits  # pylint: disable=g-import-not-at-top
  return digits.load('train', 32)


def one_run(source, batch: int, batches: int, workers: int, seed: int) -> tuple[float, float]:
  """(seconds to the first batch, images/s over the next `batches` batches)."""
  from tikd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  ds = pipeline.train_dataset(source, batch_size=batch, seed=seed)
  t0 = time.perf_counter()
  it = pipeline.make_iterator(ds, workers)
  try:
    first = next(it)
    if first['image'].shape != (batch,) + tuple(source.image_shape):
      raise RuntimeError(f'unexpected batch shape {first["image"].shape}')
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(batches):
      next(it)
    rate = batches * batch / (time.perf_counter() - t1)
  finally:
    close = getattr(it, 'close', None)
    if close is not None:
      close()
  return startup, rate


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--batches', type=int, default=100, help='timed batches per run')
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--workers', default='0,1',
                      help='grain worker processes per row (0: decode in this process)')
  parser.add_argument('--sources', default='digits,synthetic50k')
  parser.add_argument('--out', default=None, help='also append the JSON lines to this file')
  args = parser.parse_args()

  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # grain's spawned workers read absl flags
  import grain  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  builders = {'digits': digits_source, 'synthetic50k': synthetic_source}
  with report.JsonLines(args.out) as emit:
    for name in args.sources.split(','):
      source = builders[name]()
      for workers in (int(w) for w in args.workers.split(',')):
        loads, startups, rates = [], [], []
        for run in range(args.runs):
          loads.append(report.load_now())
          startup, rate = one_run(source, args.batch, args.batches, workers, seed=run)
          startups.append(startup)
          rates.append(rate)
        emit({
            'name': 'input_pipeline',
            'source': name,
            'examples': len(source),
            'image_shape': list(source.image_shape),
            'batch': args.batch,
            'batches': args.batches,
            'workers': workers,
            'runs': args.runs,
            'median_images_per_s': round(statistics.median(rates), 1),
            'p10_images_per_s': round(report.quantile(rates, 0.1), 1),
            'p90_images_per_s': round(report.quantile(rates, 0.9), 1),
            'images_per_s': [round(r, 1) for r in rates],
            'median_first_batch_s': round(statistics.median(startups), 3),
            'load_1min': report.load_summary(loads),
            'cpus': os.cpu_count(),
            'versions': {
                'python': platform.python_version(),
                'grain': grain.__version__ if hasattr(grain, '__version__') else 'unknown',
                'numpy': np.__version__
            },
        })


if __name__ == '__main__':
  main()
