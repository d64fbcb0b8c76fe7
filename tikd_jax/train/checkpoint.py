"""Orbax checkpoints: model, optimizer, data-iterator position and run metadata, saved together.

Layout: `<workdir>/checkpoints/<step>/{model,extra,optimizer,data,meta,metrics}`. `model` holds
`{'params': …, 'batch_stats': …}` keyed by flat string paths ('blocks/0/attn/qkv/kernel'), so a
checkpoint is readable without the Python model and mismatches can be listed key by key. A
weights-only checkpoint (teachers converted from PyTorch) has just `model` and `meta`.

Faults (README "Reliability"):
- A step folder appears only complete: orbax writes `<step>.orbax-checkpoint-tmp*` and renames
  it when every item is written; unfinished folders are never listed and are removed on the next
  start. Old steps are dropped only after the newer one is renamed (orbax deletes in the save's
  finalize, after the commit, and not at all when the commit failed), and by a rename into
  `_deleted/` first (purged afterwards), so a kill mid-deletion never leaves a half step. The
  best-metric value is written with each step, so the best checkpoint survives restarts.
- `meta` carries an integer checksum of every saved array; a restore that reads different bytes,
  or that fails anywhere inside orbax, reports the step and what failed and falls back to the
  previous step; the failed newer ones are moved to `<workdir>/unreadable_checkpoints/`. The
  checksums and that fallback live in `checkpoint_integrity.py`, the flat paths and mismatch
  report in `tikd_jax/tree.py`; this module is the orbax manager and weights-only I/O.
- A failed save (disk full, …) raises `CheckpointSaveError` naming the step and the previous,
  intact checkpoint, whether it failed at once or later in the background.
"""
from __future__ import annotations

import errno
import glob
import json
import math
import os
import shutil
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from tikd_jax.train.checkpoint_integrity import (CheckpointIntegrityError, brief, checksums,
                                                 host_checksums, newest_readable, quarantine,
                                                 verify)
from tikd_jax.tree import fill_template, flatten

_DELETED = '_deleted'  # old steps are renamed here, then purged
UNREADABLE_DIR = 'unreadable_checkpoints'  # beside the checkpoints folder
_DAMAGED_ADVICE = ('If the storage is healthy, the checkpoints are damaged: delete that folder '
                   '(or move it away) to start fresh, or point --workdir at a new directory.')


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the previous one is intact."""


def _abstract(tree):

  def leaf(x):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, 'sharding', None))

  return jax.tree.map(leaf, tree)


# ------------------------------------------------------------------------------- save errors


def _is_disk_full(e: BaseException) -> bool:
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if 'No space left on device' in str(e) or 'Disk quota exceeded' in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def _save_error(step: int, directory: str, previous: int | None, e: BaseException):
  intact = (f'the previous checkpoint (step {previous}) is intact'
            if previous is not None else 'no earlier checkpoint exists')
  if _is_disk_full(e):
    return CheckpointSaveError(
        f'disk full while saving checkpoint step {step} in {directory}; {intact}; free space and '
        f'rerun to resume ({brief(e, 200)})')
  return CheckpointSaveError(
      f'saving checkpoint step {step} in {directory} failed ({brief(e)}); {intact}; fix the '
      f'cause and rerun to resume')


def _is_primary() -> bool:
  return jax.process_index() == 0


def _all_hosts(ok: bool) -> bool:
  """True when `ok` holds on every host (a collective: every host must call it)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray(int(ok), np.int32))))


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _step_dirs(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(
      int(d)
      for d in os.listdir(directory)
      if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def _reset_unreadable_metrics(directory: str):
  """Orbax reads every step's `metrics` file when it opens a directory and fails on a damaged
  one; such a file only ranks the step for 'best', so it is reset to {} (the data is kept)."""
  for step in _step_dirs(directory):
    path = os.path.join(directory, str(step), 'metrics', 'metrics')
    if not os.path.exists(path):
      continue
    try:
      with open(path) as f:
        json.load(f)
    except (OSError, ValueError) as e:
      logging.warning(
          'the metrics file of checkpoint step %d is unreadable (%s); reset, so the '
          'step no longer counts as the best', step, brief(e))
      with open(path, 'w') as f:
        f.write('{}')


class Checkpointer:
  """Keeps the newest `keep` checkpoints and, when a metric is given, the best one as well."""

  def __init__(self, directory: str, *, keep: int = 3, best_metric: str | None = None,
               best_mode: str = 'max', async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.set_aside: list[tuple[int, str]] = []  # (step, reason) moved to unreadable_checkpoints
    self._pending: tuple[int, int | None] | None = None  # async save in flight: (step, previous)
    self._purge_deleted()  # steps a killed run had started to drop
    if _is_primary():
      _reset_unreadable_metrics(self.directory)
    _sync('checkpointer: directory checked')
    self.best_metric = best_metric
    policies = [pp.LatestN(n=keep)]
    best_fn = None
    if best_metric:
      worst = -math.inf if best_mode == 'max' else math.inf

      def best_fn(metrics):  # checkpoints saved without the metric never rank first
        value = (metrics or {}).get(best_metric)
        return worst if value is None else float(value)

      policies.append(
          pp.BestN(get_metric_fn=best_fn, n=1, reverse=best_mode == 'min',
                   keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=pp.AnyPreservationPolicy(policies),
        best_fn=best_fn,  # with it orbax writes each step's metrics, so 'best' survives restarts
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=True,  # leftovers of a save killed midway
        todelete_subdir=_DELETED)  # drop old steps by an atomic rename first
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_handlers={
            'model': ocp.StandardCheckpointHandler(), 'extra': ocp.StandardCheckpointHandler(),
            'optimizer': ocp.StandardCheckpointHandler(),
            'data': grain.checkpoint.CheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()
        })

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  # ----------------------------------------------------------------------------- save
  def save(self, step: int, *, variables, extra, opt_state, data_iterator, meta: dict,
           metrics: dict | None = None, force: bool = False) -> bool:
    """`variables`: the model's {'params', 'batch_stats'}; `extra`: other trained state.

    Returns once the arrays are copied; the write finishes in the background. A failure of the
    previous background write is raised here (or by `wait`) as CheckpointSaveError.
    """
    self.wait()
    self._purge_deleted()
    previous = max((s for s in self.manager.all_steps() if s < step), default=None)
    items = {'model': flatten(variables), 'extra': _nonempty(extra), 'optimizer': opt_state}
    meta = dict(meta, checksums={name: checksums(tree) for name, tree in items.items()})
    args = ocp.args.Composite(data=grain.checkpoint.CheckpointSave(data_iterator),
                              meta=ocp.args.JsonSave(meta),
                              **{name: ocp.args.StandardSave(tree) for name, tree in items.items()})
    if self.best_metric and metrics is None:
      metrics = {}  # written as {}: ranks last for 'best' (None would log a warning per save)
    try:
      saved = self.manager.save(step, args=args, metrics=metrics, force=force)
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._discard_unfinished(step)
      raise _save_error(step, self.directory, previous, e) from e
    if saved:
      self._pending = (step, previous)
    return saved

  def wait(self):
    """Blocks until the last save is complete on disk; raises CheckpointSaveError if it failed."""
    pending, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      if pending is None:
        raise
      self._discard_unfinished(pending[0])
      raise _save_error(pending[0], self.directory, pending[1], e) from e

  def close(self, *, quiet: bool = False):
    """Waits for the last save and closes; `quiet` (while another error propagates) logs
    instead of raising, so the original error is the one reported."""
    try:
      self.wait()
      self._purge_deleted()
      self.manager.close()
    except Exception as e:  # pylint: disable=broad-exception-caught
      if not quiet:
        raise
      logging.error('while closing the checkpointer after an error: %s', brief(e, 1000))

  def _discard_unfinished(self, step: int):
    """Frees the space of a failed write (its temporary folder; never a finished step)."""
    if _is_primary():
      for path in glob.glob(os.path.join(self.directory, f'{step}.orbax-checkpoint-tmp*')):
        shutil.rmtree(path, ignore_errors=True)

  def _purge_deleted(self):
    """Removes the steps orbax renamed into `_deleted/` (only after their rename completed)."""
    if _is_primary():
      shutil.rmtree(os.path.join(self.directory, _DELETED), ignore_errors=True)

  # ----------------------------------------------------------------------------- restore
  def read_meta(self, step: int) -> dict:
    """The run metadata saved with `step` (step, epoch, model, phase, data position, …)."""
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    if meta.get('step', step) != step:
      raise CheckpointIntegrityError(f'checkpoint {self.directory}/{step}: its metadata says '
                                     f'step {meta.get("step")}')
    return meta

  def restore(self, step: int, *, variables_template, extra_template, opt_template, data_iterator):
    """Restores into the templates' structure and shardings → (variables, extra, opt, meta).

    Raises CheckpointMismatchError when the checkpoint does not fit the templates, and
    CheckpointIntegrityError when the restored arrays differ from their saved checksums.
    `data_iterator` None skips the saved iterator state (the caller positions the stream).
    """
    what = f'checkpoint {self.directory}/{step}'
    meta = self.read_meta(step)
    check_fits(self.manager.item_metadata(step)['model'], variables_template, what)
    items = dict(model=ocp.args.StandardRestore(_abstract(flatten(variables_template))),
                 extra=ocp.args.StandardRestore(_abstract(_nonempty(extra_template))),
                 optimizer=ocp.args.StandardRestore(_abstract(opt_template)))
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    expected = meta.pop('checksums', None) or {}
    for item in ('model', 'extra', 'optimizer'):
      verify(item, checksums(restored[item]), expected.get(item), what)
    variables = fill_template(variables_template, dict(restored['model']), 'checkpoint')
    extra = {k: v for k, v in restored['extra'].items() if k != _EMPTY}
    return variables, extra, restored['optimizer'], meta

  def restore_newest(self, restore_fn: Callable[[int], Any]) -> tuple[int | None, Any]:
    """(step, restore_fn(step)) for the newest step that restores; (None, None) when empty.

    A step that fails (any error but a CheckpointMismatchError, on any host) is reported and the
    previous step is tried; once one restores, the failed newer ones are set aside (so training
    can write those steps again). When none restores nothing is moved and
    UnreadableCheckpointError says what to do. `restore_fn` must start afresh on every call.
    """
    step, result, failures = newest_readable(reversed(self.all_steps()), restore_fn,
                                             directory=self.directory, advice=_DAMAGED_ADVICE,
                                             agree=_all_hosts)
    if failures:
      self._set_aside(failures)
    return step, result

  def _set_aside(self, failures: list[tuple[int, str]]):
    """Moves unreadable steps out of the way (kept for inspection, never deleted)."""
    if _is_primary():
      into = os.path.join(os.path.dirname(self.directory), UNREADABLE_DIR)
      for step, reason in failures:
        quarantine(self.directory, step, reason, into)
    self.set_aside.extend(failures)
    _sync('checkpointer: unreadable steps set aside')
    self.manager.reload()


_EMPTY = '_empty'


def _nonempty(tree: dict) -> dict:
  """Orbax refuses to save an empty tree; a placeholder leaf keeps the item's layout fixed."""
  return dict(tree, **{_EMPTY: np.zeros((), np.int8)})


def check_fits(saved_metadata, template, what: str):
  """Raises the key-by-key mismatch list before orbax would fail deep inside."""
  shapes = {
      k: np.empty(getattr(v, 'shape', ()), dtype=np.uint8) for k, v in dict(saved_metadata).items()
  }
  fill_template(template, shapes, what)


# ------------------------------------------------------------------------------- weights only


def _resolve_weights_dir(path: str) -> tuple[str, list[int], bool]:
  """A workdir, its `checkpoints/` folder or one step folder → (dir, steps newest first, whether
  one step was named)."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f'checkpoint path {path} does not exist')
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    path = os.path.join(path, 'checkpoints')
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(os.path.join(path, 'model')):
    return os.path.dirname(path), [int(base)], True
  steps = [s for s in _step_dirs(path) if os.path.isdir(os.path.join(path, str(s), 'model'))]
  if not steps:
    raise FileNotFoundError(f'{path} holds no checkpoint (no <step>/model folder); point '
                            f'the path at a workdir, its checkpoints/ folder or one step folder')
  return path, steps[::-1], False


# The model EMA's key in a checkpoint's `extra` item (TrainState.ema: {'params', 'batch_stats'}).
EMA_ITEM = 'ema'


def _load_step_weights(step_dir: str, with_ema: bool = False):
  """(meta, flat model variables, flat EMA or None) of one step folder, checksums verified; the
  EMA (in the `extra` item) is read only `with_ema` and when the metadata says the step has one."""
  # Handlers for every item a step may hold, so orbax skips the unrequested ones silently.
  handler = ocp.CompositeCheckpointHandler(model=ocp.StandardCheckpointHandler(),
                                           meta=ocp.JsonCheckpointHandler(),
                                           extra=ocp.StandardCheckpointHandler(),
                                           optimizer=ocp.StandardCheckpointHandler(),
                                           data=grain.checkpoint.CheckpointHandler(),
                                           metrics=ocp.JsonCheckpointHandler())
  checkpointer = ocp.Checkpointer(handler)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  saved = checkpointer.metadata(step_dir).item_metadata
  target = {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device)
      for k, v in dict(saved['model']).items()
  }
  restored = checkpointer.restore(
      step_dir, args=ocp.args.Composite(model=ocp.args.StandardRestore(target),
                                        meta=ocp.args.JsonRestore()))
  meta = dict(restored['meta'] or {})
  expected = meta.pop('checksums', None) or {}
  flat = {k: np.asarray(v) for k, v in dict(restored['model']).items()}
  verify('model', host_checksums(flat), expected.get('model'), f'checkpoint {step_dir}')
  ema = None
  if with_ema and meta.get('ema'):
    # The whole `extra` item (the loss terms' state beside the EMA: small), so that its
    # checksums can be verified as written.
    extra_target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                saved['extra'].tree)
    extra = flatten(
        checkpointer.restore(
            step_dir,
            args=ocp.args.Composite(extra=ocp.args.StandardRestore(extra_target)))['extra'])
    extra = {k: np.asarray(v) for k, v in extra.items()}
    verify('extra', host_checksums(extra), expected.get('extra'), f'checkpoint {step_dir}')
    ema = {k[len(EMA_ITEM) + 1:]: v for k, v in extra.items() if k.startswith(EMA_ITEM + '/')}
    if not ema:
      raise CheckpointIntegrityError(f'checkpoint {step_dir}: its metadata says it holds a model '
                                     f'EMA, its extra item has none')
  checkpointer.close()
  return meta, flat, ema


def load_weights(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(meta, flat variables as NumPy) of the newest readable checkpoint under `path`.

  `path`: a workdir, its checkpoints/ folder, or one step folder (then only that step). An
  unreadable step is reported and the previous one used; none readable → a clear error.
  """
  return load_weights_and_ema(path, with_ema=False)[:2]


def load_weights_and_ema(path: str, with_ema: bool = True):
  """(meta, flat variables, flat model EMA) of the newest readable checkpoint under `path`, as
  `load_weights`; the EMA has the variables' keys ('params/…', 'batch_stats/…'), None when the
  checkpoint holds none (trained with config.ema.decay = 0, or weights only). Both come from the
  same step."""
  directory, steps, named = _resolve_weights_dir(path)
  return newest_readable(
      steps, lambda step: _load_step_weights(os.path.join(directory, str(step)), with_ema),
      directory=directory, named=named,
      advice='Point the path at another checkpoint, or retrain it.')[1]


def save_weights(directory: str, variables: dict, meta: dict, step: int = 0) -> str:
  """A weights-only checkpoint (`model` + `meta`) that `config.teacher.checkpoint` accepts."""
  directory = os.path.abspath(directory)
  flat = flatten(jax.tree.map(np.asarray, variables))
  mngr = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=True),
      item_handlers={'model': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()})
  mngr.save(
      step, args=ocp.args.Composite(
          model=ocp.args.StandardSave(flat),
          meta=ocp.args.JsonSave(dict(meta, checksums={'model': host_checksums(flat)}))),
      force=True)
  mngr.wait_until_finished()
  mngr.close()
  return os.path.join(directory, str(step))
