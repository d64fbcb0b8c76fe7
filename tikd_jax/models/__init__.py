"""Model registry: a config names a model by string (`config.model.name`)."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tikd_jax.models.resnet_cifar import CONFIGS as RESNET_CONFIGS
from tikd_jax.models.resnet_cifar import CifarResNet
from tikd_jax.models.vit import SIZES as VIT_SIZES
from tikd_jax.models.vit import DistilledViT


def _distilled_vit(variant: str = 'small', **kw):
  return DistilledViT(variant, **kw)


def _plain_vit(variant: str = 'small', **kw):
  return DistilledViT(variant, distilled=False, **kw)


def _irkd_vit(variant: str = 'irkd_custom', **kw):
  """IRKD's ViTWithDistillation: zero dist token without position, no final norm, cls at eval."""
  kw.setdefault('drop_path', 0.0)
  return DistilledViT(variant, dist_pos_embed=False, final_norm=False, eval_head='cls', **kw)


def _resnet(arch: str):

  def build(variant: str | None = None, **kw):
    if variant not in (None, '', arch):
      raise ValueError(f'{arch} takes no variant, got {variant!r}')
    return CifarResNet(arch, **kw)

  return build


MODELS: dict[str, Callable[..., nnx.Module]] = {
    'distilled_vit': _distilled_vit,
    'vit': _plain_vit,
    'irkd_vit': _irkd_vit,
    **{name: _resnet(name) for name in RESNET_CONFIGS},
}

VIT_MODELS = ('distilled_vit', 'vit', 'irkd_vit')


def build_model(name: str, *, rngs: nnx.Rngs, fast_layers: bool = False,
                **kwargs: Any) -> nnx.Module:
  """Builds `name` (see MODELS) with the given keyword arguments; unknown names fail loudly.

  `fast_layers=True` swaps the CPU layers into the built model (tikd_jax/cpu/layers.py
  `substitute`): they change how layers lower, not what they compute or their parameters, so it
  is not a model argument saved with checkpoints.
  """
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; known models: {sorted(MODELS)}. '
                     f'ViT variants: {sorted(VIT_SIZES)}')
  if isinstance(kwargs.get('dtype'), str):  # configs and checkpoint metadata name dtypes
    kwargs['dtype'] = None if kwargs['dtype'] == 'float32' else jnp.dtype(kwargs['dtype'])
  model = MODELS[name](rngs=rngs, **kwargs)
  if fast_layers:
    from tikd_jax.cpu import layers  # pylint: disable=g-import-not-at-top
    layers.substitute(model)
  return model


def count_params(model: nnx.Module) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
