"""A trained (or converted) Flax checkpoint → a PyTorch state dict.

  python -m convert.to_torch --workdir runs/tikd_small --out tikd_small.safetensors
  python -m convert.to_torch --workdir runs/tikd_small --step 60000 --out tikd_small.pt
  python -m convert.to_torch --workdir runs/tikd_released --weights=ema --out tikd_ema.pt

`--weights=ema` exports the model EMA (`config.ema.decay`) the checkpoint holds instead of the raw
weights: the same keys and shapes, so the printed load calls are the same.

The checkpoint's `meta['model']` ({'name': …, 'kwargs': …}, what `build_model` takes) says which
model the weights belong to; the Flax model is built from it and loaded strictly, so a checkpoint
that does not fit its own metadata fails with the list of keys. The state dict is checked the same
way against the PyTorch twin (`convert.torch_models`) before it is written:
  * `.pt`: `torch.save(state_dict)`, a bare state dict (timm / RepDistiller layout);
  * `.safetensors`: the same tensors, with `meta['model']` as JSON under the metadata key
    'tikd_model' (`convert.from_torch` reads it back for an exact round trip).
It prints the exact calls that load the file strictly: timm's class and arguments where timm has
the model (a ViT without text modules; timm expects normalised input), and always the PyTorch twin
(`convert.torch_models.TorchDistilledViT` / `TorchCifarResNet`, [0, 1] NCHW images, normalised
inside).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import jax
import torch
from flax import nnx

from convert import cli
from convert.mapping import flax_to_torch, load_strict
from convert.torch_models import timm_args, timm_eps_refusal, torch_model_like, torch_twin_args
from tikd_jax.models import build_model
from tikd_jax.models.variables import load_variables
from tikd_jax.train.checkpoint import load_weights_and_ema

META_KEY = 'tikd_model'
WEIGHTS_KEY = 'tikd_weights'  # .safetensors metadata: 'raw' or 'ema' (which weights were written)


def step_dir(workdir: str, step: int | None) -> str:
  """The path `load_weights` should read: the workdir itself, or one step folder of it."""
  if step is None:
    return workdir
  base = os.path.abspath(os.path.expanduser(workdir))
  candidates = [os.path.join(base, 'checkpoints', str(step)), os.path.join(base, str(step))]
  if os.path.basename(base) == str(step):
    candidates.append(base)
  for c in candidates:
    if os.path.isdir(os.path.join(c, 'model')):
      return c
  root = os.path.join(base, 'checkpoints') if os.path.isdir(os.path.join(base, 'checkpoints')) \
      else base
  have = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
  raise FileNotFoundError(f'{workdir} has no checkpoint for step {step}; steps present: {have}')


def build_flax_model(model_meta: dict) -> nnx.Module:
  """`build_model(meta['name'], **meta['kwargs'])`, abstract: shapes only, no initialisation
  compute (conversion fills every variable from the checkpoint, see `load_variables`)."""
  if not isinstance(model_meta, dict) or 'name' not in model_meta:
    raise ValueError(f"checkpoint metadata has no model description (expected meta['model'] = "
                     f"{{'name': …, 'kwargs': {{…}}}}, got {model_meta!r}); pass --model and "
                     f"--model_kwargs")
  kwargs = dict(model_meta.get('kwargs') or {})

  def build(key):
    # Constants (e.g. the stochastic-depth schedule) stay concrete while tracing.
    with jax.ensure_compile_time_eval():
      return build_model(model_meta['name'], rngs=nnx.Rngs(key), **kwargs)

  return nnx.eval_shape(build, jax.random.key(0))


def export(flat: dict, model_meta: dict, what: str = 'checkpoint'):
  """(Flax model, PyTorch model, state dict) of flat Flax variables; both sides loaded strictly."""
  model = build_flax_model(model_meta)
  load_variables(model, flat, what)
  state_dict = flax_to_torch(flat)
  torch_model = load_strict(
      torch_model_like(model).eval(), state_dict, f'{what} (as a PyTorch state dict)')
  return model, torch_model, state_dict


def save_state_dict(state_dict: dict, path: str, model_meta: dict | None = None,
                    weights: str | None = None) -> str:
  path = os.path.abspath(os.path.expanduser(path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if path.endswith('.safetensors'):
    from safetensors.torch import save_file
    metadata = {'format': 'pt'}
    if model_meta is not None:
      metadata[META_KEY] = json.dumps(model_meta)
    if weights is not None:
      metadata[WEIGHTS_KEY] = weights
    save_file({k: v.contiguous() for k, v in state_dict.items()}, path, metadata=metadata)
  elif path.endswith(('.pt', '.pth', '.bin')):
    torch.save(state_dict, path)
  else:
    raise ValueError(f'--out must end in .pt, .pth or .safetensors, got {path}')
  return path


def _call(name: str, kwargs: dict) -> str:
  return f'{name}(' + ', '.join(f'{k}={v!r}' for k, v in kwargs.items()) + ')'


def csv_floats(values) -> str:
  """Channel statistics as --mean/--std take them, exactly (repr round-trips a float)."""
  return ','.join(repr(float(v)) for v in values)


def load_instructions(flax_model, path: str) -> str:
  """The Python lines that load the exported file at `path` with strict=True."""
  if path.endswith('.safetensors'):
    imports, read = 'from safetensors.torch import load_file', f'load_file({path!r})'
  else:
    imports, read = 'import torch', f'torch.load({path!r})'
  lines = []
  timm = timm_args(flax_model)
  if timm is not None:
    mean, std = tuple(map(float, flax_model.mean)), tuple(map(float, flax_model.std))
    lines += [
        '# timm (input: (x - mean) / std for x in [0, 1], NCHW; '
        f'mean={mean}, std={std})', f'import timm; {imports}', f'model = {_call(*timm)}',
        f'model.load_state_dict({read}, strict=True)'
    ]
  elif timm_eps_refusal(flax_model):
    lines.append(f'# {timm_eps_refusal(flax_model)}')
  cls, kwargs = torch_twin_args(flax_model)
  lines += [
      '# this repository\'s PyTorch twin (input: x in [0, 1], NCHW; it normalises inside)',
      f'from convert.torch_models import {cls.__name__}; {imports}',
      f'model = {_call(cls.__name__, kwargs)}', f'model.load_state_dict({read}, strict=True)'
  ]
  return '\n'.join(lines)


def _parse(argv):
  p = argparse.ArgumentParser(prog='python -m convert.to_torch', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', required=True,
                 help='training workdir, its checkpoints/ folder, or one step folder')
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default: the newest)')
  p.add_argument('--out', required=True, help='output file, .pt or .safetensors')
  # Default raw, as DeiT / timm users expect: DeiT's checkpoint.pth saves `model_ema` beside
  # `model`, its released weights are the `model` entry, and timm's load_checkpoint /
  # clean_checkpoint.py read `model` unless use_ema=True / --use-ema; the EMA is opt-in here too.
  p.add_argument(
      '--weights', choices=('raw', 'ema'), default='raw',
      help='raw: the trained weights (default); ema: the model EMA the checkpoint holds '
      '(config.ema.decay > 0), e.g. for DeiT / TIKD released-recipe runs')
  p.add_argument('--model', default=None, help="override meta['model']['name']")
  p.add_argument('--model_kwargs', default=None,
                 help="JSON object overriding meta['model']['kwargs']")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
  args = _parse(argv)
  source = step_dir(args.workdir, args.step)
  meta, flat, ema = load_weights_and_ema(source, with_ema=args.weights == 'ema')
  what = f'checkpoint {source}'
  if args.weights == 'ema':
    if ema is None:
      raise ValueError(
          f'--weights=ema: the checkpoint in {source} (step {meta.get("step")}) holds no model '
          f'EMA (trained with config.ema.decay=0, or weights only); export its raw weights with '
          f'--weights=raw (the default)')
    flat, what = ema, f'model EMA of checkpoint {source}'
  model_meta = dict(meta.get('model') or {})
  if args.model:
    model_meta['name'] = args.model
  if args.model_kwargs:
    model_meta['kwargs'] = json.loads(args.model_kwargs)
  model_meta.setdefault('kwargs', {})
  model, _, state_dict = export(flat, model_meta, what=what)
  path = save_state_dict(state_dict, args.out, model_meta, weights=args.weights)
  n = sum(int(v.numel()) for v in state_dict.values() if v.is_floating_point())
  print(
      f'wrote {path}: {len(state_dict)} tensors, {n:,} values ({args.weights} weights of step '
      f'{meta.get("step")}), model {model_meta["name"]} {json.dumps(model_meta["kwargs"])}',
      file=sys.stderr)
  print(load_instructions(model, path), flush=True)
  if not path.endswith('.safetensors'):
    mean, std = csv_floats(model.mean), csv_floats(model.std)
    print(
        f'{path} is a bare state dict and does not record the input normalisation; to read it '
        f'back: python -m convert.from_torch --checkpoint {path} --mean {mean} --std {std} '
        f'--out DIR (a .safetensors export records it)', file=sys.stderr)
  return path


if __name__ == '__main__':
  cli.run(main)
