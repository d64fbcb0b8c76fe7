"""The three figures, drawn with matplotlib's object API (Agg canvas, no pyplot global state)."""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

RIGHT, WRONG = '#1a7f37', '#cf222e'


def _figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig


def save(fig: Figure, path: str, dpi: int = 110) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi, bbox_inches='tight', facecolor='white')
  return path


def heatmap_grid(images: np.ndarray, maps: np.ndarray, true_names: Sequence[str],
                 pred_names: Sequence[str], title: str, cols: int = 4,
                 alpha: float = 0.5) -> Figure:
  """Images [N, H, W, 3] uint8 with maps [N, H, W] in [0, 1] overlaid (jet), titled true/pred."""
  n = len(images)
  cols = max(1, min(cols, n))
  rows = math.ceil(n / cols)
  fig = _figure(2.3 * cols, 2.5 * rows + 0.4)
  axes = fig.subplots(rows, cols, squeeze=False)
  for k, ax in enumerate(axes.flat):
    ax.set_axis_off()
    if k >= n:
      continue
    h, w = images[k].shape[:2]
    ax.imshow(images[k], interpolation='nearest', extent=(0, w, h, 0))
    ax.imshow(maps[k], cmap='jet', alpha=alpha, vmin=0.0, vmax=1.0, interpolation='bilinear',
              extent=(0, w, h, 0))
    ok = true_names[k] == pred_names[k]
    ax.set_title(f'true: {true_names[k]}\npred: {pred_names[k]}', fontsize=9,
                 color=RIGHT if ok else WRONG)
  fig.suptitle(title, fontsize=10)
  return fig


def _class_colors(k: int):
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  if k <= 10:
    return [colormaps['tab10'](i) for i in range(k)]
  if k <= 20:
    return [colormaps['tab20'](i) for i in range(k)]
  return [colormaps['turbo'](i / max(k - 1, 1)) for i in range(k)]


def embedding_scatter(points: np.ndarray, labels: np.ndarray, names: Sequence[str],
                      title: str) -> Figure:
  """2-D points coloured by class, one legend entry per class present."""
  fig = _figure(8.0, 6.5)
  ax = fig.subplots()
  present = np.unique(labels)
  colors = _class_colors(len(names))
  for c in present:
    sel = labels == c
    ax.scatter(points[sel, 0], points[sel, 1], s=10, color=colors[int(c)], label=names[int(c)],
               alpha=0.8, linewidths=0)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(title, fontsize=10)
  ax.legend(loc='center left', bbox_to_anchor=(1.01, 0.5), ncol=max(1,
                                                                    math.ceil(len(present) / 25)),
            fontsize=8 if len(present) <= 25 else 6, markerscale=1.5, title='class', frameon=False)
  return fig


def _series(rows: list[dict], key: str, scale: float = 1.0):
  pts = [(r['step'], float(r[key]) * scale)
         for r in rows
         if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
  return ([s for s, _ in pts], [v for _, v in pts])


def training_curves(train: list[dict], evals: list[dict], resumes: Sequence[int],
                    title: str) -> Figure:
  """Left: train (and eval) loss vs step. Right: eval top-1/top-5 (and train top-1) vs step."""
  fig = _figure(11.0, 4.0)
  ax_loss, ax_acc = fig.subplots(1, 2)
  steps, loss = _series(train, 'loss')
  if steps:
    ax_loss.plot(steps, loss, lw=1.2, label='train loss')
  steps, loss = _series(evals, 'loss')
  if steps:
    ax_loss.plot(steps, loss, 'o--', lw=1.2, ms=4, label='eval loss')
  for ax, what in ((ax_loss, 'loss'), (ax_acc, 'accuracy (%)')):
    ax.set_xlabel('step')
    ax.set_ylabel(what)
    ax.grid(alpha=0.3)
    for i, s in enumerate(resumes):
      ax.axvline(s, color='grey', ls=':', lw=1, label='resumed' if i == 0 else None)
  for key, style in (('top1', 'o-'), ('top5', 's-')):
    steps, acc = _series(evals, key)
    if steps:
      ax_acc.plot(steps, acc, style, lw=1.2, ms=4, label=f'eval {key.replace("top", "top-")}')
  steps, acc = _series(train, 'train_top1', 100.0)
  if steps:
    ax_acc.plot(steps, acc, lw=1, color='grey', alpha=0.7, label='train top-1 (batch)')
  if not evals:
    ax_acc.text(0.5, 0.5, 'no eval rows in metrics.jsonl yet', transform=ax_acc.transAxes,
                ha='center', va='center', color='grey')
  if not _series(train, 'loss')[0] and not evals:
    ax_loss.text(0.5, 0.5, 'no loss rows', transform=ax_loss.transAxes, ha='center', va='center',
                 color='grey')
  ax_loss.set_title('loss')
  ax_acc.set_title('accuracy')
  for ax in (ax_loss, ax_acc):
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  return fig
