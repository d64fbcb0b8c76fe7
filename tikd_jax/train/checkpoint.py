"""Orbax checkpoints: model, optimizer, data-iterator position and run metadata, saved together.

Layout: `<workdir>/checkpoints/<step>/{model,optimizer,data,meta}`. `model` holds
`{'params': …, 'batch_stats': …}` keyed by flat string paths ('blocks/0/attn/qkv/kernel'), so a
checkpoint is readable without the Python model and mismatches can be listed key by key. A
weights-only checkpoint (teachers converted from PyTorch) has just `model` and `meta`.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

SEP = '/'


def _key_str(k) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flatten(tree) -> dict[str, Any]:
  """{'a': {'b': x}} → {'a/b': x}; integer keys (nnx.List) become their decimal strings."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {SEP.join(_key_str(k) for k in path): leaf for path, leaf in leaves}


def _shape(x) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, 'shape') else tuple(np.shape(x))


def fill_template(template, flat: dict[str, Any], what: str):
  """Puts the arrays of `flat` into the structure of `template`; lists every mismatch at once."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  names = [SEP.join(_key_str(k) for k in p) for p, _ in paths]
  missing = [n for n in names if n not in flat]
  unexpected = sorted(set(flat) - set(names))
  misshaped = [f'{n}: checkpoint {_shape(flat[n])} vs model {_shape(t)}'
               for n, (_, t) in zip(names, paths)
               if n in flat and _shape(flat[n]) != _shape(t)]
  if missing or unexpected or misshaped:
    lines = [f'{what} does not fit the model:']
    for title, items in (('missing keys', missing), ('unexpected keys', unexpected),
                         ('mis-shaped keys', misshaped)):
      if items:
        lines.append(f'  {title} ({len(items)}): ' + ', '.join(items[:20]) +
                     (' …' if len(items) > 20 else ''))
    raise ValueError('\n'.join(lines))
  return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])


def _abstract(tree):
  def leaf(x):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, 'sharding', None))
  return jax.tree.map(leaf, tree)


class Checkpointer:
  """Keeps the newest `keep` checkpoints and, when a metric is given, the best one as well."""

  def __init__(self, directory: str, *, keep: int = 3, best_metric: str | None = None,
               best_mode: str = 'max', async_save: bool = True):
    self.directory = os.path.abspath(directory)
    policies = [pp.LatestN(n=keep)]
    if best_metric:
      policies.append(pp.BestN(get_metric_fn=lambda m: m[best_metric], n=1,
                               reverse=best_mode == 'min',
                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=pp.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'model': ocp.StandardCheckpointHandler(),
                       'extra': ocp.StandardCheckpointHandler(),
                       'optimizer': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, *, variables, extra, opt_state, data_iterator, meta: dict,
           metrics: dict | None = None, force: bool = False) -> bool:
    """`variables`: the model's {'params', 'batch_stats'}; `extra`: other trained state."""
    args = ocp.args.Composite(
        model=ocp.args.StandardSave(flatten(variables)),
        extra=ocp.args.StandardSave(_nonempty(extra)),
        optimizer=ocp.args.StandardSave(opt_state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(meta))
    return self.manager.save(step, args=args, metrics=metrics, force=force)

  def restore(self, step: int, *, variables_template, extra_template, opt_template,
              data_iterator):
    """Restores into the templates' structure and shardings → (variables, extra, opt, meta)."""
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
        'meta']
    check_fits(self.manager.item_metadata(step)['model'], variables_template,
               f'checkpoint {self.directory}/{step}')
    restored = self.manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(_abstract(flatten(variables_template))),
        extra=ocp.args.StandardRestore(_abstract(_nonempty(extra_template))),
        optimizer=ocp.args.StandardRestore(_abstract(opt_template)),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    variables = fill_template(variables_template, dict(restored['model']), 'checkpoint')
    extra = {k: v for k, v in restored['extra'].items() if k != _EMPTY}
    return variables, extra, restored['optimizer'], meta

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


_EMPTY = '_empty'


def _nonempty(tree: dict) -> dict:
  """Orbax refuses to save an empty tree; a placeholder leaf keeps the item's layout fixed."""
  return dict(tree, **{_EMPTY: np.zeros((), np.int8)})


def check_fits(saved_metadata, template, what: str):
  """Raises the key-by-key mismatch list before orbax would fail deep inside."""
  shapes = {k: np.empty(getattr(v, 'shape', ()), dtype=np.uint8)
            for k, v in dict(saved_metadata).items()}
  fill_template(template, shapes, what)


def _resolve_weights_dir(path: str) -> tuple[str, int]:
  """Accepts a workdir, its `checkpoints/` folder, or one step folder; returns (dir, step)."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f'checkpoint path {path} does not exist')
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    path = os.path.join(path, 'checkpoints')
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(os.path.join(path, 'model')):
    return os.path.dirname(path), int(base)
  steps = sorted(int(d) for d in os.listdir(path)
                 if d.isdigit() and os.path.isdir(os.path.join(path, d, 'model')))
  if not steps:
    raise FileNotFoundError(f'{path} holds no checkpoint (no <step>/model folder); point '
                            f'the path at a workdir, its checkpoints/ folder or one step folder')
  return path, steps[-1]


def load_weights(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(meta, flat variables as NumPy) of the newest checkpoint under `path` (any layout above)."""
  directory, step = _resolve_weights_dir(path)
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                               item_handlers={'model': ocp.StandardCheckpointHandler(),
                                              'meta': ocp.JsonCheckpointHandler()})
  md = mngr.item_metadata(step)['model']
  target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                    sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
            for k, v in dict(md).items()}
  restored = mngr.restore(step, args=ocp.args.Composite(
      model=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  mngr.close()
  flat = {k: np.asarray(v) for k, v in dict(restored['model']).items()}
  return dict(restored['meta'] or {}), flat


def save_weights(directory: str, variables: dict, meta: dict, step: int = 0) -> str:
  """A weights-only checkpoint (`model` + `meta`) that `config.teacher.checkpoint` accepts."""
  directory = os.path.abspath(directory)
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True),
                               item_handlers={'model': ocp.StandardCheckpointHandler(),
                                              'meta': ocp.JsonCheckpointHandler()})
  mngr.save(step, args=ocp.args.Composite(
      model=ocp.args.StandardSave(flatten(jax.tree.map(np.asarray, variables))),
      meta=ocp.args.JsonSave(meta)), force=True)
  mngr.wait_until_finished()
  mngr.close()
  return os.path.join(directory, str(step))
