"""The library files one training batch passes through: at most 12, the project's bound.

One real step of a tiny run through the trainer's own path (setup → create_train_state → the
loop's stream and step), with DeiT's recipe (RandAugment on the host, random erasing and
Mixup/CutMix in the step), hard distillation and a ResNet teacher. `sys.setprofile` records every
tikd_jax/*.py file whose functions run between "the loop asks for the next batch" and "the step
returns the new state", the first call's tracing included; what runs once per run or per
phase (setup, opening the phase's stream, building its step) does not count. The loop's own file
counts: it asks for the batch (`loop.next_batch`) and hands it to the step. The input runs
in-process (`data.num_workers=0`, the default): with grain worker processes the same per-example
files (source, host augmentation, pipeline) run there instead, so the list is the same. A "hop"
is a named library function that runs (lambdas and comprehensions are not counted).

  python -m pytest -q -s tests/test_batch_path.py    # prints the CPU and the GPU list
"""
import os
import sys
import threading

import jax
import pytest
from flax import nnx

from configs import common, tiny
from tikd_jax.data import build_source
from tikd_jax.models import build_model
from tikd_jax.models.variables import model_variables
from tikd_jax.train import checkpoint, loop
from tikd_jax.train import run as run_lib

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tikd_jax')
MAX_FILES = 12
# The input (source, host and batch augmentation, pipeline) and the trainer (loop, step).
DATA_AND_TRAIN = 6


def _config(fast_layers: str, teacher_checkpoint: str):
  """configs/tiny.py:hard (a micro DeiT student, a resnet8 teacher) with DeiT's augmentation,
  everything else as configured (the XLA preset included)."""
  c = tiny.get_config('hard')
  with c.unlocked():
    common.deit_augment(c)
    c.cpu_fast_layers = fast_layers
    c.data.num_workers = 0
    c.teacher.checkpoint = teacher_checkpoint
  return c


def batch_path(fast_layers: str, workdir: str) -> dict[str, list[str]]:
  """{tikd_jax file (relative path): its functions that ran} for one training batch."""
  teacher = build_model('resnet8', rngs=nnx.Rngs(1), num_classes=10, mean=tiny.common.DIGITS_MEAN,
                        std=tiny.common.DIGITS_STD)
  path = checkpoint.save_weights(workdir, model_variables(teacher),
                                 meta={'model': {'name': 'resnet8', 'kwargs': {}}})
  config = _config(fast_layers, path)
  train = build_source(config.data, 'train')
  run = run_lib.setup(config, '', sources=(train, train))  # loads the teacher as a run does
  state = run_lib.create_train_state(run)
  phase = run.phases[0]
  seen, recording = {}, [False]

  def profile(frame, event, arg):
    del arg
    if recording[0] and event == 'call':
      code = frame.f_code
      if code.co_filename.startswith(PACKAGE) and code.co_filename.endswith('.py'):
        where = os.path.relpath(code.co_filename, os.path.dirname(PACKAGE))
        seen.setdefault(where, set()).add(f'{code.co_qualname}:{code.co_firstlineno}')

  threading.setprofile(profile)  # grain's reader threads start with the stream
  sys.setprofile(profile)
  try:
    stream = loop.train_stream(run, phase, 0)  # as the loop opens a phase's stream
    step = loop.Steps(run).train(phase)  # as the loop takes the phase's step
    recording[0] = True
    batch = loop.next_batch(run, stream)
    state, metrics = step(state, batch, run.teacher.variables)
    recording[0] = False
  finally:
    sys.setprofile(None)
    threading.setprofile(None)
  stream.close()
  jax.block_until_ready(metrics)
  return {f: sorted(functions) for f, functions in sorted(seen.items())}


@pytest.mark.parametrize('fast_layers', ['auto', 'off'], ids=['cpu', 'gpu'])
def test_one_batch_crosses_few_library_files(fast_layers, tmp_path):
  """'auto' on this CPU is the CPU path (fast layers and kernels); 'off' builds the plain Flax
  layers a GPU or TPU runs, which is what the GPU list shows."""
  path = batch_path(fast_layers, str(tmp_path))
  files = list(path)
  # Named functions only: a lambda or a comprehension is no hop.
  named = {
      f: [n for n in functions if not n.split(':')[0].split('.')[-1].startswith('<')]
      for f, functions in path.items()
  }
  hops = sum(len(functions) for functions in named.values())
  print(f'\n{len(files)} library files, {hops} functions on one training batch '
        f'({"CPU" if fast_layers == "auto" else "GPU"} path):\n' +
        '\n'.join(f'  {f}  ({len(functions)})' for f, functions in named.items()))
  ours = [f for f in files if f.startswith(('tikd_jax/data/', 'tikd_jax/train/'))]
  assert len(ours) <= DATA_AND_TRAIN, ours
  assert len(files) <= MAX_FILES, files
