"""TIKD's value projection layouts: one shared `text_proj` (ours) or one per attention block
(`text_proj_layout='per_block'`, the released `blocks.i.attn.text_proj`).

Parameter counts of the CIFAR-100 students in both layouts (the paper's 16,352,264 for large), that
every block really uses its own projection, the CPU fast layers, and the conversion both ways with
the released names.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert import from_torch
from convert.mapping import flax_to_torch, load_strict, torch_to_flax
from convert.torch_models import torch_model_like
from tests.test_convert import assert_bit_exact, flax_forward, make_model, torch_forward
from tests.test_models import FAST_COMPILE
from tests.test_tikd import _block, _lin, _np
from tikd_jax.models import build_model, count_params
from tikd_jax.models.vit import SIZES


def _abstract(variant, layout, text_dim=512):
  return nnx.eval_shape(
      lambda: build_model('distilled_vit', variant=variant, num_classes=100, text_dim=text_dim,
                          text_proj_layout=layout, rngs=nnx.Rngs(0)))


# --------------------------------------------------------------------------- (a) parameter counts
# (total, without our text predictor / adapter) with 512-d text, 8 heads, CIFAR-100.
COUNTS = {
    ('small', 'shared'): (1_092_632, 1_050_968),
    ('small', 'per_block'): (1_100_888, 1_059_224),
    ('medium', 'shared'): (4_154_664, 4_104_680),
    ('medium', 'per_block'): (4_187_560, 4_137_576),
    ('large', 'shared'): (16_352_648, 16_220_936),
    ('large', 'per_block'): (16_483_976, 16_352_264),
}
# The paper's exact figures (released code: patch embed, tokens, 5 blocks, norm, two heads,
# text_decoder and 5 × text_proj = Linear(512, head_dim); no predictor, no adapter).
PAPER = {'small': 1_089_944, 'medium': 4_178_536, 'large': 16_352_264}


@pytest.mark.parametrize('variant,layout', sorted(COUNTS))
def test_parameter_counts(variant, layout):
  model = _abstract(variant, layout)
  total, released = COUNTS[variant, layout]
  ours = count_params(model.text_predictor)
  if model.text_adapter is not None:
    ours += count_params(model.text_adapter)
  assert (count_params(model), count_params(model) - ours) == (total, released)
  if layout == 'per_block':
    # The released Linear(512, head_dim) is fed the width-d decoded tokens, so it only runs at
    # d = 512; ours is d → head_dim. The paper counts the declared 512 inputs.
    s = SIZES[variant]
    assert released + s.depth * (512 - s.dim) * (s.dim // s.heads) == PAPER[variant]
  if variant == 'large' and layout == 'per_block':
    assert released == 16_352_264  # the paper's 16.35M, exactly


def test_layouts_own_their_projections_where_the_names_say():
  names = lambda m: {'/'.join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  shared = names(_abstract('micro', 'shared', 32))
  per_block = names(_abstract('micro', 'per_block', 32))
  assert {'text_proj/kernel', 'text_proj/bias'} <= shared
  assert not any('attn/text_proj' in k for k in shared)
  assert not any(k.startswith('text_proj/') for k in per_block)
  assert {f'blocks/{i}/attn/text_proj/{leaf}' for i in (0, 1) for leaf in ('kernel', 'bias')} \
      <= per_block
  # Without text the option changes nothing; an unknown layout fails loudly.
  plain = lambda layout: names(
      nnx.eval_shape(lambda: build_model('distilled_vit', variant='micro', num_classes=10,
                                         text_proj_layout=layout, rngs=nnx.Rngs(0))))
  assert plain('per_block') == plain('shared')
  with pytest.raises(ValueError, match='text_proj_layout'):
    build_model('distilled_vit', variant='micro', num_classes=10, text_dim=32,
                text_proj_layout='per_head', rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------- (b) own projections
def _per_block_micro(seed=0, fast=False, text_dim=32):
  """Micro per-block model whose text modules are far from their small init (so they matter)."""
  model = build_model('distilled_vit', variant='micro', num_classes=10, text_dim=text_dim,
                      text_proj_layout='per_block', fast_layers=fast, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed + 10)
  for p in [model.text_decoder] + [block.attn.text_proj for block in model.blocks]:
    p.kernel[...] = jnp.asarray(rng.standard_normal(p.kernel.shape, np.float32) * 0.3)
    p.bias[...] = jnp.asarray(rng.standard_normal(p.bias.shape, np.float32) * 0.3)
  return model


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _forward(graphdef, state, images, text):
  model = nnx.merge(graphdef, state)
  first, out0 = model(images)
  fused, out = model(images, text=text, fuse_text=True)
  return first, out0['tokens'], fused, out['fused_block0']


def forward(model, images, text):
  """(first-pass logits, first-pass tokens, fused logits, block 0's fused tokens), one compile."""
  return _forward(*nnx.split(model), images, text)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _grads(graphdef, params, rest, images, text):

  def loss(params, what):
    logits, out = nnx.merge(graphdef, params, rest)(images, text=text, fuse_text=True)
    return jnp.sum(jnp.sin(logits if what == 'logits' else out['fused_block0']))  # no symmetry

  value, g_logits = jax.value_and_grad(loss)(params, 'logits')
  return value, g_logits, jax.grad(loss)(params, 'fused_block0')


def grads(model, images, text):
  """(loss on the fused logits, its gradient, the gradient of a loss on block 0's fused tokens),
  through nnx.split as the train step sees them."""
  return _grads(*nnx.split(model, nnx.Param, ...), images, text)


def text_proj_grads(g):
  return [(np.asarray(b['attn']['text_proj']['kernel'][...]),
           np.asarray(b['attn']['text_proj']['bias'][...])) for b in g['blocks'].values()]


def _inputs(model, b=2):
  images = jax.random.uniform(jax.random.key(1), (b, 32, 32, 3))
  # Text aligned with the cls token, so that the cosine weights are not all clamped to 0.
  text = jax.random.normal(jax.random.key(2), (b, model.text_dim))
  return images, text + 3.0 * forward(model, images, text)[1][:, 0]


def numpy_per_block_forward(model, images, text):
  """The released fusion restated: block i adds ITS text_proj(text_decoder(c ⊙ x)) to v."""
  heads = model.size.heads
  x = _np(forward(model, images, text)[1])  # first pass + norm (checked in test_tikd)
  t = _np(text)
  cos = np.einsum('bnd,bd->bn', x, t) / np.maximum(np.linalg.norm(x, axis=-1), 1e-8) / \
      np.maximum(np.linalg.norm(t, axis=-1), 1e-8)[:, None]
  decoded = _lin(np.clip(cos, 0, 1)[..., None] * x, model.text_decoder)
  for blk in model.blocks:
    x = _block(x, blk, heads, value_bias=_lin(decoded, blk.attn.text_proj))
  return (_lin(x[:, 0], model.head) + _lin(x[:, 1], model.head_dist)) / 2


def test_per_block_fusion_matches_a_numpy_restatement():
  model = _per_block_micro()
  images, text = _inputs(model)
  fused = forward(model, images, text)[2]
  np.testing.assert_allclose(fused, numpy_per_block_forward(model, images, text), atol=1e-4)


def test_each_block_uses_its_own_projection():
  model = _per_block_micro()
  images, text = _inputs(model)
  first, _, fused, block0 = forward(model, images, text)
  # Block 1's projection: the fused logits move, block 0's fused tokens and the first pass don't.
  p1 = model.blocks[1].attn.text_proj
  p1.kernel[...] = p1.kernel[...] + 0.5
  first2, _, fused2, block0_2 = forward(model, images, text)
  np.testing.assert_array_equal(first2, first)
  np.testing.assert_array_equal(block0_2, block0)
  assert np.max(np.abs(fused2 - fused)) > 1e-3
  # Block 0's projection moves block 0's fused tokens.
  p0 = model.blocks[0].attn.text_proj
  p0.kernel[...] = p0.kernel[...] + 0.5
  assert np.max(np.abs(forward(model, images, text)[3] - block0_2)) > 1e-3


def test_projection_gradients_are_per_block():
  model = _per_block_micro()
  _, g_logits, g_block0 = grads(model, *_inputs(model))
  # Block 0's fused tokens depend on block 0's projection only.
  (k0, b0), (k1, b1) = text_proj_grads(g_block0)
  assert np.abs(k0).max() > 1e-6 and np.abs(b0).max() > 1e-6
  assert not np.any(k1) and not np.any(b1)
  # The logits depend on both, differently.
  g = text_proj_grads(g_logits)
  for kernel, bias in g:
    assert np.abs(kernel).max() > 1e-6 and np.abs(bias).max() > 1e-6
  assert not np.allclose(g[0][0], g[1][0])


# --------------------------------------------------------------------------- CPU fast layers
def test_fast_layers_per_block_same_logits_and_gradients():
  (v0, g0, _), (v1, g1, _) = [
      grads(m, *_inputs(m)) for m in (_per_block_micro(fast=False), _per_block_micro(fast=True))
  ]
  np.testing.assert_allclose(v1, v0, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
  assert all(np.abs(k).max() > 1e-6 for k, _ in text_proj_grads(g1))


# --------------------------------------------------------------------------- (c) convert
@pytest.mark.parametrize('text_dim', [32, 12])  # width (released, no adapter) / adapted (ours)
def test_per_block_round_trip_through_torch(text_dim):
  model, flat = make_model('distilled_vit', variant='micro', num_classes=10, text_dim=text_dim,
                           text_proj_layout='per_block')
  sd = flax_to_torch(flat)
  assert {f'blocks.{i}.attn.text_proj.{leaf}' for i in (0, 1) for leaf in ('weight', 'bias')} \
      <= set(sd)
  assert 'text_proj.weight' not in sd
  assert tuple(sd['blocks.1.attn.text_proj.weight'].shape) == (16, 32)  # [head_dim, width]
  twin = load_strict(torch_model_like(model).eval(), sd, 'export')
  x = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  text = np.random.default_rng(2).standard_normal((2, text_dim)).astype(np.float32)
  ours = flax_forward(model, x, text, fused=True)
  theirs = torch_forward(twin, x, text=text, fuse_text=True)[0]
  np.testing.assert_allclose(ours['fused'], theirs, atol=1e-5)
  assert np.max(np.abs(ours['fused'] - ours['logits'])) > 1e-3
  assert_bit_exact(torch_to_flax(twin.state_dict()), flat)
  # Back into Flax the way `python -m convert.from_torch` does: the layout is read off the keys.
  name, kwargs = from_torch.infer_vit(sd, None)
  assert (name, kwargs['text_proj_layout'], kwargs['text_dim']) == \
      ('distilled_vit', 'per_block', text_dim)
  back = from_torch.convert(sd, {'name': name, 'kwargs': kwargs}, 'round trip')
  again = flax_forward(back, x, text, fused=True)
  for k in ours:
    np.testing.assert_allclose(again[k], ours[k], atol=1e-5, err_msg=k)


@pytest.mark.parametrize('layout', ['shared', 'per_block'])
def test_the_fusion_gate_round_trips_through_torch(layout):
  """Our gated fusion (`fusion_gate`, random non-zero gain here): the twin computes the same fused
  logits, and `convert.from_torch` reads the gate off its key."""
  model, flat = make_model('distilled_vit', variant='micro', num_classes=10, text_dim=12,
                           text_proj_layout=layout, fusion_gate=True)
  sd = flax_to_torch(flat)
  assert tuple(sd['text_gate'].shape) == (32,)
  twin = load_strict(torch_model_like(model).eval(), sd, 'export')
  x = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  text = np.random.default_rng(2).standard_normal((2, 12)).astype(np.float32)
  ours = flax_forward(model, x, text, fused=True)
  np.testing.assert_allclose(ours['fused'],
                             torch_forward(twin, x, text=text, fuse_text=True)[0], atol=1e-5)
  name, kwargs = from_torch.infer_vit(sd, None)
  assert kwargs['fusion_gate'] and name == 'distilled_vit'
  back = from_torch.convert(sd, {'name': name, 'kwargs': kwargs}, 'round trip')
  np.testing.assert_allclose(
      flax_forward(back, x, text, fused=True)['fused'], ours['fused'], atol=1e-5)


# --------------------------------------------------------------------------- (d) released names
def released_state_dict(dim=32, depth=2, heads=2, mlp=64, classes=10, patch=4, grid=8, seed=0):
  """A state dict with the released TIKD DistilledVisionTransformer's names (models.py,
  vision_transformer.py): no text predictor, text_proj inside every block's attention."""
  g = torch.Generator().manual_seed(seed)
  r = lambda *shape: torch.randn(*shape, generator=g) * 0.1
  sd = {
      'cls_token': r(1, 1, dim), 'dist_token': r(1, 1, dim),
      'pos_embed': r(1, grid * grid + 2, dim), 'patch_embed.proj.weight': r(dim, 3, patch, patch),
      'patch_embed.proj.bias': r(dim), 'norm.weight': 1 + r(dim), 'norm.bias': r(dim),
      'head.weight': r(classes, dim), 'head.bias': r(classes), 'head_dist.weight': r(classes, dim),
      'head_dist.bias': r(classes), 'text_decoder.weight': r(dim, dim), 'text_decoder.bias': r(dim)
  }
  for i in range(depth):
    for name, (dout, din) in {
        'norm1': (dim, None), 'norm2': (dim, None), 'attn.qkv': (3 * dim, dim),
        'attn.proj': (dim, dim), 'attn.text_proj': (dim // heads, dim), 'mlp.fc1': (mlp, dim),
        'mlp.fc2': (dim, mlp)
    }.items():
      sd[f'blocks.{i}.{name}.weight'] = 1 + r(dout) if din is None else r(dout, din)
      sd[f'blocks.{i}.{name}.bias'] = r(dout)
  return sd


def test_a_released_state_dict_lands_in_its_blocks(capsys):
  sd = released_state_dict()
  name, kwargs = from_torch.infer_vit(sd, None)
  assert (name, kwargs['variant'], kwargs['text_dim'], kwargs['text_proj_layout']) == \
      ('distilled_vit', 'micro', 32, 'per_block')
  model = from_torch.convert(sd, {'name': name, 'kwargs': kwargs}, 'released checkpoint')
  assert 'fresh one was added' in capsys.readouterr().err  # released files have no predictor
  for i, block in enumerate(model.blocks):
    np.testing.assert_array_equal(block.attn.text_proj.kernel[...],
                                  sd[f'blocks.{i}.attn.text_proj.weight'].numpy().T)
    np.testing.assert_array_equal(block.attn.text_proj.bias[...],
                                  sd[f'blocks.{i}.attn.text_proj.bias'].numpy())
  # Every released tensor is used as is: the export gives them back under the same names.
  exported = flax_to_torch(torch_to_flax(sd))
  for k, v in sd.items():
    torch.testing.assert_close(exported[k], v, rtol=0, atol=0)
  # Swapping the two blocks' projections in the file swaps them in the model.
  swapped = dict(sd)
  for leaf in ('weight', 'bias'):
    swapped[f'blocks.0.attn.text_proj.{leaf}'] = sd[f'blocks.1.attn.text_proj.{leaf}']
    swapped[f'blocks.1.attn.text_proj.{leaf}'] = sd[f'blocks.0.attn.text_proj.{leaf}']
  model2 = from_torch.convert(swapped, {'name': name, 'kwargs': kwargs}, 'swapped')
  np.testing.assert_array_equal(model2.blocks[0].attn.text_proj.kernel[...],
                                model.blocks[1].attn.text_proj.kernel[...])
