"""IRKD's saliency maps and saliency-matching losses (README "IRKD"): pure JAX functions.

Two variants, both from the released IRKD notebooks (salman192003/IRKD):

* attention saliency (``P_4_ALL.ipynb`` cell 14, ``process_attention`` and
  ``multi_layer_attention_loss``; the run behind the headline 84.29%): the head-averaged
  attention of the cls query over the patch keys, as a grid, min-max normalised per sample; MSE
  student vs teacher, averaged over layers.
* gradient saliency (``Experiment_1b.ipynb`` = ``P_2_OUR_STUDENT_SAL_MAP.ipynb`` cell 1, and
  ``Saliency_patch_size2.ipynb`` = ``P_2_SaliencyMap.ipynb`` cell 1, class ``SaliencyDistiller``,
  methods ``compute_attention_map`` and ``saliency_loss``): a Grad-CAM-like map per class from the
  patch tokens after a block and the model's own classifier on their mean; MSE student vs
  teacher, summed over layers.

The teacher's maps are always wrapped in ``jax.lax.stop_gradient`` (the notebooks ``.detach()``
them); the student's maps keep their gradient, including the second-order path of the gradient
variant through the classifier weights. The saliency weight (0.8, ``gamma`` / ``alpha_att`` in
the notebooks) is applied by the caller, not here: `config.saliency.kind` adds the term
`<kind>_saliency` at `config.saliency.weight` to every phase (`auto_weight`), with
`saliency.layers` and `saliency.resize_to` as its settings.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp

from tikd_jax.losses.registry import Context, register

# Epsilons of the min-max normalisations, as in the notebooks.
ATTENTION_EPS = 1e-8  # process_attention: (x - min) / (max - min + 1e-8)
GRADIENT_EPS = 1e-6  # compute_attention_map: (flat - mn) / (mx - mn + 1e-6)

# Layers of the gradient variant: Experiment_1b / P_2_OUR_STUDENT_SAL_MAP (4-layer student,
# 12-layer teacher) use ``SaliencyDistiller(student, teacher, layer_idxs=[0, 2, 3])``, the SAME
# index in both models. (P_2_SaliencyMap, 12 vs 12 layers, uses ``list(range(12))``.)
DEFAULT_GRADIENT_LAYERS = (0, 2, 3)

Grid = Union[int, Sequence[int], None]
# 'all', or per layer an int (the same index in both models; negative counts from each model's
# end) or a (student index, teacher index) pair.
LayerSpec = Union[str, Sequence[Union[int, Sequence[int]]]]


# ----------------------------------------------------------------------------------- helpers
def _grid_shape(grid: Grid, num_patches: int, what: str) -> tuple[int, int]:
  """(gh, gw) from an int, a pair or None (square, as the notebooks' ``int(math.sqrt(N))``)."""
  if grid is None:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
      raise ValueError(f'{what}: {num_patches} patch tokens do not form a square grid; '
                       f'pass grid=(gh, gw) explicitly')
    return side, side
  gh, gw = (grid, grid) if isinstance(grid, int) else tuple(int(g) for g in grid)
  if gh * gw != num_patches:
    raise ValueError(f'{what}: grid {gh}x{gw} = {gh * gw} does not match the {num_patches} '
                     f'patch tokens; check the prefix length (cls/dist tokens) and the '
                     f'grid at this resolution (image size / patch size)')
  return gh, gw


def _min_max(x: jax.Array, eps: float) -> jax.Array:
  """(x − min) / (max − min + eps) with min / max over all but the first (batch) axis."""
  axes = tuple(range(1, x.ndim))
  lo = jnp.min(x, axis=axes, keepdims=True)
  hi = jnp.max(x, axis=axes, keepdims=True)
  return (x - lo) / (hi - lo + eps)


def _linear_resize_axis(x: jax.Array, out_size: int, axis: int) -> jax.Array:
  """One axis of torch's ``upsample_bilinear2d`` (align_corners=False, no antialias).

    src = max((dst + 0.5)·in/out − 0.5, 0); i0 = floor(src); i1 = min(i0 + 1, in − 1);
    y = (1 − λ)·x[i0] + λ·x[i1], λ = src − i0.
    """
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  src = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * (in_size / out_size) - 0.5
  src = jnp.maximum(src, 0.0)
  i0 = jnp.floor(src).astype(jnp.int32)
  lam = src - i0.astype(jnp.float32)
  i1 = jnp.minimum(i0 + 1, in_size - 1)
  shape = [1] * x.ndim
  shape[axis] = out_size
  lam = lam.reshape(shape)
  return jnp.take(x, i0, axis=axis) * (1.0 - lam) + jnp.take(x, i1, axis=axis) * lam


def resize_bilinear(maps: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """[B, h, w, ...] → [B, gh, gw, ...] like ``F.interpolate(mode='bilinear')`` (no corners).

    The attention loss resizes with this when the two grids differ (P_4_ALL cell 14:
    ``F.interpolate(s_attn.unsqueeze(1), size=t_attn.shape[-2:], mode='bilinear')``).
    """
  return _linear_resize_axis(_linear_resize_axis(maps, grid[0], 1), grid[1], 2)


def _match_grids(s: jax.Array, t: jax.Array, resize_to: str | None) -> tuple[jax.Array, jax.Array]:
  """Brings student and teacher maps ([B, gh, gw, ...]) to one grid."""
  if s.shape[1:3] == t.shape[1:3]:
    return s, t
  if resize_to == 'teacher':  # the notebook: the student map is resized to the teacher's grid
    return resize_bilinear(s, t.shape[1:3]), t
  if resize_to == 'student':
    return s, resize_bilinear(t, s.shape[1:3])
  raise ValueError(f'student saliency grid {s.shape[1:3]} differs from the teacher grid '
                   f'{t.shape[1:3]}; pass resize_to="teacher" (as IRKD does) or "student"')


def _depth(out: Mapping[str, jax.Array], kind: str) -> int:
  """Number of blocks with an ``{kind}{i}`` entry (``attn`` or ``block``) in a model's `out`."""
  pattern = re.compile(rf'^{kind}(\d+)$')
  idx = sorted(int(m.group(1)) for k in out if (m := pattern.match(k)))
  if idx != list(range(len(idx))):
    raise ValueError(f"model outputs have {kind} entries for blocks {idx}; expected 0..n-1")
  return len(idx)


def layer_pairs(layers: LayerSpec, depth_s: int, depth_t: int) -> list[tuple[int, int]]:
  """Resolves a layer spec to (student block, teacher block) pairs.

    'all': blocks 0 .. min(depth_s, depth_t) − 1, paired by index. This is what P_4_ALL's
    ``multi_layer_attention_loss`` does: it loops ``layer_indices = list(range(12))`` over both
    models' attentions and skips an index that raises ``IndexError``, so a shallower model limits
    the pairs to its depth. An int i means block i of both models (the notebooks index both with
    the same ``i``); a negative int counts from each model's own end (-1 = each model's last
    block). A pair (i_s, i_t) pairs different blocks.
    """
  if isinstance(layers, str):
    if layers != 'all':
      raise ValueError(f"layers must be 'all' or a list of indices / pairs, got {layers!r}")
    return [(i, i) for i in range(min(depth_s, depth_t))]
  pairs = []
  for spec in layers:
    i_s, i_t = (spec, spec) if isinstance(spec, int) else tuple(spec)
    for i, depth, who in ((i_s, depth_s, 'student'), (i_t, depth_t, 'teacher')):
      if not -depth <= i < depth:
        raise ValueError(f'saliency layer {spec!r}: the {who} has {depth} blocks, '
                         f'so block {i} does not exist; fix the layers list')
    pairs.append((i_s % depth_s, i_t % depth_t))
  if not pairs:
    raise ValueError('saliency layers list is empty')
  return pairs


# -------------------------------------------------------------------------------------- maps
def attention_saliency(attn: jax.Array, num_prefix: int, grid: Grid = None,
                       eps: float = ATTENTION_EPS) -> jax.Array:
  """Attention saliency of one block: [B, H, T, T] attention probabilities → [B, gh, gw].

        a = mean_h attn[:, h]                                    [B, T, T]
        s = a[:, 0, num_prefix:]   (cls query over patch keys)   [B, N] → [B, gh, gw]
        S = (s − min s) / (max s − min s + 1e-8)    min / max per sample over the grid

    From P_4_ALL.ipynb cell 14, ``process_attention``: ``attn = attentions[layer_idx].mean(dim=1)``;
    ``cls_attn = attn[:, 0, 2:] if has_distill else attn[:, 0, 1:]``; ``reshape(-1, H, W)``;
    ``amin`` / ``amax`` over dims (1, 2); ``(x - min) / (max - min + 1e-8)``.
    `num_prefix` is the model's ``num_prefix`` (2 with a dist token, 1 for a plain ViT).
    """
  attn = jnp.asarray(attn, jnp.float32)
  if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
    raise ValueError(f'attention must be [B, heads, T, T], got shape {attn.shape}')
  cls_row = jnp.mean(attn, axis=1)[:, 0, num_prefix:]
  gh, gw = _grid_shape(grid, cls_row.shape[-1], 'attention_saliency')
  return _min_max(cls_row.reshape(cls_row.shape[0], gh, gw), eps)


def gradient_saliency(patch_tokens: jax.Array, classifier_fn: Callable[[jax.Array], jax.Array],
                      grid: Grid = None, eps: float = GRADIENT_EPS) -> jax.Array:
  """Gradient saliency of one block: patch tokens [B, N, d] → maps [B, gh, gw, C].

        z = classifier_fn(mean_n P)                              [B, C]
        w_c = mean_n ∂(Σ_b z[b, c]) / ∂P[:, n]                   [B, d]
        M[b, n, c] = Σ_k ReLU(w_c[b, k] · P[b, n, k])            [B, N, C] → [B, gh, gw, C]
        S = (M − min M) / (max M − min M + 1e-6)    min / max per sample over grid AND classes

    From Experiment_1b.ipynb cell 1 (= P_2_OUR_STUDENT_SAL_MAP / P_2_SaliencyMap cell 1),
    ``SaliencyDistiller.compute_attention_map(P, logits)`` with ``logits = classifier(P.mean(1))``:
    per class ``grad = torch.autograd.grad(logits[:, c].sum(), P, create_graph=True)``,
    ``w = grad.mean(dim=1, keepdim=True)``, ``att = (w * P).relu().sum(dim=2)``; the maps are
    concatenated on the last axis, ``view(B, side, side, C)`` (channels last, kept here), and
    normalised over the flattened ``view(B, -1)`` with eps 1e-6.

    The logits depend on P only through m = mean_n P, so every token has the same gradient
    (1/N)·∂z/∂m and its token-mean is exactly w_c = (1/N)·∂(Σ_b z[b, c])/∂m: one ``jax.vjp`` of
    `classifier_fn` at m, vmapped over the C one-hot cotangents. The result stays differentiable
    (second order): gradients reach P (hence the blocks) and, through w, the classifier weights.
    """
  p = jnp.asarray(patch_tokens, jnp.float32)
  if p.ndim != 3:
    raise ValueError(f'patch tokens must be [B, N, d], got shape {p.shape}')
  b, n, _ = p.shape
  gh, gw = _grid_shape(grid, n, 'gradient_saliency')
  logits, vjp_fn = jax.vjp(lambda m: jnp.asarray(classifier_fn(m), jnp.float32), p.mean(axis=1))
  if logits.ndim != 2 or logits.shape[0] != b:
    raise ValueError(f'classifier_fn must map [B, d] to [B, C] logits, got {logits.shape}')
  c = logits.shape[-1]
  one_hots = jnp.broadcast_to(jnp.eye(c, dtype=logits.dtype)[:, None, :], (c, b, c))
  (grad_mean,) = jax.vmap(vjp_fn)(one_hots)  # [C, B, d] = ∂(Σ_b z[b, c]) / ∂m
  w = grad_mean / n  # token-mean of ∂(Σ_b z[b, c]) / ∂P
  maps = jnp.sum(jax.nn.relu(w[:, :, None, :] * p[None]), axis=-1)  # [C, B, N]
  maps = jnp.moveaxis(maps, 0, -1).reshape(b, gh, gw, c)
  return _min_max(maps, eps)


# ------------------------------------------------------------------------------------ losses
def saliency_loss(student_maps: jax.Array, teacher_maps: jax.Array) -> jax.Array:
  """MSE between saliency maps, teacher side stop-gradient: mean((S_s − sg(S_t))²).

    ``F.mse_loss(A_s, A_t.detach())`` (reduction 'mean') in both notebooks.
    """
  student_maps = jnp.asarray(student_maps, jnp.float32)
  teacher_maps = jax.lax.stop_gradient(jnp.asarray(teacher_maps, jnp.float32))
  if student_maps.shape != teacher_maps.shape:
    raise ValueError(f'student saliency maps {student_maps.shape} and teacher maps '
                     f'{teacher_maps.shape} differ in shape; resize to one grid first')
  return jnp.mean(jnp.square(student_maps - teacher_maps))


def attention_saliency_loss(student_out: Mapping[str, jax.Array], teacher_out: Mapping[str,
                                                                                       jax.Array],
                            *, student_prefix: int, teacher_prefix: int, grid_s: Grid = None,
                            grid_t: Grid = None, layers: LayerSpec = 'all',
                            resize_to: str | None = 'teacher') -> jax.Array:
  """Attention saliency loss, averaged over layer pairs:

        L = 1/|pairs| · Σ_(i, j) MSE(resize(S_s(attn_i)), sg(S_t(attn_j)))

    From P_4_ALL.ipynb cell 14, ``multi_layer_attention_loss``: ``layer_indices = range(12)``
    over both models (same index, missing blocks skipped, see `layer_pairs`), the teacher with
    ``has_distill=False`` (plain ViT), the student with its dist token; when the grids differ the
    STUDENT map is resized to the teacher's grid (``F.interpolate(..., mode='bilinear')``, i.e.
    align_corners False): ``resize_to='teacher'``. ``'student'`` resizes the teacher map instead.
    ``total_loss / valid_layers``.

    `student_out` / `teacher_out` are the models' `out` dicts (``attn{i}`` [B, heads, T, T]);
    prefixes are each model's ``num_prefix``; grids are (image size / patch) per model.
    """
  pairs = layer_pairs(layers, _depth(student_out, 'attn'), _depth(teacher_out, 'attn'))
  total = jnp.zeros((), jnp.float32)
  for i_s, i_t in pairs:
    s = attention_saliency(student_out[f'attn{i_s}'], student_prefix, grid_s)
    t = attention_saliency(jax.lax.stop_gradient(teacher_out[f'attn{i_t}']), teacher_prefix, grid_t)
    s, t = _match_grids(s, t, resize_to)
    total = total + saliency_loss(s, t)
  return total / len(pairs)


def gradient_saliency_loss(student_out: Mapping[str, jax.Array], teacher_out: Mapping[str,
                                                                                      jax.Array], *,
                           student_classifier: Callable[[jax.Array], jax.Array],
                           teacher_classifier: Callable[[jax.Array], jax.Array],
                           student_prefix: int, teacher_prefix: int, grid_s: Grid = None,
                           grid_t: Grid = None, layers: LayerSpec = DEFAULT_GRADIENT_LAYERS,
                           resize_to: str | None = 'teacher') -> jax.Array:
  """Gradient saliency loss, SUMMED over layer pairs:

        L = Σ_(i, j) MSE(S_s(P_s^i, head_s), sg(S_t(sg(P_t^j), head_t)))
        P^i = out[f'block{i}'][:, prefix:]   (tokens after block i, prefix tokens dropped)

    From Experiment_1b.ipynb cell 1, ``SaliencyDistiller.saliency_loss``: forward hooks on
    ``encoder.layer[i].output`` (HF ViTOutput / DeiTOutput: MLP + residual, i.e. the tokens after
    block i) of both models for ``i in layer_idxs``; ``Ps = Fs[:, 2:, :]``,
    ``Pt = Ft[:, 2:, :].detach()``; ``ls = stu.classifier(Ps.mean(1))``,
    ``lt = tea_classifier(Pt.mean(1))`` (each model's own cls head); ``A_t = ....detach()``;
    ``loss += F.mse_loss(A_s, A_t)``. Default layers (0, 2, 3) as there (same index in both
    models). The notebooks only pair equal grids (patch 2 / patch 2); for unequal grids
    (**Ours**) the maps are resized like the attention variant's.

    `student_classifier` / `teacher_classifier` map [B, d] → [B, C] (e.g. ``model.head``).
    """
  pairs = layer_pairs(layers, _depth(student_out, 'block'), _depth(teacher_out, 'block'))
  total = jnp.zeros((), jnp.float32)
  for i_s, i_t in pairs:
    s = gradient_saliency(student_out[f'block{i_s}'][:, student_prefix:], student_classifier,
                          grid_s)
    p_t = jax.lax.stop_gradient(teacher_out[f'block{i_t}'][:, teacher_prefix:])
    t = jax.lax.stop_gradient(gradient_saliency(p_t, teacher_classifier, grid_t))
    s, t = _match_grids(s, t, resize_to)
    total = total + saliency_loss(s, t)
  return total


# ------------------------------------------------------------------------------------ terms
SALIENCY_KINDS = ('none', 'attention', 'gradient')


def _weight_of(kind: str):

  def weight(config, stage):
    del stage
    saliency = config.saliency
    if saliency.kind not in SALIENCY_KINDS:
      raise ValueError(f"saliency must be 'none', 'attention' or 'gradient', got {saliency.kind!r}")
    return float(saliency.weight) if saliency.kind == kind else None

  return weight


def _settings(config):
  return {'layers': config.saliency.layers, 'resize_to': config.saliency.resize_to}


def _parse_layers(spec):
  if spec in ('', 'all', None):
    return spec or None
  if isinstance(spec, str):
    return tuple(int(i) for i in spec.split(','))
  return tuple(spec)


def _saliency_models(ctx, name):
  if ctx.teacher is None or not hasattr(ctx.teacher, 'num_prefix'):
    raise ValueError(f'loss term {name!r} needs a ViT teacher (attention maps, patch tokens)')
  return dict(student_prefix=ctx.student.num_prefix, teacher_prefix=ctx.teacher.num_prefix)


@register('attention_saliency', needs_teacher=True, settings=_settings,
          auto_weight=_weight_of('attention'))
def attention_saliency_term(ctx: Context, layers='', resize_to: str = 'teacher'):
  """IRKD's attention saliency alignment (README "IRKD"), averaged over layer pairs."""
  loss = attention_saliency_loss(ctx.out, ctx.teacher_out, layers=_parse_layers(layers) or 'all',
                                 resize_to=resize_to, **_saliency_models(ctx, 'attention_saliency'))
  return loss, {'saliency_loss': loss}


@register('gradient_saliency', needs_teacher=True, settings=_settings,
          auto_weight=_weight_of('gradient'))
def gradient_saliency_term(ctx: Context, layers='', resize_to: str = 'teacher'):
  """IRKD's gradient saliency alignment (README "IRKD"), summed over layer pairs."""
  layers, models = _parse_layers(layers), _saliency_models(ctx, 'gradient_saliency')
  loss = gradient_saliency_loss(ctx.out, ctx.teacher_out, student_classifier=ctx.student.head,
                                teacher_classifier=ctx.teacher.head, resize_to=resize_to,
                                **({'layers': layers} if layers else {}), **models)
  return loss, {'saliency_loss': loss}
