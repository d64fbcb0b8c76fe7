"""TIKD without captions at test time: the three training designs through the real jitted step,
and every eval text input (predicted / none / captions / released) recomputed by hand.

  (a) `tikd.fusion_text='predicted'`: the fused pass trains on the text predictor's output, the
      captions supervise only the predictor;
  (b) `tikd.fusion_text='scheduled'`: caption with a probability falling from 1 to 0 over the
      phase, else the prediction;
  (c) `tikd.self_distill_weight`: the fused pass teaches the first pass (eval_text='none').
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, demo, tikd_cifar10, tikd_cifar100
from tests.test_step_meaning import (B, C, COMPILE, DEIT_WEIGHTS, IMG, SEED, STEP, STEPS_PER_EPOCH,
                                     make_model, TEXT_DIM, batch, cosine, expected, far, forward,
                                     images_of, kd, method_inputs, run_step, teacher, tikd,
                                     tikd_terms)
from tests.test_train import tiny_config
from tikd_jax.data import pipeline
from tikd_jax.train import evaluate as evaluate_lib
from tikd_jax.train import step as step_lib
from tikd_jax.train.run import create_train_state, setup
from tests.method_loss import method_loss
from tikd_jax.train.optim import decay_mask
from tikd_jax.train.step import StepOptions

__all__ = ['batch', 'teacher', 'tikd']  # the fixtures this file uses from test_step_meaning

BETA, PREDICTOR_WEIGHT = 0.1, 1.0


def _caption(seed=3):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(B, TEXT_DIM)), jnp.float32)


def _fused_step(tikd, teacher, batch, *, fusion_text, extra=(), phase_steps=(0, 1), step=STEP):
  objective = method_loss(
      tikd_cifar100.get_config('small,hard').distill,
      (('tikd_alignment', BETA), ('text_predictor', PREDICTOR_WEIGHT)) + tuple(extra))
  opts = StepOptions(num_classes=C, steps_per_epoch=STEPS_PER_EPOCH, seed=SEED, fuse_text=True,
                     fusion_text=fusion_text, phase_steps=phase_steps)
  return run_step(tikd, teacher, objective, opts, dict(batch, text=_caption()), step=step)


# ------------------------------------------------------------------ (a) fusion on the prediction
def test_predicted_fusion_trains_on_the_predictors_output(tikd, teacher, batch):
  params, _, metrics, grads, _ = _fused_step(tikd, teacher, batch, fusion_text='predicted')
  images, caption = images_of(batch), _caption()
  _, first = forward(tikd, images, train=True)
  prediction = first['text_pred']
  # Expected: hard KD and alignment on the pass fused with the prediction; the predictor's
  # cosine loss against the caption.
  x = dict(method_inputs(teacher, batch, jax.nn.one_hot(batch['label'], C)), text=prediction)
  fused_loss, terms, _, _ = expected(tikd, params, images, x,
                                     dict(DEIT_WEIGHTS['hard'], alignment=BETA), tikd_terms,
                                     fuse_text=True)
  predictor = jnp.mean(1.0 - cosine(prediction, caption))
  np.testing.assert_allclose(metrics['loss'], fused_loss + PREDICTOR_WEIGHT * predictor, rtol=1e-5)
  np.testing.assert_allclose(metrics['text_predictor_loss'], predictor, rtol=1e-5)
  # The caption-fused reading differs clearly, so the check can tell.
  _, _, caption_metrics, _, _ = _fused_step(tikd, teacher, batch, fusion_text='caption')
  assert far(caption_metrics['loss'], metrics['loss'])
  # Fusion passes no gradient to the predictor: only its own cosine term trains it.
  down = grads['student']['text_predictor']['down']['kernel']
  assert np.abs(down).max() > 1e-6
  _, _, _, no_predictor_grads, _ = run_step(
      tikd, teacher,
      method_loss(tikd_cifar100.get_config('small,hard').distill, (('tikd_alignment', BETA),)),
      StepOptions(num_classes=C, steps_per_epoch=STEPS_PER_EPOCH, seed=SEED, fuse_text=True,
                  fusion_text='predicted'), dict(batch, text=caption))
  for leaf in jax.tree.leaves(no_predictor_grads['student']['text_predictor']):
    assert not np.any(leaf)


# ------------------------------------------------------------------ (b) scheduled sampling
def test_scheduled_sampling_falls_from_caption_to_prediction(tikd, teacher, batch):
  opts = StepOptions(num_classes=C, steps_per_epoch=1, seed=0, fuse_text=True,
                     fusion_text='scheduled', phase_steps=(100, 300))
  keep = lambda step: np.asarray(
      step_lib._caption_keep(  # pylint: disable=protected-access
          opts, jnp.int32(step), jax.random.key(step), 20_000))
  assert keep(100).all() and not keep(300).any()
  for step, p in ((150, 0.75), (200, 0.5), (250, 0.25)):
    assert abs(keep(step).mean() - p) < 0.02, (step, keep(step).mean())
  # Through the step: at the phase's first step it is the caption run, at its end the
  # prediction run, loss for loss.
  at_start = _fused_step(tikd, teacher, batch, fusion_text='scheduled', phase_steps=(STEP, 99))
  at_end = _fused_step(tikd, teacher, batch, fusion_text='scheduled', phase_steps=(0, STEP))
  caption = _fused_step(tikd, teacher, batch, fusion_text='caption')
  predicted = _fused_step(tikd, teacher, batch, fusion_text='predicted')
  assert at_start[2]['loss'] == caption[2]['loss']
  assert at_end[2]['loss'] == predicted[2]['loss']
  assert far(caption[2]['loss'], predicted[2]['loss'])


# ------------------------------------------------------------------ (c) self-distillation
def test_self_distillation_teaches_the_first_pass_from_the_fused_one(tikd, teacher, batch):
  weight = 0.7
  params, _, metrics, grads, _ = _fused_step(tikd, teacher, batch, fusion_text='caption',
                                             extra=(('tikd_self_distill', weight),))
  _, _, plain, plain_grads, _ = _fused_step(tikd, teacher, batch, fusion_text='caption')
  graphdef, variables = tikd
  images, caption = images_of(batch), _caption()

  def self_distill(student_params):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    model = nnx.merge(graphdef, student_params, variables['batch_stats'])
    _, out = model(images, train=True, text=caption, fuse_text=True)
    first = (out['first_cls_logits'] + out['first_dist_logits']) / 2
    fused = jax.lax.stop_gradient((out['cls_logits'] + out['dist_logits']) / 2)
    return kd(first, fused, 1.0)

  value, term_grads = jax.jit(jax.value_and_grad(self_distill), **COMPILE)(params['student'])
  np.testing.assert_allclose(metrics['self_distill_loss'], value, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss'], plain['loss'] + weight * value, rtol=1e-5)
  assert float(value) > 1e-3
  # The step's gradient is the plain one plus weight · the term's (no gradient into the fused
  # side: with it, the head gradients below would differ).
  expected_grads = jax.tree.map(lambda g, t: g + weight * np.asarray(t, np.float64),
                                plain_grads['student'], term_grads)
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-5),
               grads['student'], expected_grads)


# ------------------------------------------------------------------ eval: every text input
def _image_folder(root, start, count, split):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tikd_jax.data import digits  # pylint: disable=g-import-not-at-top
  images, labels = digits._load(32)  # pylint: disable=protected-access
  for i in range(start, start + count):
    folder = os.path.join(root, split, str(labels[i]))
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(images[i]).save(os.path.join(folder, f'{i:04d}.png'))


@pytest.fixture(scope='module')
def captioned(tmp_path_factory):
  """Digits in an image folder (train 64 / val 24) whose two splits a tiny random BLIP captions
  (it sees images only, never labels) and a tiny random CLIP encodes."""
  from tikd_jax.text_teacher.__main__ import main  # pylint: disable=g-import-not-at-top
  from tikd_jax.text_teacher.tiny import save_tiny_blip, save_tiny_clip  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.mktemp('captioned')
  root = str(base / 'digits')
  _image_folder(root, 0, 64, 'train')
  _image_folder(root, 64, 24, 'val')
  blip, clip = save_tiny_blip(str(base / 'blip')), save_tiny_clip(str(base / 'clip'))
  features = {}
  for split in ('train', 'val'):
    out = str(base / f'features-{split}')
    flags = ['--data.name', 'image_folder', '--data.dir', root, '--split', split, '--out', out]
    assert main([
        'caption', *flags, '--model', blip, '--batch_size', '16', '--device', 'cpu',
        '--max_new_tokens', '6'
    ]) == 0
    assert main(['encode', *flags, '--encoder', clip, '--device', 'cpu']) == 0
    features[split] = out
  return root, features


def test_every_eval_text_input_is_what_it_says(tmp_path, captioned):
  root, features = captioned
  stages = [
      dict(name='warmup', epochs=1.0, fuse_text=False),
      dict(name='joint', epochs=1.0, fuse_text=True)
  ]
  config = tiny_config(
      'none', stages=stages, eval_batch_size=16, **{
          'data.name': 'image_folder', 'data.dir': root, 'data.eval_split': 'val',
          'text.features_dir': features['train'], 'text.eval_features_dir': features['val'],
          'tikd.eval_text': 'captions', 'tikd.fusion_gate': False
      })  # ungated: drawn gate gains (0.1 scale) would leave the inputs too close to tell apart
  run = setup(config, str(tmp_path))
  assert run.data.num_classes == C
  # Weights drawn at full scale (the initialisers' 0.02 would leave the text almost no effect),
  # evaluated after the fusing stage as the trainer does.
  kwargs = {k: v for k, v in run.student.kwargs.items() if k != 'num_classes'}
  graphdef, variables = make_model(run.student.name, 4, **kwargs)
  state = create_train_state(run)
  state = state.replace(params=dict(state.params, student=variables['params']),
                        batch_stats=variables['batch_stats'])
  result = evaluate_lib.evaluate(run, state, run.phases[-1])
  data = run.data
  images = np.stack([data.eval[i]['image'] for i in range(len(data.eval))])
  labels = np.array([data.eval[i]['label'] for i in range(len(data.eval))])
  model = (graphdef, variables)

  def top1_and_loss(text=None, fuse_text=True):
    logits, _ = forward(model,
                        jnp.asarray(images, jnp.float32) / 255.0, False,
                        None if text is None else jnp.asarray(text), fuse_text)
    log_probs = np.asarray(jax.nn.log_softmax(logits), np.float64)
    return (100.0 * float(np.mean(np.argmax(np.asarray(logits), -1) == labels)),
            float(-np.mean(log_probs[np.arange(len(labels)), labels])))

  released = data.text_features[np.arange(len(labels)) % 16]  # rows 0…15 for every batch
  expected = {
      'captions': top1_and_loss(data.eval_text_features), 'predicted': top1_and_loss(),
      'no_text': top1_and_loss(fuse_text=False), 'released': top1_and_loss(released)
  }
  for suffix, (top1, loss) in expected.items():
    assert result[f'top1_{suffix}'] == pytest.approx(top1, abs=1e-6), suffix
    assert result[f'loss_{suffix}'] == pytest.approx(loss, rel=1e-5), suffix
  # Each input changes the fused pass's output, so the losses above can tell them apart.
  losses = sorted(loss for _, loss in expected.values())
  assert all(b - a > 3e-4 * a for a, b in zip(losses, losses[1:])), expected
  assert result['top1'] == result['top1_captions']  # the headline is tikd.eval_text's
  np.testing.assert_array_equal(
      pipeline.released_rows(data.text_features, 24, 16)[16:24], data.text_features[:8])
  # The captions are the val split's own, read by example index, and not the train rows.
  assert not np.allclose(data.eval_text_features, data.text_features[:24])


def test_captions_mode_needs_the_eval_splits_features(tmp_path):
  config = tiny_config('none', **{'tikd.eval_text': 'captions'})
  with pytest.raises(ValueError, match='text.eval_features_dir'):
    setup(config, str(tmp_path))
  with pytest.raises(ValueError, match="tikd.fusion_text='prediction'"):
    setup(tiny_config('none', **{'tikd.fusion_text': 'prediction'}), str(tmp_path))


# ------------------------------------------------------------------ the fusion gate
@pytest.fixture(scope='module')
def gated():
  """The `tikd` student with `fusion_gate`: its gain as built (zeros), other weights drawn."""
  graphdef, variables = make_model('distilled_vit', 2, variant='micro', img_size=IMG, drop_path=0.0,
                                   text_dim=TEXT_DIM, fusion_gate=True)
  params = dict(variables['params'], text_gate=jnp.zeros_like(variables['params']['text_gate']))
  return graphdef, dict(variables, params=params)


def test_a_closed_gate_starts_the_joint_stage_from_the_first_pass(gated, teacher, batch):
  """At the switch to fused training the gated student predicts exactly as its first pass: no
  self-distillation pull, no gradient into the fused-only modules, and the gain itself learns."""
  _, _, metrics, grads, _ = _fused_step(gated, teacher, batch, fusion_text='caption',
                                        extra=(('tikd_self_distill', 1.0),))
  assert float(metrics['self_distill_loss']) == 0.0
  student = grads['student']
  assert float(jnp.abs(student['text_decoder']['kernel']).max()) == 0.0
  assert float(jnp.abs(student['text_proj']['kernel']).max()) == 0.0
  assert float(jnp.abs(student['text_gate']).max()) > 1e-4
  # With the gain open the fused pass counts again, exactly as x + g ⊙ (fused(x) − x).
  graphdef, variables = gated
  g = jnp.asarray(
      np.random.default_rng(4).uniform(0.2, 1.0, variables['params']['text_gate'].shape),
      jnp.float32)
  opened = dict(variables, params=dict(variables['params'], text_gate=g))
  ungated_graphdef, _ = make_model('distilled_vit', 2, variant='micro', img_size=IMG, drop_path=0.0,
                                   text_dim=TEXT_DIM)
  plain_params = {k: v for k, v in opened['params'].items() if k != 'text_gate'}
  images, caption = images_of(batch), _caption()
  _, gated_out = forward((graphdef, opened), images, True, text=caption, fuse_text=True)
  _, plain_out = forward((ungated_graphdef, dict(opened, params=plain_params)), images, True,
                         text=caption, fuse_text=True)
  x = gated_out['tokens']
  expected_pre = x + g * (plain_out['fused_block1'] - x)
  np.testing.assert_allclose(gated_out['pre_logits'], expected_pre[:, 0], atol=1e-5)
  assert float(jnp.abs(gated_out['pre_logits'] - plain_out['pre_logits']).max()) > 1e-3


def test_only_our_default_design_is_gated():
  assert common.base().tikd.fusion_gate and common.base().tikd.self_distill_weight > 0
  assert tikd_cifar100.get_config('small,hard').tikd.fusion_gate
  assert not tikd_cifar100.get_config('small,hard,released').tikd.fusion_gate
  assert not tikd_cifar10.get_config('small,hard,released').tikd.fusion_gate
  assert [d.get('fusion_gate', True) for d in demo.TIKD_DESIGNS.values()] == \
      [False, False, False, True]
  assert not decay_mask({'text_gate': 0, 'head': {'kernel': 0}}, common.NO_DECAY)['text_gate']
