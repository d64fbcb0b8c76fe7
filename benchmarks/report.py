"""What every benchmark writes: one JSON line per row on stdout, appended to `--out` when given,
with the run-to-run spread and the machine's load summarised the same way in every script."""
from __future__ import annotations

import json
import os
import statistics
import time


def quantile(values, p: float) -> float:
  """The p-quantile of `values`, linearly interpolated (numpy's default)."""
  values = sorted(values)
  k = p * (len(values) - 1)
  lo, hi = int(k), min(int(k) + 1, len(values) - 1)
  return values[lo] + (values[hi] - values[lo]) * (k - lo)


def load_summary(loads) -> dict:
  """{min, median, max} of 1-minute load averages sampled during a measurement."""
  return {'min': min(loads), 'median': round(statistics.median(loads), 2), 'max': max(loads)}


def load_now() -> float:
  return round(os.getloadavg()[0], 2)


def timed_call(contestant) -> float:
  """One timed call of `contestant.fn`, its seconds and the load before it appended to the
  contestant's `times` / `loads` (the workers of train_step.py and curriculum_step.py)."""
  contestant.loads.append(load_now())
  t = time.perf_counter()
  contestant.fn()
  contestant.times.append(time.perf_counter() - t)
  return contestant.times[-1]


def interleave(fns: dict, runs: int, pause_s: float = 0.0) -> dict:
  """{name: (times, loads)}: `runs` rounds of one call of each contestant, the order rotated every
  round, so that a change in the machine's load hits all contestants alike (conv_lowering.py,
  attention_core.py). `pause_s` before every call lets the previous contestant's threads stop
  spinning (libgomp and OpenBLAS workers spin after a call, slowing a millisecond-scale
  successor)."""
  names = list(fns)
  out = {n: ([], []) for n in names}
  for r in range(runs):
    k = r % len(names)
    for n in names[k:] + names[:k]:
      if pause_s:
        time.sleep(pause_s)
      out[n][1].append(load_now())
      t = time.perf_counter()
      fns[n]()
      out[n][0].append(time.perf_counter() - t)
  return out


class JsonLines:
  """`with JsonLines(path) as emit: emit(row)` prints each row and appends it to `path` (if any)
  at once, so an interrupted benchmark keeps the rows it measured."""

  def __init__(self, path: str | None):
    self.path = path
    self._file = None

  def __enter__(self):
    if self.path:
      os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
      self._file = open(self.path, 'a')  # pylint: disable=consider-using-with
    return self.emit

  def emit(self, row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if self._file:
      self._file.write(line + '\n')
      self._file.flush()

  def __exit__(self, *exc):
    if self._file:
      self._file.close()


def table(rows: list[dict]) -> str:
  """A markdown table of benchmarks/train_step.py rows: one line per (size, dtype, framework, step
  part), each with its speed ratio against PyTorch eager of the same size, dtype and part."""
  timed = [r for r in rows if 'median_s' in r]
  eager = {(r['size'], r.get('dtype', 'float32'), r['name']): r['median_s']
           for r in timed
           if r['framework'] == 'torch'}
  lines = [
      '| size | dtype | part | framework | median ms | images/s | × torch eager | '
      'fraction of peak | compile s | load |', '|---|---|---|---|---|---|---|---|---|---|'
  ]
  for r in timed:
    key = (r['size'], r.get('dtype', 'float32'), r['name'])
    ratio = f'{eager[key] / r["median_s"]:.2f}' if key in eager else '–'
    fraction = r.get('fraction_of_peak')
    lines.append(f'| {r["size"]} | {key[1]} | {r["name"]} | {r["framework"]} | '
                 f'{1000 * r["median_s"]:.1f} | {r["images_per_s"]:.0f} | {ratio} | '
                 f'{"–" if fraction is None else f"{fraction:.3f}"} | '
                 f'{r.get("compile_s", "–")} | {r["load_1min"]["median"]} |')
  for r in rows:
    if 'skipped' in r:
      lines.append(f'\n{r.get("framework", "all")} {r["size"]} {r.get("dtype", "")}: '
                   f'skipped ({r["skipped"]})')
    elif r.get('name') == 'peak':
      lines.append(f'\npeak: {r["what"]} {r["dtype"]} n={r["n"]}: {r["gflops"]} GFLOP/s'
                   f' on {r.get("device", "cpu")}')
  return '\n'.join(lines)


def sweep(rows: list[dict], keep_above: float = 1.02) -> str:
  """A markdown table of the device check's sweep: every tagged JAX train_step row against the
  untagged JAX row of the same size and dtype (the defaults), in images/s; a point is kept when
  it is faster by more than `keep_above`×. jax_cudnn rows (the cuDNN attention core) are points
  of their own, tagged by framework."""
  timed = [r for r in rows if r.get('name') == 'train_step' and 'images_per_s' in r]
  base = {(r['size'], r.get('dtype', 'float32')): r
          for r in timed
          if r['framework'] == 'jax' and not r.get('tag') and r['batch'] == min(
              x['batch'] for x in timed if x['size'] == r['size'])}
  lines = [
      '| point | size | dtype | batch | images/s | × defaults | keep |',
      '|---|---|---|---|---|---|---|'
  ]
  for r in timed:
    point = r.get('tag') or ('cudnn attention' if r['framework'] == 'jax_cudnn' else None)
    ref = base.get((r['size'], r.get('dtype', 'float32')))
    if not point or ref is None or not r['framework'].startswith('jax'):
      continue
    ratio = r['images_per_s'] / ref['images_per_s']
    lines.append(
        f'| {point} | {r["size"]} | {r.get("dtype", "float32")} | {r["batch"]} | '
        f'{r["images_per_s"]:.0f} | {ratio:.3f} | {"yes" if ratio > keep_above else "no"} |')
  return '\n'.join(lines)


if __name__ == '__main__':
  import sys  # pylint: disable=g-import-not-at-top
  if len(sys.argv) != 3 or sys.argv[1] not in ('table', 'sweep'):
    sys.exit('usage: python benchmarks/report.py table|sweep ROWS.jsonl')
  with open(sys.argv[2]) as f:
    loaded = [json.loads(line) for line in f if line.strip()]
  print((table if sys.argv[1] == 'table' else sweep)(loaded))
