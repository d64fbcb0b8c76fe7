r"""The student's attention core on XLA:CPU, written several ways, beside PyTorch eager.

  python benchmarks/attention_core.py [--sizes small,medium] [--batch 128] [--runs 9]
      [--out benchmarks/results/attention_core.jsonl]

One contestant = forward + backward of softmax(q·kᵀ/√d)·v for one block (q, k, v [B, H, 66, d]:
the 64 patches + cls + dist tokens of a 32-px patch-4 DistilledViT), the gradient of ⟨out, g⟩
with respect to q, k and v:

  model         the formula of tikd_jax/models/vit.py's Attention (scores scaled after q·kᵀ)
  kernel        the C++ attention kernel, tikd_jax/cpu/layers.py's `attention` (one call forward,
                one backward):
                the model under config.cpu_fast_layers. It takes token-major q, k, v (the qkv
                projection's layout), so here it also pays three transposes in and one out
  scale_q       q scaled first (timm's order): no elementwise pass over the [B, H, N, N] scores
  keys_major    scores laid out [B, H, k, q], softmax over axis -2 (XLA:CPU reduces the minor
                axis through a reduce-window; a reduction over a major axis is a plain loop)
  chunked       lax.map over 8 chunks of the batch, so every [b, H, N, N] tensor stays in cache
  split         the batch in 8 independent slices (no loop): XLA:CPU's thunk executor may run
                independent products on both cores at once
  block_diag    one product per image for all heads (block-diagonal kᵀ and v): B instead of B·H
                matmuls, H× the multiplies
  all_nn        a custom VJP in which every product is [m, k]·[k, n], the operands transposed in
                memory (XLA folds a plain transpose back into the dot)
  model@<opts>  `model` under XLA:CPU library options (YNNPACK / XNNPACK / oneDNN dots)
  torch         PyTorch eager (autograd), the same math, torch's default thread count

Every JAX contestant is checked against `model` (forward and the three gradients, 1e-5 of their
scale). `--what matmul` times one batched product [B·H, 66, 66]·[66, d] alone (XLA vs torch.bmm):
XLA:CPU runs a batched dot as one small Eigen product per batch element, and at B·H = 1,024
products of ~0.1–0.3 MFLOP the per-product cost, not the arithmetic, sets the time.
Contestants run interleaved (order rotated every round) in this one process; one JSON line each.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report  # noqa: E402  pylint: disable=g-import-not-at-top

TOKENS = 66  # (32 / 4)² patches + cls + dist
SIZES = {'small': (8, 16), 'medium': (8, 32), 'large': (8, 64)}  # (heads, head_dim), vit.SIZES
CHUNKS = 8
NO_YNN = {'xla_cpu_experimental_ynn_fusion_type': ''}  # what xla_options 'auto' picks on CPU
OPTIONS = {
    'ynn_dot': {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'},
    'xnn_dot':
        dict(NO_YNN, xla_cpu_experimental_xnn_fusion_type='LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'),
    'onednn_dot':
        dict(NO_YNN, xla_cpu_experimental_onednn_fusion_type='LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'),
}
TOLERANCE = 1e-5


def cores() -> dict:
  """name → f(q, k, v) for every JAX way of writing the attention core."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top

  batch_dims = ((0, 1), (0, 1))

  def model(q, k, v):
    scores = jnp.matmul(q, jnp.swapaxes(k, -1, -2)) * (q.shape[-1]**-0.5)
    return jnp.matmul(jax.nn.softmax(scores, axis=-1), v)

  def kernel(q, k, v):  # the model under config.cpu_fast_layers
    from tikd_jax.cpu import kernels, layers  # pylint: disable=g-import-not-at-top
    from tikd_jax.models import vit  # pylint: disable=g-import-not-at-top
    # as `layers.substitute` chooses: the kernel where it is available, else the plain formula
    attention = layers.attention if kernels.ATTENTION.available() else vit.attention_core
    tokens_major = [jnp.swapaxes(x, 1, 2) for x in (q, k, v)]
    return jnp.swapaxes(attention(*tokens_major, q.shape[-1]**-0.5)[0], 1, 2)

  def scale_q(q, k, v):
    scores = jnp.matmul(q * q.shape[-1]**-0.5, jnp.swapaxes(k, -1, -2))
    return jnp.matmul(jax.nn.softmax(scores, axis=-1), v)

  def keys_major(q, k, v):
    scores_t = lax.dot_general(k, q * q.shape[-1]**-0.5, (((3,), (3,)), batch_dims))
    probs_t = jax.nn.softmax(scores_t, axis=-2)  # [B, H, k, q]
    return lax.dot_general(probs_t, v, (((2,), (2,)), batch_dims))

  def chunked(q, k, v):
    split = lambda t: t.reshape(CHUNKS, t.shape[0] // CHUNKS, *t.shape[1:])  # noqa: E731
    return lax.map(lambda a: model(*a), (split(q), split(k), split(v))).reshape(q.shape)

  def split(q, k, v):
    return jnp.concatenate(
        [model(*parts) for parts in zip(*(jnp.split(t, CHUNKS) for t in (q, k, v)))])

  def block_diag(q, k, v):
    b, h, n, d = q.shape
    eye = jnp.eye(h, dtype=q.dtype)
    q_rows = (q * d**-0.5).transpose(0, 2, 1, 3).reshape(b, n, h * d)
    k_blocks = jnp.einsum('bhkd,hg->bhdgk', k, eye).reshape(b, h * d, h * n)
    scores = jnp.matmul(q_rows, k_blocks).reshape(b, n, h, n)
    probs = jax.nn.softmax(scores, axis=-1).reshape(b, n, h * n)
    v_blocks = jnp.einsum('bhkd,hg->bhkgd', v, eye).reshape(b, h * n, h * d)
    return jnp.matmul(probs, v_blocks).reshape(b, n, h, d).transpose(0, 2, 1, 3)

  def mm(a, b):  # [.., m, k]·[.., k, n]
    return lax.dot_general(a, b, (((3,), (2,)), batch_dims))

  def transposed(x):
    return lax.optimization_barrier(jnp.swapaxes(x, -1, -2))

  @jax.custom_vjp
  def all_nn(q, k, v):
    return mm(jax.nn.softmax(mm(q * q.shape[-1]**-0.5, transposed(k)), axis=-1), v)

  def all_nn_fwd(q, k, v):
    qs = q * q.shape[-1]**-0.5
    probs = jax.nn.softmax(mm(qs, transposed(k)), axis=-1)
    return mm(probs, v), (qs, k, v, probs)

  def all_nn_bwd(res, d_out):
    qs, k, v, probs = res
    d_probs = mm(d_out, transposed(v))
    d_scores = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True))
    scale = qs.shape[-1]**-0.5
    return (mm(d_scores, k) * scale, transposed(mm(transposed(qs), d_scores)),
            transposed(mm(transposed(d_out), probs)))

  all_nn.defvjp(all_nn_fwd, all_nn_bwd)
  return {
      'model': model, 'kernel': kernel, 'scale_q': scale_q, 'keys_major': keys_major,
      'chunked': chunked, 'split': split, 'block_diag': block_diag, 'all_nn': all_nn
  }


def _inputs(batch, heads, head_dim, seed=0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((batch, heads, TOKENS, head_dim)).astype('float32') for _ in range(4)]


def jax_contestants(batch, heads, head_dim) -> tuple[dict, dict]:
  """(name → timed callable, name → max error against `model` relative to each output's scale)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  q, k, v, g = (jnp.asarray(a) for a in _inputs(batch, heads, head_dim))
  ways = dict(cores())
  ways.update({f'model@{name}': (ways['model'], options) for name, options in OPTIONS.items()})
  fns, errors, reference = {}, {}, None
  for name, way in ways.items():
    core, options = way if isinstance(way, tuple) else (way, NO_YNN)

    def forward_backward(q, k, v, g, core=core):
      out, vjp = jax.vjp(core, q, k, v)
      return (out,) + vjp(g)

    compiled = jax.jit(forward_backward, compiler_options=options).lower(q, k, v, g).compile()
    outputs = compiled(q, k, v, g)
    reference = reference or outputs
    errors[name] = max(
        float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(outputs, reference))
    fns[name] = lambda c=compiled: jax.block_until_ready(c(q, k, v, g))
  return fns, errors


def torch_contestant(batch, heads, head_dim):
  import torch  # pylint: disable=g-import-not-at-top
  q, k, v, g = (torch.from_numpy(a) for a in _inputs(batch, heads, head_dim))
  for t in (q, k, v):
    t.requires_grad_(True)

  def step():
    probs = ((q @ k.transpose(-1, -2)) * head_dim**-0.5).softmax(-1)
    torch.autograd.grad((probs @ v), (q, k, v), g)

  return step


def matmul_contestants(batch, heads, head_dim) -> dict:
  """One batched product [B·H, N, N]·[N, d], XLA vs torch.bmm."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a = rng.standard_normal((batch * heads, TOKENS, TOKENS)).astype('float32')
  b = rng.standard_normal((batch * heads, TOKENS, head_dim)).astype('float32')
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  product = jax.jit(jnp.matmul, compiler_options=NO_YNN).lower(ja, jb).compile()
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  return {
      'xla_batched_dot': lambda: jax.block_until_ready(product(ja, jb)),
      'torch_bmm': lambda: torch.bmm(ta, tb)
  }


def run(size, batch, runs, what, emit) -> None:
  heads, head_dim = SIZES[size]
  if what == 'core':
    fns, errors = jax_contestants(batch, heads, head_dim)
    fns['torch'] = torch_contestant(batch, heads, head_dim)
    # forward 2 products, backward 4, of B·H·N·N·d multiply-adds each
    flops = 6 * 2 * batch * heads * TOKENS * TOKENS * head_dim
  else:
    fns, errors = matmul_contestants(batch, heads, head_dim), {}
    flops = 2 * batch * heads * TOKENS * TOKENS * head_dim
  for fn in fns.values():
    fn()  # warm-up
  for name, (t, loads) in report.interleave(fns, runs).items():
    median = statistics.median(t)
    row = {
        'name': f'attention_{what}', 'way': name, 'size': size, 'batch': batch, 'heads': heads,
        'head_dim': head_dim, 'tokens': TOKENS, 'runs': runs, 'median_ms': round(median * 1e3, 2),
        'p10_ms': round(report.quantile(t, 0.1) * 1e3,
                        2), 'p90_ms': round(report.quantile(t, 0.9) * 1e3, 2),
        'gflop_per_s': round(flops / median / 1e9, 1), 'load_1m': report.load_summary(loads)
    }
    if name in errors:
      row['max_rel_error_vs_model'] = float(f'{errors[name]:.2e}')
      if errors[name] > TOLERANCE:
        raise AssertionError(f'{name} differs from the model formula by {errors[name]:.1e}')
    emit(row)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--sizes', default='small,medium')
  parser.add_argument('--what', default='core,matmul')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--runs', type=int, default=9)
  parser.add_argument('--out', default=None)
  args = parser.parse_args(argv)
  if args.batch % CHUNKS:
    parser.error(f'--batch must be a multiple of {CHUNKS} (the chunked contestant)')
  with report.JsonLines(args.out) as emit:
    for size in args.sizes.split(','):
      for what in args.what.split(','):
        run(size, args.batch, args.runs, what, emit)


if __name__ == '__main__':
  main()
