"""`jax.nn.dot_product_attention` (cuDNN's fused attention on GPU) as the ViT's attention core,
swapped into a built model per `Attention` instance, as tikd_jax/cpu/layers.py swaps the CPU's.

A benchmark option for now (benchmarks/train_step.py `--frameworks jax_cudnn`): if the device
check shows it ahead, it moves to a backend package beside tikd_jax/cpu/. It returns no attention
maps (the fused kernel never forms them), so it serves runs whose losses read no maps.
"""
from __future__ import annotations

import dataclasses

import jax


def cudnn_core(q: jax.Array, k: jax.Array, v: jax.Array, scale: float):
  """(out [B, N, H, d], None) from token-major q, k, v [B, N, H, d], as `vit.attention_core`."""
  implementation = 'cudnn' if jax.default_backend() == 'gpu' else None
  out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
  return out, None


def swap_attention(model, core=cudnn_core):
  """`model` with every `vit.Attention.core` set to `core` (in place; returned)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from tikd_jax.models import vit  # pylint: disable=g-import-not-at-top
  for _, node in nnx.iter_graph(model):
    if isinstance(node, vit.Attention):
      node.core = core
  return model


def with_cudnn_attention(run):
  """`run` (train/run.py `Run`) whose student's graph has the cuDNN attention core."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  abstract = nnx.eval_shape(lambda: swap_attention(run.student.build(run.spec.seed)))
  graphdef, _, _ = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  return dataclasses.replace(run, student=dataclasses.replace(run.student, graphdef=graphdef))
