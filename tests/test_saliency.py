"""Tests for tikd_jax.losses.saliency (IRKD's saliency maps and losses).

Maps come from real models: the IRKD student (``irkd_vit`` / ``irkd_custom``, patch 2, dist
token) and small teachers (a plain patch-4 ViT, one prefix token, and a DeiT-like patch-2 ViT with
a dist token), all at 16 px. Their parameters are drawn with NumPy (not the near-zero timm init)
so that attention rows and saliency maps are far from flat.

The torch side re-states the IRKD notebooks' definitions independently (float64, torch.autograd
with ``create_graph=True`` for the gradient maps); the JAX side runs in float32.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from tikd_jax.losses.saliency import (
    attention_saliency,
    attention_saliency_loss,
    gradient_saliency,
    gradient_saliency_loss,
    layer_pairs,
    resize_bilinear,
    saliency_loss,
)
from tikd_jax.models import build_model
from tikd_jax.models.vit import DistilledViT, ViTSize

TOL = dict(rtol=1e-5, atol=1e-5)
B, IMG, C = 3, 16, 10
SMALL_TEACHER = dict(dim=48, depth=6, heads=3, mlp_dim=96)


def _build(builder, seed):
  """Builds a model abstractly (no init program to compile) and fills it with NumPy draws:
    LayerNorm scales 1 + N(0, 0.1²), biases N(0, 0.1²), kernels N(0, 1/fan_in), tokens and
    position embeddings N(0, 0.5²), far from timm's near-zero init, so maps have structure."""
  graphdef, state = nnx.split(nnx.eval_shape(builder))
  rs = np.random.RandomState(seed)

  def fill(path, x):
    name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
    if name == 'scale':
      value = 1.0 + 0.1 * rs.randn(*x.shape)
    elif name == 'bias':
      value = 0.1 * rs.randn(*x.shape)
    elif name == 'kernel':
      value = rs.randn(*x.shape) / np.sqrt(np.prod(x.shape[:-1]))
    else:
      value = 0.5 * rs.randn(*x.shape)
    return jnp.asarray(value, x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


@jax.jit(static_argnums=0)
def _apply(graphdef, state, images):
  return nnx.merge(graphdef, state)(images)[1]


def _forward(model, images):
  """The model's `out` dict (one compiled program per architecture)."""
  return _apply(*nnx.split(model), images)


@pytest.fixture(scope='module')
def models():
  student = _build(
      lambda: build_model('irkd_vit', variant='irkd_custom', num_classes=C, img_size=IMG, rngs=nnx.
                          Rngs(0)), seed=1)
  vit_teacher = _build(
      lambda: DistilledViT(ViTSize(patch=4, **SMALL_TEACHER), num_classes=C, img_size=IMG, distilled
                           =False, drop_path=0.0, rngs=nnx.Rngs(0)), seed=2)
  # A teacher with the student's layout (dist token, patch 2: the DeiT-teacher case of the
  # gradient notebooks, same grid); sharing the architecture shares the compiled forward.
  peer_teacher = _build(
      lambda: build_model('irkd_vit', variant='irkd_custom', num_classes=C, img_size=IMG, rngs=nnx.
                          Rngs(0)), seed=3)
  images = np.random.RandomState(4).rand(B, IMG, IMG, 3).astype(np.float32)
  models = dict(student=student, vit_teacher=vit_teacher, peer_teacher=peer_teacher)
  outs = {name: _forward(m, images) for name, m in models.items()}
  return dict(models, images=images, outs=outs)


def _t(x):
  return torch.tensor(np.asarray(x), dtype=torch.float64)


def _torch_head(head):
  """Copies an nnx.Linear (kernel [d, C]) into a float64 torch Linear (weight [C, d])."""
  kernel = np.asarray(head.kernel[...])
  lin = torch.nn.Linear(kernel.shape[0], kernel.shape[1]).double()
  with torch.no_grad():
    lin.weight.copy_(_t(kernel.T))
    lin.bias.copy_(_t(head.bias[...]))
  return lin


# --------------------------------------------------------------------- torch re-statements
def torch_attention_map(attn, prefix):
  """Head mean, row of query 0, keys after the prefix, square grid, per-sample min-max (1e-8)."""
  a = attn.mean(dim=1)[:, 0, prefix:]
  side = int(math.sqrt(a.shape[1]))
  a = a.reshape(a.shape[0], side, side)
  lo = a.flatten(1).min(dim=1).values[:, None, None]
  hi = a.flatten(1).max(dim=1).values[:, None, None]
  return (a - lo) / (hi - lo + 1e-8)


def torch_gradient_map(patches, classifier):
  """Per class: autograd of the summed class logit w.r.t. the patch tokens (create_graph), its
    mean over tokens as channel weights, ReLU(weights·tokens) summed over channels; classes on the
    last axis of a [B, side, side, C] grid; min-max over everything of a sample (eps 1e-6)."""
  logits = classifier(patches.mean(dim=1))
  per_class = []
  for c in range(logits.shape[1]):
    (g,) = torch.autograd.grad(logits[:, c].sum(), patches, create_graph=True)
    weights = g.mean(dim=1, keepdim=True)
    per_class.append(torch.relu(weights * patches).sum(dim=2))
  b, n = patches.shape[:2]
  side = int(math.sqrt(n))
  maps = torch.stack(per_class, dim=-1).reshape(b, side, side, -1)
  flat = maps.reshape(b, -1)
  lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
  return ((flat - lo) / (hi - lo + 1e-6)).reshape(maps.shape)


# ----------------------------------------------------------------------------- the maps
@pytest.mark.parametrize('name, prefix, layer', [('student', 2, 1), ('vit_teacher', 1, 5),
                                                 ('peer_teacher', 2, 0)])
def test_attention_saliency_matches_torch(models, name, prefix, layer):
  attn = models['outs'][name][f'attn{layer}']
  got = np.asarray(jax.jit(attention_saliency, static_argnums=1)(attn, prefix))
  want = torch_attention_map(_t(attn), prefix).numpy()
  side = IMG // (4 if name == 'vit_teacher' else 2)
  assert got.shape == (B, side, side)
  np.testing.assert_allclose(got, want, **TOL)
  # min-max bounds: 0 at each sample's minimum (to rounding: XLA fuses the normalisation),
  # 1 − O(1e-8 / range) at its maximum
  np.testing.assert_allclose(got.reshape(B, -1).min(1), np.zeros(B), atol=1e-7)
  np.testing.assert_allclose(got.reshape(B, -1).max(1), np.ones(B), atol=1e-6)
  assert got.min() >= -1e-7 and got.max() <= 1.0
  # not a flat map: the attention has real structure
  assert got.std() > 0.1


def test_attention_saliency_explicit_grid_and_errors():
  attn = np.random.RandomState(0).rand(2, 3, 14, 14).astype(np.float32)
  got = attention_saliency(attn, 2, grid=(3, 4))  # 12 patches, non-square grid
  assert got.shape == (2, 3, 4)
  with pytest.raises(ValueError, match='grid 4x4'):
    attention_saliency(attn, 2, grid=4)
  with pytest.raises(ValueError, match='square'):
    attention_saliency(attn, 2)


@pytest.mark.parametrize('name, prefix, layer', [('student', 2, 2), ('peer_teacher', 2, 3),
                                                 ('vit_teacher', 1, 0)])
def test_gradient_saliency_matches_torch_autograd(models, name, prefix, layer):
  model, out = models[name], models['outs'][name]
  patches = out[f'block{layer}'][:, prefix:]
  got = np.asarray(jax.jit(lambda p: gradient_saliency(p, model.head))(patches))
  p_torch = _t(patches).requires_grad_(True)
  want = torch_gradient_map(p_torch, _torch_head(model.head)).detach().numpy()
  side = IMG // model.size.patch
  assert got.shape == (B, side, side, C)
  np.testing.assert_allclose(got, want, **TOL)
  flat = got.reshape(B, -1)
  np.testing.assert_allclose(flat.min(1), np.zeros(B), atol=1e-7)
  np.testing.assert_allclose(flat.max(1), np.ones(B), atol=1e-5)
  assert flat.min() >= -1e-7 and flat.max() <= 1.0
  # classes differ: the maps are not one map repeated
  assert np.abs(got[..., 0] - got[..., 1]).max() > 0.05


def test_gradient_saliency_second_order_gradients_match_torch(models):
  """d MSE(S(P, W), target) / d(P, W, b): JAX (vjp inside grad) vs torch (create_graph=True)."""
  head = models['student'].head
  patches = np.asarray(models['outs']['student']['block3'][:, 2:])
  target = np.asarray(attention_saliency(models['outs']['student']['attn0'], 2))[..., None]
  target = np.broadcast_to(target, (B, 8, 8, C)) * np.linspace(0.2, 1.0, C, dtype=np.float32)

  def loss(p, kernel, bias):
    return saliency_loss(gradient_saliency(p, lambda h: h @ kernel + bias), target)

  kernel, bias = head.kernel[...], head.bias[...]
  value, (g_p, g_k, g_b) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(patches, kernel,
                                                                                bias)

  p_t = _t(patches).requires_grad_(True)
  lin = _torch_head(head)
  l_t = F.mse_loss(torch_gradient_map(p_t, lin), _t(target))
  l_t.backward()
  np.testing.assert_allclose(float(value), l_t.item(), **TOL)
  for got, want in ((g_p, p_t.grad), (g_k, lin.weight.grad.T)):
    want = want.numpy()
    scale = np.abs(want).max()
    assert scale > 1e-4  # a real gradient, not an empty check
    np.testing.assert_allclose(np.asarray(got) / scale, want / scale, atol=1e-5)
  # the bias moves every logit equally: it changes neither w nor P, so its gradient is 0
  assert lin.bias.grad is None or torch.all(lin.bias.grad == 0)
  np.testing.assert_array_equal(np.asarray(g_b), np.zeros(C, np.float32))


# ------------------------------------------------------------------------------- resizing
@pytest.mark.parametrize('src, dst', [((8, 8), (4, 4)), ((4, 4), (8, 8)), ((6, 5), (4, 7))])
def test_resize_bilinear_matches_torch_interpolate(src, dst):
  x = np.random.RandomState(0).rand(2, *src, 3).astype(np.float32)
  got = np.asarray(jax.jit(resize_bilinear, static_argnums=1)(x, dst))
  want = F.interpolate(_t(x).permute(0, 3, 1, 2), size=dst, mode='bilinear')
  np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), **TOL)


# -------------------------------------------------------------------------------- losses
def test_saliency_loss_is_mse_with_teacher_stop_gradient():
  s = np.random.RandomState(1).rand(2, 4, 4).astype(np.float32)
  t = np.random.RandomState(2).rand(2, 4, 4).astype(np.float32)
  value, (g_s, g_t) = jax.jit(jax.value_and_grad(saliency_loss, argnums=(0, 1)))(s, t)
  np.testing.assert_allclose(float(value), np.mean((np.asarray(s) - t)**2), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g_s), 2 * (np.asarray(s) - t) / s.size, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(g_t), np.zeros_like(t))
  with pytest.raises(ValueError, match='differ in shape'):
    jax.eval_shape(saliency_loss, s, t[:, :2])


def test_attention_saliency_loss_matches_torch(models):
  """Student patch 2 (8x8 grid, 4 blocks) vs plain ViT teacher patch 4 (4x4 grid, 6 blocks):
    blocks 0..3 paired by index, student map resized (bilinear) to the teacher grid, mean."""
  s_out, t_out = models['outs']['student'], models['outs']['vit_teacher']
  got = jax.jit(lambda s, t: attention_saliency_loss(s, t, student_prefix=2, teacher_prefix=1,
                                                     grid_s=8, grid_t=4))(s_out, t_out)
  terms = []
  for i in range(12):  # the notebook's loop: every index present in both models
    if f'attn{i}' not in s_out or f'attn{i}' not in t_out:
      continue
    t_map = torch_attention_map(_t(t_out[f'attn{i}']), 1)
    s_map = torch_attention_map(_t(s_out[f'attn{i}']), 2)
    s_map = F.interpolate(s_map[:, None], size=t_map.shape[-2:], mode='bilinear')[:, 0]
    terms.append(F.mse_loss(s_map, t_map))
  assert len(terms) == 4
  want = (sum(terms) / len(terms)).item()
  assert want > 1e-3
  np.testing.assert_allclose(float(got), want, **TOL)
  # explicit pairs and the other resize direction give other, finite numbers
  other = jax.jit(lambda s, t: attention_saliency_loss(
      s, t, student_prefix=2, teacher_prefix=1, layers=[(0, 0), (-1, -1)], resize_to='student'))(
          s_out, t_out)
  assert np.isfinite(float(other)) and abs(float(other) - want) > 1e-6
  with pytest.raises(ValueError, match='differs from the teacher grid'):  # at trace time
    jax.eval_shape(
        lambda s, t: attention_saliency_loss(s, t, student_prefix=2, teacher_prefix=1, resize_to=
                                             None), s_out, t_out)


def test_gradient_saliency_loss_matches_torch(models):
  """Student vs a patch-2 teacher with a dist token: blocks [0, 2, 3] of both, MSE summed."""
  s_out, t_out = models['outs']['student'], models['outs']['peer_teacher']
  student, teacher = models['student'], models['peer_teacher']
  got = jax.jit(lambda s, t: gradient_saliency_loss(
      s, t, student_classifier=student.head, teacher_classifier=teacher.head, student_prefix=2,
      teacher_prefix=2, grid_s=8, grid_t=8))(s_out, t_out)
  s_head, t_head = _torch_head(student.head), _torch_head(teacher.head)
  want = 0.0
  for i in (0, 2, 3):
    p_s = _t(s_out[f'block{i}'][:, 2:]).requires_grad_(True)
    p_t = _t(t_out[f'block{i}'][:, 2:]).requires_grad_(True)
    a_s = torch_gradient_map(p_s, s_head)
    a_t = torch_gradient_map(p_t, t_head).detach()
    want = want + F.mse_loss(a_s, a_t).item()
  assert want > 1e-3
  np.testing.assert_allclose(float(got), want, **TOL)


def test_layer_pairs():
  assert layer_pairs('all', 4, 12) == [(0, 0), (1, 1), (2, 2), (3, 3)]
  assert layer_pairs((0, 2, 3), 4, 12) == [(0, 0), (2, 2), (3, 3)]
  assert layer_pairs((0, 1, -1), 4, 12) == [(0, 0), (1, 1), (3, 11)]
  assert layer_pairs([(3, 11), (0, 5)], 4, 12) == [(3, 11), (0, 5)]
  with pytest.raises(ValueError, match='student has 4 blocks'):
    layer_pairs((0, 4), 4, 12)
  with pytest.raises(ValueError, match="'all'"):
    layer_pairs('last', 4, 12)


def test_losses_train_the_student_only(models):
  """Both losses through live forwards of both models, gradients w.r.t. every parameter of
    both: the teacher's are all exactly 0 (stop_gradient on its maps, tokens and attention); the
    student's blocks, embeddings and head kernel (gradient variant, second order through
    w = ∂z/∂m / N) get a real one; its head bias exactly 0 (it shifts all logits, so neither w nor
    P moves). Small models (IRKD student layout with 2 blocks, plain ViT teacher with 3, patch 4)
    keep the compile of the second-order gradient short."""
  student = _build(
      lambda: DistilledViT(ViTSize(dim=32, depth=2, heads=2, mlp_dim=64, patch=2
                                  ), num_classes=C, img_size=IMG, drop_path=0.0, dist_pos_embed=
                           False, final_norm=False, eval_head='cls', rngs=nnx.Rngs(0)), seed=5)
  teacher = _build(
      lambda: DistilledViT(ViTSize(dim=32, depth=3, heads=2, mlp_dim=64, patch=4), num_classes=C,
                           img_size=IMG, distilled=False, drop_path=0.0, rngs=nnx.Rngs(0)), seed=6)
  images = models['images'][:2]
  s_def, s_params, s_rest = nnx.split(student, nnx.Param, ...)
  t_def, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)

  def loss(s_params, t_params):
    s_model, t_model = nnx.merge(s_def, s_params, s_rest), nnx.merge(t_def, t_params, t_rest)
    _, s_out = s_model(images)
    _, t_out = t_model(images)
    attn = attention_saliency_loss(s_out, t_out, student_prefix=2, teacher_prefix=1)
    grad = gradient_saliency_loss(s_out, t_out, student_classifier=s_model.head,
                                  teacher_classifier=t_model.head, student_prefix=2,
                                  teacher_prefix=1, layers=(0, 1, -1))
    return attn + grad

  # A one-off program: XLA's backend optimisations cost more compile time than they save.
  fast_compile = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)
  g_s, g_t = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=fast_compile)(s_params,
                                                                                    t_params)
  t_leaves = jax.tree.leaves(g_t)
  assert len(t_leaves) > 20
  for leaf in t_leaves:
    np.testing.assert_array_equal(np.asarray(leaf), np.zeros(leaf.shape, leaf.dtype))
  for path in (('blocks', 0, 'attn', 'qkv', 'kernel'), ('blocks', 1, 'mlp', 'fc2', 'kernel'),
               ('patch_embed', 'kernel'), ('pos_embed',), ('head', 'kernel')):
    leaf = g_s
    for key in path:
      leaf = leaf[key]
    assert float(jnp.abs(leaf[...]).max()) > 1e-7, path
  np.testing.assert_array_equal(np.asarray(g_s['head']['bias'][...]), np.zeros(C, np.float32))
