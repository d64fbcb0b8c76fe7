"""Plots of a training run: attention / Grad-CAM maps, t-SNE of features, training curves.

  python -m tikd_jax.visualize attention --workdir DIR [--out DIR] [--num_images 8] [--split test]
  python -m tikd_jax.visualize gradcam --workdir DIR [--num_images 8] [--block -1]
  python -m tikd_jax.visualize tsne --workdir DIR [--max_points 1000]
  python -m tikd_jax.visualize curves --workdir DIR

The maps are pure functions in `maps`, the figures in `figures`, the workdir reading in
`workdir`, the command line in `cli`.
"""
from tikd_jax.visualize.cli import main

__all__ = ['main']
