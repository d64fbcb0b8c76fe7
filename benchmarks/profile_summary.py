r"""One train step per size under `jax.profiler`, summarised as a top-15 ops table (op, time, share).

  python benchmarks/profile_summary.py --sizes small,medium,large --batch 1024 --dtype bfloat16 \
      --trace_dir /tmp/profile [--out rows.jsonl] [--md table.md]
  python benchmarks/profile_summary.py --summarise TRACE.trace.json.gz   # an existing trace

The step is benchmarks/train_step.py's (`build_jax`: the trainer's own step on synthetic data with
a random teacher), compiled and run twice before the traced step. `jax.profiler.trace(...,
create_perfetto_trace=True)` writes a Perfetto / Chrome trace (`*.trace.json.gz`) beside the
.xplane.pb, so no TensorBoard plugin is needed: its complete events (`ph: X`, `dur` in µs) are
grouped by name. On a GPU the ops are the device's (processes named `/device:GPU:…`: kernels on
the streams); elsewhere every complete event of the XLA threads counts (XLA:CPU's thunks and
ops). Nested events are counted at every level, so shares are of the summed op time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import report  # noqa: E402  pylint: disable=g-import-not-at-top

TOP = 15
# Host-side events that are the profiler's and Python's, not the step's ops.
_HOST_NOISE = ('$', 'PjitFunction', 'ThunkExecutor', 'TraceMe', 'ProfilerSession')


def read_trace(path: str) -> dict:
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rt') as f:
    return json.load(f)


def op_times(trace: dict) -> dict[str, list]:
  """{op name: [total µs, count]} over the device's processes if the trace has any (GPU), else
  over every complete event that is not Python's or the profiler's own."""
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  names = {
      e['pid']: e.get('args', {}).get('name', '')
      for e in events
      if e.get('ph') == 'M' and e.get('name') == 'process_name'
  }
  device_pids = {pid for pid, name in names.items() if '/device:' in name}
  out = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    if e.get('ph') != 'X' or 'dur' not in e:
      continue
    if device_pids and e.get('pid') not in device_pids:
      continue
    name = str(e.get('name', ''))
    if not device_pids and (name.startswith(_HOST_NOISE) or '.py' in name):
      continue
    out[name][0] += float(e['dur'])
    out[name][1] += 1
  return dict(out)


def op_kind(name: str) -> str:
  """`dot.51` → `dot`, `copy_bitcast_fusion.6` → `copy_bitcast_fusion`: XLA's instance suffix."""
  return re.sub(r'\.\d+$', '', name)


def summarise(trace: dict, top: int = TOP, by_kind: bool = False) -> list[dict]:
  """The `top` ops (or op kinds, instance suffixes dropped) by total time: {op, ms, count,
  share} (share of all op time counted)."""
  times = op_times(trace)
  if by_kind:
    kinds = collections.defaultdict(lambda: [0.0, 0])
    for name, (t, n) in times.items():
      kinds[op_kind(name)][0] += t
      kinds[op_kind(name)][1] += n
    times = kinds
  total = sum(t for t, _ in times.values()) or 1.0
  ranked = sorted(times.items(), key=lambda kv: -kv[1][0])[:top]
  return [{'op': name, 'ms': round(t / 1000, 3), 'count': n, 'share': round(t / total, 4)}
          for name, (t, n) in ranked]


def table(ops: list[dict]) -> str:
  lines = ['| op | ms | calls | share |', '|---|---|---|---|']
  for o in ops:
    op = o['op'] if len(o['op']) <= 60 else o['op'][:57] + '...'
    lines.append(f'| `{op}` | {o["ms"]:.3f} | {o["count"]} | {100 * o["share"]:.1f} % |')
  return '\n'.join(lines)


def newest_trace(trace_dir: str) -> str:
  paths = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
  if not paths:
    raise FileNotFoundError(f'no *.trace.json.gz under {trace_dir}: jax.profiler wrote none')
  return max(paths, key=os.path.getmtime)


def trace_step(size: str, batch: int, dtype: str, xla_options: str, trace_dir: str) -> str:
  """Traces one step of `size` (after a compile and two untimed steps); the trace's path."""
  import jax  # pylint: disable=g-import-not-at-top

  from benchmarks import train_step  # pylint: disable=g-import-not-at-top
  b = train_step.build_jax(size, batch, xla_options, dtype)
  step = b['step'].lower(b['state'], b['batch'], b['teacher_vars']).compile()
  state = b['state']
  for _ in range(2):
    state, metrics = step(state, b['batch'], b['teacher_vars'])
  jax.block_until_ready((state, metrics))
  os.makedirs(trace_dir, exist_ok=True)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    state, metrics = step(state, b['batch'], b['teacher_vars'])
    jax.block_until_ready((state, metrics))
  return newest_trace(trace_dir)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--summarise', default=None, help='a *.trace.json.gz to summarise only')
  parser.add_argument('--sizes', default='small')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--xla_options', default='auto')
  parser.add_argument('--trace_dir', default='/tmp/tikd_profile')
  parser.add_argument('--top', type=int, default=TOP)
  parser.add_argument('--out', default=None, help='also append the JSON lines to this file')
  parser.add_argument('--md', default=None, help='also append the markdown tables to this file')
  args = parser.parse_args()
  if args.summarise:
    print(table(summarise(read_trace(args.summarise), args.top)))
    return
  with report.JsonLines(args.out) as emit:
    for size in (s for s in args.sizes.split(',') if s):
      t = time.perf_counter()
      path = trace_step(size, args.batch, args.dtype, args.xla_options,
                        os.path.join(args.trace_dir, f'{size}_{args.dtype}'))
      trace = read_trace(path)
      ops, kinds = summarise(trace, args.top), summarise(trace, args.top, by_kind=True)
      import jax  # pylint: disable=g-import-not-at-top
      emit({
          'benchmark': 'profile', 'size': size, 'batch': args.batch, 'dtype': args.dtype,
          'device': jax.devices()[0].device_kind, 'trace': path, 'top_ops': ops, 'top_kinds': kinds,
          'seconds': round(time.perf_counter() - t, 1), 'load_1min': report.load_now()
      })
      text = (f'\n### {size} {args.dtype}, batch {args.batch}: top {args.top} ops\n\n{table(ops)}\n'
              f'\nby kind:\n\n{table(kinds)}\n')
      print(text, file=sys.stderr)
      if args.md:
        with open(args.md, 'a') as f:
          f.write(text)


if __name__ == '__main__':
  main()
