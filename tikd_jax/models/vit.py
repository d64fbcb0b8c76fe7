"""Vision transformers with a distillation token (DeiT), the TIKD fusion and the IRKD variant.

One class, `DistilledViT`, covers three published layouts:
  * DeiT / TIKD students: tokens [cls, dist, patches], learned pos_embed over all of them, final
    LayerNorm, eval averages the two heads (DeiT; TIKD's released vision_transformer.py).
  * a plain ViT (`distilled=False`): [cls, patches], one head.
  * IRKD's `ViTWithDistillation` (`dist_pos_embed=False, final_norm=False, eval_head='cls'`): the
    dist token is zero-initialised and has no position embedding (IRKD's notebooks).
The TIKD text fusion (TIKD's released vision_transformer.py; README "TIKD") is enabled by
`text_dim`; see `_text_fusion`. `text_proj_layout` picks where its value projection lives:
  * 'shared' (ours, the default): one `text_proj` for all blocks;
  * 'per_block' (released): every attention owns one, `blocks.<i>.attn.text_proj`, the names of
    the released checkpoints (their `blocks.i.attn.text_proj.weight/bias`).
`text_predictor=False` builds no text predictor (the released code has none; then the fused pass
needs captions). `heads` overrides the size table's head count (the released registry: 2 / 4 / 8
for small / medium / large), `layer_norm_eps` every LayerNorm's epsilon (1e-6 as timm; Hugging
Face ViT checkpoints use 1e-12).
`fusion_gate` (ours, off in the released layout) blends the fused pass into the tokens it starts
from, x + g ⊙ (fused(x) − x), with g a per-channel gain initialised to zero (ReZero, Bachlechner
et al. 2020; LayerScale, Touvron et al. 2021): when a joint stage begins the fused logits equal
the first pass's, so a stage switch does not throw the student back to chance.

Every call returns `(logits, out)`: `logits` are what the model predicts in the current mode, `out`
names the intermediates (both heads, tokens after every block, pre-logits, attention maps).
Inputs are float images in [0, 1], NHWC; the model owns its normalisation (`mean`, `std`).
The last block runs its token-wise layers on the prefix (cls, dist) rows and the patch rows apart
and the heads read the prefix part alone, so a jitted caller that reads only the logits (a frozen
teacher, a student trained by its heads) skips the patch rows' projection and MLP there.

Dropout (`dropout`, `attn_dropout`; off by default) is Hugging Face ViT's `hidden_dropout_prob` and
`attention_probs_dropout_prob`, the options of IRKD's notebooks: hidden dropout on the embedded
tokens (IRKD layout: before the dist token joins, as its notebooks concatenate it after
`vit.embeddings`), after the attention's output projection and after the MLP's second linear;
attention dropout on the softmax probabilities (what `out['attn<i>']` then holds, as HF returns
them). timm's ViT drops at the same places and also after the MLP's activation. DeiT / TIKD use
drop path instead. Dropout draws from `rng`, the key that drives drop path, through keys of its
own (`fold_in(key, DROPOUT_STREAM)`), so turning it on leaves the drop-path draws as they were.

The model calls every layer through its attributes: the attention core (`Attention.core`) and the
dropout masks (`.bernoulli`) too, so that `models.build_model` can swap in the CPU layers of
tikd_jax/cpu/layers.py (same math, another lowering).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from tikd_jax.normalization import CIFAR100_MEAN, CIFAR100_STD

# timm initialises every Linear weight and the tokens with trunc_normal(0.02), biases with zeros.
_trunc_normal = nnx.initializers.truncated_normal(stddev=0.02, lower=-2.0 / 0.02, upper=2.0 / 0.02)
# PyTorch's default Conv2d init (kaiming_uniform, a=sqrt(5)) is uniform with variance 1/(3 fan_in).
_torch_conv_default = nnx.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


@dataclasses.dataclass(frozen=True)
class ViTSize:
  dim: int
  depth: int
  heads: int
  mlp_dim: int
  patch: int
  # Rank of the low-rank text adapters (text → width projection, width → text predictor), ours;
  # chosen so that the default students' counts land near the paper's (docs/tikd.md): a count
  # match by choice, not the released modules.
  text_rank: int = 32


# TIKD students on CIFAR-100 (TIKD paper) and IRKD's students (IRKD's notebooks).
SIZES: dict[str, ViTSize] = {
    'micro': ViTSize(dim=32, depth=2, heads=2, mlp_dim=64, patch=4, text_rank=8),  # for tests
    'demo': ViTSize(dim=64, depth=4, heads=4, mlp_dim=128, patch=4, text_rank=16),  # digits demo
    'small': ViTSize(dim=128, depth=5, heads=8, mlp_dim=512, patch=4, text_rank=32),
    'medium': ViTSize(dim=256, depth=5, heads=8, mlp_dim=1024, patch=4, text_rank=32),
    'large': ViTSize(dim=512, depth=5, heads=8, mlp_dim=2048, patch=4, text_rank=128),
    'irkd_custom': ViTSize(dim=128, depth=4, heads=4, mlp_dim=256, patch=2),
    'vit_tiny': ViTSize(dim=192, depth=12, heads=3, mlp_dim=768, patch=4),
    'irkd_teacher': ViTSize(dim=384, depth=12, heads=6, mlp_dim=1536, patch=4),
    'deit_small': ViTSize(dim=384, depth=12, heads=6, mlp_dim=1536, patch=16),
}

# Where TIKD's value projection lives: one for all blocks (ours) or one per attention (released).
TEXT_PROJ_LAYOUTS = ('shared', 'per_block')


def _linear(din, dout, rngs, dtype, bias=True):
  return nnx.Linear(din, dout, use_bias=bias, kernel_init=_trunc_normal, dtype=dtype, rngs=rngs)


def gelu_exact(x: jax.Array) -> jax.Array:
  """Exact GELU, x·Φ(x) = x/2·(1 + erf(x/√2)): PyTorch's formula; cheaper than erfc on XLA:CPU."""
  return 0.5 * x * (1.0 + lax.erf(x * np.asarray(1.0 / math.sqrt(2.0), x.dtype)))


# `fold_in(key, DROPOUT_STREAM)` is dropout's key below every key that drives drop path. Those are
# split in two (a block's key, the model's key); a split's i-th key is fold_in(key, i) under
# jax's partitionable threefry, so 2 is the first index no split uses.
DROPOUT_STREAM = 2


def dropout(x: jax.Array, rate: float, rng: jax.Array | None,
            bernoulli: Callable = jax.random.bernoulli) -> jax.Array:
  """Element-wise dropout (torch.nn.Dropout in train mode): zeroes each entry with probability
  `rate` and scales the kept ones by 1 / (1 − rate). No key or rate 0: `x` unchanged."""
  return apply_dropout(x, rate, dropout_mask(x.shape, rate, rng, bernoulli))


def dropout_mask(shape, rate: float, rng: jax.Array | None,
                 bernoulli: Callable = jax.random.bernoulli) -> jax.Array | None:
  """Dropout's keep mask for a tensor of `shape`, drawn by `bernoulli` (jax.random.bernoulli's
  signature and draws); None when nothing is dropped."""
  if rng is None or rate == 0.0:
    return None
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'dropout rate must be in [0, 1), got {rate}')
  return bernoulli(rng, 1.0 - rate, shape)


def apply_dropout(x: jax.Array, rate: float, keep: jax.Array | None) -> jax.Array:
  if keep is None:
    return x
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


def _dropout_keys(rng: jax.Array | None, n: int) -> list:
  """n dropout keys under `rng` (the key that also drives drop path), or n Nones."""
  if rng is None:
    return [None] * n
  return list(jax.random.split(jax.random.fold_in(rng, DROPOUT_STREAM), n))


def attention_core(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                   drop: Callable[[jax.Array], jax.Array] | None = None):
  """The attention core softmax(q·kᵀ·scale)·v per head: (out [B, N, H, d], probs [B, H, N, N])
  from token-major q, k, v [B, N, H, d].

  The softmax runs in at least float32; `drop` (attention dropout) acts on the probabilities
  before they weight v, and `probs` is what it returns (as Hugging Face returns the maps).
  """
  # heads-major [B, H, N, d] makes both products plain batched matmuls
  qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  scores = jnp.matmul(qh, jnp.swapaxes(kh, -1, -2)) * scale  # [B, H, N, N]
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
  if drop is not None:
    probs = drop(probs)
  return jnp.matmul(probs, vh).transpose(0, 2, 1, 3), probs


def drop_path(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Stochastic depth: drops the whole residual branch per sample, rescaling the kept ones."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection (timm layout).

  `text_proj=True` gives it its own TIKD value projection (the released per-block layout).
  `core` is the attention core (q, k, v, scale) → (out, probs) and `bernoulli` draws the attention
  dropout's masks: `attention_core` and jax.random.bernoulli, or their CPU versions.
  """

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, dtype=None, text_proj: bool = False,
               attn_dropout: float = 0.0):
    self.core = attention_core
    self.bernoulli = jax.random.bernoulli
    self.heads = heads
    self.attn_dropout = attn_dropout
    self.head_dim = dim // heads
    self.qkv = _linear(dim, 3 * dim, rngs, dtype)
    self.proj = _linear(dim, dim, rngs, dtype)
    # Released: Linear(512, head_dim) applied to the decoded tokens, which are embed_dim wide, so
    # it only runs at width 512; sized width → head_dim here, the same module at 512.
    self.text_proj = _linear(dim, self.head_dim, rngs, dtype) if text_proj else None

  def __call__(self, x: jax.Array, value_bias: jax.Array | None = None,
               decoded: jax.Array | None = None, rng: jax.Array | None = None):
    """`value_bias` [B, N, head_dim] is added to every head's values (TIKD's text_proj term).

    `decoded` [B, N, dim] (TIKD's text_decoder output; per-block layout only) makes this block's
    own `text_proj(decoded)` that term instead. `rng`: the attention-dropout key (train mode).
    """
    y, attn = self.mix(x, value_bias, decoded, rng)
    return self.proj(y), attn

  def mix(self, x, value_bias=None, decoded=None, rng=None):
    """The heads' outputs before the output projection, [B, N, dim], and the attention maps."""
    if decoded is not None:
      if self.text_proj is None:
        raise ValueError('decoded text given to an attention without its own text_proj: build '
                         "the model with text_proj_layout='per_block'")
      value_bias = self.text_proj(decoded)
    b, n, d = x.shape
    # qkv features are [q | k | v], each heads × head_dim (timm). A split (not three strided
    # slices) keeps the backward a concatenation.
    q, k, v = (
        t.reshape(b, n, self.heads, self.head_dim) for t in jnp.split(self.qkv(x), 3, axis=-1))
    if value_bias is not None:
      v = v + value_bias[:, :, None, :].astype(v.dtype)
    scale = self.head_dim**-0.5
    if self.attn_dropout and rng is not None:
      y, attn = attention_core(q, k, v, scale,
                               lambda p: dropout(p, self.attn_dropout, rng, self.bernoulli))
    else:
      y, attn = self.core(q, k, v, scale)
    return y.reshape(b, n, d), attn


class Mlp(nnx.Module):

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=None):
    self.fc1 = _linear(dim, hidden, rngs, dtype)
    self.fc2 = _linear(hidden, dim, rngs, dtype)

  def __call__(self, x):
    # timm and DeiT use the exact (erf) GELU; flax's default is the tanh approximation.
    return self.fc2(gelu_exact(self.fc1(x)))


class Block(nnx.Module):
  """Pre-LN transformer block: x + DropPath(Drop(Attn(LN(x)))), x + DropPath(Drop(MLP(LN(x))))
  (Drop: hidden dropout, its masks drawn by `bernoulli`; the attention drops its probabilities at
  `attn_dropout`)."""

  def __init__(self, size: ViTSize, drop_path_rate: float, *, rngs: nnx.Rngs, dtype=None,
               text_proj: bool = False, dropout: float = 0.0, attn_dropout: float = 0.0,
               layer_norm_eps: float = 1e-6):
    self.bernoulli = jax.random.bernoulli
    self.drop_path_rate = drop_path_rate
    self.dropout = dropout
    self.norm1 = nnx.LayerNorm(size.dim, epsilon=layer_norm_eps, dtype=dtype, rngs=rngs)
    self.attn = Attention(size.dim, size.heads, rngs=rngs, dtype=dtype, text_proj=text_proj,
                          attn_dropout=attn_dropout)
    self.norm2 = nnx.LayerNorm(size.dim, epsilon=layer_norm_eps, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(size.dim, size.mlp_dim, rngs=rngs, dtype=dtype)

  def __call__(self, x, rng=None, value_bias=None, decoded=None):
    """(tokens, attention maps)."""
    y, attn, keep_proj, keep_mlp, r1, r2 = self._mix(x, rng, value_bias, decoded)
    return self._token_wise(x, y, keep_proj, keep_mlp, r1, r2), attn

  def split(self, x, num_prefix: int, rng=None, value_bias=None, decoded=None):
    """((prefix tokens, patch tokens), attention maps): the block's values, with its token-wise
    rest (output projection, MLP) run on the rows [:num_prefix] and [num_prefix:] apart. The last
    block's way: the heads read only the prefix rows, so XLA drops the other rows' work (~3/4 of
    the block) whenever nothing reads them. The dropout masks are drawn for all rows and
    sliced."""
    y, attn, keep_proj, keep_mlp, r1, r2 = self._mix(x, rng, value_bias, decoded)
    return tuple(
        self._token_wise(x[:, rows], y[:, rows],
                         *(None if m is None else m[:, rows]
                           for m in (keep_proj, keep_mlp)), r1, r2)
        for rows in (slice(None, num_prefix), slice(num_prefix, None))), attn

  def _mix(self, x, rng, value_bias, decoded):
    """The attention mix, its maps, the hidden-dropout masks and the drop-path keys."""
    r1 = r2 = None
    if rng is not None:
      r1, r2 = jax.random.split(rng)
    r_attn, r_proj, r_mlp = _dropout_keys(rng, 3)
    y, attn = self.attn.mix(self.norm1(x), value_bias, decoded, r_attn)
    keep_proj, keep_mlp = (
        dropout_mask(x.shape, self.dropout, r, self.bernoulli) for r in (r_proj, r_mlp))
    return y, attn, keep_proj, keep_mlp, r1, r2

  def _token_wise(self, x, y, keep_proj, keep_mlp, r1, r2):
    """The rest of the block after the attention mix: projection, MLP, both residuals."""
    y = apply_dropout(self.attn.proj(y), self.dropout, keep_proj)
    x = x + drop_path(y, self.drop_path_rate, r1)
    y = apply_dropout(self.mlp(self.norm2(x)), self.dropout, keep_mlp)
    return x + drop_path(y, self.drop_path_rate, r2)


class LowRankLinear(nnx.Module):
  """din → rank → dout, two linear maps (used for the text adapters)."""

  def __init__(self, din: int, rank: int, dout: int, *, rngs: nnx.Rngs, dtype=None):
    self.down = _linear(din, rank, rngs, dtype)
    self.up = _linear(rank, dout, rngs, dtype)

  def __call__(self, x):
    return self.up(self.down(x))


def _cosine(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """torch.nn.functional.cosine_similarity over the last axis (eps clamps each norm)."""
  na = jnp.maximum(jnp.linalg.norm(a, axis=-1), eps)
  nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), eps)
  return jnp.sum(a * b, axis=-1) / (na * nb)


class DistilledViT(nnx.Module):
  """DeiT-style ViT with optional distillation token and optional TIKD text fusion."""

  def __init__(
      self,
      size: ViTSize | str,
      *,
      num_classes: int,
      img_size: int = 32,
      patch_size: int | None = None,
      drop_path: float = 0.1,
      dropout: float = 0.0,
      attn_dropout: float = 0.0,
      distilled: bool = True,
      dist_pos_embed: bool = True,
      final_norm: bool = True,
      eval_head: str = 'mean',
      text_dim: int | None = None,
      text_proj_layout: str = 'shared',
      fusion_gate: bool = False,
      text_predictor: bool = True,
      heads: int | None = None,
      layer_norm_eps: float = 1e-6,
      mean: Sequence[float] = CIFAR100_MEAN,
      std: Sequence[float] = CIFAR100_STD,
      dtype: Any = None,
      rngs: nnx.Rngs,
  ):
    if isinstance(size, str):
      if size not in SIZES:
        raise ValueError(f'unknown ViT size {size!r}; known sizes: {sorted(SIZES)}')
      size = SIZES[size]
    if patch_size is not None:
      size = dataclasses.replace(size, patch=patch_size)
    if heads is not None:
      if heads < 1 or size.dim % heads:
        raise ValueError(f'heads={heads} does not divide the width {size.dim} of ViT size '
                         f'{size}: pick a divisor of {size.dim}')
      size = dataclasses.replace(size, heads=int(heads))
    if img_size % size.patch:
      raise ValueError(f'img_size {img_size} is not a multiple of patch size {size.patch}')
    if eval_head not in ('mean', 'cls'):
      raise ValueError(f"eval_head must be 'mean' or 'cls', got {eval_head!r}")
    if text_proj_layout not in TEXT_PROJ_LAYOUTS:
      raise ValueError(f'text_proj_layout must be one of {TEXT_PROJ_LAYOUTS}, got '
                       f'{text_proj_layout!r}')
    for name, rate in (('dropout', dropout), ('attn_dropout', attn_dropout)):
      if not 0.0 <= rate < 1.0:
        raise ValueError(f'{name} must be in [0, 1), got {rate}')
    self.size = size
    self.dropout = float(dropout)
    self.attn_dropout = float(attn_dropout)
    self.num_classes = num_classes
    self.img_size = img_size
    self.distilled = distilled
    self.dist_pos_embed = dist_pos_embed
    self.final_norm = final_norm
    self.eval_head = eval_head
    self.text_dim = text_dim
    self.text_proj_layout = text_proj_layout
    self.fusion_gate = bool(fusion_gate)
    self.layer_norm_eps = float(layer_norm_eps)
    self.mean = tuple(mean)
    self.std = tuple(std)
    self.dtype = dtype
    self.bernoulli = jax.random.bernoulli  # the embedding dropout's masks
    d = size.dim
    self.grid = img_size // size.patch
    self.num_prefix = 2 if distilled else 1
    self.patch_embed = nnx.Conv(3, d, (size.patch, size.patch), strides=size.patch, padding='VALID',
                                kernel_init=_torch_conv_default, dtype=dtype, rngs=rngs)
    self.cls_token = nnx.Param(_trunc_normal(rngs.params(), (1, 1, d)))
    if distilled:
      init = nnx.initializers.zeros if not dist_pos_embed else _trunc_normal
      self.dist_token = nnx.Param(init(rngs.params(), (1, 1, d)))
    n_pos = self.grid**2 + (self.num_prefix if dist_pos_embed else 1)
    self.pos_embed = nnx.Param(_trunc_normal(rngs.params(), (1, n_pos, d)))
    rates = [float(r) for r in np.linspace(0.0, drop_path, size.depth)]
    per_block = text_dim is not None and text_proj_layout == 'per_block'
    self.blocks = nnx.List([
        Block(size, r, rngs=rngs, dtype=dtype, text_proj=per_block, dropout=self.dropout,
              attn_dropout=self.attn_dropout, layer_norm_eps=self.layer_norm_eps) for r in rates
    ])
    self.norm = (nnx.LayerNorm(d, epsilon=self.layer_norm_eps, dtype=dtype, rngs=rngs)
                 if final_norm else None)
    self.head = _linear(d, num_classes, rngs, dtype)
    self.head_dist = _linear(d, num_classes, rngs, dtype) if distilled else None
    if text_dim is not None:
      # TIKD. text_decoder and text_proj are the released modules (text_proj per block, or one
      # shared here); the adapter (text → width, only when dims differ) and the predictor
      # (cls → text, for caption-free inference) are ours.
      self.text_decoder = _linear(d, d, rngs, dtype)
      self.text_proj = None if per_block else _linear(d, size.dim // size.heads, rngs, dtype)
      self.text_adapter = (LowRankLinear(text_dim, size.text_rank, d, rngs=rngs, dtype=dtype)
                           if text_dim != d else None)
      # The released model has none (`text_predictor=False`): no caption-free fused pass then.
      self.text_predictor = (LowRankLinear(d, size.text_rank, text_dim, rngs=rngs, dtype=dtype)
                             if text_predictor else None)
      self.text_gate = nnx.Param(jnp.zeros((d,), jnp.float32)) if fusion_gate else None

  # ------------------------------------------------------------------ helpers
  def normalize(self, images: jax.Array) -> jax.Array:
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std

  def embed(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Patches + prefix tokens + position embeddings → [B, prefix + grid², d], then hidden
    dropout with key `rng` (HF's embeddings dropout; IRKD layout: not on the dist token)."""
    x = self.patch_embed(self.normalize(images).astype(self.dtype or jnp.float32))
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    pos = self.pos_embed[...]
    if (gh, gw) != (self.grid, self.grid):
      pos = resize_pos_embed(pos, (gh, gw), num_prefix=pos.shape[1] - self.grid**2)
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, d)).astype(x.dtype)

    def drop(x):
      return dropout(x, self.dropout, rng, self.bernoulli)

    if not self.distilled:
      return drop(jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype))
    dist = jnp.broadcast_to(self.dist_token[...], (b, 1, d)).astype(x.dtype)
    if self.dist_pos_embed:
      return drop(jnp.concatenate([cls, dist, x], axis=1) + pos.astype(x.dtype))
    # IRKD: cls and patches get positions, the dist token none (and no dropout: the notebooks
    # add it after HF's embeddings, dropout included).
    x = drop(jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype))
    return jnp.concatenate([x[:, :1], dist, x[:, 1:]], axis=1)

  def run_blocks(self, x, rng, out, prefix, value_bias=None, decoded=None):
    """(prefix tokens, patch tokens) after the last block, which computes them apart
    (`Block.split`): the heads read the prefix alone, so the patch rows' work is dropped when no
    output that holds them is read."""
    rngs = list(jax.random.split(rng, len(
        self.blocks))) if rng is not None else [None] * len(self.blocks)
    last = len(self.blocks) - 1
    for i, (block, r) in enumerate(zip(self.blocks, rngs)):
      if i < last:
        x, attn = block(x, r, value_bias, decoded)
      else:
        x, attn = block.split(x, self.num_prefix, r, value_bias, decoded)
      out[f'{prefix}attn{i}'] = attn
      out[f'{prefix}block{i}'] = x if i < last else jnp.concatenate(x, axis=1)
    return x

  def heads(self, x, out, train):
    out['pre_logits'] = x[:, 0]
    cls_logits = self.head(x[:, 0]).astype(jnp.float32)
    out['cls_logits'] = cls_logits
    if not self.distilled:
      return cls_logits
    dist_logits = self.head_dist(x[:, 1]).astype(jnp.float32)
    out['dist_logits'] = dist_logits
    if train or self.eval_head == 'cls':
      return cls_logits
    return (cls_logits + dist_logits) / 2

  # ------------------------------------------------------------------ forward
  def __call__(self, images, *, train: bool = False, rng: jax.Array | None = None,
               text: jax.Array | None = None, fuse_text: bool = False,
               text_keep: jax.Array | None = None):
    """images: [B, H, W, 3] floats in [0, 1]. text: [B, text_dim] caption features or None.

    With `fuse_text` (TIKD models only) the second, text-conditioned pass produces the logits;
    `text=None` then uses the text predictor's output (caption-free inference). `text_keep` [B]
    bool picks per example: True fuses `text`, False the predictor's output (scheduled
    sampling). The first pass's head logits stay in `out` as `first_{cls,dist}_logits`.
    """
    out: dict[str, jax.Array] = {}
    if not train:
      rng = None
    r1 = r2 = None
    if rng is not None:
      r1, r2 = jax.random.split(rng)
    parts = self.run_blocks(self.embed(images, _dropout_keys(rng, 1)[0]), r1, out, prefix='')
    if self.norm is not None:  # token-wise: on each part, so the heads' part stands alone
      parts = tuple(self.norm(x) for x in parts)
    heads_x = parts[0]
    out['tokens'] = jnp.concatenate(parts, axis=1)
    if self.text_dim is not None and self.text_predictor is not None:
      # Cheap, always computed so its cosine loss can train in every stage.
      out['text_pred'] = self.text_predictor(heads_x[:, 0]).astype(jnp.float32)
    if fuse_text:
      if self.text_dim is None:
        raise ValueError('fuse_text=True needs a TIKD model: build it with text_dim set')
      first = {}
      self.heads(heads_x, first, train)
      out.update({f'first_{k}': v for k, v in first.items() if k.endswith('_logits')})
      heads_x = self._text_fusion(out['tokens'], self._fusion_text(text, text_keep, out), out, r2)
    return self.heads(heads_x, out, train), out

  @staticmethod
  def _fusion_text(text, keep, out):
    """The text the second pass fuses: the caption feature, or the predictor's output (no
    gradient into the predictor through fusion: captions alone train it)."""
    if keep is None and text is not None:
      return text.astype(jnp.float32)
    if 'text_pred' not in out:
      raise ValueError('the fused pass needs a text: this model has no text predictor '
                       '(built with text_predictor=False, as the released code) to stand in for '
                       'missing captions; pass the caption features (`text`, no `text_keep`), '
                       "or evaluate the first pass (eval_text 'none')")
    predicted = jax.lax.stop_gradient(out['text_pred'])
    if text is None:
      return predicted
    return jnp.where(keep[:, None], text.astype(jnp.float32), predicted)

  def _text_fusion(self, x, text, out, rng):
    """TIKD's released fusion: cos-weighted tokens → text_decoder → second pass with value bias.
    Returns the second pass's prefix tokens (what the heads read)."""
    t = text.astype(jnp.float32)
    if self.text_adapter is not None:
      t = self.text_adapter(t.astype(x.dtype)).astype(jnp.float32)
    c = jnp.clip(_cosine(x.astype(jnp.float32), t[:, None, :]), 0.0, 1.0)  # [B, N]
    out['text_weights'] = c
    x_decoded = self.text_decoder((c[..., None] * x).astype(x.dtype))
    # The second pass starts from the normed first-pass tokens, with no final norm after it.
    if self.text_proj is None:  # per-block: each attention projects the decoded tokens itself
      fused = self.run_blocks(x, rng, out, prefix='fused_', decoded=x_decoded)[0]
    else:
      value_bias = self.text_proj(x_decoded)
      fused = self.run_blocks(x, rng, out, prefix='fused_', value_bias=value_bias)[0]
    if self.text_gate is None:
      return fused
    x = x[:, :self.num_prefix]
    return x + self.text_gate[...].astype(x.dtype) * (fused - x)


def resize_pos_embed(pos_embed: jax.Array, grid: tuple[int, int], num_prefix: int) -> jax.Array:
  """Bicubic resize of the patch part of a [1, prefix + g², d] position embedding to `grid`.

  Matches torch.nn.functional.interpolate(mode='bicubic', align_corners=False) (the IRKD and
  timm recipe); the prefix (cls / dist) positions are kept as they are. A same-size call returns
  the input unchanged.
  """
  prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
  old = int(math.isqrt(patches.shape[1]))
  if old * old != patches.shape[1]:
    raise ValueError(f'position embedding has {patches.shape[1]} patch positions, not a square')
  if tuple(grid) == (old, old):
    return pos_embed
  d = patches.shape[-1]
  img = patches.reshape(old, old, d).astype(jnp.float32)
  img = _bicubic_resize_torch(img, grid)
  return jnp.concatenate(
      [prefix, img.reshape(1, grid[0] * grid[1], d).astype(pos_embed.dtype)], axis=1)


def _cubic_weights(t: jax.Array, a: float = -0.75) -> jax.Array:
  """Keys' cubic convolution weights for offsets (t+1, t, 1-t, 2-t) with PyTorch's a = -0.75."""

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return jnp.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _resize_axis(img: jax.Array, out_size: int, axis: int) -> jax.Array:
  in_size = img.shape[axis]
  scale = in_size / out_size
  src = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale - 0.5  # align_corners=False
  base = jnp.floor(src)
  w = _cubic_weights(src - base)  # [out, 4]
  idx = jnp.clip(base[:, None].astype(jnp.int32) + jnp.arange(-1, 3)[None, :], 0, in_size - 1)
  gathered = jnp.take(img, idx, axis=axis)  # axis replaced by [out, 4]
  shape = [1] * gathered.ndim
  shape[axis], shape[axis + 1] = out_size, 4
  return jnp.sum(gathered * w.reshape(shape), axis=axis + 1)


def _bicubic_resize_torch(img: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """[H, W, D] → [gh, gw, D], separable bicubic as torch's upsample_bicubic2d (border clamp)."""
  return _resize_axis(_resize_axis(img, grid[0], 0), grid[1], 1)
