"""TIKD: the text fusion, caption-free inference and staged training."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from scipy.special import erf

from tikd_jax.losses import tikd as terms
from tikd_jax.models import build_model
from tikd_jax.train import checkpoint as ckpt_lib
from tikd_jax.train import trainer
from tests.test_train import tiny_config


def _np(x):
  return np.asarray(x, np.float64)


def _ln(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu)**2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * _np(p.scale[...]) + _np(p.bias[...])


def _lin(x, p):
  return x @ _np(p.kernel[...]) + _np(p.bias[...])


def _block(x, blk, heads, value_bias=None):
  b, n, d = x.shape
  hd = d // heads
  qkv = _lin(_ln(x, blk.norm1), blk.attn.qkv).reshape(b, n, 3, heads, hd)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  if value_bias is not None:
    v = v + value_bias[:, :, None, :]
  s = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(hd)
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  x = x + _lin(np.einsum('bhqk,bkhd->bqhd', a, v).reshape(b, n, d), blk.attn.proj)
  h = _lin(_ln(x, blk.norm2), blk.mlp.fc1)
  return x + _lin(0.5 * h * (1 + erf(h / np.sqrt(2))), blk.mlp.fc2)


def numpy_tikd_forward(model, images, text):
  """TIKD's released fusion restated: first pass → clamp(cos) weights → text_decoder → pass 2."""
  heads = model.size.heads
  x = (_np(images) - np.array(model.mean)) / np.array(model.std)
  w = _np(model.patch_embed.kernel[...])
  p = model.size.patch
  b, hgt, wid, _ = x.shape
  patches = x.reshape(b, hgt // p, p, wid // p, p, 3).transpose(0, 1, 3, 2, 4, 5)
  tokens = np.einsum('bijklc,klcd->bijd', patches, w) + _np(model.patch_embed.bias[...])
  tokens = tokens.reshape(b, -1, tokens.shape[-1])
  d = tokens.shape[-1]
  cls = np.broadcast_to(_np(model.cls_token[...]), (b, 1, d))
  dist = np.broadcast_to(_np(model.dist_token[...]), (b, 1, d))
  x = np.concatenate([cls, dist, tokens], 1) + _np(model.pos_embed[...])
  for blk in model.blocks:
    x = _block(x, blk, heads)
  x = _ln(x, model.norm)
  t = _np(text)
  if model.text_adapter is not None:
    t = _lin(_lin(t, model.text_adapter.down), model.text_adapter.up)
  cos = (x @ t[:, :, None])[..., 0] / np.maximum(np.linalg.norm(x, axis=-1), 1e-8) / \
      np.maximum(np.linalg.norm(t, axis=-1), 1e-8)[:, None]
  c = np.clip(cos, 0, 1)
  bias = _lin(_lin(c[..., None] * x, model.text_decoder), model.text_proj)
  for blk in model.blocks:
    x = _block(x, blk, heads, value_bias=bias)
  cls_logits = _lin(x[:, 0], model.head)
  dist_logits = _lin(x[:, 1], model.head_dist)
  return (cls_logits + dist_logits) / 2, c, np.mean(1 - c)


@pytest.mark.parametrize('text_dim', [32, 12])  # equal to the width (released) / adapted (ours)
def test_fusion_forward_matches_a_numpy_restatement(text_dim):
  model = build_model('distilled_vit', variant='micro', num_classes=10, text_dim=text_dim,
                      rngs=nnx.Rngs(0))
  images = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3))
  # Text aligned with some tokens so that the weights are not all clamped to 0.
  first, out0 = model(images)
  text = jax.random.normal(jax.random.key(2), (3, text_dim))
  if text_dim == 32:
    text = text + 3.0 * out0['tokens'][:, 0]
  logits, out = model(images, text=text, fuse_text=True)
  ref_logits, ref_c, ref_align = numpy_tikd_forward(model, images, text)
  np.testing.assert_allclose(out['text_weights'], ref_c, atol=2e-5)
  alignment = terms.tikd_alignment(
      terms.Context(out=out, labels=None, targets=None, epoch=1.0, step=0))[0]
  np.testing.assert_allclose(alignment, ref_align, atol=2e-5)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
  c = np.asarray(out['text_weights'])
  assert c.min() >= 0.0 and c.max() <= 1.0 and c.max() > 0.0
  assert not np.allclose(logits, first)  # the text changes the prediction


def test_alignment_loss_and_its_gradient_match_torch():
  model = build_model('distilled_vit', variant='micro', num_classes=10, text_dim=32,
                      rngs=nnx.Rngs(0))
  images = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
  _, out0 = model(images)
  tokens = np.asarray(out0['tokens'])
  text0 = np.asarray(jax.random.normal(jax.random.key(3), (4, 32)) + 2.0 * tokens[:, 0])

  def alignment(text):
    out = model(images, text=text, fuse_text=True)[1]
    return terms.tikd_alignment(terms.Context(out=out, labels=None, targets=None, epoch=1.0,
                                              step=0))[0]

  value, grad = jax.value_and_grad(alignment)(jnp.asarray(text0))
  x = torch.tensor(tokens, dtype=torch.float64)
  t = torch.tensor(text0, dtype=torch.float64, requires_grad=True)
  c = torch.clamp(torch.nn.functional.cosine_similarity(x, t[:, None, :], dim=-1), 0, 1)
  ref = torch.mean(1 - c)
  ref.backward()
  assert abs(float(value) - ref.item()) < 1e-5
  np.testing.assert_allclose(grad, t.grad.numpy(), atol=1e-5)


def test_caption_free_inference_uses_the_text_predictor():
  model = build_model('distilled_vit', variant='micro', num_classes=10, text_dim=12,
                      rngs=nnx.Rngs(0))
  images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  _, out = model(images)
  no_caption, _ = model(images, text=None, fuse_text=True)
  with_prediction, _ = model(images, text=out['text_pred'], fuse_text=True)
  np.testing.assert_allclose(no_caption, with_prediction, atol=1e-6)


@pytest.fixture(scope='module')
def prompt_features(tmp_path_factory):
  """Class-prompt features of the digits train split from the real offline MiniLM encoder."""
  from tikd_jax import text_teacher
  from tikd_jax.data import build_source
  c = tiny_config()
  out = str(tmp_path_factory.mktemp('text') / 'digits-train')
  text_teacher.build_class_prompt_features(c.data, 'train', out, text_teacher.minilm_folder(),
                                           template='a photo of the digit {name}.',
                                           source=build_source(c.data, 'train'))
  return out


def _staged(features_dir, **kw):
  stages = [
      dict(name='vision_warmup', epochs=0.5, fuse_text=False),
      dict(name='joint', epochs=0.5, fuse_text=True)
  ]
  return tiny_config('none', stages=stages, **{'text.features_dir': features_dir}, **kw)


@pytest.fixture(scope='module')
def staged_run(tmp_path_factory, prompt_features):
  """An uninterrupted two-stage TIKD run (shared by the tests below)."""
  workdir = tmp_path_factory.mktemp('staged')
  return workdir, trainer.train_and_evaluate(_staged(prompt_features), str(workdir))


def test_stage_switch_and_mid_stage_resume_equal_an_uninterrupted_run(tmp_path, prompt_features,
                                                                      staged_run):
  straight_dir, straight = staged_run
  assert 'top1_no_text' in straight  # fused model: both caption-free variants are reported
  # Stop inside the second stage (steps 11–22), then resume.
  trainer.train_and_evaluate(_staged(prompt_features, stop_at_step=16), str(tmp_path / 'b'))
  assert ckpt_lib.Checkpointer(str(tmp_path / 'b' / 'checkpoints')).latest_step() == 16
  resumed = trainer.train_and_evaluate(_staged(prompt_features), str(tmp_path / 'b'))
  _, a = ckpt_lib.load_weights(str(straight_dir))
  _, b = ckpt_lib.load_weights(str(tmp_path / 'b'))
  assert a.keys() == b.keys() and any('text_decoder' in k for k in a)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert resumed['top1'] == straight['top1']
  lines = open(tmp_path / 'b' / 'metrics.jsonl').read()
  assert 'alignment_loss' in lines and 'text_predictor_loss' in lines


def test_eval_needs_no_text_features(tmp_path, staged_run):
  workdir, trained = staged_run
  c = _staged(str(tmp_path / 'no_such_features'))  # eval must not look for them
  result = trainer.evaluate_checkpoint(c, str(workdir))
  assert result['count'] == 360 and np.isfinite(result['loss'])
  assert result['top1'] == pytest.approx(trained['top1'])  # caption-free, predictor-driven
