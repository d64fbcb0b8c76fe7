"""A PyTorch checkpoint → a weights-only Flax checkpoint (`config.teacher.checkpoint` reads it).

  # RepDistiller teacher (torch.load(p)['model']; bare, 'state_dict' and 'net' wrappers work too)
  python -m convert.from_torch --checkpoint resnet32x4_vanilla/ckpt_epoch_240.pth \
      --model resnet32x4 --num_classes 100 --out teachers/resnet32x4
  # our own export (exact round trip of convert.to_torch), or a timm / facebookresearch DeiT file
  python -m convert.from_torch --checkpoint tikd_small.safetensors --out teachers/tikd_small
  # a Hugging Face DeiT folder (DeiTForImageClassificationWithTeacher), optionally re-gridded to
  # 32 px / patch 2 with a fresh 10-class head (IRKD's fine-tuned teacher)
  python -m convert.from_torch --checkpoint deit-small-distilled-patch16-224 --out teachers/deit_s
  python -m convert.from_torch --checkpoint deit-small-distilled-patch16-224 --img_size 32 \
      --patch_size 2 --num_classes 10 --reset_heads --out teachers/deit_s_p2
  # IRKD's notebooks: torch.save(model.state_dict(), …) of a Hugging Face ViT, DataParallel's
  # 'module.' prefix or not, transformers 4.x or 5.x key names (or a save_pretrained folder):
  # a ViTForImageClassification teacher (or the ce rows' ViTTinyClassifier) → `vit`,
  python -m convert.from_torch --checkpoint small_p_4_correct_teacher_weights.pth \
      --out teachers/irkd_vit_p4
  # a ViTWithDistillation student (vit.…, distill_token, classifier, distiller) → `irkd_vit`
  python -m convert.from_torch --checkpoint student.pth --out students/irkd_vit_tiny
  # the P2 teacher, a DeiTForImageClassification (deit.…, one classifier on cls) →
  # `distilled_vit` with eval_head=cls and a zero head_dist
  python -m convert.from_torch --checkpoint "best_teacher (1).pth" --out teachers/irkd_deit_p2

What is not given is read off the weights: the model (`resnet*` / `distilled_vit` / `vit` /
`irkd_vit`), the ViT size (`SIZES` entry with these widths), image size, number of classes, TIKD's
text dimension and `text_proj_layout` (per-block when the file has `blocks.i.attn.text_proj`, as
the released TIKD checkpoints do). A released TIKD checkpoint has no text predictor (ours, for
caption-free inference): it gets a fresh one, and its text dimension is the model width (the
released `set_text_features` takes features exactly that wide). Input normalisation:
`--norm cifar100|cifar10|imagenet` or `--mean/--std`; the Hugging Face processor's statistics for
a HF folder; our export's metadata; ImageNet's for a HF DeiT-with-teacher folder; CIFAR-10's
for a HF ViT or cls-only DeiT without a processor (IRKD's notebooks); else the model default
(CIFAR-100). Every key is checked both in PyTorch names and in
Flax names; a mismatch fails with the list of missing, unexpected and mis-shaped keys.

Hugging Face ViTs (IRKD's notebooks). The model follows from the keys: `distill_token` makes it
IRKD's `ViTWithDistillation` (→ `irkd_vit`: the dist token after cls without a position, no
final norm, eval on the cls head), else a ViTForImageClassification (→ `vit`, cls head after
the final norm). Keys the notebooks' forwards never read are left out, and the command says so:
ViTModel's default pooler (`vit.pooler.…`) and, for ViTWithDistillation, `vit.layernorm`. A state
dict does not record the number of heads: it is the `SIZES` entry's with these widths (pass
--variant if two differ); a folder's config.json gives it. Logits equal transformers' (ours
resizes position embeddings as `interpolate_pos_encoding=True` does: bicubic, align_corners
False), except for the LayerNorm eps: transformers' default (what the notebooks ran) is 1e-12,
ours is 1e-6, a small difference the command warns about (tests/test_convert_irkd.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Mapping, Sequence

import torch

from convert import cli
from convert.mapping import (check_state_dict, hf_deit_to_timm, hf_vit_to_timm, is_hf_vit,
                             resample_patch_embed, torch_to_flax, unwrap_state_dict)
from convert.to_torch import META_KEY, build_flax_model, csv_floats
from convert.torch_models import resize_pos_embed, torch_model_like
from tikd_jax import normalization
from tikd_jax.models import VIT_MODELS
from tikd_jax.models.resnet_cifar import CONFIGS as RESNET_CONFIGS
from tikd_jax.models.variables import load_variables, model_variables
from tikd_jax.models.vit import SIZES
from tikd_jax.train.checkpoint import save_weights
from tikd_jax.tree import flatten

NORMS = normalization.BY_NAME


# --------------------------------------------------------------------------- reading
def read_checkpoint(path: str, trust_pickle: bool = False):
  """(state dict in timm / RepDistiller names, {'model': …} from the file or None, extra kwargs).

  `path`: a Hugging Face DeiT or ViT folder (`save_pretrained`), a .safetensors file, or a
  torch.save file. `extra`: what the file says beyond its weights ('heads', 'mean' / 'std', a
  'norm_note' when the normalisation is assumed, 'model_kwargs').
  """
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(path):
    return _from_hugging_face(*_read_hf_folder(path), path, None)
  if not os.path.exists(path):
    raise FileNotFoundError(f'checkpoint {path} does not exist')
  file_meta = None
  if path.endswith('.safetensors'):
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, framework='pt') as f:
      metadata = f.metadata() or {}
    state_dict = load_file(path)
    if META_KEY in metadata:
      file_meta = json.loads(metadata[META_KEY])
  else:
    state_dict = unwrap_state_dict(_torch_load(path, trust_pickle), f'checkpoint {path}')
  if any(k.startswith('deit.') for k in state_dict) or is_hf_vit(state_dict):
    print(
        f'{path}: a Hugging Face state dict does not record its LayerNorm eps: using '
        f'transformers\' default, {HF_LAYER_NORM_EPS:g} (what IRKD\'s notebooks ran); pass '
        f'--model_kwargs \'{{"layer_norm_eps": …}}\' if it was built with another', file=sys.stderr)
    return _from_hugging_face(state_dict, {'layer_norm_eps': HF_LAYER_NORM_EPS}, path, file_meta)
  return state_dict, file_meta, {}


# transformers' ViTConfig / DeiTConfig default; a converted HF model records it (model kwarg
# `layer_norm_eps`), so that its logits equal transformers' (timm's 1e-6 differs by ~5e-7 / var).
HF_LAYER_NORM_EPS = 1e-12
_IRKD_NORM_NOTE = ('records no input normalisation: using CIFAR-10\'s, as IRKD\'s notebooks '
                   'normalise; convert again with --norm or --mean/--std if it was trained with '
                   'other statistics')


def _torch_load(path: str, trust_pickle: bool):
  try:
    return torch.load(path, map_location='cpu', weights_only=not trust_pickle)
  except Exception as e:  # noqa: BLE001 - the unpickler raises many types
    raise ValueError(f'torch.load({path}, weights_only=True) failed ({type(e).__name__}: {e}). '
                     f'If you trust the file, pass --trust_pickle') from e


def _from_hugging_face(state_dict, extra: dict, what: str, file_meta):
  """A Hugging Face DeiT or ViT state dict (either transformers' names) → read_checkpoint's
  triple. Without normalisation in `extra`: ImageNet's for DeiTForImageClassificationWithTeacher
  (the Hub's), CIFAR-10's for what IRKD's notebooks save (ViTs, the cls-only DeiT)."""
  extra = dict(extra)
  eps = extra.pop('layer_norm_eps', HF_LAYER_NORM_EPS)
  extra['model_kwargs'] = dict(extra.get('model_kwargs') or {}, layer_norm_eps=float(eps))
  if any(k.startswith('deit.') for k in state_dict):
    sd = hf_deit_to_timm(state_dict)
    if 'head_dist.weight' in sd:
      kind, default_norm = 'DeiTForImageClassificationWithTeacher', 'imagenet'
    else:  # IRKD's P2 teacher; `eval_head='cls'` gives its logits (tests/test_deit_teacher.py)
      kind, default_norm = 'DeiTForImageClassification (cls head only)', 'irkd'
      sd['head_dist.weight'] = torch.zeros_like(sd['head.weight'])
      sd['head_dist.bias'] = torch.zeros_like(sd['head.bias'])
      extra['model_kwargs'] = dict(extra.get('model_kwargs') or {}, eval_head='cls')
      print(
          f'{what}: no distillation head; the model evaluates its cls head (eval_head=cls) '
          f'and holds a zero head_dist', file=sys.stderr)
    dropped = []
  elif is_hf_vit(state_dict):
    sd, dropped = hf_vit_to_timm(state_dict)
    kind = 'ViTWithDistillation' if 'dist_token' in sd else 'ViTForImageClassification'
    if kind == 'ViTForImageClassification' and dropped:
      kind = 'ViTModel + classifier (the notebooks\' ViTTinyClassifier)'
    default_norm = 'irkd'
  else:
    raise ValueError(unrecognised(what, state_dict))
  print(f'{what}: a Hugging Face {kind} state dict', file=sys.stderr)
  if dropped:
    print(f'{what}: left out {", ".join(dropped)} (never read by the {kind} forward)',
          file=sys.stderr)
  if 'mean' not in extra:
    if default_norm == 'irkd':
      extra['norm_note'] = _IRKD_NORM_NOTE
    elif os.path.isdir(what):  # the Hub's DeiT folders: ImageNet statistics
      extra['mean'], extra['std'] = (list(v) for v in NORMS[default_norm])
  return sd, file_meta, extra


def _read_hf_folder(path: str):
  """(state dict as on disk, extra) of a `save_pretrained` folder: config.json and
  model.safetensors (or its shards, or pytorch_model.bin). The weights are read as files, not
  through from_pretrained, so custom classes (IRKD's ViTWithDistillation) read too."""
  if not os.path.exists(os.path.join(path, 'config.json')):
    raise FileNotFoundError(f'{path} is a folder without config.json: not a Hugging Face model')
  from transformers import AutoConfig

  config = AutoConfig.from_pretrained(path)
  if config.model_type not in ('deit', 'vit'):
    raise ValueError(f'{path} holds a {config.model_type!r} model; only DeiT and ViT convert')
  if config.hidden_act != 'gelu':
    raise ValueError(f'{path}: hidden_act {config.hidden_act!r}; our ViT uses exact GELU (gelu)')
  if not config.qkv_bias or config.num_channels != 3:
    raise ValueError(f'{path}: qkv_bias={config.qkv_bias}, num_channels={config.num_channels}; '
                     f'our ViT has qkv bias and 3 channels')
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
  else:
    files = [
        n for n in ('model.safetensors', 'pytorch_model.bin')
        if os.path.exists(os.path.join(path, n))
    ][:1]
  if not files:
    raise FileNotFoundError(f'{path} has a config.json but no model.safetensors(.index.json) or '
                            f'pytorch_model.bin')
  state_dict = {}
  for name in files:
    file = os.path.join(path, name)
    if name.endswith('.safetensors'):
      from safetensors.torch import load_file
      state_dict.update(load_file(file))
    else:
      state_dict.update(unwrap_state_dict(_torch_load(file, False), file))
  extra = {'heads': config.num_attention_heads, 'layer_norm_eps': float(config.layer_norm_eps)}
  proc = os.path.join(path, 'preprocessor_config.json')
  if os.path.exists(proc):
    with open(proc) as f:
      pc = json.load(f)
    if 'image_mean' in pc and 'image_std' in pc:
      extra['mean'], extra['std'] = list(pc['image_mean']), list(pc['image_std'])
  return state_dict, extra


# --------------------------------------------------------------------------- inference
def infer_resnet(sd: Mapping[str, torch.Tensor]) -> tuple[str, dict]:
  n = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('layer1.'))
  filters = (sd['conv1.weight'].shape[0],) + tuple(
      sd[f'layer{s}.0.conv2.weight'].shape[0] for s in (1, 2, 3))
  for arch, (depth, f) in RESNET_CONFIGS.items():
    if depth == 6 * n + 2 and tuple(f) == filters:
      return arch, {'num_classes': int(sd['fc.weight'].shape[0])}
  raise ValueError(f'checkpoint is a CIFAR ResNet of depth {6 * n + 2} with filters {filters}, '
                   f'which is none of {sorted(RESNET_CONFIGS)}')


def _vit_geometry(sd, name: str) -> tuple[int, int, int]:
  """(patch, grid, number of prefix positions in pos_embed) of a timm-layout state dict."""
  patch = int(sd['patch_embed.proj.weight'].shape[-1])
  n_pos = int(sd['pos_embed'].shape[1])
  prefix = 2 if name == 'distilled_vit' else 1
  grid = math.isqrt(n_pos - prefix)
  if grid * grid != n_pos - prefix:
    raise ValueError(f'pos_embed has {n_pos} positions: not {prefix} prefix + a square grid, '
                     f'so this is not a {name} checkpoint')
  return patch, grid, prefix


def infer_vit(sd: Mapping[str, torch.Tensor], name: str | None, heads: int | None = None,
              variant: str | None = None):
  """(model name, kwargs) of a timm-layout ViT state dict; `variant` skips the size search."""
  if name is None:
    if 'dist_token' not in sd:
      name = 'vit'
    elif 'norm.weight' not in sd:
      name = 'irkd_vit'
    else:
      name = 'distilled_vit'
  dim = int(sd['cls_token'].shape[-1])
  depth = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.'))
  mlp = int(sd['blocks.0.mlp.fc1.weight'].shape[0])
  patch, grid, _ = _vit_geometry(sd, name)
  kwargs = {'num_classes': int(sd['head.weight'].shape[0]), 'img_size': grid * patch}
  rank = None
  if 'text_predictor.up.weight' in sd:
    kwargs['text_dim'] = int(sd['text_predictor.up.weight'].shape[0])
    rank = int(sd['text_predictor.down.weight'].shape[0])
  elif 'text_decoder.weight' in sd:  # released TIKD: text as wide as the model, no predictor
    kwargs['text_dim'] = dim
  if 'blocks.0.attn.text_proj.weight' in sd:
    kwargs['text_proj_layout'] = 'per_block'
  if 'text_gate' in sd:
    kwargs['fusion_gate'] = True
  if variant is not None:  # as told; the strict key check reports what does not fit
    if variant not in SIZES:
      raise ValueError(f'unknown ViT variant {variant!r}; known: {sorted(SIZES)}')
    candidates = [variant]
  else:
    fits = [
        v for v, s in SIZES.items() if (s.dim, s.depth, s.mlp_dim) == (dim, depth, mlp) and (
            heads is None or s.heads == heads) and (rank is None or s.text_rank == rank)
    ]
    if not fits:
      raise ValueError(f'no ViT size in SIZES has dim {dim}, depth {depth}, mlp {mlp}'
                       f'{f", heads {heads}" if heads else ""}'
                       f'{f", text rank {rank}" if rank else ""}; add one to '
                       f'tikd_jax/models/vit.py:SIZES or pass --variant')
    candidates = [v for v in fits if SIZES[v].patch == patch] or fits
    if len({SIZES[v].heads for v in candidates}) > 1:
      raise ValueError(f'sizes {candidates} all fit these weights but differ in heads: pass '
                       f'--variant')
  kwargs['variant'] = candidates[0]
  if SIZES[candidates[0]].patch != patch:
    kwargs['patch_size'] = patch
  return name, kwargs


LAYOUTS = (
    'a CIFAR ResNet (RepDistiller: conv1.weight, layer1.…, fc.…)',
    'a timm / facebookresearch / tikd-jax ViT (cls_token, patch_embed.proj.weight, blocks.…)',
    'a Hugging Face DeiT (deit.embeddings.…, cls_classifier.…)',
    'a Hugging Face ViT as IRKD\'s notebooks save it (vit.embeddings.…, classifier.…; '
    'ViTWithDistillation adds distill_token and distiller.…)',
)


def unrecognised(path: str, sd: Mapping[str, object]) -> str:
  """What a state dict of none of LAYOUTS holds: its top-level names, counted."""
  tops: dict[str, int] = {}
  for k in sd:
    tops[k.split('.')[0]] = tops.get(k.split('.')[0], 0) + 1
  found = ', '.join(f'{t} ({n})' for t, n in sorted(tops.items())[:20]) or 'no tensors'
  return (f'checkpoint {path} is none of the layouts this reads: {"; ".join(LAYOUTS)} '
          f'(a DataParallel "module." prefix is stripped first). It holds {len(sd)} tensors '
          f'under {found}; first keys: {sorted(sd)[:8]}')


def _norm_kwargs(args, extra) -> dict:
  if args.mean or args.std:
    if not (args.mean and args.std):
      raise ValueError('give both --mean and --std')
    return {
        'mean': [float(x) for x in args.mean.split(',')],
        'std': [float(x) for x in args.std.split(',')]
    }
  if args.norm:
    mean, std = NORMS[args.norm]
    return {'mean': list(mean), 'std': list(std)}
  if 'norm_note' in extra:  # IRKD's notebooks: CIFAR-10 statistics
    print(f'{args.checkpoint} {extra["norm_note"]}', file=sys.stderr)
    mean, std = NORMS['cifar10']
    return {'mean': list(mean), 'std': list(std)}
  return {k: extra[k] for k in ('mean', 'std') if k in extra}


# --------------------------------------------------------------------------- re-gridding
def regrid_vit(sd: dict, name: str, kwargs: dict) -> dict:
  """Resamples the patch kernel and resizes pos_embed when the target patch / image size differ
  from the checkpoint's (pseudo-inverse patch resize, bicubic positions, prefix kept)."""
  src_patch, src_grid, prefix = _vit_geometry(sd, name)
  patch = kwargs.get('patch_size') or SIZES[kwargs['variant']].patch
  img = kwargs.get('img_size', 32)
  if img % patch:
    raise ValueError(f'img_size {img} is not a multiple of patch size {patch}')
  sd = dict(sd)
  if patch != src_patch:
    sd['patch_embed.proj.weight'] = resample_patch_embed(sd['patch_embed.proj.weight'], patch)
    print(f'patch embedding resampled {src_patch} → {patch}', file=sys.stderr)
  if img // patch != src_grid:
    sd['pos_embed'] = resize_pos_embed(sd['pos_embed'], (img // patch,) * 2, prefix)
    print(f'position embedding resized {src_grid}² → {img // patch}²', file=sys.stderr)
  return sd


# --------------------------------------------------------------------------- conversion
HEADS = ('head', 'head_dist', 'fc')


def fresh_heads(twin: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
  """New classifier weights, initialised as our models do: trunc_normal(0.02) and zero bias for
  the ViT heads (timm), PyTorch's default Linear init for the ResNet's fc (RepDistiller)."""
  with torch.random.fork_rng():
    torch.manual_seed(seed)
    out = {}
    for name in HEADS:
      layer = getattr(twin, name, None)
      if layer is None:
        continue
      if name == 'fc':
        layer.reset_parameters()
      else:
        torch.nn.init.trunc_normal_(layer.weight, std=0.02, a=-2.0, b=2.0)
        torch.nn.init.zeros_(layer.bias)
      out.update({f'{name}.{k}': v.detach().clone() for k, v in layer.state_dict().items()})
  return out


def fresh_text_predictor(twin: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
  """A new text predictor (ours; released TIKD checkpoints have none), initialised as our
  Linear layers are: trunc_normal(0.02) weights, zero biases (timm)."""
  with torch.random.fork_rng():
    torch.manual_seed(seed)
    out = {}
    for name, layer in twin.text_predictor.named_children():
      torch.nn.init.trunc_normal_(layer.weight, std=0.02, a=-2.0, b=2.0)
      torch.nn.init.zeros_(layer.bias)
      out.update(
          {f'text_predictor.{name}.{k}': v.detach().clone() for k, v in layer.state_dict().items()})
  return out


def _without_counters(sd):
  """BatchNorm's num_batches_tracked carries nothing the eval model uses (old files lack it)."""
  return {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}


def convert(state_dict: Mapping[str, torch.Tensor], model_meta: dict, what: str,
            reset_heads: bool = False):
  """Checks `state_dict` against the model of `model_meta` and returns the loaded Flax model."""
  model = build_flax_model(model_meta)
  twin = torch_model_like(model)
  sd = dict(state_dict)
  if reset_heads:
    sd = {k: v for k, v in sd.items() if k.split('.')[0] not in HEADS}
    sd.update(fresh_heads(twin))
  if (getattr(twin, 'text_predictor', None) is not None and 'text_decoder.weight' in sd
      and not any(k.startswith('text_predictor.') for k in sd)):
    sd.update(fresh_text_predictor(twin))
    print(
        f'{what}: no text predictor (a released TIKD checkpoint); a fresh one was added, '
        f'train it before caption-free inference', file=sys.stderr)
  check_state_dict(_without_counters(twin.state_dict()), _without_counters(sd), what)
  flat = torch_to_flax(sd)
  template = flatten(model_variables(model))
  flat = {
      k: (v.astype(template[k].dtype) if k in template and v.dtype != template[k].dtype else v)
      for k, v in flat.items()
  }
  load_variables(model, flat, what)
  return model


def _parse(argv):
  p = argparse.ArgumentParser(prog='python -m convert.from_torch', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--checkpoint', required=True,
                 help='.pth/.pt/.bin/.safetensors file, or a Hugging Face DeiT / ViT folder')
  p.add_argument('--out', required=True, help='output directory (a weights-only checkpoint)')
  p.add_argument(
      '--model', default=None,
      help=f'model name (default: read off the weights): {", ".join(VIT_MODELS)}, '
      f'{", ".join(RESNET_CONFIGS)}')
  p.add_argument('--variant', default=None, help=f'ViT size: {", ".join(SIZES)}')
  p.add_argument('--num_classes', type=int, default=None)
  p.add_argument('--img_size', type=int, default=None,
                 help='ViT image size; a new one resizes pos_embed')
  p.add_argument('--patch_size', type=int, default=None,
                 help='ViT patch size; a new one resamples the patch embedding')
  p.add_argument('--reset_heads', action='store_true',
                 help='fresh classifier heads (with --num_classes) instead of the checkpoint\'s')
  p.add_argument('--norm', choices=sorted(NORMS), default=None, help='input normalisation')
  p.add_argument('--mean', default=None, help='comma-separated channel means (with --std)')
  p.add_argument('--std', default=None, help='comma-separated channel stds (with --mean)')
  p.add_argument('--model_kwargs', default=None, help='JSON object of further build_model kwargs')
  p.add_argument('--step', type=int, default=0, help='step number of the written checkpoint')
  p.add_argument('--trust_pickle', action='store_true',
                 help='torch.load with weights_only=False (only for files you trust)')
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
  args = _parse(argv)
  sd, file_meta, extra = read_checkpoint(args.checkpoint, args.trust_pickle)
  name = args.model or (file_meta or {}).get('name')
  if 'conv1.weight' in sd and any(k.startswith('layer1.') for k in sd):
    arch, kwargs = infer_resnet(sd)
    if name is None:
      name = arch
    elif name != arch:
      raise ValueError(f'--model {name} but the checkpoint is a {arch} (see its layer shapes)')
  elif 'cls_token' in sd and 'patch_embed.proj.weight' in sd:
    if name is not None and name not in VIT_MODELS:
      raise ValueError(f'checkpoint is a ViT but --model is {name}')
    name, kwargs = infer_vit(sd, name, extra.get('heads'), args.variant)
  else:
    raise ValueError(unrecognised(args.checkpoint, sd))
  vit_only = [f'--{f}' for f in ('variant', 'img_size', 'patch_size') if getattr(args, f)]
  if name not in VIT_MODELS and vit_only:
    raise ValueError(f'{", ".join(vit_only)} only apply to ViTs, not {name}')
  kwargs.update((file_meta or {}).get('kwargs') or {})
  kwargs.update(_norm_kwargs(args, extra))
  for flag in ('variant', 'num_classes', 'img_size', 'patch_size'):
    if getattr(args, flag) is not None:
      kwargs[flag] = getattr(args, flag)
  kwargs.update(extra.get('model_kwargs') or {})
  if args.model_kwargs:
    kwargs.update(json.loads(args.model_kwargs))
  if name in VIT_MODELS:
    sd = regrid_vit(sd, name, kwargs)
  model_meta = {'name': name, 'kwargs': kwargs}
  model = convert(sd, model_meta, f'checkpoint {args.checkpoint}', args.reset_heads)
  if 'mean' not in kwargs:
    print(
        f'{args.checkpoint} records no input normalisation: using the model default, mean '
        f'{csv_floats(model.mean)} std {csv_floats(model.std)} (CIFAR-100); if it was trained with other '
        f'statistics, convert again with --norm or --mean/--std', file=sys.stderr)
  kwargs.setdefault('mean', list(model.mean))  # explicit in the metadata
  kwargs.setdefault('std', list(model.std))
  path = save_weights(args.out, model_variables(model),
                      meta={'model': model_meta,
                            'source': os.path.abspath(args.checkpoint)}, step=args.step)
  print(f'wrote {path}: model {name} {json.dumps(kwargs)}', file=sys.stderr)
  return path


if __name__ == '__main__':
  cli.run(main)
