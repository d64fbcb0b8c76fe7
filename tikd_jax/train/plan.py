"""The run as a sequence of phases: TIKD's training stages and IRKD's resolution curriculum.

A phase is a contiguous range of steps with fixed switches (text fusion, its loss terms,
frozen parameters, input resolution). Each distinct set of switches gets its own compiled step,
compiled once. Phases come from `config.stages` (a list of stages with `epochs` and switches) or from
`config.curriculum.stages` ([(resolution, epochs), …]); without either, one phase covers
`config.num_epochs`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from tikd_jax.data.pipeline import CROP_MODES
from tikd_jax.train.loss_config import stage_terms


@dataclasses.dataclass(frozen=True)
class Phase:
  name: str
  start_step: int
  end_step: int  # exclusive
  fuse_text: bool = False
  # The phase's loss: Σ weight · term over these (term, weight) pairs (train/loss_config.py);
  # `Run.losses[phase.terms]` is its `Loss`.
  terms: tuple[tuple[str, float], ...] = (('ce', 1.0),)
  frozen: tuple[str, ...] = ()
  resolution: int | None = None  # None: full size
  reset_optimizer: bool = False  # re-create the optimizer state when the phase starts

  @property
  def switches(self) -> tuple:
    """What the compiled step depends on (phases with equal switches share one compile)."""
    return (self.fuse_text, self.terms, self.frozen, self.resolution)


_STAGE_KEYS = {
    'name', 'epochs', 'fuse_text', 'alignment_beta', 'text_predictor_weight', 'frozen',
    'resolution', 'reset_optimizer', 'loss'
}


def build_phases(config, steps_per_epoch: int) -> list[Phase]:
  stages = list(config.stages)
  curriculum = config.curriculum
  curriculum_stages = list(curriculum.stages)
  tikd = config.tikd
  defaults = dict(fuse_text=bool(tikd.fuse_text), alignment_beta=float(tikd.alignment_beta),
                  text_predictor_weight=float(tikd.text_predictor_weight))
  if stages and curriculum_stages:
    raise ValueError('config.stages and config.curriculum.stages cannot both be set; give each '
                     'stage a `resolution` instead')
  mode = curriculum.mode
  if mode not in CROP_MODES:  # checked here too, so that a bad mode fails before any compile
    raise ValueError(f"config.curriculum.mode={mode!r}: use 'crop' (a res×res window of the "
                     f"padded image, as IRKD) or 'resize' (the whole image downscaled to res)")
  if curriculum_stages:
    reset = bool(curriculum.reset_optimizer)
    stages = [
        dict(name=f'res{int(r)}', epochs=e, resolution=int(r), reset_optimizer=reset)
        for r, e in curriculum_stages
    ]
  if not stages:
    stages = [dict(name='main', epochs=config.num_epochs)]
  phases, start = [], 0
  for i, stage in enumerate(stages):
    stage = dict(stage)
    unknown = set(stage) - _STAGE_KEYS
    if unknown:
      raise ValueError(f'stage {i}: unknown keys {sorted(unknown)}; allowed: {sorted(_STAGE_KEYS)}')
    steps = int(round(float(stage['epochs']) * steps_per_epoch))
    if steps <= 0:
      raise ValueError(f'stage {i} ({stage.get("name")}) has {stage["epochs"]} epochs = {steps} '
                       f'steps; give it at least one step')
    kw = dict(defaults)
    kw.update({
        k: stage[k] for k in ('fuse_text', 'alignment_beta', 'text_predictor_weight') if k in stage
    })
    phases.append(
        Phase(name=str(stage.get('name', f'stage{i}')), start_step=start, end_step=start + steps,
              fuse_text=bool(kw['fuse_text']), terms=stage_terms(config, stage, **kw),
              frozen=tuple(stage.get('frozen', ())), resolution=stage.get('resolution'),
              reset_optimizer=bool(stage.get('reset_optimizer', False)) and i > 0))
    start += steps
  return phases


def phase_at(phases: Sequence[Phase], step: int) -> int:
  """Index of the phase that contains `step` (the last phase for step == total)."""
  for i, p in enumerate(phases):
    if p.start_step <= step < p.end_step:
      return i
  return len(phases) - 1
