"""Per-stage validation with early stopping (`config.curriculum.val_transform`, decided once as
`RunSpec.stage_val`; IRKD's notebooks).

IRKD's curriculum notebooks validate after every epoch of a stage on the 5k hold-out, shown at
the stage's resolution: `CenterCrop(res)` of the 32-px image in the P2 notebooks, `Resize(res)`
in P4_ALL. A stage keeps its best validation top-1; after `patience` epochs in a row without a
strictly better one it stops early. Before the next stage (and the final test, always at full
size) the stage's best weights are restored. The notebooks differ here, and we take one rule for
all stages: P4_ALL's `cl` row restores the best weights only when a stage stops early, its KD
rows stop without restoring; ours restores them at the end of every validated stage.

The record of the current stage lives in the train state (`TrainState.stage_val`, so that it is
checkpointed and a run resumed mid-stage continues it exactly; the step passes it through):
  best        the student's {'params', 'batch_stats'} at the best epoch so far
  best_top1   its validation top-1 (−1 before the first validation of the stage)
  bad_epochs  epochs since the best one
  epochs      epochs validated in this stage
Stopping early moves the step counter to the end of the stage (the next stage's steps, data
and learning-rate schedule are where the plan put them).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tikd_jax.data.host_augment import center_crop, resize_image

VAL_TRANSFORMS = {'center_crop': center_crop, 'resize': resize_image}


def fresh(variables: dict) -> dict:
  """A stage's record before its first validation; `best` a copy of the current weights."""
  return {
      'best': jax.tree.map(jnp.copy, variables), 'best_top1': jnp.asarray(-1.0, jnp.float32),
      'bad_epochs': jnp.asarray(0, jnp.int32), 'epochs': jnp.asarray(0, jnp.int32)
  }


def update(record: dict, variables: dict, top1: float, patience: int) -> tuple[dict, bool]:
  """The record after one epoch's validation top-1 of `variables`, and whether the stage stops
  (`patience` epochs in a row without a strictly better top-1)."""
  epochs = int(record['epochs']) + 1
  if top1 > float(record['best_top1']):
    record = dict(fresh(variables), best_top1=jnp.asarray(top1, jnp.float32))
    return dict(record, epochs=jnp.asarray(epochs, jnp.int32)), False
  bad = int(record['bad_epochs']) + 1
  record = dict(record, bad_epochs=jnp.asarray(bad, jnp.int32),
                epochs=jnp.asarray(epochs, jnp.int32))
  return record, bad >= patience


class ValSource:
  """`source` with every image shown at `resolution` by `transform` (a VAL_TRANSFORMS name);
  None resolution: as it is."""

  def __init__(self, source, resolution: int | None, transform: str):
    self.source = source
    self.resolution = resolution
    self.transform = VAL_TRANSFORMS[transform]
    self.num_classes = source.num_classes

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    element = self.source[index]
    if self.resolution is None:
      return element
    return {**element, 'image': np.asarray(self.transform(element['image'], self.resolution))}
