r"""Page faults, system time and peak memory per step, under each XLA:CPU preset.

  python benchmarks/host_memory.py [--resolutions 12,16,24,32] [--sizes small] \
      [--presets no_ynn,auto] [--allocator auto] [--calls 6] [--batch 128] \
      [--out benchmarks/results/host_memory.jsonl]

What the small heaps and the allocator policy of tikd_jax/cpu/compiler.py are about: whether a
step's temporaries are faulted back in every step. Each worker sets `--allocator` for its preset
as main.py does for a run (auto: keep freed memory mapped under the presets that cut small heaps). Steps: the IRKD curriculum step at each `--resolutions` (as
curriculum_step.py builds it) and the distillation step with the ResNet32x4 teacher for each
`--sizes` (as train_step.py builds it). glibc's settings are process-wide, so every (step, preset)
runs in a fresh interpreter, one after the other: two warm-up calls, then `--calls` calls with
`resource.getrusage` around each. One JSON line per (step, preset): the median minor faults,
system seconds and wall seconds of a call, the process's peak RSS, and whether the step compiled
with the small heaps. The wall seconds are not interleaved: for speed, see curriculum_step.py and
train_step.py.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report  # noqa: E402  pylint: disable=g-import-not-at-top


def _contestant(kind: str, what: str, preset: str, batch: int, allocator: str):
  """The benchmark contestant (its `fn` one step; its `extra` says whether the step compiled
  with the small heaps) for 'irkd' at resolution `what` or 'distill' at student size `what`."""
  if kind == 'irkd':
    from benchmarks import curriculum_step  # pylint: disable=g-import-not-at-top
    return curriculum_step.jax_contestants([int(what)], batch, 'none', preset, 'auto',
                                           allocator=allocator)[0]
  from benchmarks import train_step  # pylint: disable=g-import-not-at-top
  return train_step.jax_contestants(what, batch, False, preset, allocator=allocator)[0]


def _worker(kind: str, what: str, preset: str, batch: int, calls: int, allocator: str) -> dict:
  contestant = _contestant(kind, what, preset, batch, allocator)
  for _ in range(2):
    contestant.fn()
  faults, system, wall = [], [], []
  for _ in range(calls):
    before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    contestant.fn()
    after = resource.getrusage(resource.RUSAGE_SELF)
    wall.append(time.perf_counter() - t)
    faults.append(after.ru_minflt - before.ru_minflt)
    system.append(after.ru_stime - before.ru_stime)
  return {
      'benchmark': 'host_memory', 'step': kind,
      ('resolution' if kind == 'irkd' else 'size'): int(what) if kind == 'irkd' else what,
      'batch': batch, 'xla_options': preset, 'small_heaps': contestant.extra['small_heaps'],
      'calls': calls, 'minor_faults': int(statistics.median(faults)),
      'system_s': round(statistics.median(system),
                        4), 'median_s': round(statistics.median(wall), 4),
      'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                          ), 'load_1min': report.load_now()
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--resolutions', default='12,16,24,32')
  parser.add_argument('--sizes', default='small')
  parser.add_argument('--presets', default='no_ynn,auto')
  parser.add_argument('--allocator', default='auto', choices=('auto', 'keep_mapped', 'system'),
                      help='host allocator policy of every worker (main.py --allocator)')
  parser.add_argument('--calls', type=int, default=6)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--out', default='')
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)  # kind:what:preset
  args = parser.parse_args(argv)
  if args.worker:
    kind, what, preset = args.worker.split(':')
    print(json.dumps(_worker(kind, what, preset, args.batch, args.calls, args.allocator)),
          flush=True)
    return
  steps = ([('irkd', r) for r in args.resolutions.split(',') if r] +
           [('distill', s) for s in args.sizes.split(',') if s])
  with report.JsonLines(args.out) as emit:
    for kind, what in steps:
      for preset in [p for p in args.presets.split(',') if p]:
        print(f'# {kind} {what} {preset}', file=sys.stderr, flush=True)
        proc = subprocess.run([
            sys.executable,
            os.path.abspath(__file__), f'--worker={kind}:{what}:{preset}', f'--batch={args.batch}',
            f'--calls={args.calls}', f'--allocator={args.allocator}'
        ], capture_output=True, text=True, check=False)
        if proc.returncode:
          sys.exit(f'{kind} {what} {preset} failed:\n{proc.stderr[-3000:]}')
        emit(json.loads(proc.stdout.strip().splitlines()[-1]))


if __name__ == '__main__':
  main()
