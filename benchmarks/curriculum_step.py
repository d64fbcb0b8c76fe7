r"""Step time per IRKD curriculum resolution: what the 12 → 32 px curriculum saves.

  python benchmarks/curriculum_step.py [--batch 128] [--runs 3] [--saliency attention] \
      [--xla_options auto] [--out benchmarks/results/curriculum_step.jsonl]

The real distillation step of the trainer (KD, teacher forward + student forward/backward + AdamW
update, optionally attention saliency) for IRKD's ViT-Tiny student (patch 4) and its 384-wide
12-layer teacher, at each curriculum resolution. One JSON line per resolution: median / p10 / p90
seconds over `--runs` timed steps after a compile step, images/s, and the time relative to 32 px.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import report  # noqa: E402
from configs import irkd_cifar10  # noqa: E402
from tikd_jax import xla_options  # noqa: E402
from tikd_jax.data import ArraySource  # noqa: E402
from tikd_jax.models import cpu_fast_layers  # noqa: E402
from tikd_jax.models.variables import abstract_model  # noqa: E402
from tikd_jax.train import run as run_lib  # noqa: E402


def random_variables(template, seed):
  """Random weights of the template's shapes (no eager model build: that compiles op by op)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape).astype(np.float32)),
                      template)


def build_run(saliency: str, batch: int, xla_preset: str, fast_layers: str) -> run_lib.Run:
  """The trainer's run of configs/irkd_cifar10.py (kd_cl, or kd_cl_sal with attention
  saliency) on synthetic 32-px data with a random teacher."""
  config = irkd_cifar10.get_config('kd_cl_sal,p4' if saliency == 'attention' else 'kd_cl,p4')
  with config.unlocked():
    config.batch_size = batch
    config.xla_options = xla_preset
    config.cpu_fast_layers = fast_layers
  train = ArraySource(np.zeros((45_000, 32, 32, 3), np.uint8), np.zeros(45_000, np.int32),
                      [str(i) for i in range(10)], 'synthetic', 'train')
  teacher_graph, teacher_tpl = abstract_model('vit', variant='irkd_teacher', patch_size=4,
                                              num_classes=10,
                                              fast_layers=cpu_fast_layers.enabled(fast_layers))
  teacher = run_lib.Teacher(teacher_graph, random_variables(teacher_tpl, 1))
  return run_lib.setup(config, '', sources=(train, train), teacher=teacher)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--resolutions', default='12,16,20,24,28,32')
  parser.add_argument('--saliency', default='none', choices=['none', 'attention'])
  parser.add_argument('--xla_options', default='auto',
                      help=f'auto or one of {sorted(xla_options.PRESETS)} (as config.xla_options)')
  parser.add_argument('--cpu_fast_layers', default='auto', choices=cpu_fast_layers.SETTINGS,
                      help='as config.cpu_fast_layers')
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)

  run = build_run(args.saliency, args.batch, args.xla_options, args.cpu_fast_layers)
  phase = run.phases[0]
  teacher_vars = run.teacher.variables
  rows = []
  with report.JsonLines(args.out) as emit:  # one row per resolution, as measured
    for res in [int(r) for r in args.resolutions.split(',')]:
      state = run_lib.create_train_state(run)  # the step donates its state
      step = run_lib.train_step_for(run, dataclasses.replace(phase, resolution=res))
      rng = np.random.default_rng(res)
      batch = {
          'image': jnp.asarray(rng.integers(0, 256, (args.batch, res, res, 3), np.uint8)),
          'label': jnp.asarray(rng.integers(0, 10, (args.batch,), np.int32))
      }
      t0 = time.perf_counter()
      state, metrics = step(state, batch, teacher_vars)
      jax.block_until_ready(metrics)
      compile_s = time.perf_counter() - t0
      times = []
      for _ in range(args.runs):
        t0 = time.perf_counter()
        state, metrics = step(state, batch, teacher_vars)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
      rows.append(
          dict(benchmark='curriculum_step', student='irkd_vit/vit_tiny/p4',
               teacher='vit/irkd_teacher/p4', resolution=res, tokens=(res // 4)**2,
               batch=args.batch, saliency=args.saliency, xla_options=args.xla_options,
               runs=args.runs, median_s=float(np.median(times)), p10_s=float(
                   np.percentile(times,
                                 10)), p90_s=float(np.percentile(times,
                                                                 90)), first_step_s=compile_s,
               images_per_s=args.batch / float(np.median(times)), load_avg=os.getloadavg()[0],
               jax=jax.__version__, machine=platform.machine(), cpus=os.cpu_count()))
      emit(rows[-1])
  full = next((r['median_s'] for r in rows if r['resolution'] == 32), None)
  if full:
    curriculum = sum(r['median_s'] for r in rows) / len(rows)
    print(
        json.dumps(
            dict(benchmark='curriculum_summary', mean_step_s_over_stages=curriculum,
                 step_s_at_32=full, speedup_vs_all_32=full / curriculum)), flush=True)


if __name__ == '__main__':
  main()
