"""Whether a checkpoint reads back as written, and what to do when it does not.

Every saved array gets an integer checksum, stored in the step's `meta`; a restore that reads
different bytes raises CheckpointIntegrityError naming the arrays. `newest_readable` is the one
fallback loop both the resume path and weights-only loading use: it tries steps newest first,
reports each failure and returns the first step that reads (or raises UnreadableCheckpointError
with what to do). Unreadable steps are moved aside with `quarantine`, never deleted (README
"Reliability"). No orbax or grain here: callers pass the per-step read function.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tikd_jax.tree import CheckpointMismatchError, flatten


class CheckpointIntegrityError(RuntimeError):
  """The restored bytes differ from the checksums written with them."""


class UnreadableCheckpointError(RuntimeError):
  """No checkpoint in a directory can be restored."""


def brief(e: BaseException, limit: int = 300) -> str:
  """One line naming an exception (orbax/tensorstore messages carry kilobytes of spec)."""
  text = ' '.join(str(e).split())
  if len(text) > limit:
    text = text[:limit] + ' …'
  return f'{type(e).__name__}: {text}'


# ------------------------------------------------------------------------------- checksums
# sum_i bits(x_i) · (2i + 1) mod 2^32 over the raw bits of every element: integer arithmetic, so
# exact in any reduction order and sharding; odd weights catch any single changed element.


def _uint_bits(x, xp):
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == np.bool_:
    x = x.astype(np.uint8)
  width = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[np.dtype(x.dtype).itemsize]
  if xp is np:
    return np.ascontiguousarray(x).reshape(-1).view(width).astype(np.uint32)
  return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).reshape(-1)


def _leaf_checksum(x, xp):
  bits = _uint_bits(x, xp)
  weights = xp.arange(bits.shape[0], dtype=xp.uint32) * xp.uint32(2) + xp.uint32(1)
  return (bits * weights).sum(dtype=xp.uint32)


@jax.jit
def _device_checksums(flat: dict[str, Any]) -> dict[str, jax.Array]:
  return {k: _leaf_checksum(jnp.asarray(v), jnp) for k, v in flat.items()}


def checksums(tree) -> dict[str, int]:
  """{flat path: checksum} of a tree of (possibly sharded, multi-host) arrays, on device."""
  return {k: int(v) for k, v in jax.device_get(_device_checksums(flatten(tree))).items()}


def host_checksums(flat: dict[str, np.ndarray]) -> dict[str, int]:
  """The same checksums of host arrays (equal to `checksums` bit for bit)."""
  return {k: int(_leaf_checksum(np.asarray(v), np)) for k, v in flat.items()}


def verify(item: str, got: dict[str, int], expected: dict[str, int] | None, what: str):
  """Raises CheckpointIntegrityError naming the arrays whose checksums differ."""
  if expected is None:  # written before checksums existed
    return
  bad = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
  if bad:
    raise CheckpointIntegrityError(
        f'{what}: the restored {item!r} data differs from the checksums written with it in '
        f'{len(bad)} array(s): {", ".join(bad[:5])}{" …" if len(bad) > 5 else ""}')


# ------------------------------------------------------------------------------- fallback


def newest_readable(steps: Iterable[int], read: Callable[[int], Any], *, directory: str,
                    advice: str, named: bool = False,
                    agree: Callable[[bool], bool] = bool) -> tuple[int | None, Any, list]:
  """(step, read(step), failures) for the first of `steps` (newest first) that reads.

  `failures` lists (step, reason) of the newer steps that did not read, for the caller to set
  aside. A CheckpointMismatchError propagates: it is a config change, and an older step would
  not fit either. `agree` turns this host's success into everyone's (a collective on several
  hosts, so all of them fall back together). No steps → (None, None, []); none readable →
  UnreadableCheckpointError listing each step's failure, then `advice`. `named`: the caller
  asked for one step, said so in the error. `read` must start afresh on every call.
  """
  steps = list(steps)
  failures = []
  for step in steps:
    error = result = None
    try:
      result = read(step)
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-exception-caught
      error = e
    if agree(error is None):
      if failures:
        logging.warning('using checkpoint step %d in %s instead of the newer, unreadable ones',
                        step, directory)
      return step, result, failures
    reason = brief(error) if error is not None else 'failed on another host'
    failures.append((step, reason))
    logging.warning('could not restore checkpoint step %d in %s: %s', step, directory, reason)
  if not failures:
    return None, None, []
  lines = '\n'.join(f'  step {s}: {r}' for s, r in failures)
  raise UnreadableCheckpointError(f'no readable checkpoint in {directory}' +
                                  (f' (step {steps[0]} was named)' if named else '') +
                                  f':\n{lines}\n{advice}')


def quarantine(directory: str, step: int, reason: str, into: str) -> str:
  """Moves step folder `directory/step` into `into` (kept for inspection) → its new path."""
  target = os.path.join(into, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
  os.makedirs(into, exist_ok=True)
  os.replace(os.path.join(directory, str(step)), target)
  logging.warning('checkpoint step %d in %s is unreadable (%s); moved to %s', step, directory,
                  reason, target)
  return target
