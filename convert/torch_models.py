"""Plain PyTorch re-statements of our models, in the layouts the PyTorch world uses.

They exist so that exported weights can be used (and checked) without JAX, and so that PyTorch
checkpoints can be checked key by key before import. No timm needed:

  * `TorchDistilledViT`: timm's `VisionTransformerDistilled` layout (`cls_token`, `dist_token`,
    `pos_embed`, `patch_embed.proj`, `blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`,
    `norm`, `head`, `head_dist`) with the same math as `tikd_jax.models.vit.DistilledViT`: LayerNorm
    eps 1e-6, exact GELU, qkv bias, eval logits = mean of both heads (or the cls head). The plain
    ViT (`distilled=False`) and IRKD's `ViTWithDistillation` (`dist_pos_embed=False,
    final_norm=False, eval_head='cls'`) are the same class. TIKD's text modules (`text_decoder`,
    `text_proj` or, with `text_proj_layout='per_block'`, the released `blocks.i.attn.text_proj`,
    `text_adapter.{down,up}`, `text_predictor.{down,up}`) are held and the fused pass is
    implemented as well. A state dict of the distilled variant without text modules loads into
    timm's `deit_*_distilled_patch*` models with strict=True. Hidden and attention dropout
    (`dropout`, `attn_dropout`) are `nn.Dropout`s where the JAX model drops (no parameters, no
    effect in eval mode); drop path is not restated (eval mode only).
  * `TorchCifarResNet`: RepDistiller's CIFAR ResNet (`conv1`, `bn1`, `layer{1,2,3}.i.{conv1,bn1,
    conv2,bn2,downsample.0,downsample.1}`, `fc`).

Inputs: float images in [0, 1], **NCHW** (PyTorch's convention; an NHWC batch `x` from the JAX side
is `x.permute(0, 3, 1, 2)`). Like the JAX models, every model normalises its input itself with its
`mean` / `std`; those are non-persistent buffers, so state dicts stay in the standard layout.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tikd_jax.normalization import CIFAR100_MEAN, CIFAR100_STD


class _Normalize(nn.Module):
  """(x - mean) / std over channels of an NCHW batch; buffers are not part of the state dict."""

  def __init__(self, mean: Sequence[float], std: Sequence[float]):
    super().__init__()
    self.register_buffer('mean',
                         torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                         persistent=False)
    self.register_buffer('std',
                         torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

  def forward(self, x):
    return (x.float() - self.mean) / self.std


# --------------------------------------------------------------------------- ViT
class PatchEmbed(nn.Module):

  def __init__(self, patch: int, dim: int):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, patch, stride=patch)

  def forward(self, x):
    x = self.proj(x)  # [B, d, gh, gw]
    return x.flatten(2).transpose(1, 2), x.shape[-2:]


class Attention(nn.Module):

  def __init__(self, dim: int, heads: int, text_proj: bool = False, dropout: float = 0.0,
               attn_dropout: float = 0.0):
    super().__init__()
    self.heads = heads
    self.head_dim = dim // heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.attn_drop = nn.Dropout(attn_dropout)  # timm's names; no parameters
    self.proj = nn.Linear(dim, dim)
    self.proj_drop = nn.Dropout(dropout)
    if text_proj:  # TIKD's released per-block layout (its Linear(512, head_dim) at width 512)
      self.text_proj = nn.Linear(dim, self.head_dim)

  def forward(self, x, value_bias=None, decoded=None):
    if decoded is not None:  # per-block layout: this block's own projection
      value_bias = self.text_proj(decoded)
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, N, hd]
    if value_bias is not None:  # TIKD: the same [B, N, hd] term added to every head's values
      v = v + value_bias[:, None]
    attn = (q @ k.transpose(-2, -1)) * (self.head_dim**-0.5)
    attn = self.attn_drop(attn.softmax(dim=-1))
    y = (attn @ v).transpose(1, 2).reshape(b, n, d)
    return self.proj_drop(self.proj(y))


class Mlp(nn.Module):

  def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)
    self.drop = nn.Dropout(dropout)  # HF's hidden dropout after fc2 only (none after the GELU)

  def forward(self, x):
    return self.drop(self.fc2(F.gelu(self.fc1(x))))  # exact (erf) GELU, as timm / DeiT


class Block(nn.Module):

  def __init__(self, dim: int, heads: int, mlp_dim: int, text_proj: bool = False,
               dropout: float = 0.0, attn_dropout: float = 0.0, layer_norm_eps: float = 1e-6):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
    self.attn = Attention(dim, heads, text_proj, dropout, attn_dropout)
    self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
    self.mlp = Mlp(dim, mlp_dim, dropout)

  def forward(self, x, value_bias=None, decoded=None):
    x = x + self.attn(self.norm1(x), value_bias, decoded)
    return x + self.mlp(self.norm2(x))


class LowRankLinear(nn.Module):

  def __init__(self, din: int, rank: int, dout: int):
    super().__init__()
    self.down = nn.Linear(din, rank)
    self.up = nn.Linear(rank, dout)

  def forward(self, x):
    return self.up(self.down(x))


def _cosine(a, b, eps: float = 1e-8):
  """Same formula as the JAX side (each norm clamped at eps)."""
  na = torch.linalg.norm(a, dim=-1).clamp_min(eps)
  nb = torch.linalg.norm(b, dim=-1).clamp_min(eps)
  return (a * b).sum(-1) / (na * nb)


def resize_pos_embed(pos_embed, grid: tuple[int, int], num_prefix: int):
  """Bicubic (align_corners=False) resize of the patch positions; prefix positions kept."""
  prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
  old = math.isqrt(patches.shape[1])
  if (old, old) == tuple(grid):
    return pos_embed
  d = patches.shape[-1]
  img = patches.reshape(1, old, old, d).permute(0, 3, 1, 2)
  img = F.interpolate(img.float(), size=tuple(grid), mode='bicubic', align_corners=False)
  img = img.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d).to(pos_embed.dtype)
  return torch.cat([prefix, img], dim=1)


class TorchDistilledViT(nn.Module):
  """DeiT-style ViT; see the module docstring. Mirrors `DistilledViT` argument for argument."""

  def __init__(self, *, dim: int, depth: int, heads: int, mlp_dim: int, patch: int,
               num_classes: int, img_size: int = 32, distilled: bool = True,
               dist_pos_embed: bool = True, final_norm: bool = True, eval_head: str = 'mean',
               text_dim: int | None = None, text_rank: int = 32, text_proj_layout: str = 'shared',
               fusion_gate: bool = False, mean: Sequence[float] = CIFAR100_MEAN,
               std: Sequence[float] = CIFAR100_STD, dropout: float = 0.0, attn_dropout: float = 0.0,
               text_predictor: bool = True, layer_norm_eps: float = 1e-6):
    super().__init__()
    if eval_head not in ('mean', 'cls'):
      raise ValueError(f"eval_head must be 'mean' or 'cls', got {eval_head!r}")
    if img_size % patch:
      raise ValueError(f'img_size {img_size} is not a multiple of patch size {patch}')
    self.distilled, self.dist_pos_embed = distilled, dist_pos_embed
    if text_proj_layout not in ('shared', 'per_block'):
      raise ValueError(f"text_proj_layout must be 'shared' or 'per_block', got "
                       f"{text_proj_layout!r}")
    self.final_norm, self.eval_head, self.text_dim = final_norm, eval_head, text_dim
    self.per_block = text_dim is not None and text_proj_layout == 'per_block'
    self.grid = img_size // patch
    self.num_prefix = 2 if distilled else 1
    self.normalize = _Normalize(mean, std)
    self.patch_embed = PatchEmbed(patch, dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    if distilled:
      self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
    n_pos = self.grid**2 + (self.num_prefix if dist_pos_embed else 1)
    self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, dim))
    self.pos_drop = nn.Dropout(dropout)  # HF's embeddings dropout (IRKD: not on the dist token)
    self.blocks = nn.ModuleList([
        Block(dim, heads, mlp_dim, self.per_block, dropout, attn_dropout, layer_norm_eps)
        for _ in range(depth)
    ])
    if final_norm:
      self.norm = nn.LayerNorm(dim, eps=layer_norm_eps)
    self.head = nn.Linear(dim, num_classes)
    if distilled:
      self.head_dist = nn.Linear(dim, num_classes)
    if text_dim is not None:
      self.text_decoder = nn.Linear(dim, dim)
      if not self.per_block:
        self.text_proj = nn.Linear(dim, dim // heads)
      if text_dim != dim:
        self.text_adapter = LowRankLinear(text_dim, text_rank, dim)
      self.text_predictor = LowRankLinear(dim, text_rank, text_dim) if text_predictor else None
      self.text_gate = nn.Parameter(torch.zeros(dim)) if fusion_gate else None

  def embed(self, images):
    x, (gh, gw) = self.patch_embed(self.normalize(images))
    b, _, d = x.shape
    pos = self.pos_embed
    if (gh, gw) != (self.grid, self.grid):
      pos = resize_pos_embed(pos, (gh, gw), num_prefix=pos.shape[1] - self.grid**2)
    cls = self.cls_token.expand(b, -1, -1)
    if not self.distilled:
      return self.pos_drop(torch.cat([cls, x], dim=1) + pos)
    dist = self.dist_token.expand(b, -1, -1)
    if self.dist_pos_embed:
      return self.pos_drop(torch.cat([cls, dist, x], dim=1) + pos)
    x = self.pos_drop(torch.cat([cls, x], dim=1) + pos)  # IRKD: the dist token has no position
    return torch.cat([x[:, :1], dist, x[:, 1:]], dim=1)

  def forward_heads(self, images, text=None, fuse_text: bool = False) -> dict:
    """Both heads and the intermediates the JAX model names in `out` (a subset)."""
    out = {}
    x = self.embed(images)
    for block in self.blocks:
      x = block(x)
    if self.final_norm:
      x = self.norm(x)
    out['tokens'] = x
    if self.text_dim is not None and self.text_predictor is not None:
      out['text_pred'] = self.text_predictor(x[:, 0])
    if fuse_text:
      if self.text_dim is None:
        raise ValueError('fuse_text=True needs a TIKD model (text_dim set)')
      if text is None and 'text_pred' not in out:
        raise ValueError('fuse_text without text needs the text predictor (text_predictor=True)')
      t = out['text_pred'].detach() if text is None else text.float()
      if self.text_dim != x.shape[-1]:
        t = self.text_adapter(t)
      c = _cosine(x, t[:, None, :]).clamp(0.0, 1.0)
      out['text_weights'] = c
      decoded = self.text_decoder(c[..., None] * x)
      value_bias = None if self.per_block else self.text_proj(decoded)
      fused = x
      for block in self.blocks:  # second pass, no final norm after it
        fused = block(fused, value_bias, decoded if self.per_block else None)
      x = fused if self.text_gate is None else x + self.text_gate * (fused - x)
    out['cls_logits'] = self.head(x[:, 0])
    if self.distilled:
      out['dist_logits'] = self.head_dist(x[:, 1])
    return out

  def forward(self, images, text=None, fuse_text: bool = False):
    """Eval logits: mean of both heads (DeiT), or the cls head (plain ViT, IRKD)."""
    out = self.forward_heads(images, text, fuse_text)
    if not self.distilled or self.eval_head == 'cls':
      return out['cls_logits']
    return (out['cls_logits'] + out['dist_logits']) / 2


# --------------------------------------------------------------------------- CIFAR ResNet
class BasicBlock(nn.Module):

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.downsample is not None:
      x = self.downsample(x)
    return F.relu(y + x)


class TorchCifarResNet(nn.Module):
  """RepDistiller's `models/resnet.py` ResNet (depth 6n + 2, filters [stem, s1, s2, s3])."""

  def __init__(self, *, depth: int, filters: Sequence[int], num_classes: int,
               mean: Sequence[float] = CIFAR100_MEAN, std: Sequence[float] = CIFAR100_STD):
    super().__init__()
    if (depth - 2) % 6:
      raise ValueError(f'depth {depth} must be 6n + 2')
    n = (depth - 2) // 6
    self.normalize = _Normalize(mean, std)
    self.conv1 = nn.Conv2d(3, filters[0], 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(filters[0])
    cin = filters[0]
    for stage, (cout, stride) in enumerate(zip(filters[1:], (1, 2, 2))):
      blocks = []
      for i in range(n):
        blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
        cin = cout
      setattr(self, f'layer{stage + 1}', nn.Sequential(*blocks))
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, images):
    x = F.relu(self.bn1(self.conv1(self.normalize(images))))
    x = self.layer3(self.layer2(self.layer1(x)))
    return self.fc(x.mean(dim=(2, 3)))  # == AvgPool2d(8) at 32 px


# --------------------------------------------------------------------------- from our models
def torch_model_like(flax_model) -> nn.Module:
  """The PyTorch twin of a built `DistilledViT` or `CifarResNet` (same sizes and options)."""
  cls, kwargs = torch_twin_args(flax_model)
  return cls(**kwargs)


def torch_twin_args(flax_model) -> tuple[type, dict]:
  """(twin class, its constructor arguments) for a built `DistilledViT` or `CifarResNet`."""
  from tikd_jax.models.resnet_cifar import CONFIGS, CifarResNet
  from tikd_jax.models.vit import DistilledViT

  mean, std = tuple(float(v) for v in flax_model.mean), tuple(float(v) for v in flax_model.std)
  if isinstance(flax_model, DistilledViT):
    s = flax_model.size
    return TorchDistilledViT, dict(
        dim=s.dim, depth=s.depth, heads=s.heads, mlp_dim=s.mlp_dim, patch=s.patch,
        num_classes=flax_model.num_classes, img_size=flax_model.img_size,
        distilled=flax_model.distilled, dist_pos_embed=flax_model.dist_pos_embed,
        final_norm=flax_model.final_norm, eval_head=flax_model.eval_head,
        text_dim=flax_model.text_dim, text_rank=s.text_rank,
        text_proj_layout=flax_model.text_proj_layout, fusion_gate=flax_model.fusion_gate, mean=mean,
        std=std, dropout=flax_model.dropout, attn_dropout=flax_model.attn_dropout,
        text_predictor=getattr(flax_model, 'text_predictor',
                               None) is not None, layer_norm_eps=flax_model.layer_norm_eps)
  if isinstance(flax_model, CifarResNet):
    depth, filters = CONFIGS[flax_model.arch]
    return TorchCifarResNet, dict(depth=depth, filters=list(filters),
                                  num_classes=flax_model.num_classes, mean=mean, std=std)
  raise TypeError(f'no PyTorch twin for {type(flax_model).__name__}')


TIMM_LAYER_NORM_EPS = 1e-6  # timm's ViTs: partial(nn.LayerNorm, eps=1e-6), not a constructor arg


def timm_eps_refusal(flax_model) -> str:
  """Why timm cannot load this ViT exactly ('' when it can, as far as LayerNorm eps goes)."""
  eps = getattr(flax_model, 'layer_norm_eps', TIMM_LAYER_NORM_EPS)
  if eps == TIMM_LAYER_NORM_EPS:
    return ''
  return (f'no timm export: this model\'s LayerNorm eps is {eps:g} (e.g. a converted Hugging Face '
          f'checkpoint) and timm\'s ViTs use {TIMM_LAYER_NORM_EPS:g}, so timm would compute other '
          f'logits; load it with the PyTorch twin below, or build timm with '
          f'norm_layer=partial(nn.LayerNorm, eps={eps:g}) yourself')


def timm_args(flax_model) -> tuple[str, dict] | None:
  """(timm class path, its constructor arguments) of the timm model that loads this model's
  exported state dict with strict=True and computes the same eval logits from normalised input,
  or None when timm has no such model (ResNets, text modules, IRKD's layout).

  A distilled ViT is timm's `VisionTransformerDistilled` (eval logits: the mean of both heads),
  a plain one `VisionTransformer` (class token, head on the normed cls token); both default to
  qkv bias, LayerNorm eps 1e-6 and exact GELU, as ours.
  """
  from tikd_jax.models.vit import DistilledViT

  if not isinstance(flax_model, DistilledViT) or flax_model.text_dim or not flax_model.final_norm:
    return None
  if timm_eps_refusal(flax_model):
    return None
  s = flax_model.size
  if int(s.dim * (s.mlp_dim / s.dim)) != s.mlp_dim:
    return None  # timm sizes the MLP as int(embed_dim * mlp_ratio)
  args = dict(img_size=flax_model.img_size, patch_size=s.patch, embed_dim=s.dim, depth=s.depth,
              num_heads=s.heads, mlp_ratio=s.mlp_dim / s.dim, num_classes=flax_model.num_classes)
  if not flax_model.distilled:
    return 'timm.models.vision_transformer.VisionTransformer', args
  if flax_model.dist_pos_embed and flax_model.eval_head == 'mean':
    return 'timm.models.deit.VisionTransformerDistilled', args
  return None  # IRKD's layout: the dist token has no position, eval reads the cls head
