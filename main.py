r"""tikd-jax entry point.

  python main.py --config=configs/demo.py --workdir=workdirs/demo
  python main.py --config=configs/tikd_cifar100.py:large --workdir=DIR --config.batch_size=512
  python main.py --config=configs/tikd_cifar100.py:large --workdir=DIR --mode=eval
  python main.py --config=configs/tikd_cifar100.py:large,hard,released --workdir=DIR \
      --mode=eval --ema=on

A config with `runs` (e.g. the demo) is a sequence of runs, each in `<workdir>/<run name>`; a
run's `teacher.checkpoint` may name an earlier run as '{workdir}/<run name>'. Rerunning a
command resumes every run from its newest checkpoint.
Exit status 75 (EX_TEMPFAIL): stopped by SIGTERM/SIGINT after a complete checkpoint; rerun to
resume (README "Reliability"). Exit status 2: an error in the data or the config that names it
(tikd_jax/data/errors.py), printed as `error: <what and what to do>` without a traceback.
Exit status 71 (EX_OSERR): an input worker process died (the OOM killer's SIGKILL, a SIGBUS from a
full /dev/shm), printed as one `error:` line with the signal, the likely cause and the checkpoint
a rerun resumes from.
Multi-host: `jax.distributed.initialize()` is called when --coordinator is given or when JAX
detects a cluster (SLURM, TPU pod, Open MPI); see README "Scaling out".
"""
from __future__ import annotations

import json
import os
import re
import statistics
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and metrics go.')
_MODE = flags.DEFINE_enum(
    'mode', 'train', ['train', 'eval'],
    'train (resumes if the workdir has a checkpoint) or eval the newest '
    'checkpoint.')
_EMA = flags.DEFINE_enum(
    'ema', 'auto', ['auto', 'on', 'off'],
    '--mode=eval: also evaluate the checkpoint\'s model EMA (config.ema.decay), reported as '
    'training reports it (ema_top1, ema_loss, …): auto = when the checkpoint holds one, on = it '
    'must hold one (an error otherwise), off = the raw weights only.')
_COORDINATOR = flags.DEFINE_string('coordinator', None,
                                   'host:port of process 0 for multi-host runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (hosts).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\'s index.')
_ALLOCATOR = flags.DEFINE_enum(
    'allocator', 'auto', ['auto', 'keep_mapped', 'system'],
    'Host memory allocator policy of this process (tikd_jax/cpu/compiler.py): keep_mapped = glibc '
    'keeps freed memory mapped, so XLA:CPU steps do not fault their temporaries back in every '
    'step; system = the C library\'s defaults; auto = keep_mapped on XLA:CPU with glibc when '
    'config.xla_options is auto or small_heaps, else system.')
flags.mark_flags_as_required(['config', 'workdir'])

# sysexits.h EX_OSERR: the operating system stopped a process of ours (an input worker).
EXIT_WORKER_DIED = 71
# What grain 0.2.18 raises in the trainer when a worker process of `mp_prefetch` is gone
# (grain/_src/python/dataset/transformations/process_prefetch.py, `__next__`).
_GRAIN_WORKER_DIED = re.compile(
    r'Worker process was terminated unexpectedly with exit code (-?\d+)')
# Signal → its usual cause in a training run, and what to do.
_LIKELY_CAUSE = {
    'SIGKILL': 'usually the OOM killer (see `dmesg`); lower --config.data.num_workers or '
               '--config.batch_size',
    'SIGBUS': 'usually a full /dev/shm (the workers pass batches through it); lower '
              '--config.data.num_workers or enlarge /dev/shm',
    'SIGSEGV': 'a crash in native code of the input pipeline (decoding, augmentation)',
}


class InputWorkerDied(Exception):
  """A grain worker process of the run in `workdir` died; the message is the one line to print."""

  def __init__(self, exit_code: int, workdir: str):
    import signal  # pylint: disable=g-import-not-at-top
    if exit_code < 0:
      name = signal.Signals(-exit_code).name
      how = f'was killed by {name}: {_LIKELY_CAUSE.get(name, "sent by another process")}'
    else:
      how = (f'exited with status {exit_code}: its error is in the log above; '
             f'--config.data.num_workers=0 runs the pipeline in this process')
    directory = os.path.join(workdir, 'checkpoints')
    # Complete checkpoints only: orbax writes into `<step>.orbax-checkpoint-tmp-…` and renames.
    steps = sorted(
        int(d) for d in (os.listdir(directory) if os.path.isdir(directory) else ()) if d.isdigit())
    where = (f'the last checkpoint is step {steps[-1]} in {directory}; rerunning the same command '
             f'resumes from it' if steps else f'no checkpoint was written in {directory} yet; '
             f'rerunning the same command starts over')
    super().__init__(f'an input worker process {how}. Training stopped; {where}')


def _dead_worker_exit_code(e: BaseException) -> int | None:
  """The exit code of the grain worker whose death `e` reports (negative: a signal), else None."""
  match = _GRAIN_WORKER_DIED.match(str(e)) if isinstance(e, RuntimeError) else None
  return int(match.group(1)) if match else None


def _maybe_initialize_distributed():
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif any(
      k in os.environ for k in ('SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES', 'OMPI_COMM_WORLD_SIZE')):
    jax.distributed.initialize()  # JAX's cluster auto-detection


def _xla_presets(config) -> set[str]:
  """config.xla_options of the config, or of each of its runs."""
  if 'runs' in config:
    return set().union(*(_xla_presets(sub) for sub in config.runs.values()))
  return {config.xla_options}


def _set_allocator(config) -> None:
  """Applies --allocator to this process (process-wide: the application's choice, made once,
  before any step) and prints what it chose."""
  from tikd_jax.cpu import compiler  # pylint: disable=g-import-not-at-top
  presets = _xla_presets(config)
  # 'auto' keeps memory mapped when any run's steps may cut small heaps.
  preset = next((p for p in ('auto', 'small_heaps') if p in presets), min(presets))
  print(compiler.set_allocator(_ALLOCATOR.value, preset), flush=True)


def run(config, workdir: str, mode: str, ema: str = 'auto') -> dict:
  from tikd_jax.train import trainer  # pylint: disable=g-import-not-at-top
  if 'runs' in config:
    results = {}
    for name in config.run_order:
      sub = config.runs[name]
      sub_dir = os.path.join(workdir, name)
      with sub.unlocked():
        if 'teacher' in sub and sub.teacher.checkpoint:
          sub.teacher.checkpoint = sub.teacher.checkpoint.format(workdir=workdir)
        if 'text' in sub and sub.text.features_dir:
          sub.text.features_dir = sub.text.features_dir.format(workdir=workdir)
      results[name] = run(sub, sub_dir, mode, ema)
    summary = _summary(results, config)
    print(summary, flush=True)
    with open(os.path.join(workdir, 'summary.txt'), 'w') as f:
      f.write(summary + '\n')
    return results
  if mode == 'eval':
    if not os.path.isdir(workdir):
      from tikd_jax.data.errors import DataNotFoundError  # pylint: disable=g-import-not-at-top
      raise DataNotFoundError(f'--mode=eval: workdir {workdir} does not exist; train first with '
                              f'the same --config and --workdir')
    result = trainer.evaluate_checkpoint(config, workdir, ema=ema)
  else:
    try:
      result = trainer.train_and_evaluate(config, workdir)
    except RuntimeError as e:
      exit_code = _dead_worker_exit_code(e)
      if exit_code is None:
        raise
      raise InputWorkerDied(exit_code, workdir) from None
  print(trainer.format_evals(result), flush=True)
  return result


def _summary(results: dict, config) -> str:
  """One row per run; runs named `<run>_seed<k>` are one row, mean ± std (n − 1) over seeds."""
  groups: dict[str, list[dict]] = {}
  for name, r in results.items():
    if isinstance(r, dict) and 'top1' in r:
      groups.setdefault(re.sub(r'_seed\d+$', '', name), []).append(r)
  # The run column fits the longest name ('student_tikd_self_distill (EMA)'), two spaces after.
  width = max([24] + [len(f'{name} (EMA)') + 2 for name in groups])
  lines = [
      '',
      config.get('summary_title', 'Summary'),  # a suite config has no base()
      f'{"run":<{width}}{"params":>12}{"Acc@1":>16}{"Acc@5":>16}{"loss":>8}  seeds'
  ]
  for name, rows in groups.items():
    lines.append(_summary_row(name, rows, '', width))
    if all('ema_top1' in r for r in rows):  # the model EMA's row below the raw weights'
      lines.append(_summary_row(f'{name} (EMA)', rows, 'ema_', width))
  return '\n'.join(lines)


def _summary_row(name: str, rows: list[dict], prefix: str, width: int) -> str:
  # Acc@5 is '–' for fewer than 5 classes (the runs report no top5; README "Configs").
  cells = [
      _mean_std([r[prefix + k]
                 for r in rows]) if all(prefix + k in r
                                        for r in rows) else '–'
      for k in ('top1', 'top5')
  ]
  loss = sum(r[prefix + 'loss'] for r in rows) / len(rows)
  return (f'{name:<{width}}{rows[0].get("num_params", 0):>12,}{cells[0]:>16}{cells[1]:>16}'
          f'{loss:>8.3f}  {len(rows)}')


def _mean_std(values: list[float]) -> str:
  if len(values) == 1:
    return f'{values[0]:.2f}'
  return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, except that an override naming no config field (`--config.optimzer.lr=…`;
  ml_collections raises AttributeError / KeyError from inside flag parsing) prints one line with
  ml_collections' suggestion, not two chained tracebacks."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    frames = traceback.extract_tb(e.__traceback__)
    if not frames or f'ml_collections{os.sep}config_dict' not in frames[-1].filename:
      raise  # not a misspelt override: keep the traceback
    detail = e
    while isinstance(detail, BaseException):  # AttributeError(KeyError("'key'\nDid you mean…"))
      detail = detail.args[0] if detail.args else ''
    detail = str(detail)
    key, _, hint = detail.partition('\n')
    name = key.strip('\'"')
    override = next((a.split('=')[0]
                     for a in argv[1:]
                     if a.startswith('--config.') and name in a.split('=')[0].split('.')),
                    '--config.…')
    print(f'error: {override}: the config has no field {key}. {hint}'.rstrip(), file=sys.stderr)
    from tikd_jax.data.errors import EXIT_USER_ERROR  # pylint: disable=g-import-not-at-top
    sys.exit(EXIT_USER_ERROR)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if flags.FLAGS['ema'].present and _MODE.value != 'eval':
    raise app.UsageError('--ema applies to --mode=eval; a training run keeps and evaluates a '
                         'model EMA when --config.ema.decay > 0')
  _maybe_initialize_distributed()
  _set_allocator(_CONFIG.value)
  from tikd_jax.data.errors import EXIT_USER_ERROR, DataError  # pylint: disable=g-import-not-at-top
  from tikd_jax.train import preemption  # pylint: disable=g-import-not-at-top
  try:
    results = run(_CONFIG.value, _WORKDIR.value, _MODE.value, _EMA.value)
  except preemption.Preempted as e:  # SIGTERM / SIGINT: checkpoint complete, rerun resumes
    print(f'{e} (exit status {preemption.EXIT_PREEMPTED})', flush=True)
    return preemption.EXIT_PREEMPTED
  except DataError as e:  # the user fixes the data or the config; the message says how
    print(f'error: {e}', file=sys.stderr, flush=True)
    return EXIT_USER_ERROR
  except InputWorkerDied as e:  # the machine, not the code: one line, and the rerun resumes
    print(f'error: {e} (exit status {EXIT_WORKER_DIED})', file=sys.stderr, flush=True)
    return EXIT_WORKER_DIED
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    with open(os.path.join(_WORKDIR.value, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  app.run(main, flags_parser=_parse_flags)
