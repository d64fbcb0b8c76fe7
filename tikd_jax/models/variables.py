"""A model's variables as plain nested dicts, and loading them back (checkpoints, conversion)."""
from __future__ import annotations

from flax import nnx

from tikd_jax.tree import fill_template


def model_variables(model: nnx.Module) -> dict:
  """{'params': …, 'batch_stats': …} as nested dicts of arrays (nnx.List indices as int keys)."""
  return {
      'params': nnx.to_pure_dict(nnx.state(model, nnx.Param)),
      'batch_stats': nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  }


def load_variables(model: nnx.Module, flat: dict, what: str = 'checkpoint') -> None:
  """Loads flat '/'-path arrays (see tikd_jax.tree.flatten) into `model`, strictly.

  Every key must be present with the right shape; otherwise a ValueError lists the missing,
  unexpected and mis-shaped keys.
  """
  filled = fill_template(model_variables(model), flat, what)
  for kind, collection in ((nnx.Param, 'params'), (nnx.BatchStat, 'batch_stats')):
    state = nnx.state(model, kind)
    nnx.replace_by_pure_dict(state, filled[collection])
    nnx.update(model, state)


def abstract_model(name: str, **kwargs):
  """(graphdef, variables template of ShapeDtypeStructs) without running any initializer."""
  from tikd_jax.models import build_model  # pylint: disable=g-import-not-at-top
  abstract = nnx.eval_shape(lambda: build_model(name, rngs=nnx.Rngs(0), **kwargs))
  graphdef, params, stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  return graphdef, {'params': nnx.to_pure_dict(params), 'batch_stats': nnx.to_pure_dict(stats)}


def load_model(name: str, kwargs: dict, flat: dict, what: str = 'checkpoint'):
  """(graphdef, variables as NumPy) of model `name` from flat checkpoint arrays, strictly."""
  graphdef, template = abstract_model(name, **kwargs)
  return graphdef, fill_template(template, flat, what)
