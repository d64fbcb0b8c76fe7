"""Variable trees as flat '/'-path dicts, and the key-by-key report when one does not fit a model.

Checkpoints, sharding rules, weight-decay masks and the PyTorch conversion all name an array by
its flat path ('params/blocks/0/attn/qkv/kernel'), so a mismatch can be listed key by key, as
timm's `load_state_dict(strict=True)` does. Pure tree logic: no checkpoint library is imported
here, so `tikd_jax.models` and `tikd_jax.sharding` stay free of orbax and grain.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

SEP = '/'


class CheckpointMismatchError(ValueError):
  """The checkpoint is readable but does not fit the model (a config change, not a fault)."""


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
  check_keys(dict(zip(names, (t for _, t in paths))), flat, what)
  return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])


def check_keys(expected: dict, got: dict, what: str) -> None:
  """Raises CheckpointMismatchError listing every missing, unexpected and mis-shaped key."""
  missing = [n for n in expected if n not in got]
  unexpected = sorted(set(got) - set(expected))
  misshaped = [
      f'{n}: checkpoint {_shape(got[n])} vs model {_shape(t)}' for n, t in expected.items()
      if n in got and _shape(got[n]) != _shape(t)
  ]
  if missing or unexpected or misshaped:
    lines = [f'{what} does not fit the model:']
    for title, items in (('missing keys', missing), ('unexpected keys', unexpected),
                         ('mis-shaped keys', misshaped)):
      if items:
        lines.append(f'  {title} ({len(items)}): ' + ', '.join(items[:20]) +
                     (' …' if len(items) > 20 else ''))
    raise CheckpointMismatchError('\n'.join(lines))
