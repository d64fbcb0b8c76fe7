"""Reading a training workdir: its config, its newest checkpoint, its metrics and its eval data."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import numpy as np

TRAIN_FIRST = ('train first: python main.py --config=configs/<config>.py --workdir={workdir} '
               '(multi-run configs such as the demo write each run to <workdir>/<run name>)')


class WorkdirError(Exception):
  """The workdir lacks something a visualisation needs; the message says what and what to do."""


def check_workdir(workdir: str) -> str:
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(workdir):
    raise WorkdirError(f'workdir {workdir} does not exist; {TRAIN_FIRST.format(workdir=workdir)}')
  return workdir


def read_config(workdir: str):
  """The run's resolved config (`<workdir>/config.json`, written when training starts)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise WorkdirError(f'{path} not found: the trainer writes it when a run starts, and the '
                       f'data set to draw images from is read from it; point --workdir at a '
                       f'run directory')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


@dataclasses.dataclass
class Checkpoint:
  name: str  # model name in tikd_jax.models.MODELS
  kwargs: dict  # its build_model keyword arguments
  graphdef: Any
  variables: dict  # {'params', 'batch_stats'} as NumPy
  meta: dict

  @property
  def step(self):
    return self.meta.get('step')

  def build(self):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    return nnx.merge(self.graphdef, self.variables['params'], self.variables['batch_stats'])


def load_checkpoint(workdir: str) -> Checkpoint:
  """The newest checkpoint under `workdir` (its checkpoints/ folder), with its model spec."""
  from tikd_jax.models.variables import load_model  # pylint: disable=g-import-not-at-top
  from tikd_jax.train.checkpoint import load_weights  # pylint: disable=g-import-not-at-top
  try:
    meta, flat = load_weights(workdir)
  except FileNotFoundError as e:
    raise WorkdirError(f'no checkpoint in {workdir} ({e}); '
                       f'{TRAIN_FIRST.format(workdir=workdir)}') from None
  if 'model' not in meta:
    raise WorkdirError(f'the checkpoint in {workdir} names no model in its metadata (meta: '
                       f'{sorted(meta)}); was it written by the tikd-jax trainer?')
  name, kwargs = meta['model']['name'], dict(meta['model']['kwargs'])
  graphdef, variables = load_model(name, kwargs, flat, what=f'checkpoint in {workdir}')
  return Checkpoint(name, kwargs, graphdef, variables, meta)


def uses_text_fusion(checkpoint: Checkpoint, config) -> bool:
  """Whether eval runs the TIKD text-fused pass (as the trainer's `evaluate_checkpoint`)."""
  return bool(checkpoint.kwargs.get('text_dim')) and config.tikd.eval_text == 'predicted'


def class_names(source, num_classes: int) -> list[str]:
  names = list(getattr(source, 'class_names', None) or [])
  return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


def sample_indices(num_examples: int, count: int, seed: int) -> np.ndarray:
  """`count` distinct example indices (all when the split is smaller), fixed by `seed`, sorted."""
  if num_examples == 0:
    raise WorkdirError('the split holds no examples')
  count = min(int(count), num_examples)
  return np.sort(np.random.RandomState(seed).choice(num_examples, count, replace=False))


def gather(source, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images [N, H, W, 3], int labels [N]) of `indices` of a data source."""
  rows = [source[int(i)] for i in indices]
  return (np.stack([np.asarray(r['image'], np.uint8) for r in rows]),
          np.asarray([int(r['label']) for r in rows], np.int64))


# ------------------------------------------------------------------------------------ metrics
@dataclasses.dataclass
class Metrics:
  train: list[dict]  # sorted by step; the last row logged for each step
  eval: list[dict]
  resumes: list[int]  # steps at which the train log went back (a resumed run)
  skipped_lines: int  # unreadable lines (e.g. the half-written last line of a killed run)


def read_metrics(workdir: str) -> Metrics:
  """`<workdir>/metrics.jsonl`, de-duplicated: the last row per (kind, step) wins.

  A resumed run re-logs the steps after its last checkpoint, so earlier rows for those steps
  describe training that was thrown away.
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise WorkdirError(f'{path} not found: the run has logged no metrics yet; '
                       f'{TRAIN_FIRST.format(workdir=workdir)}')
  rows: dict[str, dict[int, dict]] = {}
  resumes, skipped, last_train_step = [], 0, None
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        step, kind = int(row['step']), str(row.get('kind', 'train'))
      except (ValueError, KeyError, TypeError):
        skipped += 1
        continue
      if kind == 'train':
        if last_train_step is not None and step <= last_train_step:
          resumes.append(step)
        last_train_step = step
      rows.setdefault(kind, {})[step] = row
  if skipped:
    print(f'{path}: skipped {skipped} unreadable line(s)', file=sys.stderr)
  ordered = {k: [v[s] for s in sorted(v)] for k, v in rows.items()}
  return Metrics(ordered.get('train', []), ordered.get('eval', []), resumes, skipped)
