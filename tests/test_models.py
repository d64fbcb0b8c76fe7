"""Model shapes, parameter counts and layout details of the TIKD, RepDistiller and IRKD models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tikd_jax.cpu import compiler
from tikd_jax.models import build_model, count_params
from tikd_jax.models import build_model as _build_model
from tikd_jax.models.vit import resize_pos_embed

FAST_COMPILE = compiler.compiler_options('fast_compile', 'cpu')


def abstract_count(name, **kw):
  return count_params(nnx.eval_shape(lambda: build_model(name, rngs=nnx.Rngs(0), **kw)))


@pytest.mark.parametrize('variant,paper,exact', [('small', 1.09e6, 1_092_632),
                                                 ('medium', 4.17e6, 4_154_664),
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
  assert abstract_count('resnet32x4', num_classes=100) == 7_433_860  # ~7.43M (RepDistiller)
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
  """The model's own GELU, alone and inside an MLP block, is the erf form timm/DeiT use, not
  flax's default tanh approximation (which differs by up to ~5e-4 around |x| = 2)."""
  from scipy.special import erf
  from tikd_jax.models.vit import gelu_exact

  def gelu_np(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))

  h = np.linspace(-4.0, 4.0, 161, dtype=np.float32)
  np.testing.assert_allclose(gelu_exact(jnp.asarray(h)), gelu_np(h.astype(np.float64)),
                             atol=1e-6)  # float32 cancellation in 1 + erf for x ≪ 0
  # The block's MLP, with O(1) weights so that its hidden units spread over [-4, 4], where the
  # two GELUs differ: fc2(gelu(fc1(x))) against float64 NumPy.
  model = build_model('distilled_vit', variant='micro', num_classes=5, rngs=nnx.Rngs(0))
  mlp = model.blocks[0].mlp
  rng = np.random.default_rng(0)
  w1 = rng.normal(0, 1.0, (32, 64)) / np.sqrt(32) * 2.0
  w2 = rng.normal(0, 1.0, (64, 32)) / np.sqrt(64)
  b1, b2 = rng.normal(0, 0.1, 64), rng.normal(0, 0.1, 32)
  for layer, w, b in ((mlp.fc1, w1, b1), (mlp.fc2, w2, b2)):
    layer.kernel[...] = jnp.asarray(w, jnp.float32)
    layer.bias[...] = jnp.asarray(b, jnp.float32)
  x = rng.normal(0, 1.0, (4, 9, 32)).astype(np.float32)
  hidden = x.astype(np.float64) @ w1 + b1
  assert hidden.std() > 1.0  # the units reach the region where tanh and erf GELU differ
  expected = gelu_np(hidden) @ w2 + b2
  tanh_gelu = 0.5 * hidden * (1 + np.tanh(np.sqrt(2 / np.pi) * (hidden + 0.044715 * hidden**3)))
  assert np.abs(tanh_gelu @ w2 + b2 - expected).max() > 1e-4  # the check below can tell them apart
  np.testing.assert_allclose(mlp(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def test_resnet_padding_matches_pytorch_at_stride_two():
  model = build_model('resnet8', num_classes=10, rngs=nnx.Rngs(0))
  conv = model.layer2[0].conv1  # 3×3 stride 2
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 16))
  ours = conv(x)
  w = torch.tensor(np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1))
  ref = torch.nn.functional.conv2d(
      torch.tensor(np.asarray(x)).permute(0, 3, 1, 2), w, stride=2, padding=1).permute(0, 2, 3,
                                                                                       1).numpy()
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
  """The CPU layers' hand-written VJPs (tikd_jax/cpu/layers.py: dense, layer_norm, patches @
  kernel) give the values and gradients of autodiff through nnx.Linear / nnx.LayerNorm / nnx.Conv,
  to float32 rounding."""
  from tikd_jax.cpu import layers as fast_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  if layer == 'dense':
    module = nnx.Linear(24, 40, rngs=nnx.Rngs(0))
    module.bias[...] = jnp.asarray(rng.randn(40), jnp.float32)
    x = jnp.asarray(rng.randn(3, 11, 24), jnp.float32)
    fast, plain = fast_lib.Linear.__call__, lambda m, x: m(x)
  elif layer == 'layer_norm':
    module = nnx.LayerNorm(24, epsilon=1e-6, rngs=nnx.Rngs(0))
    module.scale[...] = jnp.asarray(1 + rng.randn(24), jnp.float32)
    module.bias[...] = jnp.asarray(rng.randn(24), jnp.float32)
    x = jnp.asarray(3 + 2 * rng.randn(3, 11, 24), jnp.float32)
    fast, plain = fast_lib.LayerNorm.__call__, lambda m, x: m(x)
  else:
    model = build_model('distilled_vit', variant='micro', img_size=16, num_classes=10,
                        rngs=nnx.Rngs(0))
    module = model
    x = jnp.asarray(rng.rand(2, 16, 16, 3), jnp.float32)
    fast = lambda m, x: fast_lib.PatchEmbed.__call__(m.patch_embed, x)
    plain = lambda m, x: m.patch_embed(x)
  weights = jnp.asarray(rng.randn(*jax.eval_shape(lambda: plain(module, x)).shape), jnp.float32)
  results = [
      _value_and_grads(lambda m, x, f=f: jnp.sum(jnp.tanh(f(m, x)) * weights), module, x)
      for f in (fast, plain)
  ]
  (v_fast, g_fast, dx_fast), (v_plain, g_plain, dx_plain) = results
  np.testing.assert_allclose(v_fast, v_plain, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx_fast, dx_plain, rtol=1e-4, atol=1e-5)
  for a, b in zip(g_fast, g_plain):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_cpu_fast_layers_switch_resolves_per_backend():
  from tikd_jax.cpu import layers as cpu_fast_layers  # pylint: disable=g-import-not-at-top
  assert cpu_fast_layers.enabled('auto', backend='cpu')
  assert not cpu_fast_layers.enabled('auto', backend='gpu')
  assert not cpu_fast_layers.enabled('auto', backend='tpu')
  assert cpu_fast_layers.enabled('on', backend='gpu') and not cpu_fast_layers.enabled('off', 'cpu')
  with pytest.raises(ValueError, match="cpu_fast_layers='fast'"):
    cpu_fast_layers.enabled('fast')


def test_vit_with_fast_layers_computes_the_plain_vit():
  """The switch changes lowering only: the whole TIKD ViT (both passes, both heads) gives the
  same logits and parameter gradients with and without it, to float32 rounding."""
  images = jax.random.uniform(jax.random.key(1), (3, 16, 16, 3))
  text = jax.random.normal(jax.random.key(2), (3, 12))
  results = []
  for fast in (False, True):
    model = build_model('distilled_vit', variant='micro', img_size=16, num_classes=10, text_dim=12,
                        drop_path=0.0, fast_layers=fast, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p, graphdef=graphdef):
      logits, out = nnx.merge(graphdef, p)(images, train=True, text=text, fuse_text=True)
      return jnp.sum(jnp.tanh(logits) * jnp.arange(10.0)) + jnp.sum(out['dist_logits']**2)

    results.append(jax.jit(jax.value_and_grad(loss), compiler_options=FAST_COMPILE)(params))
  (v_plain, g_plain), (v_fast, g_fast) = results
  np.testing.assert_allclose(v_fast, v_plain, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize('fast', [False, True])
def test_last_block_split_computes_the_whole_block(fast):
  """Block.split(x, p) gives the rows [:p] and [p:] of the whole block's output, dropout masks
  and drop path included (the masks are drawn for all rows and sliced, not drawn per part)."""
  model = build_model('distilled_vit', variant='micro', num_classes=10, drop_path=0.5, dropout=0.3,
                      fast_layers=fast, rngs=nnx.Rngs(0))
  block = model.blocks[1]
  tokens = jax.random.normal(jax.random.key(3), (8, 18, 32))
  for key in (None, jax.random.key(4)):
    whole, attn = block(tokens, key)
    (head, rest), attn_split = block.split(tokens, 2, key)
    np.testing.assert_allclose(head, whole[:, :2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rest, whole[:, 2:], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(attn_split, attn)
  assert np.abs(np.asarray(whole) - np.asarray(block(tokens)[0])).max() > 1e-2  # masks drawn


def test_logits_alone_skip_the_last_blocks_patch_rows():
  """When only the logits are read (a frozen teacher; a student whose loss reads only its heads)
  XLA drops the last block's projection and MLP for the patch rows: the compiled forward has at
  least those dense layers' FLOPs fewer than one that also returns the tokens, and the same
  logits."""
  model = build_model('distilled_vit', variant='micro', num_classes=10, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  images = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))

  def compiled(with_tokens):

    def forward(state, images):
      logits, out = nnx.merge(graphdef, state)(images)
      return (logits, out['tokens']) if with_tokens else (logits,)

    return jax.jit(forward).lower(state, images).compile()

  alone, with_tokens = compiled(False), compiled(True)
  b, rows, prefix, d, mlp = 4, 8 * 8 + 2, 2, 32, 64
  patch_rows_dense = 2 * b * (rows - prefix) * (d * d + 2 * d * mlp)
  saved = with_tokens.cost_analysis()['flops'] - alone.cost_analysis()['flops']
  assert patch_rows_dense <= saved < 1.2 * patch_rows_dense
  np.testing.assert_allclose(alone(state, images)[0], with_tokens(state, images)[0], rtol=1e-6)


def test_fast_bernoulli_is_jax_bernoulli_bit_for_bit():
  """The CPU layers' bernoulli draws jax.random.bernoulli's mask exactly (the unrolled threefry
  hash and uniform floats), for derived keys, odd shapes and several probabilities; other key
  kinds fall back to jax's own draw."""
  from tikd_jax.cpu import layers as cpu_fast_layers  # pylint: disable=g-import-not-at-top
  base = jax.random.key(11)
  keys = [base, jax.random.fold_in(base, 2), jax.random.split(base, 3)[1]]
  for key in keys:
    for shape in ((5,), (3, 7, 9), (2, 18, 4, 3)):
      for p in (0.9, 0.5, 0.1):
        got = jax.jit(cpu_fast_layers.bernoulli, static_argnums=(1, 2))(key, p, shape)
        np.testing.assert_array_equal(got, jax.random.bernoulli(key, p, shape))
  rate = float(np.mean(cpu_fast_layers.bernoulli(base, 0.9, (100_000,))))
  assert abs(rate - 0.9) < 0.005
  rbg = jax.random.key(3, impl='rbg')
  np.testing.assert_array_equal(cpu_fast_layers.bernoulli(rbg, 0.5, (64,)),
                                jax.random.bernoulli(rbg, 0.5, (64,)))


def test_fast_layers_drop_out_the_same_entries():
  """With dropout on, the fast ViT draws the plain ViT's masks: the same train-mode tokens."""
  images = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))

  def tokens(fast, key):
    model = build_model('irkd_vit', variant='micro', img_size=16, num_classes=10, dropout=0.3,
                        fast_layers=fast, rngs=nnx.Rngs(0))
    return np.asarray(model(images, train=True, rng=jax.random.key(key))[1]['tokens'])

  plain = tokens(False, 5)
  np.testing.assert_allclose(tokens(True, 5), plain, rtol=1e-5, atol=1e-5)
  assert np.abs(tokens(False, 6) - plain).max() > 0.1  # the masks matter


# The released registry (JSJ515-Group/TIKD models.py): tikd_{tiny,small,base}_distilled_patch4_32,
# our small / medium / large.
RELEASED_REGISTRY = {'small': (128, 2), 'medium': (256, 4), 'large': (512, 8)}


def released_count(dim, heads, num_classes=100, img=32, patch=4, depth=5, mlp_ratio=4, text=512):
  """Parameters of the released DistilledVisionTransformer, module by module (vision_transformer.py
  VisionTransformer with PatchEmbed, qkv bias, Attention.text_proj = Linear(512, head_dim);
  models.py adds dist_token, pos_embed over N + 2, head_dist and text_decoder Linear(d, d))."""
  d, hd, n = dim, dim // heads, (img // patch)**2
  block = (2 * d + (3 * d * d + 3 * d) + (d * d + d) + (text * hd + hd) + 2 * d +
           (d * mlp_ratio * d + mlp_ratio * d) + (mlp_ratio * d * d + d))
  return (3 * patch * patch * d + d + 2 * d + (n + 2) * d + depth * block + 2 * d + 2 *
          (d * num_classes + num_classes) + d * d + d)


@pytest.mark.parametrize('size,ours,ours_released,released', [
    ('small', 1_092_760, 1_110_824, 1_213_064),
    ('medium', 4_154_920, 4_203_560, 4_260_616),
    ('large', 16_353_160, 16_352_264, 16_352_264),
])
def test_default_and_released_preset_counts_against_the_released_registry(
    size, ours, ours_released, released):
  """docs/tikd.md's table: our default preset's student (8 heads, shared text_proj, adapter,
  predictor, gate), the `:released` preset's (the registry's heads, per-block text_proj, no
  predictor) and the released model's own count. Large `:released` equals the released model;
  small / medium differ because the released text_proj reads 512 inputs (it only runs at width
  512) where ours reads the width-d tokens after a low-rank text adapter."""
  from configs import tikd_cifar100  # pylint: disable=g-import-not-at-top
  from tikd_jax.train.run import model_spec  # pylint: disable=g-import-not-at-top
  counts = []
  for arg in (size, f'{size},released'):
    c = tikd_cifar100.get_config(arg)
    name, kwargs = model_spec(c.model, 100)
    kwargs.setdefault('fusion_gate', c.tikd.fusion_gate)
    counts.append(abstract_count(name, text_dim=512, **kwargs))
  assert counts == [ours, ours_released]
  dim, heads = RELEASED_REGISTRY[size]
  assert tikd_cifar100.RELEASED_HEADS[size] == heads
  assert released_count(dim, heads) == released
  assert released_count(512, 8, num_classes=200, img=64) == 16_553_168  # Tiny ImageNet, 16.55M


def test_heads_text_predictor_and_layer_norm_eps_options():
  """`heads` overrides the size table's, `text_predictor=False` builds none (the released model):
  the fused pass then runs on captions and refuses to run without them; `layer_norm_eps` reaches
  every LayerNorm, also under the CPU layers (which read the module's epsilon)."""

  def build_model(name, **more):  # the same initial weights for every model built here
    return _build_model(name, variant='micro', num_classes=5, text_dim=16,
                        text_proj_layout='per_block', rngs=nnx.Rngs(0), **more)

  model = build_model('distilled_vit', heads=4, text_predictor=False, layer_norm_eps=1e-12)
  assert model.size.heads == 4 and model.blocks[0].attn.head_dim == 8
  assert model.blocks[0].attn.text_proj.kernel.shape == (32, 8)
  assert model.text_predictor is None
  norms = [model.norm] + [n for b in model.blocks for n in (b.norm1, b.norm2)]
  assert {n.epsilon for n in norms} == {1e-12}
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  text = jax.random.normal(jax.random.key(2), (2, 16))
  logits, out = model(x, text=text, fuse_text=True)
  assert logits.shape == (2, 5) and 'text_pred' not in out
  with pytest.raises(ValueError, match='no text predictor'):
    model(x, fuse_text=True)
  with pytest.raises(ValueError, match='does not divide the width 32'):
    build_model('distilled_vit', heads=3)
  fast = build_model('distilled_vit', heads=4, text_predictor=False, layer_norm_eps=1e-12,
                     fast_layers=True)
  assert {n.epsilon for n in [fast.norm] + [b.norm1 for b in fast.blocks]} == {1e-12}
  np.testing.assert_allclose(np.asarray(fast(x, text=text, fuse_text=True)[0]), np.asarray(logits),
                             rtol=1e-5, atol=1e-5)
  # eps changes the numbers: a model with timm's 1e-6 and the same weights differs.
  timm_eps = build_model('distilled_vit', heads=4, text_predictor=False)
  assert {b.norm1.epsilon for b in timm_eps.blocks} == {1e-6}
