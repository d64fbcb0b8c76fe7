"""Progress of a long loop: tqdm on a terminal, plain log lines (rate and ETA) otherwise."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger('tikd_jax.text_teacher')


def format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s' if m else f'{s}s'


class Progress:
  """`update(n)` after each batch; `initial` = work done by an earlier run (not in the rate)."""

  def __init__(self, total: int, desc: str, unit: str = 'images', initial: int = 0,
               interval: float = 30.0, use_tqdm: bool | None = None):
    self.total, self.desc, self.unit = total, desc, unit
    self.done, self.initial, self.interval = initial, initial, interval
    self.start = self.last_log = time.perf_counter()
    if use_tqdm is None:
      use_tqdm = sys.stderr.isatty()
    self.bar = None
    if use_tqdm:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)

  @property
  def rate(self) -> float:
    elapsed = time.perf_counter() - self.start
    return (self.done - self.initial) / elapsed if elapsed > 0 else 0.0

  def status(self) -> str:
    rate = self.rate
    eta = format_seconds((self.total - self.done) / rate) if rate > 0 else '?'
    pct = 100.0 * self.done / self.total if self.total else 100.0
    return (f'{self.desc}: {self.done:,}/{self.total:,} ({pct:.1f}%), {rate:.2f} {self.unit}/s, '
            f'ETA {eta}')

  def update(self, n: int) -> None:
    self.done += n
    if self.bar is not None:
      self.bar.update(n)
      return
    now = time.perf_counter()
    if now - self.last_log >= self.interval or self.done >= self.total:
      self.last_log = now
      log.info(self.status())

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    elapsed = time.perf_counter() - self.start
    log.info('%s: %s %s in %s (%.2f %s/s)', self.desc, f'{self.done - self.initial:,}', self.unit,
             format_seconds(elapsed), self.rate, self.unit)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
