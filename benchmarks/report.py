"""What every benchmark writes: one JSON line per row on stdout, appended to `--out` when given,
with the run-to-run spread and the machine's load summarised the same way in every script."""
from __future__ import annotations

import json
import os
import statistics


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
