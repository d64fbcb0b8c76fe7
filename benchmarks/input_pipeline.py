r"""Throughput of the grain train pipeline (images/s): is the input ever the bottleneck?

  python benchmarks/input_pipeline.py [--batch 128] [--batches 100] [--runs 3] [--workers 0,1]
      [--out benchmarks/results/input_pipeline.jsonl]
  python benchmarks/input_pipeline.py --recipe tikd_cifar100[:ARG] [--workers 0,1,2]
      [--baseline_root /tmp/base6f]

The pipeline is the trainer's: `pipeline.train_dataset` (global shuffle, repeat, random crop with
4 px zero padding + horizontal flip per image, batching) + `pipeline.make_iterator` (2 read
threads, prefetch 2, optionally `--workers` grain worker processes). Sources: the offline digits
train split (1,437 images, 32 px) and a synthetic in-memory 50,000 × 32 × 32 × 3 uint8
`ArraySource` (CIFAR's size). Each (source, workers) row: one fresh iterator per run, the first
batch (start-up, worker spawn) timed apart, then `--batches` batches; median / p10 / p90 images/s
over `--runs` runs, plus the 1-minute load average. Rows without workers also give images per
CPU second of this process (`images_per_cpu_s`, from `time.process_time`: about what one process
with a core of its own delivers), which a machine shared with other jobs disturbs less than
images/s. (Worker processes' CPU seconds read from /proc during the timed batches did not track
their work, so worker rows have wall-clock rates only.) One JSON line per row to stdout (and
--out).
A train step of the ViT students takes seconds per 128 images on this CPU (train_step.py), i.e.
tens of images/s: on CPU the pipeline only has to stay well above that; an accelerator needs
tens of thousands.

`--recipe NAME` (configs/NAME.py, `NAME:ARG` for its get_config argument) measures instead the
stream that preset's trainer builds: `run.load_data` on the synthetic source (the preset's host
augmentation from `run.build_augmentations`, e.g. the TIKD recipe's RandAugment
rand-m9-mstd0.5-inc1, its sampler and batch) and `loop.train_stream` for its first phase. Rows:
`pipeline` 'recipe' (all of it) and 'crop_flip' (the same stream without the host augmentation),
the runs of the two interleaved. `--baseline_root DIR` (a checkout of another commit, e.g. `git
worktree add /tmp/base6f 6f12d78`) adds its 'recipe' rows: each library is measured in a server
process of its own (its tikd_jax first on sys.path, inherited by its grain workers) and the
contestants' runs alternate, so a change in the machine's load hits both alike.

`--randaugment_on device` sets the preset's `augment.randaugment_on`: the host stream then crops
and flips only, and a row `pipeline` 'device_randaugment' gives what moved: the jitted batched
RandAugment (data/device_randaugment.py) on the default JAX backend, on batches already there
(images/s, median over `--runs` of `--batches` batches; `backend` names the device).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import report  # noqa: E402  pylint: disable=g-import-not-at-top

RESULT = 'INPUT_PIPELINE_RESULT '  # a server's reply line (other output may share its stdout)


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


def timed_iterator(make_iterator, batch: int, batches: int, image_shape: tuple,
                   workers: int = 0) -> dict:
  """{startup: seconds to the first batch; then over the next `batches` batches: rate, images/s;
  cpu_rate, images per CPU second of this process, without worker processes only (else None)}."""
  t0 = time.perf_counter()
  it = make_iterator()
  try:
    first = next(it)
    if first['image'].shape != (batch,) + tuple(image_shape):
      raise RuntimeError(f'unexpected batch shape {first["image"].shape}')
    startup = time.perf_counter() - t0
    cpu0 = time.process_time()
    t1 = time.perf_counter()
    for _ in range(batches):
      next(it)
    seconds = time.perf_counter() - t1
    cpu = time.process_time() - cpu0
  finally:
    close = getattr(it, 'close', None)
    if close is not None:
      close()
  images = batches * batch
  return {
      'startup': startup, 'rate': images / seconds,
      'cpu_rate': None if workers else images / max(cpu, 1e-9)
  }


def one_run(source, batch: int, batches: int, workers: int, seed: int) -> dict:
  """The crop-and-flip pipeline on `source`: `timed_iterator`'s numbers."""
  from tikd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  ds = pipeline.train_dataset(source, batch_size=batch, seed=seed)
  return timed_iterator(lambda: pipeline.make_iterator(ds, workers), batch, batches,
                        source.image_shape, workers)


# --- a preset's own stream -------------------------------------------------------------------


def load_recipe(spec: str, batch: int | None, randaugment_on: str | None = None):
  """`NAME[:ARG]` or `configs/NAME.py[:ARG]` → (name, arg, locked config), the batch and
  `augment.randaugment_on` overridden when given."""
  import importlib  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(':')
  name = os.path.basename(path).removesuffix('.py')
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config(arg) if arg else module.get_config()
  if batch:
    config.batch_size = batch
  if randaugment_on:
    config.augment.randaugment_on = randaugment_on
  return name, arg, config


def device_randaugment_rate(config, batch: int, batches: int) -> dict:
  """The preset's RandAugment as the step runs it with randaugment_on='device': images/s of the
  jitted batched version on the default backend, `batches` batches of `batch` 32 px images."""
  import jax  # pylint: disable=g-import-not-at-top
  from tikd_jax.train.run import build_augmentations  # pylint: disable=g-import-not-at-top
  from tikd_jax.train.spec import resolve  # pylint: disable=g-import-not-at-top
  _, step_augment = build_augmentations(resolve(config))  # what the trainer builds
  augment = jax.jit(step_augment.keywords['randaugment'])
  images = jax.random.randint(jax.random.key(0), (batch, 32, 32, 3), 0, 256).astype('float32')
  t0 = time.perf_counter()
  out = augment(images, jax.random.key(0)).block_until_ready()
  startup = time.perf_counter() - t0
  t1 = time.perf_counter()
  for i in range(batches):
    out = augment(images, jax.random.key(i + 1))
  out.block_until_ready()
  return {
      'startup': startup, 'rate': batches * batch / (time.perf_counter() - t1),
      'backend': jax.default_backend()
  }


class RecipeStreams:
  """The train stream `loop.train_stream` builds for `config`'s first phase, over `source`, as
  the trainer would (`run.load_data`: host augmentation, sampler, text rows), with and without
  the host augmentation."""

  def __init__(self, config, source):
    import dataclasses  # pylint: disable=g-import-not-at-top
    import types  # pylint: disable=g-import-not-at-top
    from tikd_jax.train import loop, plan  # pylint: disable=g-import-not-at-top
    from tikd_jax.train import run as run_lib  # pylint: disable=g-import-not-at-top
    self.config, self.source = config, source
    eval_source = synthetic_source(n=1_000, size=source.image_shape[0], seed=1)
    sources = (source, eval_source, eval_source)
    try:  # the library resolves the config into a run spec first (and an older checkout doesn't)
      from tikd_jax.train.spec import resolve  # pylint: disable=g-import-not-at-top
      self.spec = resolve(config)
    except ImportError:
      self.spec = None
    data = run_lib.load_data(self.spec or config, sources=sources)
    self.phase = plan.build_phases(config, data.steps_per_epoch)[0]
    self.has_host_augment = data.host_augment is not None
    self._data, self._loop = data, loop
    self._replace, self._namespace = dataclasses.replace, types.SimpleNamespace

  def run(self, pipeline: str, workers: int, batches: int) -> dict:
    data = self._replace(self._data, num_workers=workers)
    if pipeline == 'crop_flip':
      data = self._replace(data, host_augment=None)
    elif pipeline != 'recipe':
      raise ValueError(f"pipeline {pipeline!r}: 'recipe' or 'crop_flip'")
    run = self._namespace(config=self.config, spec=self.spec, data=data)
    shape = self.phase.resolution and (self.phase.resolution,) * 2 + self.source.image_shape[2:]
    return timed_iterator(lambda: self._loop.train_stream(run, self.phase, 0).iterator,
                          self.config.batch_size, batches, shape or self.source.image_shape,
                          workers)


def serve(args) -> None:
  """Server mode (`--serve`): one line of JSON per request on stdin, {pipeline, workers,
  batches}; the reply is one `RESULT` line on stdout."""
  _, _, config = load_recipe(args.recipe, args.batch, args.randaugment_on)
  streams = RecipeStreams(config, synthetic_source())
  import tikd_jax  # pylint: disable=g-import-not-at-top
  print(RESULT + json.dumps({'ready': True, 'tikd_jax': os.path.dirname(tikd_jax.__file__)}),
        flush=True)
  for line in sys.stdin:
    request = json.loads(line)
    result = streams.run(request['pipeline'], request['workers'], request['batches'])
    print(RESULT + json.dumps(result), flush=True)


class Server:
  """This script in `--serve` mode with `root`'s tikd_jax (a checkout of some commit)."""

  def __init__(self, root: str, args):
    root = os.path.abspath(root)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, REPO]))
    command = [
        sys.executable,
        os.path.abspath(__file__), '--serve', '--library_root', root, '--recipe', args.recipe
    ] + (['--batch', str(args.batch)] if args.batch else [])
    self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True, env=env, cwd=root)
    self.root = root
    self.commit = _commit(root)
    self.library = self._reply()['tikd_jax']
    if not self.library.startswith(root):
      raise RuntimeError(f'the server for {root} imported tikd_jax from {self.library}')

  def _reply(self) -> dict:
    for line in self.process.stdout:
      if line.startswith(RESULT):
        return json.loads(line[len(RESULT):])
    raise RuntimeError(f'the server for {self.root} stopped (exit {self.process.wait()})')

  def run(self, pipeline: str, workers: int, batches: int) -> dict:
    self.process.stdin.write(
        json.dumps({'pipeline': pipeline, 'workers': workers, 'batches': batches}) + '\n')
    self.process.stdin.flush()
    return self._reply()

  def close(self) -> None:
    self.process.stdin.close()
    self.process.wait(timeout=60)


def _commit(root: str) -> str:
  try:
    out = subprocess.run(['git', '-C', root, 'rev-parse', '--short', 'HEAD'], capture_output=True,
                         text=True, check=True)
    dirty = subprocess.run(['git', '-C', root, 'status', '--porcelain', '--untracked-files=no'],
                           capture_output=True, text=True, check=True).stdout.strip()
    return out.stdout.strip() + ('+changes' if dirty else '')
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def recipe_rows(args, emit, versions: dict) -> None:
  """Rows of `--recipe`: per worker count, the contestants' runs interleaved (the order rotated
  every run)."""
  name, arg, config = load_recipe(args.recipe, args.batch, args.randaugment_on)
  servers = {}
  if args.baseline_root:
    servers = {'worktree': Server(REPO, args), 'baseline': Server(args.baseline_root, args)}
    contestants = [('worktree', 'recipe'), ('baseline', 'recipe'), ('worktree', 'crop_flip')]
    runner = lambda who, pipeline, w: servers[who].run(pipeline, w, args.batches)
  else:
    streams = RecipeStreams(config, synthetic_source())
    if not streams.has_host_augment:
      print(
          f'note: {args.recipe} builds no host augmentation (randaugment_on='
          f'{config.augment.randaugment_on!r}); its two host rows measure the same stream',
          file=sys.stderr)
    here = 'library_root' if args.library_root else 'worktree'  # whose tikd_jax this process runs
    contestants = [(here, 'recipe'), (here, 'crop_flip')]
    runner = lambda who, pipeline, w: streams.run(pipeline, w, args.batches)
  commits = {'worktree': _commit(REPO), 'library_root': _commit(args.library_root or REPO)}
  if args.baseline_root:
    commits['baseline'] = servers['baseline'].commit
  recipe = f'{name}:{arg}' if arg else name
  on_device = config.augment.randaugment and config.augment.randaugment_on == 'device'
  try:
    if on_device:
      loads, runs = [], []
      for _ in range(args.runs):
        loads.append(report.load_now())
        runs.append(device_randaugment_rate(config, int(config.batch_size), args.batches))
      emit({
          'name': 'input_pipeline', 'recipe': recipe, 'config_name': config.name,
          'pipeline': 'device_randaugment', 'library': 'worktree', 'commit': commits['worktree'],
          'backend': runs[0]['backend'], 'image_shape': [32, 32,
                                                         3], 'batch': int(config.batch_size),
          'batches': args.batches, 'runs': args.runs, **_rates(runs, loads), 'versions': versions
      })
    for workers in (int(w) for w in args.workers.split(',')):
      results = {c: ([], []) for c in contestants}  # loads, runs
      for r in range(args.runs):
        k = r % len(contestants)
        for contestant in contestants[k:] + contestants[:k]:
          loads, runs = results[contestant]
          loads.append(report.load_now())
          runs.append(runner(*contestant, workers))
      for (who, pipeline), (loads, runs) in results.items():
        emit({
            'name': 'input_pipeline',
            'recipe': recipe,
            'config_name': config.name,
            'pipeline': pipeline,
            'randaugment_on': config.augment.randaugment_on,
            'library': who,
            'commit': commits[who],
            'source': 'synthetic50k',
            'examples': 50_000,
            'image_shape': [32, 32, 3],
            'batch': int(config.batch_size),
            'batches': args.batches,
            'workers': workers,
            'runs': args.runs,
            'interleaved_with': [f'{w}/{p}' for w, p in contestants if (w, p) != (who, pipeline)],
            **_rates(runs, loads),
            'versions': versions,
        })
  finally:
    for server in servers.values():
      server.close()


def _rates(runs: list[dict], loads) -> dict:
  """The row's numbers over its runs: wall-clock images/s (median, p10, p90, each run), images
  per CPU second (rows without workers), start-up and load."""
  rates = [r['rate'] for r in runs]
  row = {
      'median_images_per_s': round(statistics.median(rates), 1),
      'p10_images_per_s': round(report.quantile(rates, 0.1), 1),
      'p90_images_per_s': round(report.quantile(rates, 0.9), 1),
      'images_per_s': [round(r, 1) for r in rates],
  }
  cpu_rates = [r['cpu_rate'] for r in runs if r.get('cpu_rate')]
  if cpu_rates:
    row['median_images_per_cpu_s'] = round(statistics.median(cpu_rates), 1)
    row['p10_images_per_cpu_s'] = round(report.quantile(cpu_rates, 0.1), 1)
    row['p90_images_per_cpu_s'] = round(report.quantile(cpu_rates, 0.9), 1)
  row.update({
      'median_first_batch_s': round(statistics.median(r['startup'] for r in runs), 3),
      'load_1min': report.load_summary(loads),
      'cpus': os.cpu_count(),
  })
  return row


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', type=int, default=None,
                      help='images per batch (default 128; with --recipe, the preset\'s)')
  parser.add_argument('--batches', type=int, default=100, help='timed batches per run')
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--workers', default='0,1',
                      help='grain worker processes per row (0: decode in this process)')
  parser.add_argument('--sources', default='digits,synthetic50k',
                      help='crop-and-flip rows (without --recipe)')
  parser.add_argument('--recipe', default=None,
                      help='a preset, NAME[:ARG] (configs/NAME.py): measure its train stream')
  parser.add_argument('--baseline_root', default=None,
                      help='with --recipe: also measure this checkout\'s library, interleaved')
  parser.add_argument(
      '--randaugment_on', choices=('host', 'device'), default=None,
      help="with --recipe: set its augment.randaugment_on ('device': the host "
      'crops and flips, and a device_randaugment row times the moved work)')
  parser.add_argument('--out', default=None, help='also append the JSON lines to this file')
  parser.add_argument('--serve', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--library_root', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.library_root:  # a server: this checkout's tikd_jax and configs come first
    sys.path.insert(0, os.path.abspath(args.library_root))
  if args.baseline_root and not args.recipe:
    parser.error('--baseline_root compares recipe streams: give --recipe too')
  if args.baseline_root and args.randaugment_on:
    parser.error('--randaugment_on sets where this checkout runs RandAugment; a baseline checkout '
                 'may not have the switch: drop --baseline_root')

  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # grain's spawned workers read absl flags
  if args.serve:
    serve(args)
    return
  import grain  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import PIL  # pylint: disable=g-import-not-at-top

  versions = {
      'python': platform.python_version(),
      'grain': grain.__version__ if hasattr(grain, '__version__') else 'unknown',
      'numpy': np.__version__,
      'pillow': PIL.__version__,
  }
  with report.JsonLines(args.out) as emit:
    if args.recipe:
      recipe_rows(args, emit, versions)
      return
    builders = {'digits': digits_source, 'synthetic50k': synthetic_source}
    batch = args.batch or 128
    for name in args.sources.split(','):
      source = builders[name]()
      for workers in (int(w) for w in args.workers.split(',')):
        loads, runs = [], []
        for run in range(args.runs):
          loads.append(report.load_now())
          runs.append(one_run(source, batch, args.batches, workers, seed=run))
        emit({
            'name': 'input_pipeline',
            'source': name,
            'examples': len(source),
            'image_shape': list(source.image_shape),
            'batch': batch,
            'batches': args.batches,
            'workers': workers,
            'runs': args.runs,
            **_rates(runs, loads),
            'versions': versions,
        })


if __name__ == '__main__':
  main()
