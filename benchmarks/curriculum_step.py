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
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import report  # noqa: E402
from configs import common  # noqa: E402
from tikd_jax import xla_options  # noqa: E402
from tikd_jax.models import cpu_fast_layers  # noqa: E402
from tikd_jax.models.variables import abstract_model  # noqa: E402
from tikd_jax.train.loss_config import method_loss  # noqa: E402
from tikd_jax.train.step import StepOptions, TrainState, make_train_step  # noqa: E402


def random_variables(template, seed):
  """Random weights of the template's shapes (no eager model build: that compiles op by op)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape).astype(np.float32)),
                      template)


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

  fast = dict(fast_layers=cpu_fast_layers.enabled(args.cpu_fast_layers))
  student_graph, student_tpl = abstract_model('irkd_vit', variant='vit_tiny', patch_size=4,
                                              num_classes=10, drop_path=0.0, **fast)
  teacher_graph, teacher_tpl = abstract_model('vit', variant='irkd_teacher', patch_size=4,
                                              num_classes=10, **fast)
  student_vars = random_variables(student_tpl, 0)
  teacher_vars = random_variables(teacher_tpl, 1)
  saliency = ((f'{args.saliency}_saliency', 0.8),) if args.saliency != 'none' else ()
  distill = common.base().distill
  distill.update(dict(method='kd', alpha=0.5, temperature=4.0))
  objective = method_loss(distill, saliency)
  tx = optax.adamw(3e-4, weight_decay=1e-4)
  params = {'student': student_vars['params'], 'objective': {}}
  opts = StepOptions(num_classes=10, steps_per_epoch=350, seed=0)
  step = jax.jit(make_train_step(graphdef=student_graph, teacher_graphdef=teacher_graph,
                                 loss=objective, tx=tx, frozen_mask=None, opts=opts),
                 donate_argnums=(0,),
                 compiler_options=xla_options.compiler_options(args.xla_options))
  rows = []
  with report.JsonLines(args.out) as emit:  # one row per resolution, as measured
    for res in [int(r) for r in args.resolutions.split(',')]:
      fresh = jax.tree.map(jnp.copy, params)  # the step donates its state
      state = TrainState(step=jnp.zeros((), jnp.int32), params=fresh,
                         batch_stats=student_vars['batch_stats'], opt_state=tx.init(fresh),
                         objective_state={})
      rng = np.random.default_rng(res)
      batch = {'image': jnp.asarray(rng.integers(0, 256, (args.batch, res, res, 3), np.uint8)),
               'label': jnp.asarray(rng.integers(0, 10, (args.batch,), np.int32))}
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
      rows.append(dict(
          benchmark='curriculum_step', student='irkd_vit/vit_tiny/p4',
          teacher='vit/irkd_teacher/p4',
          resolution=res, tokens=(res // 4) ** 2, batch=args.batch, saliency=args.saliency,
          xla_options=args.xla_options,
          runs=args.runs, median_s=float(np.median(times)), p10_s=float(np.percentile(times, 10)),
          p90_s=float(np.percentile(times, 90)), first_step_s=compile_s,
          images_per_s=args.batch / float(np.median(times)), load_avg=os.getloadavg()[0],
          jax=jax.__version__, machine=platform.machine(), cpus=os.cpu_count()))
      emit(rows[-1])
  full = next((r['median_s'] for r in rows if r['resolution'] == 32), None)
  if full:
    curriculum = sum(r['median_s'] for r in rows) / len(rows)
    print(json.dumps(dict(benchmark='curriculum_summary', mean_step_s_over_stages=curriculum,
                          step_s_at_32=full, speedup_vs_all_32=full / curriculum)), flush=True)


if __name__ == '__main__':
  main()
