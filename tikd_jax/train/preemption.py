"""Graceful stops: SIGTERM / SIGINT set a flag; the trainer stops at a step every host agrees on.

Schedulers (Kubernetes, SLURM, preemptible VMs, TPU maintenance events) send SIGTERM and wait a
grace period before SIGKILL. The trainer finishes the step in flight, writes the pending metrics,
saves a checkpoint, waits for it to be complete, closes its logs and raises `Preempted`;
`main.py` turns that into exit status 75 (EX_TEMPFAIL: "try again"), and rerunning the same
command resumes. A second Ctrl-C interrupts at once (the default SIGINT behaviour is restored
after the first); further SIGTERMs are ignored while the checkpoint is written.

Multi-host: each host receives its signal at its own moment, so the flag is combined with an
all-gather at log intervals (every host checks at the same steps) and all hosts stop at the same
step. A single process checks the flag after every step.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Callable

import numpy as np

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, rerun to continue


class Preempted(Exception):
  """Training stopped on a signal after saving a complete checkpoint at `step`."""

  def __init__(self, step: int, directory: str, reason: str):
    self.step, self.directory, self.reason = step, directory, reason
    super().__init__(f'stopped by {reason} at step {step}; the checkpoint of step {step} is '
                     f'complete in {directory}. Rerun the same command to resume.')


def _process_allgather(x: np.ndarray) -> np.ndarray:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x))


class StopRequest:
  """Context manager that turns SIGTERM / SIGINT into a stop request the training loop polls.

    with StopRequest() as stop:
      for step in ...:
        ...
        if stop.should_stop(at_sync_point=step % log_every == 0):
          break   # then save and raise Preempted(step, ..., stop.reason)

  `process_count` and `allgather` are injectable for tests; by default they are JAX's.
  Outside the main thread signal handlers cannot be installed: the request is then never set.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, *, process_count: int | None = None,
               allgather: Callable[[np.ndarray], np.ndarray] | None = None):
    if process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_count = jax.process_count()
    self.process_count = process_count
    self._allgather = allgather or _process_allgather
    self.reason: str | None = None  # e.g. 'SIGTERM'; set by the handler or by another host
    self._previous: dict[int, object] = {}

  # -- signal handling -------------------------------------------------------------------------
  def __enter__(self) -> 'StopRequest':
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.reason is None:
      self.reason = name
    if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
      signal.signal(signal.SIGINT, signal.default_int_handler)
    # os.write, not print: a handler may run in the middle of another print.
    os.write(2, (f'\nreceived {name}: finishing the current step, then saving a checkpoint and '
                 f'exiting (status {EXIT_PREEMPTED}); rerun to resume.' +
                 (' Press Ctrl-C again to exit at once.' if signum == signal.SIGINT else '') +
                 '\n').encode())

  def request(self, reason: str = 'request') -> None:
    """Asks for a stop without a signal (tests, callbacks)."""
    if self.reason is None:
      self.reason = reason

  @property
  def requested(self) -> bool:
    """This process has been asked to stop (not yet agreed with the other hosts)."""
    return self.reason is not None

  # -- agreement -------------------------------------------------------------------------------
  def should_stop(self, at_sync_point: bool) -> bool:
    """True when every host should stop after the current step.

    One process: the local flag, every step. Several: only at sync points (which every host
    must reach at the same steps), where the flags are all-gathered and any raised flag stops
    all hosts.
    """
    if self.process_count <= 1:
      return self.requested
    if not at_sync_point:
      return False
    flags = self._allgather(np.asarray(int(self.requested), np.int32))
    if np.any(np.asarray(flags)):
      if self.reason is None:
        self.reason = 'a signal on another host'
      return True
    return False
