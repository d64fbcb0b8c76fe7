"""`python -m tikd_jax.visualize attention|gradcam|tsne|curves --workdir DIR`: PNGs from a run.

  attention  ViT: attention rollout (default; --attention=last: the last block's cls → patch
             attention), head-averaged, over --num_images eval images. CNN (CIFAR ResNets):
             Grad-CAM on layer3 w.r.t. the predicted class. One grid, tiles titled true/pred.
  gradcam    Grad-CAM w.r.t. the predicted class over --num_images eval images. ViT: on the patch
             tokens of block --block's norm1 output (default the last block; pytorch-grad-cam's
             ViT recipe), differentiating the eval logits (distilled: mean of the cls and dist
             heads). CNN (CIFAR ResNets): on layer3, as `attention` does.
  tsne       t-SNE (fixed --seed) of the model's pre-logits features of up to --max_points eval
             examples, coloured by class.
  curves     train loss and eval top-1/top-5 (top-5 with ≥ 5 classes) vs step from metrics.jsonl
             (last row per step wins).

Images come from the split --split (default: the config's eval split) of the data set named in
`<workdir>/config.json`; weights from the newest checkpoint in `<workdir>/checkpoints`.
PNGs go to --out (default `<workdir>/plots`); each command prints the path it wrote.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np

from tikd_jax.visualize import figures
from tikd_jax.visualize.workdir import WorkdirError, check_workdir

GRAD_CAM_STAGE = 'layer3'


def _log(text: str):
  print(text, file=sys.stderr, flush=True)


def _out_path(args, filename: str) -> str:
  return os.path.join(os.path.abspath(args.out or os.path.join(args.workdir, 'plots')), filename)


def _eval_data(args, config, num_examples: int):
  """(images uint8, labels, class names, split) of up to `num_examples` seeded examples."""
  from tikd_jax.data import build_source  # pylint: disable=g-import-not-at-top
  from tikd_jax.visualize import workdir as wd  # pylint: disable=g-import-not-at-top
  split = args.split or config.data.eval_split
  try:
    source = build_source(config.data, split)
  except (ValueError, FileNotFoundError) as e:
    raise WorkdirError(f'cannot read split {split!r} of data set {config.data.name!r} named in '
                       f'{args.workdir}/config.json: {e}') from None
  idx = wd.sample_indices(len(source), num_examples, args.seed)
  images, labels = wd.gather(source, idx)
  return images, labels, source, source.split  # 'auto' resolved


def _forward_fn(checkpoint, fuse_text: bool):
  """Jitted images [B, H, W, 3] floats → (logits, out) of the checkpoint's model, eval mode."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef = checkpoint.graphdef
  kwargs = {'fuse_text': True} if fuse_text else {}

  @jax.jit
  def forward(params, batch_stats, images):
    return nnx.merge(graphdef, params, batch_stats)(images, train=False, **kwargs)

  return lambda images: forward(checkpoint.variables['params'], checkpoint.variables['batch_stats'],
                                images)


def _heatmap_figure(args, ckpt, images, labels, source, split, heat, logits, method: str,
                    filename: str) -> str:
  from tikd_jax.visualize import maps  # pylint: disable=g-import-not-at-top
  from tikd_jax.visualize import workdir as wd  # pylint: disable=g-import-not-at-top
  heat = np.asarray(maps.upsample(heat, images.shape[1:3]))
  preds = np.argmax(np.asarray(logits), axis=-1)
  names = wd.class_names(source, int(logits.shape[-1]))
  fig = figures.heatmap_grid(images, heat, [names[int(i)] for i in labels],
                             [names[int(i)] for i in preds],
                             f'{ckpt.name} step {ckpt.step}, {split} split: {method}')
  return figures.save(fig, _out_path(args, filename))


def _resnet_grad_cam(ckpt, x):
  from tikd_jax.visualize import maps  # pylint: disable=g-import-not-at-top
  logits, acts, grads = maps.stage_gradients(ckpt.graphdef, ckpt.variables, x, GRAD_CAM_STAGE)
  return logits, maps.grad_cam(acts,
                               grads), f'Grad-CAM on {GRAD_CAM_STAGE} w.r.t. the predicted class'


def _unsupported(ckpt, model, what: str):
  return WorkdirError(f'no {what} view for model {ckpt.name!r} ({type(model).__name__}); '
                      f'supported: DistilledViT and CifarResNet')


def _heatmap_inputs(args):
  """What a heat-map command reads: (checkpoint, config, (images, labels, source, split), the
  built model, the images as floats in [0, 1])."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tikd_jax.visualize import workdir as wd  # pylint: disable=g-import-not-at-top
  ckpt = wd.load_checkpoint(args.workdir)
  config = wd.read_config(args.workdir)
  data = _eval_data(args, config, args.num_images)
  return ckpt, config, data, ckpt.build(), jnp.asarray(data[0], jnp.float32) / 255.0


def attention(args) -> str:
  from tikd_jax.models.resnet_cifar import CifarResNet  # pylint: disable=g-import-not-at-top
  from tikd_jax.models.vit import DistilledViT  # pylint: disable=g-import-not-at-top
  from tikd_jax.visualize import maps  # pylint: disable=g-import-not-at-top
  from tikd_jax.visualize import workdir as wd  # pylint: disable=g-import-not-at-top
  ckpt, config, data, model, x = _heatmap_inputs(args)
  if isinstance(model, DistilledViT):
    logits, out = _forward_fn(ckpt, wd.uses_text_fusion(ckpt, config))(x)
    attns = [out[f'attn{i}'] for i in range(len(model.blocks))]
    if args.attention == 'rollout':
      heat = maps.attention_rollout(attns, model.num_prefix)
      method = f'attention rollout over {len(attns)} blocks (cls → patches, head-averaged)'
    else:
      heat = maps.last_layer_attention(attns, model.num_prefix)
      method = 'last-block attention (cls → patches, head-averaged)'
  elif isinstance(model, CifarResNet):
    logits, heat, method = _resnet_grad_cam(ckpt, x)
  else:
    raise _unsupported(ckpt, model, 'attention')
  return _heatmap_figure(args, ckpt, *data, heat, logits, method, 'attention.png')


def gradcam(args) -> str:
  from tikd_jax.models.resnet_cifar import CifarResNet  # pylint: disable=g-import-not-at-top
  from tikd_jax.models.vit import DistilledViT  # pylint: disable=g-import-not-at-top
  from tikd_jax.visualize import maps  # pylint: disable=g-import-not-at-top
  from tikd_jax.visualize import workdir as wd  # pylint: disable=g-import-not-at-top
  ckpt, config, data, model, x = _heatmap_inputs(args)
  if isinstance(model, DistilledViT):
    depth = len(model.blocks)
    if not -depth <= args.block < depth:
      raise WorkdirError(f'--block {args.block} is out of range: {ckpt.name} has {depth} blocks '
                         f'(0..{depth - 1}, or -1 for the last)')
    logits, acts, grads = maps.vit_token_gradients(ckpt.graphdef, ckpt.variables, x, args.block)
    heat = maps.vit_grad_cam(acts, grads, model.num_prefix)
    heads = ('mean of cls and dist heads'
             if model.distilled and model.eval_head == 'mean' else 'cls head')
    vision = ', vision pass' if wd.uses_text_fusion(ckpt, config) else ''
    method = (f'Grad-CAM on block {args.block % depth} norm1 tokens w.r.t. the predicted class '
              f'({heads}{vision})')
  elif isinstance(model, CifarResNet):
    logits, heat, method = _resnet_grad_cam(ckpt, x)
  else:
    raise _unsupported(ckpt, model, 'Grad-CAM')
  return _heatmap_figure(args, ckpt, *data, heat, logits, method, 'gradcam.png')


def _features(ckpt, config, images: np.ndarray, batch_size: int) -> np.ndarray:
  """out['pre_logits'] of every image, in fixed-size batches (one compilation)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tikd_jax.visualize import workdir as wd  # pylint: disable=g-import-not-at-top
  forward = _forward_fn(ckpt, wd.uses_text_fusion(ckpt, config))
  n = len(images)
  batch_size = min(batch_size, n)
  feats = []
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    real = len(chunk)
    if real < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - real,) + chunk.shape[1:], chunk.dtype)])
    _, out = forward(jnp.asarray(chunk, jnp.float32) / 255.0)
    feats.append(np.asarray(out['pre_logits'], np.float32)[:real])
    _log(f'features: {min(start + batch_size, n)}/{n} examples')
  return np.concatenate(feats)


def tsne(args) -> str:
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  from tikd_jax.visualize import workdir as wd  # pylint: disable=g-import-not-at-top
  ckpt = wd.load_checkpoint(args.workdir)
  config = wd.read_config(args.workdir)
  images, labels, source, split = _eval_data(args, config, args.max_points)
  if len(images) < 5:
    raise WorkdirError(f't-SNE needs at least 5 examples, the {split} split gave {len(images)}')
  feats = _features(ckpt, config, images, args.batch_size)
  perplexity = float(min(30.0, (len(feats) - 1) / 3.0))
  _log(f't-SNE of {len(feats)} × {feats.shape[1]} features (perplexity {perplexity:g})')
  points = TSNE(n_components=2, perplexity=perplexity, init='pca', learning_rate='auto',
                random_state=args.seed).fit_transform(feats.astype(np.float64))
  num_classes = int(ckpt.kwargs.get('num_classes') or labels.max() + 1)
  fig = figures.embedding_scatter(
      points, labels, wd.class_names(source, num_classes),
      f't-SNE of {ckpt.name} pre-logits features: {len(feats)} {split} examples, '
      f'step {ckpt.step} (seed {args.seed})')
  return figures.save(fig, _out_path(args, 'tsne.png'))


def curves(args) -> str:
  from tikd_jax.visualize import workdir as wd  # pylint: disable=g-import-not-at-top
  m = wd.read_metrics(args.workdir)
  if not m.train and not m.eval:
    raise WorkdirError(f'{args.workdir}/metrics.jsonl holds no train or eval rows')
  fig = figures.training_curves(
      m.train, m.eval, m.resumes,
      f'{os.path.basename(args.workdir)}: {len(m.train)} train / {len(m.eval)} eval points' +
      (f', resumed {len(m.resumes)}×' if m.resumes else ''))
  return figures.save(fig, _out_path(args, 'curves.png'))


COMMANDS = {'attention': attention, 'gradcam': gradcam, 'tsne': tsne, 'curves': curves}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m tikd_jax.visualize', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('command', choices=sorted(COMMANDS))
  p.add_argument('--workdir', required=True, help='a training run directory')
  p.add_argument('--out', default=None, help='output directory (default: <workdir>/plots)')
  p.add_argument('--num_images', type=int, default=8, help='attention, gradcam: images in the grid')
  p.add_argument('--max_points', type=int, default=1000, help='tsne: examples to embed')
  p.add_argument('--split', default=None, help="data split (default: the config's eval split)")
  p.add_argument('--attention', choices=('rollout', 'last'), default='rollout',
                 help='ViT map: attention rollout or the last block only')
  p.add_argument('--block', type=int, default=-1,
                 help="gradcam, ViT: the block whose norm1 output is mapped (-1: the last)")
  p.add_argument('--seed', type=int, default=0, help='example sampling and t-SNE random_state')
  p.add_argument('--batch_size', type=int, default=256, help='tsne: feature batch size')
  args = p.parse_args(argv)
  for name in ('num_images', 'max_points', 'batch_size'):
    if getattr(args, name) < 1:
      p.error(f'--{name} must be at least 1, got {getattr(args, name)}')
  return args


def main(argv: Sequence[str] | None = None) -> str:
  """Runs one command; returns (and prints) the PNG path. Missing inputs exit with a message."""
  args = parse_args(argv)
  try:
    args.workdir = check_workdir(args.workdir)
    path = COMMANDS[args.command](args)
  except WorkdirError as e:
    raise SystemExit(f'error: {e}') from None
  print(path, flush=True)
  return path
