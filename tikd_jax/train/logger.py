"""Metrics to JSON lines + TensorBoard, and progress to the terminal (tqdm) or plain log lines.

Only the chief process (process 0) writes. `metrics.jsonl` is appended across restarts; every
row carries its `step` so rows repeated after a resume are detectable (keep the last per step).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import numpy as np


def _plain(v: Any):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


def _summary_writer(logdir: str):
  """tensorboardX's SummaryWriter, imported without torch. tensorboardX imports torch when it is
  installed (~2 s, a tenth of a smoke run) only to accept torch tensors; we log Python floats.
  While sys.modules['torch'] is None, `import torch` raises ImportError, which tensorboardX
  handles; the entry is removed again so that later code imports torch as usual."""
  if 'tensorboardX' not in sys.modules and 'torch' not in sys.modules:
    sys.modules['torch'] = None
    try:
      import tensorboardX  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    finally:
      del sys.modules['torch']
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  return SummaryWriter(logdir)


class MetricLogger:

  def __init__(self, workdir: str, *, is_chief: bool = True, total_steps: int = 0,
               initial_step: int = 0, tensorboard: bool = True, prefix: str = ''):
    self.is_chief = is_chief
    self.workdir = workdir
    self.prefix = prefix
    self._tb = None
    self._bar = None
    self._t0 = time.time()
    self._step0 = initial_step
    self.total_steps = total_steps
    if not is_chief:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', buffering=1)
    if tensorboard:
      self._tb = _summary_writer(os.path.join(workdir, 'tensorboard'))
    if sys.stderr.isatty() and total_steps:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=initial_step, desc=prefix or 'train',
                       dynamic_ncols=True)

  def write(self, step: int, metrics: dict[str, Any], kind: str = 'train') -> dict:
    row = {'step': int(step), 'kind': kind, 'time': round(time.time(), 3)}
    row.update({k: _plain(v) for k, v in metrics.items()})
    if not self.is_chief:
      return row
    self._jsonl.write(json.dumps(row) + '\n')
    if self._tb is not None:
      for k, v in row.items():
        if k not in ('step', 'time', 'kind') and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(f'{kind}/{k}', v, step)
    return row

  def progress(self, step: int, metrics: dict[str, Any]):
    """Advances the bar on a terminal; prints one plain line otherwise."""
    if not self.is_chief:
      return
    rate = (step - self._step0) / max(time.time() - self._t0, 1e-9)
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix({k: f'{v:.4g}' for k, v in list(shown.items())[:4]})
      return
    eta = (self.total_steps - step) / rate if rate > 0 and self.total_steps else float('nan')
    parts = ' '.join(f'{k}={v:.4g}' for k, v in shown.items())
    print(
        f'{self.prefix}[step {step}/{self.total_steps}] {parts} ({rate:.2f} steps/s, '
        f'eta {eta:.0f}s)', flush=True)

  def message(self, text: str):
    if not self.is_chief:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self):
    if not self.is_chief:
      return
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    self._jsonl.close()
