"""What a model looks at: attention rollout, last-layer cls attention, Grad-CAM. Pure JAX.

Every map is [B, h, w] on the model's own grid (patches for a ViT, the feature map for a CNN),
normalised per image to [0, 1]; `upsample` brings it to the image size for overlays. The functions
are jitted (`num_prefix`, `grid` static: pass an int, a tuple or None).

* `attention_rollout` (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"): the
  head-averaged attention of every block, with the residual path added as identity
  (Â = ½·mean_h A + ½·I, rows renormalised), multiplied through the blocks; the map is the cls
  token's row over the patch tokens, min-max normalised. The default of
  `python -m tikd_jax.visualize attention`.
* `last_layer_attention`: the last block's head-averaged cls → patch attention, min-max normalised
  (the repo's `attention_saliency`, i.e. IRKD's attention map).
* `grad_cam` (Selvaraju et al. 2017): w_c = spatial mean of ∂y/∂A_c, map = ReLU(Σ_c w_c·A_c),
  divided by its maximum; `stage_gradients` gets ∂y/∂A by `jax.grad` through the whole model.
* `vit_grad_cam`: the same map for a ViT, on the patch tokens of a block's `norm1` output, with
  `vit_token_gradients` for A and ∂y/∂A (pytorch-grad-cam's ViT recipe; see its docstring).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tikd_jax.losses.saliency import attention_saliency, resize_bilinear

MIN_MAX_EPS = 1e-8


def _grid(num_patches: int, grid: int | Sequence[int] | None) -> tuple[int, int]:
  if grid is None:
    side = int(round(num_patches**0.5))
    grid = (side, side)
  elif isinstance(grid, int):
    grid = (grid, grid)
  gh, gw = (int(g) for g in grid)
  if gh * gw != num_patches:
    raise ValueError(f'{num_patches} patch tokens do not fill a {gh}x{gw} grid; check '
                     f'num_prefix (cls/dist tokens) and the grid (image size / patch size)')
  return gh, gw


def min_max(maps: jax.Array, eps: float = MIN_MAX_EPS) -> jax.Array:
  """(x − min) / (max − min + eps) per image (over every axis but the first)."""
  axes = tuple(range(1, maps.ndim))
  lo = jnp.min(maps, axis=axes, keepdims=True)
  hi = jnp.max(maps, axis=axes, keepdims=True)
  return (maps - lo) / (hi - lo + eps)


@functools.partial(jax.jit, static_argnames=('num_prefix', 'grid', 'residual'))
def attention_rollout(attns: Sequence[jax.Array], num_prefix: int,
                      grid: int | Sequence[int] | None = None, residual: float = 0.5) -> jax.Array:
  """Attention rollout from the cls token: per-block [B, heads, T, T] probabilities → [B, gh, gw].

      Â_l = (1 − r)·mean_h A_l + r·I,  rows renormalised to sum 1
      R   = Â_L · … · Â_1
      map = min-max(R[:, 0, num_prefix:])      (cls row, patch columns; prefix = cls [+ dist])
  """
  if not attns:
    raise ValueError('attention_rollout needs the attention of at least one block')
  rollout = None
  for attn in attns:
    attn = jnp.asarray(attn, jnp.float32)
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
      raise ValueError(f'attention must be [B, heads, T, T], got shape {attn.shape}')
    a = (1.0 - residual) * jnp.mean(attn, axis=1) + residual * jnp.eye(attn.shape[-1])
    a = a / jnp.sum(a, axis=-1, keepdims=True)
    rollout = a if rollout is None else jnp.einsum('bij,bjk->bik', a, rollout)
  cls_row = rollout[:, 0, num_prefix:]
  gh, gw = _grid(cls_row.shape[-1], grid)
  return min_max(cls_row.reshape(-1, gh, gw))


@functools.partial(jax.jit, static_argnames=('num_prefix', 'grid'))
def last_layer_attention(attns: Sequence[jax.Array], num_prefix: int,
                         grid: int | Sequence[int] | None = None) -> jax.Array:
  """The last block's head-averaged cls → patch attention, min-max normalised: [B, gh, gw]."""
  return attention_saliency(attns[-1], num_prefix, grid)


@jax.jit
def grad_cam(activations: jax.Array, gradients: jax.Array) -> jax.Array:
  """Grad-CAM from a stage's activations A and ∂y/∂A, both [B, h, w, C] → [B, h, w] in [0, 1].

      w_c = mean_{i,j} ∂y/∂A[i, j, c];   M = ReLU(Σ_c w_c·A[..., c]);   M / max M
  A map that is zero everywhere (no positive evidence) stays zero.
  """
  activations = jnp.asarray(activations, jnp.float32)
  gradients = jnp.asarray(gradients, jnp.float32)
  if activations.shape != gradients.shape or activations.ndim != 4:
    raise ValueError(f'activations and gradients must both be [B, h, w, C]; got '
                     f'{activations.shape} and {gradients.shape}')
  weights = jnp.mean(gradients, axis=(1, 2))  # [B, C]
  cam = jax.nn.relu(jnp.einsum('bhwc,bc->bhw', activations, weights))
  peak = jnp.max(cam, axis=(1, 2), keepdims=True)
  return jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)


class _Probe(nnx.Variable):
  """A zero added to a stage's output: its gradient is the gradient w.r.t. that output."""


class _ProbedBlock(nnx.Module):

  def __init__(self, block: nnx.Module, shape, dtype):
    self.block = block
    self.probe = _Probe(jnp.zeros(shape, dtype))

  def __call__(self, x, *args, **kwargs):
    return self.block(x, *args, **kwargs) + self.probe[...]


def stage_gradients(graphdef, variables: dict, images: jax.Array, stage: str = 'layer3',
                    classes: jax.Array | None = None):
  """(logits, A, ∂y/∂A) with A = out[stage] and y the logit of `classes` (default: predicted).

  `stage` names an nnx.List of blocks whose last output the model reports as out[stage] (the
  CIFAR ResNets' layer1..3). A zero is added to that output inside the model and `jax.grad`
  runs through the whole forward pass (eval mode: images do not interact, so the gradient of
  the summed selected logits is every image's own gradient).
  """
  model = nnx.merge(graphdef, variables['params'], variables['batch_stats'])
  blocks = getattr(model, stage, None)
  if not isinstance(blocks, nnx.List) or not len(blocks):
    raise ValueError(f'{type(model).__name__} has no stage {stage!r} made of blocks; Grad-CAM '
                     f'needs a stage such as the CIFAR ResNets\' layer3')
  images = jnp.asarray(images, jnp.float32)
  shape = jax.eval_shape(lambda im: model(im, train=False)[1][stage], images)
  blocks[-1] = _ProbedBlock(blocks[-1], shape.shape, shape.dtype)
  probed_def, probe, rest = nnx.split(model, _Probe, ...)

  @jax.jit
  def run(probe, rest, images, classes):

    def selected_logits(probe):
      logits, out = nnx.merge(probed_def, probe, rest)(images, train=False)
      chosen = jnp.argmax(logits, axis=-1) if classes is None else classes
      picked = jnp.take_along_axis(logits, chosen[:, None].astype(jnp.int32), axis=1)
      return jnp.sum(picked), (logits, out[stage])

    grads, (logits, acts) = jax.grad(selected_logits, has_aux=True)(probe)
    return logits, acts, jax.tree.leaves(grads)[0]

  return run(probe, rest, images, classes)


def vit_token_gradients(graphdef, variables: dict, images: jax.Array, block: int = -1,
                        classes: jax.Array | None = None):
  """(logits, A, ∂y/∂A) of a `DistilledViT`: A = `blocks[block].norm1`'s output [B, T, d].

  The recipe is pytorch-grad-cam's for ViTs (jacobgil/pytorch-grad-cam,
  usage_examples/vit_example.py and tutorials/vision_transformers.md: `target_layers =
  [model.blocks[-1].norm1]`, a `reshape_transform` that drops the class token and reshapes the
  rest to the patch grid; a distilled ViT drops both its prefix tokens, cls and dist). TIKD's released code (JSJ515-Group/TIKD) ships no Grad-CAM script, so
  there is no released recipe to follow. Why norm1 of the last block and not its output: the heads
  read the prefix tokens only, so the last block's output patch tokens have zero gradient; the
  last block's attention is the one place where patch tokens still reach the class token.

  y is the logit of `classes` (default: the predicted class) in the logits the model predicts
  with in eval mode: for a distilled ViT (eval_head='mean', DeiT) the mean of the cls and dist
  heads, (cls + dist) / 2, which is also what timm's DeiT returns in eval mode and so what
  pytorch-grad-cam differentiates for a distilled DeiT; for an IRKD-layout model
  (eval_head='cls') and a plain ViT the cls head. So the map explains the prediction the
  model makes and the figure's titles show. A TIKD model is run on its vision pass
  (fuse_text=False, its first-pass logits): the fused pass re-runs the same blocks, so the
  probe would sit in both passes and the map would mix two activations.

  The gradient comes from a zero probe added to norm1's output inside the model (as
  `stage_gradients` does for a ResNet stage); `models/vit.py` is not changed. Eval mode:
  images do not interact, so the gradient of the summed selected logits is each image's own.
  """
  model = nnx.merge(graphdef, variables['params'], variables['batch_stats'])
  blocks = getattr(model, 'blocks', None)
  if not isinstance(blocks, nnx.List) or not len(blocks):
    raise ValueError(f'{type(model).__name__} has no transformer blocks (model.blocks); ViT '
                     f'Grad-CAM needs a DistilledViT')
  depth = len(blocks)
  if not -depth <= block < depth:
    raise ValueError(f'block {block} out of range for a ViT with {depth} blocks (use 0..'
                     f'{depth - 1}, or -1 for the last)')
  block %= depth
  images = jnp.asarray(images, jnp.float32)
  tokens = jax.eval_shape(lambda im: model.embed(im), images)
  blocks[block].norm1 = _ProbedBlock(blocks[block].norm1, tokens.shape, tokens.dtype)
  probed_def, probe, rest = nnx.split(model, _Probe, ...)

  @jax.jit
  def run(probe, rest, images, classes):

    def selected_logits(probe):
      probed = nnx.merge(probed_def, probe, rest)
      logits, out = probed(images, train=False)
      # A itself: norm1 (unprobed) of the block's input, the previous block's output
      x = probed.embed(images) if block == 0 else out[f'block{block - 1}']
      acts = probed.blocks[block].norm1.block(x)
      chosen = jnp.argmax(logits, axis=-1) if classes is None else classes
      picked = jnp.take_along_axis(logits, chosen[:, None].astype(jnp.int32), axis=1)
      return jnp.sum(picked), (logits, acts)

    grads, (logits, acts) = jax.grad(selected_logits, has_aux=True)(probe)
    return logits, acts, jax.tree.leaves(grads)[0]

  return run(probe, rest, images, classes)


@functools.partial(jax.jit, static_argnames=('num_prefix', 'grid'))
def vit_grad_cam(activations: jax.Array, gradients: jax.Array, num_prefix: int,
                 grid: int | Sequence[int] | None = None) -> jax.Array:
  """Grad-CAM on ViT tokens A and ∂y/∂A, both [B, prefix + gh·gw, d] → [B, gh, gw] in [0, 1].

  The prefix tokens (cls [+ dist]) are dropped and the patch tokens reshaped to the grid
  (pytorch-grad-cam's `reshape_transform`); then `grad_cam`: w_c = mean over the patch tokens
  of ∂y/∂A_c, M = ReLU(Σ_c w_c·A_c), M / max M (divided by its maximum like the ResNet maps;
  pytorch-grad-cam min-max scales, which differs only where M's minimum is above zero).
  """
  activations = jnp.asarray(activations, jnp.float32)
  gradients = jnp.asarray(gradients, jnp.float32)
  if activations.shape != gradients.shape or activations.ndim != 3:
    raise ValueError(f'activations and gradients must both be [B, tokens, d]; got '
                     f'{activations.shape} and {gradients.shape}')
  b, _, d = activations.shape
  gh, gw = _grid(activations.shape[1] - num_prefix, grid)
  return grad_cam(activations[:, num_prefix:].reshape(b, gh, gw, d),
                  gradients[:, num_prefix:].reshape(b, gh, gw, d))


def upsample(maps: jax.Array, size: Sequence[int]) -> jax.Array:
  """[B, h, w] → [B, H, W], bilinear (align_corners=False); values stay within [min, max]."""
  return _upsample(jnp.asarray(maps, jnp.float32), tuple(int(s) for s in size))


@functools.partial(jax.jit, static_argnames='size')
def _upsample(maps, size):
  return resize_bilinear(maps, size)
