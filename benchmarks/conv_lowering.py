r"""How the ResNet32x4 teacher's convolutions could lower on XLA:CPU, timed side by side.

  python benchmarks/conv_lowering.py [--what layers,options,teacher] [--runs 9] [--batch 128]
      [--layers "32x32 64->64 s1,..."] [--contestants winograd_f2x2,winograd_f4x4]
      [--out benchmarks/results/conv_lowering.jsonl]

layers   every 3×3 conv shape of ResNet32x4 at 32 px (+ bias + ReLU, as the folded teacher runs
         them) as: `xla_conv` (lax.conv_general_dilated, NHWC: what the model uses), `xla_conv_nchw`
         (the same in NCHW), `im2col` (the 9 shifted views concatenated, one [B·H·W, 9C]·[9C, O]
         dot), `im2col_rows` (3 dots of K = 3C, one per kernel row), `shifted_dots` (9 dots of
         K = C accumulated), `winograd_f2x2` (Winograd F(2×2, 3×3), stride 1), `winograd_f4x4`
         (Winograd F(4×4, 3×3), stride 1, H and W divisible by 4), `winograd_kernel` (F(2×2, 3×3)
         as the C++ kernel, tikd_jax/cpu/layers.py's `conv3x3`, what `cpu_fast_layers` runs);
         each checked against xla_conv (F(4×4) to WINOGRAD_F4X4_TOLERANCE). `--layers` and
         `--contestants` pick a subset.
options  one 32×32 64→64 conv under XLA:CPU option sets (YNNPACK, oneDNN, XNNPACK switches this
         jaxlib knows), with whether the compiled program still holds XLA's own convolution.
teacher  the whole eval-mode forward: `plain` (the Flax model: conv → BatchNorm), `fast_layers`
         (the same model built with fast_layers=True: its 3×3 stride-1 convs as `winograd_kernel`,
         what the trainer runs on CPU), `folded`
         (`folded_forward`: every BatchNorm folded into its conv, conv + bias + ReLU),
         `folded_im2col` (folded, every conv as `im2col`) and `folded_winograd_8x8` (folded, the
         8×8 stride-1 convs as `winograd_f4x4`); logits checked against plain.

Contestants of one group run interleaved (order rotated each round) in this one process; one
JSON line each: median / p10 / p90 / min seconds, GFLOP/s of the median, the 1-minute load.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report  # noqa: E402  pylint: disable=g-import-not-at-top

NO_YNN = {'xla_cpu_experimental_ynn_fusion_type': ''}
OPTION_SETS = {
    'no_ynn (auto)':
        NO_YNN,
    'default (ynn)': {},
    'ynn_conv_only': {
        'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'
    },
    'onednn':
        dict(NO_YNN, xla_cpu_use_onednn=True),
    'onednn_custom_call':
        dict(NO_YNN, xla_cpu_use_onednn=True, xla_cpu_experimental_onednn_custom_call=True),
    'onednn_fusion_conv':
        dict(NO_YNN,
             xla_cpu_experimental_onednn_fusion_type='LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'),
    'xnn_fusion_conv':
        dict(NO_YNN,
             xla_cpu_experimental_xnn_fusion_type='LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'),
}
# (spatial size, in, out, stride) of ResNet32x4's 3×3 convs at 32 px
LAYERS = ((32, 3, 32, 1), (32, 32, 64, 1), (32, 64, 64, 1), (32, 64, 128, 2), (16, 128, 128, 1),
          (16, 128, 256, 2), (8, 256, 256, 1))

# Winograd F(4×4, 3×3) (Lavin & Gray 2016; wincnn with interpolation points 0, ±1, ±2, ∞):
# y = Aᵀ·[(G·g·Gᵀ) ⊙ (Bᵀ·d·B)]·A for a 6×6 input tile d and a 3×3 kernel g, 4×4 outputs.
# yapf: disable
WINOGRAD_F4X4_BT = ((4,  0, -5,  0, 1, 0),
                    (0, -4, -4,  1, 1, 0),
                    (0,  4, -4, -1, 1, 0),
                    (0, -2, -1,  2, 1, 0),
                    (0,  2, -1, -2, 1, 0),
                    (0,  4,  0, -5, 0, 1))
WINOGRAD_F4X4_G = (( 1 / 4,       0,     0),
                   (-1 / 6,  -1 / 6, -1 / 6),
                   (-1 / 6,   1 / 6, -1 / 6),
                   (1 / 24,  1 / 12,  1 / 6),
                   (1 / 24, -1 / 12,  1 / 6),
                   (     0,       0,     1))
WINOGRAD_F4X4_AT = ((1, 1,  1, 1,  1, 0),
                    (0, 1, -1, 2, -2, 0),
                    (0, 1,  1, 4,  4, 0),
                    (0, 1, -1, 8, -8, 1))
# yapf: enable
# The largest |winograd_f4x4 − xla_conv| / max|xla_conv| bench_layers accepts. F(4×4)'s transforms
# have entries up to 8 and 1/24, so its float32 error is ~10× direct conv's: on the stride-1 layers
# (He-initialised kernels, unit-variance inputs, batch 128, two seeds) it measured at most 4e-6
# (32²×3), 6e-6 (32²×32), 1e-5 (32²×64), 1.2e-5 (16²×128), 1.9e-5 (8²×256), against 1e-6 for
# F(2×2); 4e-5 is twice the largest.
WINOGRAD_F4X4_TOLERANCE = 4e-5


def _combine(matrix, xs):
  """[Σ_i matrix[a][i]·xs[i] for each row a] as adds and scalings (zero terms skipped): XLA:CPU
  fuses these into elementwise loops, where a dot over a 6-long axis would need transposes."""
  out = []
  for row in matrix:
    terms = [x if c == 1 else -x if c == -1 else x * c for c, x in zip(row, xs) if c != 0]
    out.append(functools.reduce(lambda a, b: a + b, terms))
  return out


def _views(x, stride):
  """The 9 shifted (strided) views of x padded by 1: view (i, j)[h, w] = xp[s·h + i, s·w + j]."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1] // stride, x.shape[2] // stride
  return [[
      xp[:, i:i + stride * (h - 1) + 1:stride, j:j + stride * (w - 1) + 1:stride, :]
      for j in range(3)
  ]
          for i in range(3)]


def lowerings():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top

  from tikd_jax.cpu import kernels, layers  # pylint: disable=g-import-not-at-top

  def xla_conv(x, k, b, s):
    p = (k.shape[0] - 1) // 2
    dims = ('NHWC', 'HWIO', 'NHWC')
    return lax.conv_general_dilated(x, k, (s, s), ((p, p), (p, p)), dimension_numbers=dims) + b

  def xla_conv_nchw(x, k, b, s):  # x in NCHW
    dims = ('NCHW', 'HWIO', 'NCHW')
    y = lax.conv_general_dilated(x, k, (s, s), ((1, 1), (1, 1)), dimension_numbers=dims)
    return y + b[:, None, None]

  def im2col(x, k, b, s):
    if k.shape[0] == 1:
      return jnp.dot(x[:, ::s, ::s], k[0, 0]) + b
    cols = jnp.concatenate([v for row in _views(x, s) for v in row], axis=-1)
    return jnp.dot(cols, k.reshape(-1, k.shape[-1])) + b

  def im2col_rows(x, k, b, s):
    views = _views(x, s)
    return b + sum(
        jnp.dot(jnp.concatenate(views[i], -1), k[i].reshape(-1, k.shape[-1])) for i in range(3))

  def shifted_dots(x, k, b, s):
    views = _views(x, s)
    return b + sum(jnp.dot(views[i][j], k[i, j]) for i in range(3) for j in range(3))

  def winograd_f2x2(x, k, b, s):
    """Winograd F(2×2, 3×3) (Lavin & Gray 2016): 4×4 input tiles at stride 2, Bᵀ·d·B, 16
    batched [tiles, C]·[C, O] dots with G·g·Gᵀ, Aᵀ·m·A; 2.25× fewer multiplies. Stride 1 only."""
    assert s == 1 and k.shape[:2] == (3, 3)
    n, h, w, c = x.shape
    th, tw = h // 2, w // 2
    bt = lambda d0, d1, d2, d3: (d0 - d2, d1 + d2, d2 - d1, d1 - d3)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = bt(*[xp[:, i:i + 2 * th:2] for i in range(4)])
    tiles = [t for r in rows for t in bt(*[r[:, :, j:j + 2 * tw:2] for j in range(4)])]
    v = jnp.stack(tiles).reshape(16, n * th * tw, c)
    g = jnp.asarray([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], k.dtype)
    u = jnp.einsum('ai,ijco,bj->abco', g, k, g).reshape(16, c, -1)
    m = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,)))).reshape(4, 4, n, th, tw, -1)
    at = lambda m0, m1, m2, m3: (m0 + m1 + m2, m1 - m2 - m3)
    r0, r1 = at(*m)
    y = [at(*r) for r in (r0, r1)]  # y[a][c]: output pixel (2i + a, 2j + c)
    y = jnp.stack([jnp.stack(y[0], -2), jnp.stack(y[1], -2)], 2)  # [n, th, 2, tw, 2, O]
    return y.reshape(n, h, w, -1) + b

  def winograd_f4x4(x, k, b, s):
    """Winograd F(4×4, 3×3): 6×6 input tiles at stride 4 (with H, W divisible by 4, padding by 1
    on every side covers the last tile), 36 [tiles, C]·[C, O] dots with G·g·Gᵀ, then Aᵀ·m·A; 4×
    fewer multiplies than direct, transforms over 2.25× the activations. Stride 1 only.

    Written as 36 separate dots, each fed by its own Bᵀ·d·B fusion (Bᵀ along rows on the 6
    stride-4 row slices, then along columns on 6 stride-4 column slices), and Aᵀ·m·A as adds on
    the 36 products. In scratch runs on XLA:CPU (2 shared cores, load ~2, batch 128, 32²×64,
    medians of 5, interleaved) this beat stacking the 36 transformed tiles for one batched dot (a
    36-way concatenate: 174 vs 131 ms), gathering the tiles then transforming with einsums (419
    vs 262 ms for the stacked form), Aᵀ·m·A as one [16, 36]·[36, tiles·O] dot plus a transpose
    (145 ms), splitting x into its 16 stride-4 phases first (no faster), and lax.map over batch
    chunks (slower on every layer)."""
    assert s == 1 and k.shape[:2] == (3, 3), (s, k.shape)
    n, h, w, c = x.shape
    assert h % 4 == 0 and w % 4 == 0, f'winograd_f4x4 needs H and W divisible by 4, got {h}×{w}'
    th, tw = h // 4, w // 4
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # tile (i, j) reads xp[4i:4i+6, 4j:4j+6]
    rows = _combine(WINOGRAD_F4X4_BT, [xp[:, i:i + 4 * th:4] for i in range(6)])
    g = jnp.asarray(WINOGRAD_F4X4_G, k.dtype)
    u = jnp.einsum('ai,ijco,bj->abco', g, k, g)
    m = [[None] * 6 for _ in range(6)]
    for a, r in enumerate(rows):
      tiles = _combine(WINOGRAD_F4X4_BT, [r[:, :, j:j + 4 * tw:4] for j in range(6)])
      for bb, v in enumerate(tiles):
        m[a][bb] = jnp.dot(v.reshape(n * th * tw, c), u[a, bb]).reshape(n, th, tw, -1)
    cols = [_combine(WINOGRAD_F4X4_AT, [m[a][bb] for a in range(6)]) for bb in range(6)]
    y = [_combine(WINOGRAD_F4X4_AT, [cols[bb][i] for bb in range(6)]) for i in range(4)]
    y = jnp.stack([jnp.stack(row, -2) for row in y], 2)  # [n, th, 4, tw, 4, O]
    return y.reshape(n, h, w, -1) + b

  def winograd_kernel(x, k, b, s):
    assert s == 1 and layers.conv3x3_supported(x, k), 'a shape the kernel leaves to xla_conv'
    # as `layers.substitute` chooses: the kernel where it is available, else XLA's convolution
    conv = layers.conv3x3 if kernels.WINOGRAD.available() else layers.conv3x3_plain
    return conv(x, k) + b

  return {
      'xla_conv': xla_conv, 'xla_conv_nchw': xla_conv_nchw, 'im2col': im2col,
      'im2col_rows': im2col_rows, 'shifted_dots': shifted_dots, 'winograd_f2x2': winograd_f2x2,
      'winograd_f4x4': winograd_f4x4, 'winograd_kernel': winograd_kernel
  }


def rows_of(group, results, flops, extra_of=lambda name: {}):
  import statistics  # pylint: disable=g-import-not-at-top
  for name, (times, loads) in results.items():
    med = statistics.median(times)
    yield {
        'name': 'conv_lowering', 'group': group, 'contestant': name, 'median_s': round(med, 5),
        'p10_s': round(report.quantile(sorted(times), 0.1),
                       5), 'p90_s': round(report.quantile(sorted(times), 0.9),
                                          5), 'min_s': round(min(times), 5), 'runs': len(times),
        'gflops': round(flops / med / 1e9,
                        1), 'load_1min': report.load_summary(loads), **extra_of(name)
    }


def bench_layers(batch, runs, emit, only=None, contestants=None):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from tikd_jax.cpu import layers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for hw, cin, cout, s in LAYERS:
    group = f'{hw}x{hw} {cin}->{cout} s{s}'
    if only and group not in only:
      continue
    x = jnp.asarray(rng.normal(size=(batch, hw, hw, cin)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, cin, cout)) * 0.05, jnp.float32)
    b = jnp.asarray(rng.normal(size=(cout,)), jnp.float32)
    fns, reference = {}, None
    for name, f in lowerings().items():
      if (name.startswith('winograd') and s != 1
          or name == 'winograd_kernel' and not layers.conv3x3_supported(x, k)  # the 3-channel stem
          or contestants and name != 'xla_conv' and name not in contestants):
        continue
      xx = jnp.transpose(x, (0, 3, 1, 2)) if name.endswith('nchw') else x
      g = jax.jit(lambda x, k, b, f=f, s=s: jax.nn.relu(f(x, k, b, s)), compiler_options=NO_YNN)
      c = g.lower(xx, k, b).compile()
      y = c(xx, k, b).block_until_ready()
      y = jnp.transpose(y, (0, 2, 3, 1)) if name.endswith('nchw') else y
      reference = y if reference is None else reference
      error = float(jnp.max(jnp.abs(y - reference)) / jnp.max(jnp.abs(reference)))
      tolerance = WINOGRAD_F4X4_TOLERANCE if name == 'winograd_f4x4' else 1e-4
      assert error < tolerance, f'{name}: differs from xla_conv by {error:.1e} (relative)'
      fns[name] = functools.partial(lambda c, xx: c(xx, k, b).block_until_ready(), c, xx)
    flops = 2 * 9 * cin * cout * batch * (hw // s)**2
    for row in rows_of(group, report.interleave(fns, runs), flops):
      emit(row)


def bench_options(batch, runs, emit):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, 32, 32, 64)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 64, 64)) * 0.05, jnp.float32)
  b = jnp.asarray(rng.normal(size=(64,)), jnp.float32)
  conv = lowerings()['xla_conv']
  fns, extra = {}, {}
  for name, options in OPTION_SETS.items():
    try:
      c = jax.jit(lambda x, k, b: jax.nn.relu(conv(x, k, b, 1)),
                  compiler_options=options).lower(x, k, b).compile()
    except Exception as e:  # pylint: disable=broad-except
      emit({
          'name': 'conv_lowering', 'group': 'options', 'contestant': name,
          'skipped': f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
      })
      continue
    text = c.as_text()
    extra[name] = {
        'options': options, 'xla_convolution_kept': ' convolution(' in text,
        'custom_fusions': text.count('kind=kCustom')
    }
    c(x, k, b).block_until_ready()
    fns[name] = functools.partial(lambda c: c(x, k, b).block_until_ready(), c)
  flops = 2 * 9 * 64 * 64 * batch * 32 * 32
  for row in rows_of('options: 32x32 64->64 s1', report.interleave(fns, runs), flops, extra.get):
    emit(row)


def folded_forward(model, images, conv):
  """ResNet32x4's eval-mode logits with every BatchNorm folded into the conv before it (kernel ·
  s, bias − mean · s, s = scale/√(var + ε)), each conv run by `conv(x, kernel, bias, stride)`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def conv_bn(c, bn, x):
    s = bn.scale[...] * jax.lax.rsqrt(bn.var[...] + bn.epsilon)
    stride = c.strides if isinstance(c.strides, int) else c.strides[0]
    return conv(x, c.kernel[...] * s, bn.bias[...] - bn.mean[...] * s, stride)

  x = (images - jnp.asarray(model.mean)) / jnp.asarray(model.std)
  x = jax.nn.relu(conv_bn(model.conv1, model.bn1, x))
  for stage in (model.layer1, model.layer2, model.layer3):
    for block in stage:
      y = jax.nn.relu(conv_bn(block.conv1, block.bn1, x))
      y = conv_bn(block.conv2, block.bn2, y)
      if block.downsample_conv is not None:
        x = conv_bn(block.downsample_conv, block.downsample_bn, x)
      x = jax.nn.relu(y + x)
  return model.fc(jnp.mean(x, axis=(1, 2)))


def winograd_f4x4_on_8x8(x, k, b, s):
  """The hybrid: `winograd_f4x4` on the stride-1 3×3 convs at 8×8 (256→256, the one layer shape
  where it beat xla_conv in bench_layers), xla_conv on every other."""
  lowered = lowerings()
  use_winograd = s == 1 and k.shape[:2] == (3, 3) and x.shape[1:3] == (8, 8)
  return lowered['winograd_f4x4' if use_winograd else 'xla_conv'](x, k, b, s)


def bench_teacher(batch, runs, emit):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from benchmarks.train_step import resnet_forward_flops  # pylint: disable=g-import-not-at-top
  from tikd_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from tikd_jax.models.variables import model_variables  # pylint: disable=g-import-not-at-top

  images = jnp.asarray(np.random.default_rng(0).random((batch, 32, 32, 3)), jnp.float32)
  model = build_model('resnet32x4', rngs=nnx.Rngs(1), num_classes=100)
  variables, graphdef = model_variables(model), nnx.graphdef(model)
  # the same weights (same seed), its 3×3 stride-1 convs through the Winograd kernel
  fast = nnx.graphdef(build_model('resnet32x4', rngs=nnx.Rngs(1), num_classes=100,
                                  fast_layers=True))
  plain = lambda m, x: m(x, train=False)[0]  # noqa: E731
  ways = {
      'plain': (graphdef, plain),
      'fast_layers': (fast, plain),
      'folded': (graphdef, lambda m, x: folded_forward(m, x,
                                                       lowerings()['xla_conv'])),
      'folded_im2col': (graphdef, lambda m, x: folded_forward(m, x,
                                                              lowerings()['im2col'])),
      'folded_winograd_8x8': (graphdef, lambda m, x: folded_forward(m, x, winograd_f4x4_on_8x8)),
  }
  fns, reference = {}, None
  for name, (graph, way) in ways.items():

    def forward(v, x, graph=graph, way=way):
      return way(nnx.merge(graph, v['params'], v['batch_stats']), x)

    c = jax.jit(forward, compiler_options=NO_YNN).lower(variables, images).compile()
    logits = c(variables, images).block_until_ready()
    reference = logits if reference is None else reference
    error = float(jnp.max(jnp.abs(logits - reference)) / jnp.max(jnp.abs(reference)))
    assert error < 1e-4, f'{name}: logits differ from the plain forward by {error:.1e} (relative)'
    fns[name] = functools.partial(lambda c, v: c(v, images).block_until_ready(), c, variables)
  flops = resnet_forward_flops('resnet32x4') * batch
  for row in rows_of('teacher_forward resnet32x4', report.interleave(fns, runs), flops):
    emit(row)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--what', default='layers,options,teacher')
  parser.add_argument('--runs', type=int, default=9)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--layers', default=None,
                      help='only these layer groups, e.g. "32x32 64->64 s1" (comma-separated)')
  parser.add_argument(
      '--contestants', default=None,
      help='layers: only these lowerings besides xla_conv (the reference), e.g. '
      '"winograd_f2x2,winograd_f4x4" (comma-separated)')
  parser.add_argument('--out', default=None)
  args = parser.parse_args()
  benches = {'layers': bench_layers, 'options': bench_options, 'teacher': bench_teacher}
  with report.JsonLines(args.out) as write:
    for what in args.what.split(','):
      emit = lambda row: write(dict(row, batch=args.batch))  # noqa: E731
      if what == 'layers':
        bench_layers(args.batch, args.runs, emit, args.layers and args.layers.split(','),
                     args.contestants and args.contestants.split(','))
      else:
        benches[what](args.batch, args.runs, emit)


if __name__ == '__main__':
  main()
