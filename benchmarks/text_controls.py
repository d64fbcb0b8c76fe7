r"""What TIKD's caption itself adds on the digits demo: the default design against its text
controls, paired by seed (docs/experiments.md, "What the text adds").

  python main.py --config=configs/demo.py:seeds=5,rows=text --workdir=workdirs/demo_text
  python benchmarks/text_controls.py workdirs/demo_text [--out benchmarks/results/text_controls.jsonl]

For every seed k it reads `student_<design>{,_shuffled,_constant}_seed<k>/final_eval.json` (the
headline top-1, caption-free at test time) and, when the run has a checkpoint, its final fusion
gate `params/text_gate`. It prints each row's mean ± std over the seeds (std with n − 1) and the
gate's mean |g|, then per control the paired difference design − control: its mean ± std and
t = mean / (std / √n), with n − 1 degrees of freedom. One JSON line per control with --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DESIGN = 'student_tikd_self_distill'
CONTROLS = ('shuffled', 'constant')


def seeds_of(workdir: str, design: str = DESIGN) -> list[int]:
  """The seeds whose design row and every control row have finished."""
  found = set()
  for name in os.listdir(workdir):
    match = re.fullmatch(re.escape(design) + r'_seed(\d+)', name)
    if match:
      found.add(int(match.group(1)))
  return sorted(s for s in found if all(
      os.path.exists(os.path.join(workdir, _run(design, c, s), 'final_eval.json'))
      for c in (None,) + CONTROLS))


def _run(design: str, control: str | None, seed: int) -> str:
  return f'{design}{"_" + control if control else ""}_seed{seed}'


def top1(workdir: str, run: str) -> float:
  with open(os.path.join(workdir, run, 'final_eval.json')) as f:
    return float(json.load(f)['top1'])


def gate_magnitude(workdir: str, run: str) -> float | None:
  """Mean |g| of the run's final fusion gate; None without a checkpoint or a gate."""
  from tikd_jax.train.checkpoint import load_weights  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  try:
    _, flat = load_weights(os.path.join(workdir, run))
  except FileNotFoundError:
    return None
  gate = flat.get('params/text_gate')
  return None if gate is None else float(np.mean(np.abs(gate)))


def paired(differences: list[float]) -> dict:
  """Mean, std (n − 1) and t = mean / (std / √n) of paired differences."""
  n = len(differences)
  mean = statistics.mean(differences)
  std = statistics.stdev(differences) if n > 1 else float('nan')
  t = mean / (std / math.sqrt(n)) if n > 1 and std > 0 else float('nan')
  return {'n': n, 'mean': mean, 'std': std, 't': t, 'df': n - 1}


def summarise(workdir: str, design: str = DESIGN) -> dict:
  seeds = seeds_of(workdir, design)
  if len(seeds) < 2:
    raise SystemExit(f'{workdir}: {len(seeds)} finished seed(s) with every control row; run '
                     f'configs/demo.py:seeds=N,rows=text with N ≥ 2 there first')
  rows = {}
  for control in (None,) + CONTROLS:
    runs = [_run(design, control, s) for s in seeds]
    gates = [g for g in (gate_magnitude(workdir, r) for r in runs) if g is not None]
    rows[control or 'captions'] = {
        'top1': [top1(workdir, r) for r in runs],
        'gate_abs_mean': statistics.mean(gates) if gates else None
    }
  comparisons = {
      c: paired([a - b for a, b in zip(rows['captions']['top1'], rows[c]['top1'])]) for c in CONTROLS
  }
  return {'seeds': seeds, 'rows': rows, 'comparisons': comparisons}


def table(summary: dict) -> str:
  lines = ['| text in training | top-1, mean ± std | mean \\|g\\| at the end |', '|---|---|---|']
  for name, row in summary['rows'].items():
    gate = '–' if row['gate_abs_mean'] is None else f'{row["gate_abs_mean"]:.4f}'
    values = row['top1']
    lines.append(f'| {name} | {statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} | '
                 f'{gate} |')
  lines += ['', '| paired difference | mean ± std | t (df) |', '|---|---|---|']
  for control, d in summary['comparisons'].items():
    lines.append(f'| captions − {control} | {d["mean"]:+.2f} ± {d["std"]:.2f} | '
                 f'{d["t"]:.2f} ({d["df"]}) |')
  return '\n'.join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('workdir')
  parser.add_argument('--design', default=DESIGN)
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)
  summary = summarise(args.workdir, args.design)
  print(f'seeds {summary["seeds"]}\n' + table(summary))
  if args.out:
    with open(args.out, 'a') as f:
      for control, d in summary['comparisons'].items():
        f.write(
            json.dumps(
                dict(name='text_controls', design=args.design, control=control,
                     seeds=summary['seeds'], captions_top1=summary['rows']['captions']['top1'],
                     control_top1=summary['rows'][control]['top1'], **d,
                     gate_abs_mean={k: v['gate_abs_mean'] for k, v in summary['rows'].items()})) +
            '\n')
  return summary


if __name__ == '__main__':
  main()
