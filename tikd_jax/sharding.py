"""Everything about device layout, in one place: the mesh, the batch layout, parameter rules.

The mesh comes from `config.mesh`, a list of (axis name, size) with one size -1 that fills the
remaining devices, e.g. [('data', -1), ('fsdp', 1)]. Batches are split over every mesh axis.
Parameters follow `config.sharding_rules`, a list of (regex on the flat parameter path, rule):
  'replicate'  – a full copy on every device (the default);
  'fsdp'       – split the largest dimension divisible by the 'fsdp' axis size over it.
The first matching rule wins. Optimizer state follows its parameter.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from tikd_jax.tree import flatten


def make_mesh(axes: Sequence[tuple[str, int]], devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  names = [str(a) for a, _ in axes]
  sizes = [int(s) for _, s in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh {axes}: at most one axis may be -1')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'config.mesh {axes}: {len(devices)} devices do not divide by {known}')
    sizes[sizes.index(-1)] = len(devices) // known
  needed = int(np.prod(sizes))
  if needed > len(devices):
    raise ValueError(f'config.mesh {axes} needs {needed} devices, {len(devices)} are available')
  # An explicit mesh smaller than the machine uses the first devices (e.g. 1-device references).
  devices = devices[:needed]
  return jax.make_mesh(tuple(sizes), tuple(names), axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over all mesh axes; the rest unsplit."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
  if fsdp <= 1 or not shape:
    return P()
  candidates = [i for i, d in enumerate(shape) if d % fsdp == 0 and d >= fsdp]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: shape[i])
  spec = [None] * len(shape)
  spec[axis] = 'fsdp'
  return P(*spec)


def param_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, str]] = ()) -> Any:
  """NamedShardings for every leaf of `tree` (params or optimizer state) by the path rules."""
  fsdp = dict(zip(mesh.axis_names, mesh.devices.shape)).get('fsdp', 1)
  compiled = [(re.compile(pattern), rule) for pattern, rule in rules]
  for _, rule in compiled:
    if rule not in ('replicate', 'fsdp'):
      raise ValueError(f"sharding rule must be 'replicate' or 'fsdp', got {rule!r}")
  paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names = list(flatten(tree).keys())
  out = []
  for name, (_, leaf) in zip(names, paths):
    rule = next((r for pat, r in compiled if pat.search(name)), 'replicate')
    spec = _fsdp_spec(tuple(np.shape(leaf)), fsdp) if rule == 'fsdp' else P()
    out.append(NamedSharding(mesh, spec))
  return jax.tree_util.tree_unflatten(treedef, out)


def place(tree, shardings):
  """Host NumPy → global arrays with the given shardings (works on every host of a pod)."""

  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

  return jax.tree.map(put, tree, shardings)
