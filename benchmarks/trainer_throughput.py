r"""The real trainer's images/s, end to end, against its own compiled step on device batches.

  python benchmarks/trainer_throughput.py --size small --steps 24 --batch 128 \
      [--rounds 3] [--workers 0] [--config configs/tikd_cifar100.py:SIZE,hard,notext] \
      [--randaugment_on host|device] [--train_examples 50000] \
      [--out benchmarks/results/trainer_throughput.jsonl]

What runs is `main.py`'s path: `run.setup` → `create_train_state` → `loop.train_loop` with the
preset's input pipeline (grain, its host augmentation, `--workers` processes), its logging, eval
and checkpoint cadence, on an in-memory synthetic CIFAR-size source (`--train_examples` random
32×32 images, benchmarks/input_pipeline.py `synthetic_source`) and a teacher built in-process
with random weights (the default preset, TIKD CIFAR-100's DeiT recipe with hard KD, needs a
ResNet32x4). `SIZE` in `--config` is replaced by `--size`.

One `train_loop` call runs a warm-up round (the first step compiles: excluded) and then `--rounds`
end-to-end rounds of `--steps` steps. Between end-to-end rounds, the same compiled step runs
`--steps` times on a batch already on the device, on a copy of the state (the step round): the
two alternate, so a change in the machine's load hits both. Each round ends with the device idle
(`block_until_ready`), so a round's time is its work. The row has the medians:

  end_to_end_images_per_s  batch · steps / the end-to-end round's seconds
  step_images_per_s        batch · steps / the step round's seconds
  breakdown_s              per end-to-end round (median), where the time outside the step goes:
    input_wait             `next(iterator)`: waiting for the pipeline's next host batch
    host_to_device         `pipeline.to_global` (make_array_from_process_local_data)
    metrics_sync           the log interval's wait for the device (compute, not overhead)
    logging                averaging the metrics, the JSON / TensorBoard rows, progress
    evaluation, checkpointing   `_evaluate_and_log`, `_save` and the checkpointer's waits
  overhead_s               end-to-end round minus step round (median of per-pair differences)

The pieces are timed by wrapping `loop.next_batch`, `loop._flush`, `loop._evaluate_and_log`,
`loop._save` from here: the trainer carries no timing code. Rounds of a few dozen steps at the
preset's cadence (50,000 examples: an eval and a checkpoint every epoch, hundreds of steps) see
logging only; `--train_examples` shrinks the epoch so that evaluation and checkpoints fall inside
the rounds (the row says how often they did).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import report  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks.input_pipeline import synthetic_source  # noqa: E402  pylint: disable=g-import-not-at-top

DEFAULT_CONFIG = 'configs/tikd_cifar100.py:SIZE,hard,notext'
PIECES = ('input_wait', 'host_to_device', 'metrics_sync', 'logging', 'evaluation', 'checkpointing')


def load_config(arg: str, size: str):
  """`path.py[:arg]` → its get_config(arg) (as main.py's --config), `SIZE` replaced by `size`."""
  path, _, config_arg = arg.replace('SIZE', size).partition(':')
  spec = importlib.util.spec_from_file_location('benchmark_config', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(config_arg) if config_arg else module.get_config()


def random_teacher(config, num_classes: int):
  """The config's teacher as run.load_teacher builds it, with random weights, on the mesh."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from tikd_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from tikd_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from tikd_jax.models.variables import model_variables  # pylint: disable=g-import-not-at-top
  from tikd_jax.train import run as run_lib  # pylint: disable=g-import-not-at-top
  from tikd_jax.train import spec as spec_lib  # pylint: disable=g-import-not-at-top
  spec = spec_lib.resolve(config)
  name, kwargs = run_lib.model_spec(spec.teacher, num_classes)
  if spec.dtype != 'float32':
    kwargs['dtype'] = spec.dtype
  teacher = build_model(name, rngs=nnx.Rngs(1), fast_layers=spec.fast_layers, **kwargs)
  variables = model_variables(teacher)
  mesh = sharding_lib.make_mesh(spec.mesh)
  return run_lib.Teacher(
      nnx.graphdef(teacher),
      sharding_lib.place(variables,
                         sharding_lib.param_shardings(variables, mesh, spec.sharding_rules)))


class Clock:
  """Seconds per piece in the current round, and the rounds' totals."""

  def __init__(self):
    self.now = collections.Counter()
    self.counts = collections.Counter()

  def timed(self, piece: str, fn):

    def wrapper(*args, **kwargs):
      t = time.perf_counter()
      try:
        return fn(*args, **kwargs)
      finally:
        self.now[piece] += time.perf_counter() - t
        self.counts[piece] += 1

    return wrapper

  def take(self) -> dict:
    out = {p: self.now[p] for p in PIECES}
    self.now.clear()
    return out


class Rounds:
  """The train step as `Steps.train` hands it to the loop, wrapped: after every `steps` calls
  it waits for the device, closes the end-to-end round and runs one step round."""

  def __init__(self, steps: int, rounds: int, batch_size: int, clock: Clock):
    self.steps, self.rounds, self.batch_size, self.clock = steps, rounds, batch_size, clock
    self.calls = 0
    self.t_round = None
    self.device_batch = None
    self.step_state = None
    self.end_to_end, self.step_only, self.breakdown, self.loads = [], [], [], []

  def wrap(self, train_step):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    def step(state, batch, teacher_vars):
      if self.device_batch is None:  # the step round's batch: a copy of the first, on device
        self.device_batch = jax.tree.map(jnp.copy, batch)
        self.step_state = jax.tree.map(jnp.copy, state)
      new_state, metrics = train_step(state, batch, teacher_vars)
      self.calls += 1
      if self.calls == 1 or (self.calls - 1) % self.steps == 0:
        jax.block_until_ready(new_state)  # the warm-up step (compile + run) or a round's end
        if self.t_round is not None:
          self.end_to_end.append(time.perf_counter() - self.t_round)
          self.breakdown.append(self.clock.take())
        if len(self.end_to_end) < self.rounds:
          self._step_round(train_step, teacher_vars)
        self.clock.take()  # the warm-up's pieces are compile-time: dropped
        self.t_round = time.perf_counter()
      return new_state, metrics

    return step

  def _step_round(self, train_step, teacher_vars):
    import jax  # pylint: disable=g-import-not-at-top
    self.loads.append(report.load_now())
    t = time.perf_counter()
    state = self.step_state
    for _ in range(self.steps):
      state, _ = train_step(state, self.device_batch, teacher_vars)
    jax.block_until_ready(state)
    self.step_state = state
    self.step_only.append(time.perf_counter() - t)


def measure(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  from tikd_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from tikd_jax.train import loop  # pylint: disable=g-import-not-at-top
  from tikd_jax.train.logger import MetricLogger  # pylint: disable=g-import-not-at-top
  from tikd_jax.train.preemption import StopRequest  # pylint: disable=g-import-not-at-top
  from tikd_jax.train.run import create_train_state, setup  # pylint: disable=g-import-not-at-top

  # A size the preset has no argument for (micro, demo): the preset's small, this ViT variant.
  preset_size = args.size if args.size in ('small', 'medium', 'large') else 'small'
  config = load_config(args.config, preset_size)
  with config.unlocked():
    config.model.variant = args.size if 'SIZE' in args.config else config.model.variant
    config.batch_size = args.batch
    config.data.num_workers = args.workers
    if args.dtype:
      config.dtype = args.dtype
    if args.randaugment_on:
      config.augment.randaugment_on = args.randaugment_on
  num_classes = 100
  train = synthetic_source(args.train_examples, num_classes=num_classes)
  evaluation = synthetic_source(args.eval_examples, num_classes=num_classes, seed=1)
  teacher = random_teacher(config, num_classes)
  workdir = tempfile.mkdtemp(prefix='trainer_throughput_')
  run = setup(config, workdir, sources=(train, evaluation), teacher=teacher)
  total = 1 + (args.rounds + 0) * args.steps
  if total > run.total_steps:
    raise SystemExit(f'{total} steps asked, the preset has {run.total_steps}')
  run = dataclasses.replace(
      run,
      spec=dataclasses.replace(run.spec, cadence=dataclasses.replace(run.spec.cadence,
                                                                     stop_at_step=total)))
  state = create_train_state(run)

  clock = Clock()
  rounds = Rounds(args.steps, args.rounds, args.batch, clock)
  steps = loop.Steps(run)
  train_for = steps.train
  steps.train = lambda phase: rounds.wrap(train_for(phase))

  def next_batch(run_, stream):
    host = clock.timed('input_wait', next)(stream.iterator)
    return clock.timed('host_to_device', loop.pipeline.to_global)(host, run_.data_sharding)

  def flush(run_, progress, out):
    clock.timed('metrics_sync', jax.block_until_ready)(progress.pending)
    return clock.timed('logging', _flush)(run_, progress, out)

  _flush, _next_batch = loop._flush, loop.next_batch  # pylint: disable=protected-access
  _evaluate, _save = loop._evaluate_and_log, loop._save  # pylint: disable=protected-access
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                       keep=run.spec.cadence.keep_checkpoints,
                                       best_metric=run.spec.cadence.best_metric)
  checkpointer.wait = clock.timed('checkpointing', checkpointer.wait)
  logger = MetricLogger(workdir, is_chief=True, total_steps=run.total_steps, initial_step=0,
                        prefix=run.spec.name)
  try:
    loop.next_batch, loop._flush = next_batch, flush  # pylint: disable=protected-access
    loop._evaluate_and_log = clock.timed('evaluation', _evaluate)  # pylint: disable=protected-access
    loop._save = clock.timed('checkpointing', _save)  # pylint: disable=protected-access
    with StopRequest() as stop:
      stream = loop.train_stream(run, run.phases[0], 0)
      loop.train_loop(run, state, stream, loop.Outputs(checkpointer, logger, stop), steps)
  finally:
    loop.next_batch, loop._flush = _next_batch, _flush  # pylint: disable=protected-access
    loop._evaluate_and_log, loop._save = _evaluate, _save  # pylint: disable=protected-access
    checkpointer.close(quiet=True)
    logger.close()

  e2e, step = rounds.end_to_end, rounds.step_only
  n = len(e2e)
  images = args.batch * args.steps
  breakdown = {p: round(statistics.median(b[p] for b in rounds.breakdown), 4) for p in PIECES}
  end_to_end_rate = images / statistics.median(e2e)
  step_rate = images / statistics.median(step[:n])
  return {
      'benchmark': 'trainer_throughput', 'config': args.config.replace('SIZE', preset_size),
      'size': args.size, 'variant': config.model.variant, 'batch': args.batch,
      'steps_per_round': args.steps, 'rounds': n, 'workers': run.data.num_workers,
      'train_examples': args.train_examples, 'steps_per_epoch': run.data.steps_per_epoch,
      'randaugment_on': run.spec.augment.randaugment_on, 'log_every_steps':
          run.spec.cadence.log_every_steps, 'dtype': run.spec.dtype, 'device': jax.devices()
                                                                               [0].device_kind,
      'end_to_end_images_per_s': round(end_to_end_rate,
                                       1), 'step_images_per_s': round(step_rate, 1),
      'end_to_end_over_step': round(end_to_end_rate / step_rate,
                                    4), 'end_to_end_round_s': [round(t, 4) for t in e2e],
      'step_round_s': [round(t, 4) for t in step[:n]
                      ], 'overhead_s': round(statistics.median(a - b for a, b in zip(e2e, step)),
                                             4), 'breakdown_s': breakdown,
      'evaluations': clock.counts['evaluation'], 'checkpoint_calls': clock.counts['checkpointing'],
      'excluded': 'the first step (compile + run) and the stop checkpoint after the last round',
      'load_1min': report.load_summary(rounds.loads), 'jax': jax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', '')
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--size', default='small')
  parser.add_argument('--steps', type=int, default=24, help='steps per round')
  parser.add_argument('--rounds', type=int, default=3, help='end-to-end (and step) rounds')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--workers', type=int, default=0,
                      help='grain worker processes (config.data.num_workers; -1: auto)')
  parser.add_argument('--config', default=DEFAULT_CONFIG)
  parser.add_argument('--dtype', default=None, help='config.dtype (default: the preset\'s)')
  parser.add_argument('--randaugment_on', choices=('host', 'device'), default=None,
                      help="config.augment.randaugment_on (default: the preset's, 'host')")
  parser.add_argument('--train_examples', type=int, default=50_000)
  parser.add_argument('--eval_examples', type=int, default=2_000)
  parser.add_argument('--out', default=None, help='also append the JSON line to this file')
  args = parser.parse_args()
  row = measure(args)
  with report.JsonLines(args.out) as emit:
    emit(row)


if __name__ == '__main__':
  main()
