r"""Speed of the full distillation train step: our jitted JAX step vs PyTorch eager vs torch.compile.

  python benchmarks/train_step.py [--sizes small,medium,large] [--batch 128] [--runs 5]
      [--frameworks jax,torch,torch_compile] [--parts] [--out benchmarks/results/train_step.jsonl]
  python benchmarks/train_step.py --quick          # micro + demo students, a few seconds each
  python benchmarks/train_step.py --device gpu --batch 1024 --dtypes float32,bfloat16 --peak measure
      # on a GPU: both frameworks on CUDA; bfloat16 = our config.dtype / torch.autocast

One step = what the trainer runs per batch: teacher forward (resnet32x4, eval mode, no gradient),
student forward + backward (TIKD DistilledViT, train mode, drop path 0.1), hard distillation
(0.5 · CE(cls head, smoothed labels) + 0.5 · CE(dist head, teacher argmax)), AdamW update.

  jax            the trainer's own pieces (tikd_jax/train/run.py: setup, create_train_state,
                 train_step_for) for configs/tikd_cifar100.py:<size>,hard,notext with its
                 augmentations off, on synthetic data with a random teacher.
  torch          convert/torch_models.py twins (TorchDistilledViT, TorchCifarResNet) in eager
                 mode, torch.optim.AdamW (defaults), the same loss.
  jax_<n>d       our step data-parallel over n XLA:CPU host devices (e.g. jax_2d: one per core),
                 --xla_force_host_platform_device_count=n in that worker only.
  torch_<n>t     torch eager with n threads (e.g. torch_1t), beside torch's default count.
  torch_compile  the same, with the teacher forward + student forward/loss under torch.compile
                 (backward through AOTAutograd); skipped with the reason when it fails here.

Each (framework, size, dtype) warms up (compiles), then times `--runs` steps one by one (device
sync after each). One JSON line per row: median / p10 / p90 seconds per step, steps/s, images/s,
model FLOPs (analytic conv + matmul count, training = 3 × forward for the student, forward only for
the teacher) and the achieved GFLOP/s and fraction of the peak (`--peak measure`: on CPU the
float32 jax dot measured in this run, on a GPU the card's datasheet dense bfloat16 peak, i.e. MFU;
benchmarks/peak.py), the XLA cost-analysis FLOPs of the compiled JAX step, compile seconds, the
1-minute load average, versions, XLA_FLAGS. `--parts` adds rows for the teacher forward alone and
the student forward/backward alone. Speed is measured here, never asserted in tests.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report  # noqa: E402  pylint: disable=g-import-not-at-top

PEAK_GFLOPS = 188.0  # float32 matmul peak of the 2-core AVX-512 machine; `--peak measure` measures
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
  from tikd_jax.cpu import compiler  # pylint: disable=g-import-not-at-top
  return compiler.compiler_options(preset)


def compiled_with_small_heaps(step, preset: str, *args) -> bool:
  """Whether the trainer's jitted `step` (train_step_for) runs with the small heaps for `args`:
  the decision setup made, taken again from the step's function (`compiler.step_options`)."""
  from tikd_jax.cpu import compiler  # pylint: disable=g-import-not-at-top
  return compiler.uses_small_heaps(compiler.step_options(preset, step.__wrapped__, *args))


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
      'name': name, 'framework': framework, 'size': size, 'teacher': TEACHER, 'batch': batch,
      'img': IMG,
      **{k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()}, 'steps_per_s': round(
          1.0 / med, 3), 'images_per_s': round(batch / med,
                                               1), 'model_gflop': round(flops / 1e9, 2),
      'achieved_gflops': round(flops / med / 1e9, 1), 'load_1min': report.load_summary(loads),
      'cpus': os.cpu_count(), 'xla_flags': os.environ.get('XLA_FLAGS', ''), 'versions': _versions()
  }
  if extra:
    row.update(extra)
  return row


def with_peak(row: dict, peak_gflops: float, peak_source: str) -> dict:
  """`row` with its fraction of the peak; set in the parent process, which alone knows the peak
  (the spawned workers re-import this module and never see `--peak_gflops`)."""
  if 'achieved_gflops' not in row:
    return row
  return dict(row, peak_gflops=peak_gflops, peak_source=peak_source,
              fraction_of_peak=round(row['achieved_gflops'] / peak_gflops, 6))


def _batch(batch: int, seed: int = DRAW_SEED):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, IMG, IMG, 3), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, (batch,)).astype(np.int32)
  return images, labels


# --------------------------------------------------------------------------- JAX
def build_jax(size: str, batch: int, xla_options: str, dtype: str = 'float32',
              attention: str = 'ours'):
  """The trainer's own run for `size` (setup → create_train_state → train_step_for) on
  synthetic data with a random teacher: (jitted step, state, batch, teacher_vars, graphs).
  `attention='cudnn'`: the student's attention core is jax.nn.dot_product_attention
  (benchmarks/cudnn_attention.py)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from configs import tikd_cifar100  # pylint: disable=g-import-not-at-top
  from tikd_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from tikd_jax.data import ArraySource  # pylint: disable=g-import-not-at-top
  from tikd_jax.cpu import layers as cpu_layers  # pylint: disable=g-import-not-at-top
  from tikd_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from tikd_jax.models.variables import model_variables  # pylint: disable=g-import-not-at-top
  from tikd_jax.train import run as run_lib  # pylint: disable=g-import-not-at-top

  config = tikd_cifar100.get_config(
      f'{size if size in ("small", "medium", "large") else "small"},hard,notext')
  with config.unlocked():
    config.model.variant = size
    config.batch_size = batch
    config.xla_options = xla_options
    config.dtype = dtype
    # The PyTorch side runs no Mixup/CutMix, erasing or RandAugment: neither does this one.
    config.augment.randaugment = False
    config.augment.mixup_alpha = config.augment.cutmix_alpha = config.augment.erasing_prob = 0.0
  images, labels = _batch(batch)
  # CIFAR's 50k train images as one repeated image (only the split's size and shape are read).
  train = ArraySource(np.broadcast_to(images[:1], (50_000,) + images.shape[1:]),
                      np.zeros(50_000, np.int32), [str(i) for i in range(NUM_CLASSES)], 'synthetic',
                      'train')
  # As run.load_teacher builds it: in config.dtype under mixed precision, with the CPU switch.
  teacher = build_model(TEACHER, rngs=nnx.Rngs(1), num_classes=NUM_CLASSES,
                        mean=config.teacher.mean, std=config.teacher.std,
                        fast_layers=cpu_layers.enabled(config.cpu_fast_layers),
                        **({} if dtype == 'float32' else {'dtype': dtype}))
  teacher_vars = model_variables(teacher)
  mesh = sharding_lib.make_mesh(config.mesh)
  teacher_vars = jax.device_put(teacher_vars, sharding_lib.param_shardings(teacher_vars, mesh))
  run = run_lib.setup(config, '', sources=(train, train),
                      teacher=run_lib.Teacher(nnx.graphdef(teacher), teacher_vars))
  if attention == 'cudnn':
    from benchmarks import cudnn_attention  # pylint: disable=g-import-not-at-top
    run = cudnn_attention.with_cudnn_attention(run)
  batch_arrays = {
      'image': jax.device_put(images, run.data_sharding),
      'label': jax.device_put(labels, run.data_sharding)
  }
  return {
      'step': run_lib.train_step_for(run, run.phases[0]), 'state': run_lib.create_train_state(run),
      'batch': batch_arrays, 'teacher_vars': teacher_vars, 'graphdef': run.student.graphdef,
      'teacher_graphdef': run.teacher.graphdef
  }


def _bf16_dots(lowered) -> int:
  """How many dots/convolutions of the lowered step (StableHLO, before XLA:CPU rewrites bf16
  into f32) take bfloat16 operands: 0 in float32, many under config.dtype='bfloat16' (the proof
  that mixed precision reached the matmuls)."""
  return sum(
      1 for line in lowered.as_text().splitlines()
      if ('stablehlo.dot_general' in line or 'stablehlo.convolution' in line) and 'bf16' in line)


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
    preset = f'/{self.extra["xla_options"]}' if 'xla_options' in self.extra else ''
    return f'{self.framework}{preset}/{self.extra.get("dtype", "float32")}'

  def row(self) -> dict:
    # times in round order too (`times_s` is sorted): pairs a contestant with another of the same
    # round, run seconds apart under the same load
    return _row(self.name, self.framework, self.size, self.batch, self.times, self.flops,
                self.loads, dict(self.extra, times_by_round_s=[round(t, 4) for t in self.times]))


def jax_contestants(size, batch, parts, xla_options='default', dtype='float32', allocator='auto',
                    attention='ours') -> list[Contestant]:
  """The trainer's step (and with `parts` its parts) for `size`; `allocator`: this worker
  process's host allocator policy, as main.py --allocator sets it for a run."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from tikd_jax.cpu import compiler  # pylint: disable=g-import-not-at-top
  compiler.set_allocator(allocator, xla_options)
  b = build_jax(size, batch, xla_options, dtype, attention)
  flops = step_flops(size, batch)
  options = _compiler_options(xla_options)
  t0 = time.perf_counter()
  lowered = b['step'].lower(b['state'], b['batch'], b['teacher_vars'])
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  holder = {'state': b['state']}

  def one():
    holder['state'], metrics = compiled(holder['state'], b['batch'], b['teacher_vars'])
    jax.block_until_ready((holder['state'], metrics))

  extra = {
      'xla_options':
          xla_options, 'dtype':
              dtype, 'device':
                  jax.devices()[0].device_kind, 'small_heaps':
                      compiled_with_small_heaps(b['step'], xla_options, b['state'], b['batch'],
                                                b['teacher_vars'])
  }
  out = [
      Contestant(
          'train_step', 'jax', size, batch, flops['step'], one,
          dict(extra, compile_s=round(compile_s, 2), xla_cost_gflop=round(
              (xla_flops(compiled) or float('nan')) / 1e9, 2), bf16_dots=_bf16_dots(lowered)))
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
def build_torch(size: str, batch: int, device: str = 'cpu', dtype: str = 'float32'):
  """The PyTorch twins on `device` ('cpu' or 'cuda'); dtype 'bfloat16' runs the forward passes
  under torch.autocast (parameters and optimizer float32, like our config.dtype)."""
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
  student, teacher = student.to(device), teacher.to(device)
  if device == 'cuda':  # float32 matmuls and convolutions in TF32, as JAX's default precision does
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
  opt = torch.optim.AdamW(student.parameters(), lr=5e-4, weight_decay=0.05)
  images, labels = _batch(batch)
  x = torch.from_numpy(images).to(device)
  y = torch.from_numpy(labels).long().to(device)

  def loss_fn(x, y):
    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
      images = x.permute(0, 3, 1, 2).float() / 255.0
      with torch.no_grad():
        teacher_labels = teacher(images).argmax(dim=1)
      out = student.forward_heads(images)
      base = F.cross_entropy(out['cls_logits'].float(), y, label_smoothing=0.1)
      distill = F.cross_entropy(out['dist_logits'].float(), teacher_labels)
      return 0.5 * base + 0.5 * distill

  return {
      'student': student, 'teacher': teacher, 'opt': opt, 'x': x, 'y': y, 'loss_fn': loss_fn,
      'images': x.permute(0, 3, 1, 2).float() / 255.0
  }


def _sync(device: str) -> None:
  if device == 'cuda':
    import torch  # pylint: disable=g-import-not-at-top
    torch.cuda.synchronize()


def _autocast_dtype(b: dict, device: str, dtype: str) -> str:
  """The dtype the student's logits come out in under this contestant's autocast setting."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
    logits = b['student'].forward_heads(b['images'][:2])['cls_logits']
  return str(logits.dtype).replace('torch.', '')


def torch_contestants(size, batch, parts, compiled: bool, device: str = 'cpu',
                      dtype: str = 'float32') -> list[Contestant] | dict:
  """PyTorch eager (or torch.compile) contestants; a `skipped` row when compiling fails."""
  import torch  # pylint: disable=g-import-not-at-top
  framework = 'torch_compile' if compiled else 'torch'
  b = build_torch(size, batch, device, dtype)
  flops = step_flops(size, batch)
  loss_fn = b['loss_fn']
  extra = {
      'torch_threads': torch.get_num_threads(), 'dtype': dtype,
      'device': torch.cuda.get_device_name() if device == 'cuda' else 'cpu',
      'compute_dtype': _autocast_dtype(b, device, dtype)
  }
  if compiled:
    loss_fn = torch.compile(loss_fn)
    t0 = time.perf_counter()
    try:
      loss_fn(b['x'], b['y']).backward()
      b['opt'].zero_grad(set_to_none=True)
      _sync(device)
    except Exception as e:  # pylint: disable=broad-except
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ''
      return {
          'name': 'train_step', 'framework': framework, 'size': size, 'batch': batch,
          'dtype': dtype, 'skipped': f'torch.compile failed here: {type(e).__name__}: {first}',
          'load': report.load_now(), 'versions': _versions()
      }
    extra['compile_s'] = round(time.perf_counter() - t0, 2)

  def one():
    b['opt'].zero_grad(set_to_none=True)
    loss_fn(b['x'], b['y']).backward()
    b['opt'].step()
    _sync(device)

  out = [Contestant('train_step', framework, size, batch, flops['step'], one, extra)]
  if parts and not compiled:
    images = b['images']
    autocast = functools.partial(torch.autocast, device, dtype=torch.bfloat16,
                                 enabled=dtype == 'bfloat16')

    def teacher_only():
      with torch.no_grad(), autocast():
        b['teacher'](images)
      _sync(device)

    def student_only():
      with autocast():
        o = b['student'].forward_heads(images)
        loss = o['cls_logits'].float().logsumexp(-1).mean() + o['dist_logits'].float().logsumexp(
            -1).mean()
      loss.backward()
      _sync(device)

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


def _framework_contestants(framework, size, batch, parts, presets, dtypes, device,
                           baseline_root) -> tuple[list[Contestant], list[dict]]:
  """(contestants, skipped rows) of one framework for every preset and dtype."""
  contestants, skipped = [], []
  if framework in ('jax', 'jax_baseline', 'jax_cudnn') or jax_host_devices(framework):
    make = jax_contestants
    if framework == 'jax_cudnn':  # our step with jax.nn.dot_product_attention as the core
      make = functools.partial(jax_contestants, attention='cudnn')
    if framework == 'jax_baseline':  # the other checkout's own benchmark of its own step
      sys.path.insert(0, os.path.abspath(baseline_root))
      make = _baseline_module(baseline_root).jax_contestants
    import tikd_jax  # pylint: disable=g-import-not-at-top
    code = os.path.dirname(os.path.dirname(os.path.abspath(tikd_jax.__file__)))
    for preset in presets:
      for dtype in dtypes:  # an older checkout's jax_contestants may take no dtype
        contestants += (make(size, batch, parts, preset) if dtype == 'float32' else make(
            size, batch, parts, preset, dtype))
    for c in contestants:
      c.framework = framework
      c.extra['code'] = code
    return contestants, skipped
  torch_device = 'cuda' if device == 'gpu' else 'cpu'
  threads = torch_threads(framework)
  if threads:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)
  for dtype in dtypes:
    made = torch_contestants(size, batch, parts, framework == 'torch_compile', torch_device, dtype)
    if isinstance(made, dict):
      skipped.append(made)
    else:
      contestants += made
  if threads:
    for c in contestants:
      c.framework = framework
  return contestants, skipped


def jax_host_devices(framework: str) -> int | None:
  """`jax_<n>d`: our step data-parallel over n XLA:CPU host devices, None otherwise."""
  match = re.fullmatch(r'jax_(\d+)d', framework)
  return int(match.group(1)) if match else None


def torch_threads(framework: str) -> int | None:
  """`torch_<n>t`: PyTorch eager with n threads (torch.set_num_threads), None otherwise. On a
  loaded machine OpenMP's barrier at 2 threads can stall on every small op; the 1-thread twin
  shows PyTorch at its best there."""
  match = re.fullmatch(r'torch_(\d+)t', framework)
  return int(match.group(1)) if match else None


def _worker(conn, framework, size, batch, parts, presets, dtypes, device, warmup,
            baseline_root=None):
  """One process per framework, so that one framework's idle thread pool (OpenMP or Eigen
  threads spinning after their last op) never competes with another's timed step."""
  devices = jax_host_devices(framework)
  if devices:  # before jax starts in this (spawned) process
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={devices}').strip()
  contestants, skipped = _framework_contestants(framework, size, batch, parts, presets, dtypes,
                                                device, baseline_root)
  for c in contestants:
    for _ in range(warmup):
      c.fn()
  conn.send(('ready', [c.label() + ':' + c.name for c in contestants], skipped))
  while True:
    msg = conn.recv()
    if msg[0] == 'step':
      conn.send(report.timed_call(contestants[msg[1]]))
    elif msg[0] == 'rows':
      conn.send([c.row() for c in contestants])
      return


def run_size(size, batch, frameworks, presets, parts, runs, warmup, emit, baseline_root=None,
             dtypes=('float32',), device='cpu') -> None:
  """Starts one worker per framework, then runs `runs` rounds of one step per contestant (order
  rotated every round) so that a change in the machine's load hits all contestants alike."""
  import multiprocessing as mp  # pylint: disable=g-import-not-at-top
  ctx = mp.get_context('spawn')
  workers = []
  for fw in frameworks:
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=_worker, daemon=True,
        args=(child, fw, size, batch, parts, presets, dtypes, device, warmup, baseline_root))
    proc.start()
    workers.append((fw, parent, proc))
  slots = []  # (worker index, contestant index, label)
  for w, (fw, conn, proc) in enumerate(workers):
    try:
      _, labels, skipped = conn.recv()  # one worker at a time reports ready
    except EOFError:  # the worker died (out of memory, a crash): say so, keep the others
      emit({
          'name': 'train_step', 'framework': fw, 'size': size, 'batch': batch,
          'skipped': f'worker exited with code {proc.join(5) or proc.exitcode}'
      })
      continue
    for row in skipped:
      emit(row)
    slots += [(w, i, label) for i, label in enumerate(labels)]
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


def measured_peak(device: str, emit) -> tuple[float, str]:
  """Runs benchmarks/peak.py in a child process (its thread pools never meet the workers'),
  emits its rows and returns (peak GFLOP/s, where it comes from): on CPU the jitted float32 jax
  dot, on a GPU the card's datasheet dense bfloat16 peak (so fraction_of_peak is MFU)."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'peak.py')
  out = subprocess.run([sys.executable, script, '--device', device], check=True,
                       capture_output=True, text=True)
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{')]
  for row in rows:
    emit(row)
  if device == 'cpu':
    jax_dot = next(r for r in rows if r['what'] == 'jax_dot')
    return jax_dot['gflops'], 'jax_dot_float32_measured'
  sheet = rows[0].get('datasheet_bf16_gflops')
  if sheet:
    return sheet, f'datasheet_bf16:{rows[0]["device"]}'
  best = max(r['gflops'] for r in rows if r['dtype'] == 'bfloat16')
  return best, 'bf16_matmul_measured'


# --------------------------------------------------------------------------- main
def main() -> None:
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
  parser.add_argument('--device', default='cpu', choices=('cpu', 'gpu'),
                      help='gpu: JAX on its default GPU backend and PyTorch on cuda')
  parser.add_argument('--dtypes', default='float32',
                      help='float32,bfloat16: our config.dtype; torch.autocast for PyTorch')
  parser.add_argument(
      '--xla_options', default='auto', help='one JAX contestant per preset: auto or one of '
      'tikd_jax/cpu/compiler.py PRESETS')
  parser.add_argument(
      '--baseline_root', default=None,
      help='another checkout of the repo (e.g. the commit before a change): adds '
      'its JAX step as framework jax_baseline, interleaved with the rest')
  parser.add_argument('--parts', action='store_true',
                      help='also time the teacher forward and the student fwd/bwd alone')
  parser.add_argument(
      '--peak', default=str(PEAK_GFLOPS), help='GFLOP/s that fraction_of_peak divides by, or '
      '"measure" (benchmarks/peak.py in this run: jax float32 dot on CPU, datasheet bf16 on GPU)')
  parser.add_argument('--deadline_s', type=float, default=None,
                      help='start no new size after this many seconds (a `skipped` row instead)')
  parser.add_argument('--tag', default=None,
                      help='a label for every row (the sweep point of benchmarks/device_check.sh)')
  parser.add_argument('--out', default=None, help='also append the JSON lines to this file')
  args = parser.parse_args()
  start = time.perf_counter()
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
  unknown = {f for f in frameworks if not torch_threads(f) and not jax_host_devices(f)
            } - {'jax', 'jax_baseline', 'jax_cudnn', 'torch', 'torch_compile'}
  if unknown:
    parser.error(f'unknown frameworks {sorted(unknown)}; use jax, jax_<n>d, jax_cudnn, torch, '
                 'torch_<n>t, torch_compile')
  dtypes = tuple(d for d in args.dtypes.split(',') if d)
  if set(dtypes) - {'float32', 'bfloat16'}:
    parser.error(f'--dtypes {args.dtypes!r}: use float32 and/or bfloat16')
  presets = [p for p in args.xla_options.split(',') if p]
  from tikd_jax.cpu.compiler import PRESETS  # pylint: disable=g-import-not-at-top
  unknown = set(presets) - set(PRESETS) - {'auto'}
  if unknown:
    parser.error(f'unknown --xla_options {sorted(unknown)}; use auto or one of {sorted(PRESETS)}')
  with report.JsonLines(args.out) as write:
    if args.peak == 'measure':
      peak, source = measured_peak(args.device, write)
    else:
      peak, source = float(args.peak), 'given'
    tag = {'tag': args.tag} if args.tag else {}
    emit = lambda row: write(with_peak(dict(row, **tag), peak, source))  # noqa: E731
    for size in sizes:
      if args.deadline_s is not None and time.perf_counter() - start > args.deadline_s:
        emit({
            'name': 'train_step', 'size': size, 'batch': batch,
            'skipped': f'--deadline_s {args.deadline_s:g} passed before this size started'
        })
        continue
      runs = args.large_runs if size == 'large' else base_runs
      run_size(size, batch, frameworks, presets, args.parts, runs, args.warmup, emit,
               args.baseline_root, dtypes, args.device)


if __name__ == '__main__':
  main()
