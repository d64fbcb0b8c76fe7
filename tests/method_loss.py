"""`method_loss`: the `Loss` of a config's `distill` block, for tests that run a step by hand."""
from tikd_jax.losses.registry import Loss
from tikd_jax.train.loss_config import method_terms


def method_loss(distill, extra: tuple[tuple[str, float], ...] = ()) -> Loss:
  """The `Loss` of `distill.method` (plus `extra` terms), settings from the `distill` block."""
  settings = _distill_settings(distill)
  return Loss(method_terms(distill) + tuple(extra), settings)


def _distill_settings(distill) -> dict:
  """The registered terms' settings of a config holding only this `distill` block."""
  from tikd_jax.train.loss_config import term_settings  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  config = common.base()
  config.distill = distill
  return term_settings(config)
