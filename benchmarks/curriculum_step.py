r"""Step time per IRKD curriculum resolution, ours against PyTorch eager, interleaved.

  python benchmarks/curriculum_step.py [--batch 128] [--runs 5] [--resolutions 12,16,...,32] \
      [--frameworks jax,torch] [--baseline_root /old/checkout] [--saliency attention] \
      [--xla_options auto] [--cpu_fast_layers auto] [--peak measure] \
      [--out benchmarks/results/curriculum_step.jsonl]

The real distillation step of the trainer (KD, teacher forward + student forward/backward + AdamW
update, optionally attention saliency) for IRKD's ViT-Tiny student (patch 4) and its 384-wide
12-layer teacher, at each curriculum resolution:

  jax           configs/irkd_cifar10.py:kd_cl,p4 (kd_cl_sal with --saliency attention) through the
                trainer's own setup / train_step_for, random teacher, synthetic batch at that size.
  jax_baseline  `--baseline_root`'s checkout building the same step its own way (its
                benchmarks/curriculum_step.py `build_run`), for before/after comparisons.
  torch         convert/torch_models.py twins in eager mode (student: IRKD's ViTWithDistillation
                layout, train mode; teacher: the plain ViT in eval mode under no_grad), the same
                loss (0.5 · CE(cls head) + 0.5 · T² · KL at T = 4 on the dist head),
                torch.optim.AdamW(lr 3e-4, weight decay 1e-4). Only without saliency.

As benchmarks/train_step.py: one worker process per framework, every contestant compiled and
warmed up first, then `--runs` rounds of one step per (framework, resolution), the order rotated
every round, so a change in this shared machine's load hits all contestants alike. One JSON line
per contestant (median / p10 / p90 / min seconds, images/s, the 1-minute load sampled before every
step, analytic GFLOP/s and the fraction of the peak with `--peak measure`), then one
`curriculum_ratio` line per resolution: PyTorch's median over ours (> 1: ours faster), PyTorch
taken at its fastest thread count of the run (`--frameworks jax,torch,torch_1t`).
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report  # noqa: E402  pylint: disable=g-import-not-at-top

NUM_CLASSES = 10
TEMPERATURE = 4.0
STUDENT, TEACHER = 'vit_tiny', 'irkd_teacher'


def random_variables(template, seed):
  """Random weights of the template's shapes (no eager model build: that compiles op by op)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape).astype(np.float32)),
                      template)


def build_run(saliency: str, batch: int, xla_preset: str, fast_layers: str):
  """The trainer's run of configs/irkd_cifar10.py (kd_cl, or kd_cl_sal with attention
  saliency) on synthetic 32-px data with a random teacher."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from configs import irkd_cifar10  # pylint: disable=g-import-not-at-top
  from tikd_jax.data import ArraySource  # pylint: disable=g-import-not-at-top
  from tikd_jax.cpu import layers as cpu_layers  # pylint: disable=g-import-not-at-top
  from tikd_jax.models.variables import abstract_model  # pylint: disable=g-import-not-at-top
  from tikd_jax.train import run as run_lib  # pylint: disable=g-import-not-at-top
  config = irkd_cifar10.get_config('kd_cl_sal,p4' if saliency == 'attention' else 'kd_cl,p4')
  with config.unlocked():
    config.batch_size = batch
    config.xla_options = xla_preset
    config.cpu_fast_layers = fast_layers
    config.curriculum.val_transform = ''  # stage validation is an eval, not part of the step
  train = ArraySource(np.zeros((45_000, 32, 32, 3), np.uint8), np.zeros(45_000, np.int32),
                      [str(i) for i in range(NUM_CLASSES)], 'synthetic', 'train')
  teacher_graph, teacher_tpl = abstract_model('vit', variant=TEACHER, patch_size=4,
                                              num_classes=NUM_CLASSES,
                                              fast_layers=cpu_layers.enabled(fast_layers))
  teacher = run_lib.Teacher(teacher_graph, random_variables(teacher_tpl, 1))
  return run_lib.setup(config, '', sources=(train, train), teacher=teacher)


def _batch(res: int, batch: int):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(res)
  return (rng.integers(0, 256, (batch, res, res, 3),
                       np.uint8), rng.integers(0, NUM_CLASSES, (batch,)).astype(np.int32))


def vit_step_flops(res: int, batch: int) -> int:
  """2 × multiply-adds of the matmuls of one step: teacher forward + 3 × the student forward."""
  from tikd_jax.models.vit import SIZES  # pylint: disable=g-import-not-at-top

  def forward(size, prefix):
    s = SIZES[size]
    patches = (res // 4)**2
    n, d = patches + prefix, s.dim
    per_block = 2 * n * (4 * d * d + 2 * d * s.mlp_dim) + 4 * n * n * d
    return 2 * patches * 48 * d + s.depth * per_block + 2 * prefix * d * NUM_CLASSES

  return batch * (forward(TEACHER, 1) + 3 * forward(STUDENT, 2))


class Contestant:

  def __init__(self, framework, res, fn, extra=None):
    self.framework, self.res, self.fn, self.extra = framework, res, fn, dict(extra or {})
    self.times: list[float] = []
    self.loads: list[float] = []


def jax_contestants(resolutions, batch, saliency, xla_preset, fast_layers, build=build_run,
                    allocator='auto') -> list[Contestant]:
  """The trainer's step at each resolution; `allocator`: this worker process's host allocator
  policy, as main.py --allocator sets it for a run."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from tikd_jax.train import run as run_lib  # pylint: disable=g-import-not-at-top
  compiled_with_small_heaps = _set_allocator(allocator, xla_preset)
  run = build(saliency, batch, xla_preset, fast_layers)
  phase = run.phases[0]
  out = []
  for res in resolutions:
    step = run_lib.train_step_for(run, dataclasses.replace(phase, resolution=res))
    images, labels = _batch(res, batch)
    data = {'image': jnp.asarray(images), 'label': jnp.asarray(labels)}
    holder = {'state': run_lib.create_train_state(run)}  # the step donates its state

    def one(step=step, data=data, holder=holder):
      holder['state'], metrics = step(holder['state'], data, run.teacher.variables)
      jax.block_until_ready(metrics)

    t0 = time.perf_counter()
    one()
    out.append(
        Contestant(
            'jax', res, one, {
                'first_step_s':
                    round(time.perf_counter() - t0, 2), 'xla_options':
                        xla_preset, 'cpu_fast_layers':
                            fast_layers, 'small_heaps':
                                compiled_with_small_heaps(step, xla_preset, holder['state'], data,
                                                          run.teacher.variables)
            }))
  return out


def _set_allocator(allocator: str, xla_preset: str):
  """Sets this worker's host allocator policy (main.py --allocator); returns how to tell whether
  a step compiled with the small heaps. A `--baseline_root` checkout from before tikd_jax/cpu/
  (its `build_run` puts it first on the path) set glibc itself in its steps, and said it there."""
  try:
    from tikd_jax.cpu import compiler  # pylint: disable=g-import-not-at-top
  except ImportError:
    from tikd_jax import xla_options  # pylint: disable=g-import-not-at-top,import-error
    return lambda step, preset, *args: xla_options.compiled_with_small_heaps(step, preset)
  from benchmarks.train_step import compiled_with_small_heaps  # pylint: disable=g-import-not-at-top
  compiler.set_allocator(allocator, xla_preset)
  return compiled_with_small_heaps


def torch_twins():
  """The PyTorch twins of `build_run`'s models: the student in train mode with the recipe's
  dropout (ViT-Tiny p4: hidden 0.1), as ours trains with it; the teacher in eval mode, frozen."""
  import torch  # pylint: disable=g-import-not-at-top

  from configs import irkd_cifar10  # pylint: disable=g-import-not-at-top
  from configs.common import CIFAR10_MEAN, CIFAR10_STD  # pylint: disable=g-import-not-at-top
  from convert.torch_models import TorchDistilledViT  # pylint: disable=g-import-not-at-top
  from tikd_jax.models.vit import SIZES  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  model = irkd_cifar10.get_config('kd_cl,p4').model

  def vit(size, **kw):
    s = SIZES[size]
    return TorchDistilledViT(dim=s.dim, depth=s.depth, heads=s.heads, mlp_dim=s.mlp_dim, patch=4,
                             num_classes=NUM_CLASSES, img_size=32, mean=CIFAR10_MEAN,
                             std=CIFAR10_STD, **kw)

  student = vit(STUDENT, dist_pos_embed=False, final_norm=False, eval_head='cls',
                dropout=model.dropout, attn_dropout=model.attn_dropout).train()
  teacher = vit(TEACHER, distilled=False).eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  return student, teacher


def torch_contestants(resolutions, batch, threads: int | None = None) -> list[Contestant]:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  if threads:
    torch.set_num_threads(threads)
  student, teacher = torch_twins()
  opt = torch.optim.AdamW(student.parameters(), lr=3e-4, weight_decay=1e-4)
  out = []
  for res in resolutions:
    images, labels = _batch(res, batch)
    x = torch.from_numpy(images)
    y = torch.from_numpy(labels).long()

    def one(x=x, y=y):
      opt.zero_grad(set_to_none=True)
      images = x.permute(0, 3, 1, 2).float() / 255.0
      with torch.no_grad():
        t = teacher(images)
      o = student.forward_heads(images)
      kd = F.kl_div(F.log_softmax(o['dist_logits'] / TEMPERATURE, -1), F.softmax(
          t / TEMPERATURE, -1), reduction='batchmean') * TEMPERATURE**2
      (0.5 * F.cross_entropy(o['cls_logits'], y) + 0.5 * kd).backward()
      opt.step()

    out.append(Contestant('torch', res, one, {'torch_threads': torch.get_num_threads()}))
  return out


def _baseline_build(root: str):
  """`build_run` of another checkout's benchmarks/curriculum_step.py (its code, its step)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.abspath(root))
  spec = importlib.util.spec_from_file_location(
      'baseline_curriculum_step',
      os.path.join(os.path.abspath(root), 'benchmarks', 'curriculum_step.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.build_run


def _torch_threads(framework: str) -> int | None:
  """'torch' runs with PyTorch's default thread count, 'torch_<n>t' with n threads."""
  return int(framework[len('torch_'):-1]) if framework.startswith('torch_') else None


def _worker(conn, framework, args):
  resolutions = [int(r) for r in args.resolutions.split(',')]
  if framework.startswith('torch'):
    contestants = torch_contestants(resolutions, args.batch, _torch_threads(framework))
    for c in contestants:
      c.framework = framework
  else:
    build = _baseline_build(args.baseline_root) if framework == 'jax_baseline' else build_run
    contestants = jax_contestants(resolutions, args.batch, args.saliency, args.xla_options,
                                  args.cpu_fast_layers, build)
    for c in contestants:
      c.framework = framework
  for c in contestants:
    for _ in range(args.warmup):
      c.fn()
  conn.send([c.res for c in contestants])
  while True:
    msg = conn.recv()
    if msg[0] == 'step':
      conn.send(report.timed_call(contestants[msg[1]]))
    else:
      conn.send([(c.framework, c.res, c.times, c.loads, c.extra) for c in contestants])
      return


def _row(framework, res, times, loads, extra, args, peak) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  by_round = [round(t, 4) for t in times]
  times = sorted(times)
  med = report.quantile(times, 0.5)
  flops = vit_step_flops(res, args.batch)
  row = {
      'benchmark': 'curriculum_step', 'framework': framework, 'student': f'irkd_vit/{STUDENT}/p4',
      'teacher': f'vit/{TEACHER}/p4', 'resolution': res, 'tokens': (res // 4)**2,
      'batch': args.batch, 'saliency': args.saliency, 'runs': len(times)
  }
  row.update(median_s=round(med, 4), p10_s=round(report.quantile(times, 0.1), 4),
             p90_s=round(report.quantile(times, 0.9), 4), min_s=round(times[0], 4),
             times_s=[round(t, 4) for t in times], times_by_round_s=by_round)
  row.update(images_per_s=round(args.batch / med, 1), model_gflop=round(flops / 1e9, 2),
             achieved_gflops=round(flops / med / 1e9, 1), load_1min=report.load_summary(loads),
             jax=jax.__version__, machine=platform.machine(), cpus=os.cpu_count(), **extra)
  if peak:
    row.update(peak_gflops=peak[0], peak_source=peak[1],
               fraction_of_peak=round(flops / med / 1e9 / peak[0], 4))
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps after the first')
  parser.add_argument('--resolutions', default='12,16,20,24,28,32')
  parser.add_argument(
      '--frameworks', default='jax,torch', help='jax, torch (its default threads) and/or '
      'torch_<n>t (n threads: on a loaded machine OpenMP at 2 threads can stall on every op)')
  parser.add_argument('--baseline_root', default=None,
                      help='another checkout: adds its step as framework jax_baseline')
  parser.add_argument('--saliency', default='none', choices=['none', 'attention'])
  parser.add_argument('--xla_options', default='auto',
                      help='auto or a tikd_jax/cpu/compiler.py preset (as config.xla_options)')
  parser.add_argument('--cpu_fast_layers', default='auto', choices=('auto', 'on', 'off'),
                      help='as config.cpu_fast_layers')
  parser.add_argument(
      '--peak', default=None, help='"measure" (benchmarks/peak.py in this run) or GFLOP/s for '
      'fraction_of_peak')
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)
  frameworks = [f for f in args.frameworks.split(',') if f]
  if args.baseline_root:
    frameworks = ['jax_baseline'] + frameworks
  if any(f not in ('jax', 'jax_baseline', 'torch') and not re.fullmatch(r'torch_\d+t', f)
         for f in frameworks):
    parser.error(f'--frameworks {args.frameworks!r}: use jax, torch and/or torch_<n>t')
  if args.saliency != 'none' and any(f.startswith('torch') for f in frameworks):
    frameworks = [f for f in frameworks if not f.startswith('torch')]
    print('# no PyTorch twin of the attention-saliency loss: torch left out', file=sys.stderr)

  import multiprocessing as mp  # pylint: disable=g-import-not-at-top
  with report.JsonLines(args.out) as emit:
    peak = None
    if args.peak == 'measure':
      from benchmarks import train_step  # pylint: disable=g-import-not-at-top
      peak = train_step.measured_peak('cpu', emit)
    elif args.peak:
      peak = (float(args.peak), 'given')
    ctx = mp.get_context('spawn')
    workers = []
    for fw in frameworks:
      parent, child = ctx.Pipe()
      proc = ctx.Process(target=_worker, args=(child, fw, args), daemon=True)
      proc.start()
      workers.append((fw, parent, proc))
    slots = []
    for w, (fw, conn, _) in enumerate(workers):
      slots += [(w, i) for i, _ in enumerate(conn.recv())]
    print(f'# {len(slots)} contestants, {args.runs} timed steps each, interleaved', file=sys.stderr,
          flush=True)
    for r in range(args.runs):
      k = r % len(slots)
      for w, i in slots[k:] + slots[:k]:
        workers[w][1].send(('step', i))
        workers[w][1].recv()
    rows = []
    for fw, conn, proc in workers:
      conn.send(('rows',))
      for framework, res, times, loads, extra in conn.recv():
        rows.append(_row(framework, res, times, loads, extra, args, peak))
        emit(rows[-1])
      proc.join(timeout=60)
    for res in sorted({r['resolution'] for r in rows}):
      summary = ratio_row([r for r in rows if r['resolution'] == res])
      if summary:
        emit(dict(summary, batch=args.batch))


def ratio_row(rows: list[dict]) -> dict | None:
  """The `curriculum_ratio` row of one resolution's contestant rows: PyTorch (its fastest thread
  count of the run) over ours, as a ratio of medians and as the median of the ratios taken round
  by round (both steps of a round ran seconds apart, under the same load: steadier when the load
  swings during a run). None without a PyTorch and a JAX row."""
  by_fw = {r['framework']: r for r in rows}
  torch_rows = [r for fw, r in by_fw.items() if fw.startswith('torch')]
  ours = [fw for fw in ('jax', 'jax_baseline') if fw in by_fw]
  if not torch_rows or not ours:
    return None
  best = min(torch_rows, key=lambda r: r['median_s'])
  out = {
      'benchmark': 'curriculum_ratio', 'resolution': rows[0]['resolution'],
      'torch': best['framework'], 'torch_median_s': best['median_s']
  }
  for fw in ours:
    out[f'{fw}_median_s'] = by_fw[fw]['median_s']
    out[f'torch_over_{fw}'] = round(best['median_s'] / by_fw[fw]['median_s'], 3)
    paired = [t / j for t, j in zip(best['times_by_round_s'], by_fw[fw]['times_by_round_s'])]
    out[f'paired_torch_over_{fw}'] = round(report.quantile(paired, 0.5), 3)
  loads = [x for r in rows for x in (r['load_1min']['min'], r['load_1min']['max'])]
  out['load_1min'] = report.load_summary(loads)
  return out


if __name__ == '__main__':
  main()
