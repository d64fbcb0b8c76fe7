"""Key and layout mapping between our flat Flax variables and PyTorch state dicts.

Flax side: `flatten(model_variables(model))`, keys like 'params/blocks/0/attn/qkv/kernel' and
'batch_stats/layer1/0/bn1/mean'. PyTorch side: timm's ViT layout and RepDistiller's ResNet layout.

  Flax                                   PyTorch
  params/…/kernel  Linear [in, out]      ….weight [out, in]        (transpose)
  params/…/kernel  Conv HWIO             ….weight OIHW             (transpose 3, 2, 0, 1)
  params/…/scale   (LayerNorm, BN)       ….weight
  batch_stats/…/mean, …/var              ….running_mean, ….running_var
  patch_embed/…                          patch_embed.proj.…
  blocks/<i>/attn/text_proj/…            blocks.<i>.attn.text_proj.…  (TIKD per-block, released)
  downsample_conv/…, downsample_bn/…     downsample.0.…, downsample.1.…
  (none)                                 ….num_batches_tracked     (written as 0, dropped on import)

Every function here is a pure re-layout: a Flax → PyTorch → Flax trip is bit-exact.
Also: Hugging Face DeiT (`DeiTForImageClassificationWithTeacher`) and ViT
(`ViTForImageClassification`, IRKD's `ViTWithDistillation`), both the on-disk names of
transformers 4.x and the in-memory names of transformers ≥ 5, → timm layout (query/key/value
merged into qkv), and the patch-embedding resampling used to re-grid a pretrained ViT.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np
import torch

from tikd_jax.tree import check_keys

_MODULE_TO_TORCH = (('patch_embed', 'patch_embed.proj'), ('downsample_conv', 'downsample.0'),
                    ('downsample_bn', 'downsample.1'))
_LEAF_TO_TORCH = {
    'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
    'var': 'running_var'
}


def _to_numpy(x) -> np.ndarray:
  if isinstance(x, torch.Tensor):
    return x.detach().cpu().numpy()
  return np.asarray(x)


def _kernel_to_torch(k: np.ndarray) -> np.ndarray:
  if k.ndim == 2:  # Linear [in, out] → [out, in]
    return k.T
  if k.ndim == 4:  # Conv HWIO → OIHW
    return k.transpose(3, 2, 0, 1)
  raise ValueError(f'kernel of rank {k.ndim} has no PyTorch layout rule')


def _weight_to_flax(w: np.ndarray) -> np.ndarray:
  if w.ndim == 2:
    return w.T
  if w.ndim == 4:  # OIHW → HWIO
    return w.transpose(2, 3, 1, 0)
  raise ValueError(f'weight of rank {w.ndim} has no Flax layout rule')


def flax_key_to_torch(key: str) -> str:
  """'params/blocks/0/attn/qkv/kernel' → 'blocks.0.attn.qkv.weight'."""
  collection, *path = key.split('/')
  if collection not in ('params', 'batch_stats') or not path:
    raise ValueError(f"flat Flax key {key!r} does not start with 'params/' or 'batch_stats/'")
  module, leaf = path[:-1], path[-1]
  module = [dict(_MODULE_TO_TORCH).get(p, p) for p in module]
  if collection == 'params' and leaf in ('kernel', 'scale', 'bias') and module:
    leaf = _LEAF_TO_TORCH[leaf]
  elif collection == 'batch_stats':
    if leaf not in ('mean', 'var'):
      raise ValueError(f'unknown batch statistic {key!r}')
    leaf = _LEAF_TO_TORCH[leaf]
  return '.'.join(module + [leaf])


def flax_to_torch(flat: Mapping[str, object]) -> dict[str, torch.Tensor]:
  """Flat Flax variables → PyTorch state dict (adds num_batches_tracked = 0 per BatchNorm)."""
  sd: dict[str, torch.Tensor] = {}
  for key in sorted(flat):
    value = _to_numpy(flat[key])
    tkey = flax_key_to_torch(key)
    if key.endswith('/kernel'):
      value = _kernel_to_torch(value)
    sd[tkey] = torch.from_numpy(np.ascontiguousarray(value).copy())
    if key.startswith('batch_stats/') and key.endswith('/mean'):
      sd[tkey[:-len('running_mean')] + 'num_batches_tracked'] = torch.tensor(0, dtype=torch.long)
  return sd


def torch_key_to_flax(key: str, ndim: int) -> str | None:
  """'blocks.0.attn.qkv.weight' → 'params/blocks/0/attn/qkv/kernel'; None for dropped keys."""
  parts = key.split('.')
  leaf = parts[-1]
  if leaf == 'num_batches_tracked':
    return None
  joined = '.'.join(parts[:-1])
  for ours, theirs in _MODULE_TO_TORCH:
    joined = re.sub(rf'(^|\.){re.escape(theirs)}(?=$|\.)', rf'\g<1>{ours}', joined)
  module = joined.split('.') if joined else []
  if leaf in ('running_mean', 'running_var'):
    return '/'.join(['batch_stats'] + module + [leaf[len('running_'):]])
  if leaf == 'weight' and module:
    leaf = 'kernel' if ndim >= 2 else 'scale'
  return '/'.join(['params'] + module + [leaf])


def torch_to_flax(state_dict: Mapping[str, object]) -> dict[str, np.ndarray]:
  """PyTorch state dict (our layouts) → flat Flax variables as NumPy (float arrays kept as is)."""
  flat: dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    value = _to_numpy(value)
    fkey = torch_key_to_flax(key, value.ndim)
    if fkey is None:
      continue
    if fkey.endswith('/kernel'):
      value = _weight_to_flax(value)
    if fkey in flat:
      raise ValueError(f'two PyTorch keys map to {fkey!r} (one of them is {key!r})')
    flat[fkey] = np.ascontiguousarray(value)
  return flat


def check_state_dict(expected: Mapping[str, object], got: Mapping[str, object], what: str):
  """Raises a ValueError listing every missing, unexpected and mis-shaped key (PyTorch names)."""
  check_keys(dict(expected), dict(got), what)


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str):
  """`module.load_state_dict(state_dict, strict=True)` with our key-by-key error first."""
  check_state_dict(module.state_dict(), state_dict, what)
  module.load_state_dict(state_dict, strict=True)
  return module


# --------------------------------------------------------------------------- checkpoint wrappers
def unwrap_state_dict(obj, what: str = 'checkpoint') -> dict[str, torch.Tensor]:
  """RepDistiller's {'model': sd, 'epoch': …}, {'state_dict': sd}, {'net': sd} or a bare state
  dict → the state dict, with DataParallel's 'module.' prefixes stripped."""
  if not isinstance(obj, Mapping):
    raise ValueError(f'{what} holds a {type(obj).__name__}, not a state dict')
  for wrapper in ('model', 'state_dict', 'net', 'model_state_dict'):
    inner = obj.get(wrapper)
    if isinstance(inner, Mapping) and inner and all(
        isinstance(v, torch.Tensor) for v in inner.values()):
      obj = inner
      break
  tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
  if not tensors:
    raise ValueError(f"{what} holds no tensors at its top level nor under 'model', "
                     f"'state_dict' or 'net' (top-level keys: {sorted(obj)[:10]})")
  if len(tensors) != len(obj):
    others = sorted(k for k in obj if k not in tensors)
    raise ValueError(f'{what} mixes tensors with other entries {others[:10]}: not a state dict')
  if all(k.startswith('module.') for k in tensors):
    tensors = {k[len('module.'):]: v for k, v in tensors.items()}
  return tensors


# --------------------------------------------------------------------------- Hugging Face ViT / DeiT
_HF_RULES = [  # (regex on the key without the 'deit.' / 'vit.' prefix, timm name)
    (r'embeddings\.cls_token', 'cls_token'),
    (r'embeddings\.distillation_token', 'dist_token'),
    (r'embeddings\.position_embeddings', 'pos_embed'),
    (r'embeddings\.patch_embeddings\.projection\.(weight|bias)', r'patch_embed.proj.\1'),
    # transformers < 5 (and every checkpoint on disk) / transformers >= 5 in memory
    (r'(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.(weight|bias)', r'blocks.\1.norm1.\2'),
    (r'(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.(weight|bias)', r'blocks.\1.norm2.\2'),
    (r'(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.(query|key|value)|'
     r'(q|k|v)_proj)\.(weight|bias)', None),  # merged into qkv below
    (r'(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:output\.dense|o_proj)\.(weight|bias)',
     r'blocks.\1.attn.proj.\2'),
    (r'(?:encoder\.layer|layers)\.(\d+)\.(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)',
     r'blocks.\1.mlp.fc1.\2'),
    (r'(?:encoder\.layer|layers)\.(\d+)\.(?:output\.dense|mlp\.fc2)\.(weight|bias)',
     r'blocks.\1.mlp.fc2.\2'),
    (r'layernorm\.(weight|bias)', r'norm.\1'),
]
# DeiTForImageClassificationWithTeacher's two heads; DeiTForImageClassification's one
# `classifier` on the cls token (IRKD's P2 teacher).
_HF_DEIT_HEADS = [(r'cls_classifier\.(weight|bias)', r'head.\1'),
                  (r'distillation_classifier\.(weight|bias)', r'head_dist.\1'),
                  (r'classifier\.(weight|bias)', r'head.\1')]
# ViTForImageClassification's `classifier`; IRKD's ViTWithDistillation adds `distill_token` and
# the `distiller` head beside its `vit` (a ViTModel).
_HF_VIT_HEADS = [(r'classifier\.(weight|bias)', r'head.\1'),
                 (r'distiller\.(weight|bias)', r'head_dist.\1'), (r'distill_token', 'dist_token')]
_QKV = {'query': 0, 'q': 0, 'key': 1, 'k': 1, 'value': 2, 'v': 2}


def _hf_to_timm(state_dict, prefix: str, heads, unused, what: str):
  """(timm-layout state dict, the keys of `unused` left out): the encoder under `prefix`, the
  heads and tokens outside it by `heads`; any other key fails with the list of them."""
  out: dict[str, torch.Tensor] = {}
  qkv: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
  unknown, dropped = [], []
  for key, value in state_dict.items():
    if any(re.fullmatch(pattern, key) for pattern in unused):
      dropped.append(key)
      continue
    done = False
    for pattern, target in heads:
      if re.fullmatch(pattern, key):
        out[re.sub(pattern, target, key)] = value
        done = True
    if not done and key.startswith(prefix):
      short = key[len(prefix):]
      for pattern, target in _HF_RULES:
        m = re.fullmatch(pattern, short)
        if not m:
          continue
        if target is None:
          layer, name = int(m.group(1)), m.group(2) or m.group(3)
          qkv.setdefault((layer, m.group(4)), {})[_QKV[name]] = value
        else:
          out[m.expand(target)] = value
        done = True
        break
    if not done:
      unknown.append(key)
  if unknown:
    raise ValueError(f'{what} checkpoint has keys with no counterpart in our ViT '
                     f'({len(unknown)}): {", ".join(sorted(unknown)[:20])}')
  for (layer, leaf), parts in sorted(qkv.items()):
    if sorted(parts) != [0, 1, 2]:
      raise ValueError(f'layer {layer}: query/key/value {leaf} incomplete (have {sorted(parts)})')
    out[f'blocks.{layer}.attn.qkv.{leaf}'] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
  return out, sorted(dropped)


def hf_deit_to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  """DeiTForImageClassificationWithTeacher (or DeiTForImageClassification: `head` only) state
  dict → timm / our ViT layout.

  Unknown keys (a pooler, a masked-image decoder) fail with the list of them.
  """
  return _hf_to_timm(state_dict, 'deit.', _HF_DEIT_HEADS, (), 'Hugging Face DeiT')[0]


def is_hf_vit(state_dict: Mapping[str, object]) -> bool:
  """Whether the keys are a Hugging Face ViT's (`vit.embeddings.…`, any transformers version)."""
  return any(k.startswith('vit.embeddings.') for k in state_dict)


def hf_vit_to_timm(
    state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
  """(timm / our ViT layout, keys left out) of the Hugging Face ViTs IRKD's notebooks save.

  * `ViTForImageClassification` (the teachers, the ce rows): `vit.…` + `classifier` on the cls
    token after `vit.layernorm` → our plain `vit`.
  * the notebooks' `ViTTinyClassifier`: the same forward, but its `ViTModel(config)` keeps the
    default pooler, which the forward never reads: `vit.pooler.…` is left out.
  * `ViTWithDistillation` (the students): `vit.…` + `distill_token`, `classifier` (cls token),
    `distiller` (dist token) → our `irkd_vit`. Its forward runs `vit.embeddings` (cls and patch
    positions), puts the dist token after cls and runs the encoder layers alone, so neither
    `vit.layernorm` nor `vit.pooler` (both in its state dict) touches its logits: left out.

  transformers 4.x names (`vit.encoder.layer.i.attention.attention.query`, `…attention.output.
  dense`, `intermediate.dense`, `output.dense`; what every file on disk holds, `save_pretrained`
  of transformers 5 included) and 5.x in-memory names (`vit.layers.i.attention.q_proj`, `o_proj`,
  `mlp.fc1`, `mlp.fc2`) both map; query / key / value are merged into qkv.
  """
  unused = [r'vit\.pooler\.dense\.(weight|bias)']
  if 'distill_token' in state_dict:
    unused.append(r'vit\.layernorm\.(weight|bias)')
  return _hf_to_timm(state_dict, 'vit.', _HF_VIT_HEADS, unused, 'Hugging Face ViT')


# --------------------------------------------------------------------------- re-gridding
def resample_patch_embed(weight: torch.Tensor, new_patch: int) -> torch.Tensor:
  """OIHW patch kernel → new kernel size by pseudo-inverse resizing (FlexiViT; timm's
  `resample_patch_embed`): a resized patch through the new kernel gives the old token."""
  old = tuple(weight.shape[-2:])
  new = (new_patch, new_patch)
  if old == new:
    return weight
  eye = torch.eye(old[0] * old[1], dtype=torch.float64).reshape(-1, 1, *old)
  mat = _resize_bicubic(eye, new).reshape(old[0] * old[1], -1)  # row i: basis patch i resized
  pinv = torch.linalg.pinv(mat)  # [new², old²]
  flat = weight.double().reshape(-1, old[0] * old[1])  # [O·I, old²]
  return (flat @ pinv.T).reshape(*weight.shape[:2], *new).to(weight.dtype)


def _resize_bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
  return torch.nn.functional.interpolate(x, size=size, mode='bicubic', antialias=True,
                                         align_corners=False)
