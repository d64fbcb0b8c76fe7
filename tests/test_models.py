"""Model shapes, parameter counts and the layout details of REFERENCE §1, §5, §7."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tikd_jax.models import build_model, count_params
from tikd_jax.models.vit import resize_pos_embed


def abstract_count(name, **kw):
  return count_params(nnx.eval_shape(lambda: build_model(name, rngs=nnx.Rngs(0), **kw)))


@pytest.mark.parametrize('variant,paper,exact', [
    ('small', 1.09e6, 1_092_632), ('medium', 4.17e6, 4_154_664),
    ('large', 16.35e6, 16_352_648)])
def test_tikd_students_match_the_paper_parameter_counts(variant, paper, exact):
  n = abstract_count('distilled_vit', variant=variant, num_classes=100, text_dim=512)
  assert n == exact
  assert abs(n - paper) / paper < 0.005


def test_tiny_imagenet_student_and_plain_counts():
  n = abstract_count('distilled_vit', variant='large', num_classes=200, img_size=64, text_dim=512)
  assert abs(n - 16.55e6) / 16.55e6 < 0.005
  # Without text modules: the released DeiT-style student alone.
  assert abstract_count('distilled_vit', variant='large', num_classes=100) == 15_925_448


def test_resnet_counts():
  assert abstract_count('resnet32x4', num_classes=100) == 7_433_860  # ~7.43M (REFERENCE §5)
  assert abstract_count('resnet8x4', num_classes=100) == 1_233_540
  assert abstract_count('resnet20', num_classes=100) == 278_324


def test_vit_outputs_and_eval_averages_the_heads():
  model = build_model('distilled_vit', variant='micro', num_classes=7, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3))
  logits, out = model(x, train=False)
  assert logits.shape == (3, 7)
  np.testing.assert_allclose(logits, (out['cls_logits'] + out['dist_logits']) / 2, atol=1e-6)
  assert out['block0'].shape == (3, 2 + 64, 32)
  assert out['attn1'].shape == (3, 2, 66, 66)
  np.testing.assert_allclose(out['attn1'].sum(-1), 1.0, atol=1e-5)
  train_logits, train_out = model(x, train=True, rng=jax.random.key(2))
  np.testing.assert_allclose(train_logits, train_out['cls_logits'])


def test_drop_path_is_seeded_and_off_at_eval():
  model = build_model('distilled_vit', variant='micro', num_classes=5, drop_path=0.5,
                      rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
  a, _ = model(x, train=True, rng=jax.random.key(3))
  b, _ = model(x, train=True, rng=jax.random.key(3))
  c, _ = model(x, train=True, rng=jax.random.key(4))
  e1, _ = model(x, train=False, rng=jax.random.key(3))
  e2, _ = model(x, train=False)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  np.testing.assert_array_equal(e1, e2)


def test_plain_and_irkd_variants():
  plain = build_model('vit', variant='micro', num_classes=5, rngs=nnx.Rngs(0))
  logits, out = plain(jnp.zeros((2, 32, 32, 3)))
  assert logits.shape == (2, 5) and 'dist_logits' not in out and out['block0'].shape[1] == 65
  irkd = build_model('irkd_vit', variant='irkd_custom', num_classes=10, rngs=nnx.Rngs(0))
  assert irkd.norm is None
  np.testing.assert_array_equal(irkd.dist_token[...], 0.0)  # zero-initialised
  assert irkd.pos_embed[...].shape == (1, 16 * 16 + 1, 128)  # cls + patches, not dist
  logits, out = irkd(jnp.ones((2, 32, 32, 3)) * 0.3)
  np.testing.assert_allclose(logits, out['cls_logits'])  # eval uses the cls head
  # 12-px curriculum input: the position grid is resized on the fly (6×6 patches of 2 px).
  low, low_out = irkd(jnp.ones((2, 12, 12, 3)) * 0.3)
  assert low.shape == (2, 10) and low_out['block0'].shape == (2, 2 + 36, 128)


def test_gelu_is_exact():
  model = build_model('distilled_vit', variant='micro', num_classes=5, rngs=nnx.Rngs(0))
  h = jnp.linspace(-3, 3, 7)[None, :]
  mlp = model.blocks[0].mlp
  hidden = mlp.fc1(jnp.zeros((1, 32)))  # only to check the activation below
  del hidden
  from scipy.special import erf
  expected = 0.5 * np.asarray(h) * (1 + erf(np.asarray(h) / np.sqrt(2)))
  np.testing.assert_allclose(jax.nn.gelu(h, approximate=False), expected, atol=1e-6)


def test_resnet_padding_matches_pytorch_at_stride_two():
  model = build_model('resnet8', num_classes=10, rngs=nnx.Rngs(0))
  conv = model.layer2[0].conv1  # 3×3 stride 2
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 16))
  ours = conv(x)
  w = torch.tensor(np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1))
  ref = torch.nn.functional.conv2d(torch.tensor(np.asarray(x)).permute(0, 3, 1, 2), w,
                                   stride=2, padding=1).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_resnet_batchnorm_updates_stats_only_in_training():
  model = build_model('resnet8', num_classes=10, rngs=nnx.Rngs(0))
  before = np.asarray(model.bn1.mean[...]).copy()
  model(jnp.ones((2, 32, 32, 3)) * 0.7, train=False)
  np.testing.assert_array_equal(model.bn1.mean[...], before)
  model(jax.random.uniform(jax.random.key(0), (2, 32, 32, 3)), train=True)
  assert not np.allclose(model.bn1.mean[...], before)


def test_pos_embed_resize_is_identity_at_the_same_grid_and_matches_torch_bicubic():
  pos = jax.random.normal(jax.random.key(0), (1, 2 + 16 * 16, 8))
  assert resize_pos_embed(pos, (16, 16), num_prefix=2) is pos
  for grid in ((6, 6), (8, 8), (10, 10), (14, 14), (20, 20)):
    ours = resize_pos_embed(pos, grid, num_prefix=2)
    np.testing.assert_array_equal(ours[:, :2], pos[:, :2])  # cls/dist positions kept
    img = torch.tensor(np.asarray(pos[0, 2:])).reshape(16, 16, 8).permute(2, 0, 1)[None]
    ref = torch.nn.functional.interpolate(img, size=grid, mode='bicubic', align_corners=False)
    ref = ref[0].permute(1, 2, 0).reshape(-1, 8).numpy()
    np.testing.assert_allclose(ours[0, 2:], ref, atol=1e-5)


def test_unknown_names_list_the_known_ones():
  with pytest.raises(ValueError, match='known models'):
    build_model('vit_gigantic', num_classes=10, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='known sizes'):
    build_model('distilled_vit', variant='huge', num_classes=10, rngs=nnx.Rngs(0))


def _value_and_grads(fn, module, x):
  """fn(module, x) → (value, d/d parameters, d/dx) through nnx.split, as the train step sees it."""
  graphdef, params = nnx.split(module)

  def f(params, x):
    return fn(nnx.merge(graphdef, params), x)

  value, (g_params, g_x) = jax.value_and_grad(f, argnums=(0, 1))(params, x)
  return value, jax.tree.leaves(g_params), g_x


@pytest.mark.parametrize('layer', ['dense', 'layer_norm', 'patch_embed'])
def test_fast_layers_match_autodiff_of_the_flax_layers(layer):
  """vit.py's hand-written VJPs (dense, layer_norm, patches @ kernel) give the values and
  gradients of autodiff through nnx.Linear / nnx.LayerNorm / nnx.Conv, to float32 rounding."""
  from tikd_jax.models import vit  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  if layer == 'dense':
    module = nnx.Linear(24, 40, rngs=nnx.Rngs(0))
    module.bias[...] = jnp.asarray(rng.randn(40), jnp.float32)
    x = jnp.asarray(rng.randn(3, 11, 24), jnp.float32)
    fast, plain = vit.dense, lambda m, x: m(x)
  elif layer == 'layer_norm':
    module = nnx.LayerNorm(24, epsilon=1e-6, rngs=nnx.Rngs(0))
    module.scale[...] = jnp.asarray(1 + rng.randn(24), jnp.float32)
    module.bias[...] = jnp.asarray(rng.randn(24), jnp.float32)
    x = jnp.asarray(3 + 2 * rng.randn(3, 11, 24), jnp.float32)
    fast, plain = vit.layer_norm, lambda m, x: m(x)
  else:
    model = build_model('distilled_vit', variant='micro', img_size=16, num_classes=10,
                        rngs=nnx.Rngs(0))
    module = model
    x = jnp.asarray(rng.rand(2, 16, 16, 3), jnp.float32)
    fast = lambda m, x: m.patch_embed_tokens(x)
    plain = lambda m, x: m.patch_embed(x)
  weights = jnp.asarray(rng.randn(*jax.eval_shape(lambda: plain(module, x)).shape), jnp.float32)
  results = [_value_and_grads(lambda m, x, f=f: jnp.sum(jnp.tanh(f(m, x)) * weights), module, x)
             for f in (fast, plain)]
  (v_fast, g_fast, dx_fast), (v_plain, g_plain, dx_plain) = results
  np.testing.assert_allclose(v_fast, v_plain, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx_fast, dx_plain, rtol=1e-4, atol=1e-5)
  for a, b in zip(g_fast, g_plain):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
