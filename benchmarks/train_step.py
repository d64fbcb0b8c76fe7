r"""Speed of the full distillation train step: our jitted JAX step vs PyTorch eager vs torch.compile.

  python benchmarks/train_step.py [--sizes small,medium,large] [--batch 128] [--runs 5]
      [--frameworks jax,torch,torch_compile] [--parts] [--out benchmarks/results/train_step.jsonl]
  python benchmarks/train_step.py --quick          # micro + demo students, a few seconds each

One step = what the trainer runs per batch: teacher forward (resnet32x4, eval mode, no gradient),
student forward + backward (TIKD DistilledViT, train mode, drop path 0.1), hard distillation
(0.5 · CE(cls head, smoothed labels) + 0.5 · CE(dist head, teacher argmax)), AdamW update.

  jax            the trainer's own pieces (tikd_jax/train/run.py: setup, create_train_state,
                 train_step_for) for configs/tikd_cifar100.py:<size>,hard,notext with its
                 augmentations off, on synthetic data with a random teacher.
  torch          convert/torch_models.py twins (TorchDistilledViT, TorchCifarResNet) in eager
                 mode, torch.optim.AdamW (defaults), the same loss.
  torch_compile  the same, with the teacher forward + student forward/loss under torch.compile
                 (backward through AOTAutograd); skipped with the reason when it fails here.

Each (framework, size) warms up (compiles), then times `--runs` steps one by one (host sync after
each). One JSON line per row: median / p10 / p90 seconds per step, steps/s, images/s, model FLOPs
(analytic conv + matmul count, training = 3 × forward for the student, forward only for the teacher)
and the achieved GFLOP/s and fraction of --peak_gflops (188 measured for float32 matmul on this
2-core machine), the XLA cost-analysis FLOPs of the compiled JAX step, the 1-minute load average
before and after, versions, XLA_FLAGS. `--parts` adds rows for the teacher forward alone and the
student forward/backward alone. Speed is measured here, never asserted in tests.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report  # noqa: E402  pylint: disable=g-import-not-at-top

PEAK_GFLOPS = 188.0  # float32 matmul peak measured on this machine (2 cores)
NUM_CLASSES = 100
IMG = 32
TEACHER = 'resnet32x4'
QUICK_SIZES = ('micro', 'demo')
DRAW_SEED = 0


# --------------------------------------------------------------------------- FLOP counts
def resnet_forward_flops(arch: str, img: int = IMG, num_classes: int = NUM_CLASSES) -> int:
  """Multiply-adds × 2 of every conv and the fc of one image (BN, ReLU, pooling not counted)."""
  from tikd_jax.models.resnet_cifar import CONFIGS  # pylint: disable=g-import-not-at-top
  depth, filters = CONFIGS[arch]
  n = (depth - 2) // 6
  flops = 2 * 9 * 3 * filters[0] * img * img
  cin, hw = filters[0], img
  for cout, stride in zip(filters[1:], (1, 2, 2)):
    for i in range(n):
      s = stride if i == 0 else 1
      out_hw = hw // s
      flops += 2 * 9 * cin * cout * out_hw * out_hw  # conv1
      flops += 2 * 9 * cout * cout * out_hw * out_hw  # conv2
      if s != 1 or cin != cout:
        flops += 2 * cin * cout * out_hw * out_hw  # 1×1 downsample
      cin, hw = cout, out_hw
  return flops + 2 * cin * num_classes


def vit_forward_flops(size: str, img: int = IMG, num_classes: int = NUM_CLASSES) -> int:
  """Matmul multiply-adds × 2 of one image through the distilled ViT (no text modules)."""
  from tikd_jax.models.vit import SIZES  # pylint: disable=g-import-not-at-top
  s = SIZES[size]
  patches = (img // s.patch)**2
  n = patches + 2
  d = s.dim
  flops = 2 * patches * (s.patch * s.patch * 3) * d  # patch embedding
  per_block = 2 * n * (d * 3 * d + d * d + 2 * d * s.mlp_dim) + 2 * 2 * n * n * d  # + qkᵀ, attn·v
  flops += s.depth * per_block
  return flops + 2 * 2 * d * num_classes  # two heads


def step_flops(size: str, batch: int) -> dict:
  teacher = resnet_forward_flops(TEACHER) * batch
  student = 3 * vit_forward_flops(size) * batch
  return {'teacher_forward': teacher, 'student_train': student, 'step': teacher + student}


# --------------------------------------------------------------------------- shared helpers
def _summary(times: list[float]) -> dict:
  times = sorted(times)
  return {
      'median_s': statistics.median(times), 'p10_s': report.quantile(times, 0.1),
      'p90_s': report.quantile(times, 0.9), 'min_s': times[0], 'runs': len(times),
      'times_s': [round(t, 4) for t in times]
  }


def _compiler_options(preset: str):
  from tikd_jax import xla_options  # pylint: disable=g-import-not-at-top
  return xla_options.compiler_options(preset, 'cpu')


def _versions() -> dict:
  v = {'python': platform.python_version()}
  for mod in ('jax', 'jaxlib', 'flax', 'optax', 'torch'):
    try:
      v[mod] = __import__(mod).__version__
    except Exception:  # pylint: disable=broad-except
      pass
  return v


def _row(name, framework, size, batch, times, flops, loads, extra=None) -> dict:
  s = _summary(times)
  med = s['median_s']
  row = {
      'name': name, 'framework': framework, 'size': size, 'teacher': TEACHER,
      'batch': batch, 'img': IMG, **{
          k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()
      }, 'steps_per_s': round(1.0 / med,
                              3), 'images_per_s': round(batch / med,
                                                        1), 'model_gflop': round(flops / 1e9, 2),
      'achieved_gflops': round(flops / med / 1e9,
                               1), 'fraction_of_peak': round(flops / med / 1e9 / PEAK_GFLOPS, 3),
      'peak_gflops': PEAK_GFLOPS, 'load_1min': report.load_summary(loads), 'cpus': os.cpu_count(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''), 'versions': _versions()
  }
  if extra:
    row.update(extra)
  return row


def _batch(batch: int, seed: int = DRAW_SEED):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, IMG, IMG, 3), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, (batch,)).astype(np.int32)
  return images, labels


# --------------------------------------------------------------------------- JAX
def build_jax(size: str, batch: int, xla_options: str):
  """The trainer's own run for `size` (setup → create_train_state → train_step_for) on
  synthetic data with a random teacher: (jitted step, state, batch, teacher_vars, graphs)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from configs import tikd_cifar100  # pylint: disable=g-import-not-at-top
  from tikd_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from tikd_jax.data import ArraySource  # pylint: disable=g-import-not-at-top
  from tikd_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from tikd_jax.models.variables import model_variables  # pylint: disable=g-import-not-at-top
  from tikd_jax.train import run as run_lib  # pylint: disable=g-import-not-at-top

  config = tikd_cifar100.get_config(
      f'{size if size in ("small", "medium", "large") else "small"},hard,notext')
  with config.unlocked():
    config.model.variant = size
    config.batch_size = batch
    config.xla_options = xla_options
    # The PyTorch side runs no Mixup/CutMix, erasing or RandAugment: neither does this one.
    config.augment.randaugment = False
    config.augment.mixup_alpha = config.augment.cutmix_alpha = config.augment.erasing_prob = 0.0
  images, labels = _batch(batch)
  # CIFAR's 50k train images as one repeated image (only the split's size and shape are read).
  train = ArraySource(np.broadcast_to(images[:1], (50_000,) + images.shape[1:]),
                      np.zeros(50_000, np.int32), [str(i) for i in range(NUM_CLASSES)], 'synthetic',
                      'train')
  teacher = build_model(TEACHER, rngs=nnx.Rngs(1), num_classes=NUM_CLASSES,
                        mean=config.teacher.mean, std=config.teacher.std)
  teacher_vars = model_variables(teacher)
  mesh = sharding_lib.make_mesh(config.mesh)
  teacher_vars = jax.device_put(teacher_vars, sharding_lib.param_shardings(teacher_vars, mesh))
  run = run_lib.setup(config, '', sources=(train, train),
                      teacher=run_lib.Teacher(nnx.graphdef(teacher), teacher_vars))
  batch_arrays = {
      'image': jax.device_put(images, run.data_sharding),
      'label': jax.device_put(labels, run.data_sharding)
  }
  return {
      'step': run_lib.train_step_for(run, run.phases[0]), 'state': run_lib.create_train_state(run),
      'batch': batch_arrays, 'teacher_vars': teacher_vars, 'graphdef': run.student.graphdef,
      'teacher_graphdef': run.teacher.graphdef
  }


def xla_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost.get('flops'))
  except Exception:  # pylint: disable=broad-except
    return None


class Contestant:
  """One timed thing: `fn()` runs one complete, synchronised step."""

  def __init__(self, name, framework, size, batch, flops, fn, extra=None):
    self.name, self.framework, self.size, self.batch = name, framework, size, batch
    self.flops, self.fn, self.extra = flops, fn, dict(extra or {})
    self.times: list[float] = []
    self.loads: list[float] = []

  def label(self):
    return f'{self.framework}{"/" + self.extra["xla_options"] if "xla_options" in self.extra else ""}'

  def row(self) -> dict:
    return _row(self.name, self.framework, self.size, self.batch, self.times, self.flops,
                self.loads, self.extra)


def jax_contestants(size, batch, parts, xla_options='default') -> list[Contestant]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  b = build_jax(size, batch, xla_options)
  flops = step_flops(size, batch)
  options = _compiler_options(xla_options)
  t0 = time.perf_counter()
  compiled = b['step'].lower(b['state'], b['batch'], b['teacher_vars']).compile()
  compile_s = time.perf_counter() - t0
  holder = {'state': b['state']}

  def one():
    holder['state'], metrics = compiled(holder['state'], b['batch'], b['teacher_vars'])
    jax.block_until_ready((holder['state'], metrics))

  extra = {'xla_options': xla_options}
  out = [
      Contestant(
          'train_step', 'jax', size, batch, flops['step'], one,
          dict(extra, compile_s=round(compile_s, 2), xla_cost_gflop=round(
              (xla_flops(compiled) or float('nan')) / 1e9, 2)))
  ]
  if not parts:
    return out

  teacher_graphdef, graphdef = b['teacher_graphdef'], b['graphdef']

  @functools.partial(jax.jit, compiler_options=options)
  def teacher_forward(tv, images):
    teacher = nnx.merge(teacher_graphdef, tv['params'], tv['batch_stats'])
    return teacher(images.astype(jnp.float32) / 255.0, train=False)[0]

  @functools.partial(jax.jit, compiler_options=options)
  def student_grad(params, stats, images, labels):

    def loss(p):
      student = nnx.merge(graphdef, p, stats)
      _, o = student(images.astype(jnp.float32) / 255.0, train=True, rng=jax.random.key(0))
      lp = jax.nn.log_softmax(o['cls_logits']) + jax.nn.log_softmax(o['dist_logits'])
      return -jnp.mean(jnp.take_along_axis(lp, labels[:, None], axis=-1))

    return jax.grad(loss)(params)

  img, lab = b['batch']['image'], b['batch']['label']
  params = jax.tree.map(jnp.copy, holder['state'].params['student'])
  stats = holder['state'].batch_stats
  out.append(
      Contestant('teacher_forward', 'jax', size, batch, flops['teacher_forward'],
                 lambda: jax.block_until_ready(teacher_forward(b['teacher_vars'], img)), extra))
  out.append(
      Contestant('student_train', 'jax', size, batch, flops['student_train'],
                 lambda: jax.block_until_ready(student_grad(params, stats, img, lab)), extra))
  return out


# --------------------------------------------------------------------------- PyTorch
def build_torch(size: str, batch: int):
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  from convert.torch_models import TorchCifarResNet, TorchDistilledViT  # pylint: disable=g-import-not-at-top
  from tikd_jax.models.resnet_cifar import CONFIGS  # pylint: disable=g-import-not-at-top
  from tikd_jax.models.vit import SIZES  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  s = SIZES[size]
  student = TorchDistilledViT(dim=s.dim, depth=s.depth, heads=s.heads, mlp_dim=s.mlp_dim,
                              patch=s.patch, num_classes=NUM_CLASSES, img_size=IMG).train()
  depth, filters = CONFIGS[TEACHER]
  teacher = TorchCifarResNet(depth=depth, filters=filters, num_classes=NUM_CLASSES).eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  opt = torch.optim.AdamW(student.parameters(), lr=5e-4, weight_decay=0.05)
  images, labels = _batch(batch)
  x = torch.from_numpy(images)
  y = torch.from_numpy(labels).long()

  def loss_fn(x, y):
    images = x.permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
      teacher_labels = teacher(images).argmax(dim=1)
    out = student.forward_heads(images)
    base = F.cross_entropy(out['cls_logits'], y, label_smoothing=0.1)
    distill = F.cross_entropy(out['dist_logits'], teacher_labels)
    return 0.5 * base + 0.5 * distill

  return {'student': student, 'teacher': teacher, 'opt': opt, 'x': x, 'y': y, 'loss_fn': loss_fn}


def torch_contestants(size, batch, parts, compiled: bool) -> list[Contestant] | dict:
  """PyTorch eager (or torch.compile) contestants; a `skipped` row when compiling fails."""
  import torch  # pylint: disable=g-import-not-at-top
  framework = 'torch_compile' if compiled else 'torch'
  b = build_torch(size, batch)
  flops = step_flops(size, batch)
  loss_fn = b['loss_fn']
  extra = {'torch_threads': torch.get_num_threads()}
  if compiled:
    loss_fn = torch.compile(loss_fn)
    t0 = time.perf_counter()
    try:
      loss_fn(b['x'], b['y']).backward()
      b['opt'].zero_grad(set_to_none=True)
    except Exception as e:  # pylint: disable=broad-except
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ''
      return {
          'name': 'train_step', 'framework': framework, 'size': size, 'batch': batch,
          'skipped': f'torch.compile failed here: {type(e).__name__}: {first}',
          'load': report.load_now(), 'versions': _versions()
      }
    extra['compile_s'] = round(time.perf_counter() - t0, 2)

  def one():
    b['opt'].zero_grad(set_to_none=True)
    loss_fn(b['x'], b['y']).backward()
    b['opt'].step()

  out = [Contestant('train_step', framework, size, batch, flops['step'], one, extra)]
  if parts and not compiled:
    images = b['x'].permute(0, 3, 1, 2).float() / 255.0

    def teacher_only():
      with torch.no_grad():
        b['teacher'](images)

    def student_only():
      o = b['student'].forward_heads(images)
      (o['cls_logits'].logsumexp(-1).mean() + o['dist_logits'].logsumexp(-1).mean()).backward()

    out.append(
        Contestant('teacher_forward', framework, size, batch, flops['teacher_forward'],
                   teacher_only, extra))
    out.append(
        Contestant('student_train', framework, size, batch, flops['student_train'], student_only,
                   extra))
  return out


def _baseline_module(root: str):
  """benchmarks/train_step.py of another checkout: it builds that checkout's step its own way."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'baseline_train_step', os.path.join(os.path.abspath(root), 'benchmarks', 'train_step.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _worker(conn, framework, size, batch, parts, presets, warmup, baseline_root=None):
  """One process per framework, so that one framework's idle thread pool (OpenMP or Eigen
  threads spinning after their last op) never competes with another's timed step."""
  make_jax_contestants = jax_contestants
  if framework == 'jax_baseline':  # the other checkout's own benchmark of its own step
    sys.path.insert(0, os.path.abspath(baseline_root))
    make_jax_contestants = _baseline_module(baseline_root).jax_contestants
  if framework in ('jax', 'jax_baseline'):
    import tikd_jax  # pylint: disable=g-import-not-at-top
    code = os.path.dirname(os.path.dirname(os.path.abspath(tikd_jax.__file__)))
    contestants = []
    for preset in presets:
      contestants += make_jax_contestants(size, batch, parts, preset)
    for c in contestants:
      c.framework = framework
      c.extra['code'] = code
  else:
    contestants = torch_contestants(size, batch, parts, compiled=framework == 'torch_compile')
  if isinstance(contestants, dict):  # skipped
    conn.send(('skipped', contestants))
    return
  for c in contestants:
    for _ in range(warmup):
      c.fn()
  conn.send(('ready', [c.label() + ':' + c.name for c in contestants]))
  while True:
    msg = conn.recv()
    if msg[0] == 'step':
      c = contestants[msg[1]]
      c.loads.append(report.load_now())
      t = time.perf_counter()
      c.fn()
      c.times.append(time.perf_counter() - t)
      conn.send(c.times[-1])
    elif msg[0] == 'rows':
      conn.send([c.row() for c in contestants])
      return


def run_size(size, batch, frameworks, presets, parts, runs, warmup, emit,
             baseline_root=None) -> None:
  """Starts one worker per framework, then runs `runs` rounds of one step per contestant (order
  rotated every round) so that a change in the machine's load hits all contestants alike."""
  import multiprocessing as mp  # pylint: disable=g-import-not-at-top
  ctx = mp.get_context('spawn')
  workers = []
  for fw in frameworks:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker, daemon=True,
                       args=(child, fw, size, batch, parts, presets, warmup, baseline_root))
    proc.start()
    workers.append((fw, parent, proc))
  slots = []  # (worker index, contestant index, label)
  for w, (fw, conn, proc) in enumerate(workers):
    kind, payload = conn.recv()  # sequential: one worker compiles / warms up at a time
    if kind == 'skipped':
      emit(payload)
      continue
    slots += [(w, i, label) for i, label in enumerate(payload)]
  print(
      f'# {size}: {len(slots)} contestants ({", ".join(l for _, _, l in slots)}), '
      f'{warmup} warm-up + {runs} timed steps each, interleaved', file=sys.stderr, flush=True)
  for r in range(runs):
    k = r % max(1, len(slots))
    for w, i, _ in slots[k:] + slots[:k]:
      workers[w][1].send(('step', i))
      workers[w][1].recv()
  for w, (fw, conn, proc) in enumerate(workers):
    if any(w == slot[0] for slot in slots):
      conn.send(('rows',))
      for row in conn.recv():
        emit(row)
    proc.join(timeout=60)


# --------------------------------------------------------------------------- main
def main() -> None:
  global PEAK_GFLOPS  # pylint: disable=global-statement
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--sizes', default='small,medium,large')
  parser.add_argument('--quick', action='store_true',
                      help='micro and demo students, batch 32, 3 runs, jax and torch eager')
  parser.add_argument('--batch', type=int, default=None, help='default 128 (32 with --quick)')
  parser.add_argument('--runs', type=int, default=None,
                      help='timed steps per contestant (default 5, 3 with --quick)')
  parser.add_argument('--large_runs', type=int, default=3, help='timed steps for size large')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps after compiling')
  parser.add_argument('--frameworks', default=None,
                      help='jax,torch,torch_compile (default all; jax,torch with --quick)')
  parser.add_argument(
      '--xla_options', default='auto', help='one JAX contestant per preset: auto or one of '
      'tikd_jax/xla_options.py PRESETS')
  parser.add_argument(
      '--baseline_root', default=None,
      help='another checkout of the repo (e.g. the commit before a change): adds '
      'its JAX step as framework jax_baseline, interleaved with the rest')
  parser.add_argument('--parts', action='store_true',
                      help='also time the teacher forward and the student fwd/bwd alone')
  parser.add_argument('--peak_gflops', type=float, default=PEAK_GFLOPS)
  parser.add_argument('--out', default=None, help='also append the JSON lines to this file')
  args = parser.parse_args()
  PEAK_GFLOPS = args.peak_gflops
  sizes = QUICK_SIZES if args.quick else tuple(s for s in args.sizes.split(',') if s)
  batch = args.batch or (32 if args.quick else 128)
  base_runs = args.runs or (3 if args.quick else 5)
  frameworks = [
      f for f in (
          args.frameworks or ('jax,torch' if args.quick else 'jax,torch,torch_compile')).split(',')
      if f
  ]
  if args.baseline_root:
    frameworks = ['jax_baseline'] + frameworks
  unknown = set(frameworks) - {'jax', 'jax_baseline', 'torch', 'torch_compile'}
  if unknown:
    parser.error(f'unknown frameworks {sorted(unknown)}; use jax, torch, torch_compile')
  presets = [p for p in args.xla_options.split(',') if p]
  from tikd_jax.xla_options import PRESETS  # pylint: disable=g-import-not-at-top
  unknown = set(presets) - set(PRESETS) - {'auto'}
  if unknown:
    parser.error(f'unknown --xla_options {sorted(unknown)}; use auto or one of {sorted(PRESETS)}')
  with report.JsonLines(args.out) as emit:
    for size in sizes:
      runs = args.large_runs if size == 'large' else base_runs
      run_size(size, batch, frameworks, presets, args.parts, runs, args.warmup, emit,
               args.baseline_root)


if __name__ == '__main__':
  main()
