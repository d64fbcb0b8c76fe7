"""CIFAR ResNets of RepDistiller (resnet8 … resnet56, resnet8x4, resnet32x4), as in RepDistiller's
models/resnet.py.

Layout and names follow RepDistiller's `models/resnet.py` so that weights convert one to one:
conv1/bn1 stem, layer1..3 of BasicBlocks (conv1, bn1, conv2, bn2, optional downsample conv+bn),
global average pool, fc. Convs pad explicitly like PyTorch ((1, 1) on both sides even at stride 2,
where Flax's 'SAME' would pad (0, 1)). BatchNorm: eps 1e-5, PyTorch momentum 0.1 == Flax 0.9.
`models.build_model` can swap the 3×3 stride-1 convolutions for the CPU layer of
tikd_jax/cpu/layers.py (Winograd: same function, another lowering).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tikd_jax.normalization import CIFAR100_MEAN, CIFAR100_STD

# RepDistiller initialises convs with kaiming_normal(mode='fan_out', relu).
_kaiming_fan_out = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# PyTorch's default Linear init: kaiming_uniform(a=sqrt(5)) → U(±1/sqrt(fan_in)), same for bias.
_torch_linear = nnx.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')

# name → (depth, filters [stem, stage1, stage2, stage3])
CONFIGS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    'resnet8': (8, (16, 16, 32, 64)),
    'resnet14': (14, (16, 16, 32, 64)),
    'resnet20': (20, (16, 16, 32, 64)),
    'resnet32': (32, (16, 16, 32, 64)),
    'resnet44': (44, (16, 16, 32, 64)),
    'resnet56': (56, (16, 16, 32, 64)),
    'resnet110': (110, (16, 16, 32, 64)),
    'resnet8x4': (8, (32, 64, 128, 256)),
    'resnet32x4': (32, (32, 64, 128, 256)),
}


def _conv(cin, cout, k, stride, rngs, dtype):
  pad = (k - 1) // 2
  return nnx.Conv(cin, cout, (k, k), strides=stride, padding=((pad, pad), (pad, pad)),
                  use_bias=False, kernel_init=_kaiming_fan_out, dtype=dtype, rngs=rngs)


def _bn(c, rngs, dtype):
  return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)


class BasicBlock(nnx.Module):

  def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs, dtype=None):
    self.conv1 = _conv(cin, cout, 3, stride, rngs, dtype)
    self.bn1 = _bn(cout, rngs, dtype)
    self.conv2 = _conv(cout, cout, 3, 1, rngs, dtype)
    self.bn2 = _bn(cout, rngs, dtype)
    if stride != 1 or cin != cout:
      self.downsample_conv = _conv(cin, cout, 1, stride, rngs, dtype)
      self.downsample_bn = _bn(cout, rngs, dtype)
    else:
      self.downsample_conv = self.downsample_bn = None

  def __call__(self, x, train: bool):
    ura = not train
    y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    y = self.bn2(self.conv2(y), use_running_average=ura)
    if self.downsample_conv is not None:
      x = self.downsample_bn(self.downsample_conv(x), use_running_average=ura)
    return jax.nn.relu(y + x)


class CifarResNet(nnx.Module):
  """RepDistiller's CIFAR ResNet. `__call__` returns (logits, out) with per-stage features."""

  def __init__(self, name: str = 'resnet32x4', *, num_classes: int,
               mean: Sequence[float] = CIFAR100_MEAN, std: Sequence[float] = CIFAR100_STD,
               dtype: Any = None, rngs: nnx.Rngs, **unused):
    if unused:
      raise ValueError(f'CifarResNet got unexpected arguments {sorted(unused)}')
    if name not in CONFIGS:
      raise ValueError(f'unknown CIFAR ResNet {name!r}; known: {sorted(CONFIGS)}')
    depth, filters = CONFIGS[name]
    if (depth - 2) % 6:
      raise ValueError(f'depth {depth} must be 6n + 2')
    n = (depth - 2) // 6
    self.arch = name
    self.mean, self.std, self.dtype = tuple(mean), tuple(std), dtype
    self.num_classes = num_classes
    self.conv1 = _conv(3, filters[0], 3, 1, rngs, dtype)
    self.bn1 = _bn(filters[0], rngs, dtype)
    cin = filters[0]
    stages = []
    for stage, (cout, stride) in enumerate(zip(filters[1:], (1, 2, 2))):
      blocks = []
      for i in range(n):
        blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1, rngs=rngs, dtype=dtype))
        cin = cout
      stages.append(nnx.List(blocks))
    self.layer1, self.layer2, self.layer3 = stages
    self.fc = nnx.Linear(cin, num_classes, kernel_init=_torch_linear,
                         bias_init=_torch_bias_init(cin), dtype=dtype, rngs=rngs)

  def __call__(self, images, *, train: bool = False, rng=None, **unused_kwargs):
    del rng  # no stochastic layers
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    x = ((images.astype(jnp.float32) - mean) / std).astype(self.dtype or jnp.float32)
    out = {}
    x = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
    out['stem'] = x
    for name in ('layer1', 'layer2', 'layer3'):
      for block in getattr(self, name):
        x = block(x, train)
      out[name] = x
    # RepDistiller uses AvgPool2d(8), i.e. a global mean at 32 px; a global mean works at any size.
    x = jnp.mean(x, axis=(1, 2))
    out['pre_logits'] = x
    logits = self.fc(x).astype(jnp.float32)
    out['cls_logits'] = logits
    return logits, out


def _torch_bias_init(fan_in: int):
  bound = 1.0 / (fan_in**0.5)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init
