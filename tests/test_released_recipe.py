"""The released TIKD recipe (`configs/tikd_cifar100.py:large,hard,released`,
docs/released_recipe.md): the base loss and DKD's / PKCD's label read the argmax of the mixed
target (`distill.base='released'`), the preset's phase and settings, and the text rows 0..B−1 on
every train batch (`tikd.text_rows='released'`).

The losses are checked through the real jitted train step of tests/test_step_meaning.py (its
micro DeiT student, resnet8 teacher and batch), recomputed here in NumPy (float64) from the
student's outputs and the teacher's eval-mode logits on the step's own Mixup / CutMix batch.
"""
# The fixtures imported from tests/test_step_meaning.py are the tests' arguments:
# ruff: noqa: F811
import types

import jax
import numpy as np
import pytest
from flax import nnx

from configs import kd_cifar100, tikd_cifar100, tiny
from tests.test_step_meaning import batch, deit, teacher  # noqa: F401  (fixtures)
from tests.test_step_meaning import (B, C, LABELS, LOSS_RTOL, PREV_LABELS, SEED, STEPS_PER_EPOCH,
                                     assert_same_gradient, expected, far, forward, images_of,
                                     method_inputs, pkcd_contrast, run_step, teacher_eval_logits)
from tikd_jax.data import pipeline
from tikd_jax.data.repeated_aug import RepeatedAugmentation
from tikd_jax.data.source import ArraySource
from tikd_jax.models import build_model, count_params
from tikd_jax.train import loop
from tikd_jax.train.loss_config import term_settings
from tests.method_loss import method_loss
from tikd_jax.train.plan import build_phases
from tikd_jax.train.run import build_augmentations, model_spec, repeated_augmentation
from tikd_jax.train.spec import resolve as resolve_spec
from tikd_jax.train.step import StepOptions

# For SEED 0 at this step the batch is mixed with λ < 0.5: every row's mixed target has its
# maximum at the partner's (the flipped batch's) label, not at its own (checked below).
FLIPPED_STEP = 13
RELEASED_TAU = 0.2  # JSJ515-Group/TIKD main.py: --distillation-tau default


# ------------------------------------------------------------------ NumPy restatements (float64)
def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_ce(logits, labels):
  """torch.nn.CrossEntropyLoss()(logits, labels): the released base criterion."""
  return -np.mean(np_log_softmax(logits)[np.arange(len(labels)), labels])


def np_soft_ce(logits, q):
  """timm SoftTargetCrossEntropy: DeiT's base criterion under Mixup."""
  return -np.mean(np.sum(np.asarray(q, np.float64) * np_log_softmax(logits), -1))


def np_logsumexp(z, axis=-1):
  m = z.max(axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.exp(z - m).sum(axis))


def np_dkd(s, t, y, temperature, alpha=1.0, beta=8.0):
  """mdistiller DKD (α·TCKD + β·NCKD, T² / B), in log space so that τ 0.2 stays finite."""
  gt = np.eye(s.shape[-1], dtype=bool)[y]

  def binary(z):
    z = np.asarray(z, np.float64) / temperature
    norm = np_logsumexp(z)
    return np.stack([z[gt] - norm, np_logsumexp(np.where(gt, -np.inf, z)) - norm], -1)

  bs, bt = binary(s), binary(t)
  tckd = np.sum(np.exp(bt) * (bt - bs)) * temperature**2 / len(y)
  ls = np_log_softmax(np.asarray(s, np.float64) / temperature - 1000.0 * gt)
  lt = np_log_softmax(np.asarray(t, np.float64) / temperature - 1000.0 * gt)
  nckd = np.sum(np.exp(lt) * (lt - ls)) * temperature**2 / len(y)
  return alpha * tckd + beta * nckd


def np_deit_soft(s, t, temperature):
  """DeiT / TIKD losses.py 'soft' (PKCD's L_kd): KL(sum) · T² / numel."""
  ls, lt = np_log_softmax(np.asarray(s) / temperature), np_log_softmax(np.asarray(t) / temperature)
  return np.sum(np.exp(lt) * (lt - ls)) * temperature**2 / s.size


# ------------------------------------------------------------------ one real step
def mixed_step(deit, teacher, batch, arg, *, step=FLIPPED_STEP, augment=True, objective_state=None):
  """One step of tikd_cifar100.get_config(arg)'s loss with its Mixup / CutMix / erasing (or, with
  augment=False, its smoothed one-hot targets) → the step's results and what it saw."""
  config = tikd_cifar100.get_config(arg)
  _, batch_augment = build_augmentations(resolve_spec(config)) if augment else (None, None)
  opts = StepOptions(num_classes=C, steps_per_epoch=STEPS_PER_EPOCH, seed=SEED,
                     label_smoothing=config.label_smoothing, batch_augment=batch_augment)
  params, new_state, metrics, grads, _ = run_step(deit, teacher, method_loss(config.distill), opts,
                                                  batch, step=step, objective_state=objective_state)
  images = images_of(batch)
  if augment:
    # The step's aug_rng: split(fold_in(key(seed), step))[0] (tests/test_step_meaning.py).
    aug_rng = jax.random.split(jax.random.fold_in(jax.random.key(SEED), step))[0]
    images, q = jax.jit(batch_augment, static_argnums=2)(images, batch['label'], C, aug_rng)
  else:
    eps = config.label_smoothing
    q = (1.0 - eps) * jax.nn.one_hot(batch['label'], C) + eps / C
  _, out = forward(deit, images, train=True)  # drop_path 0: the step's forward
  return types.SimpleNamespace(params=params, state=new_state, metrics=metrics, grads=grads,
                               images=images, q=np.asarray(q, np.float64),
                               cls=np.asarray(out['cls_logits'], np.float64),
                               dist=np.asarray(out['dist_logits'], np.float64),
                               t=np.asarray(teacher_eval_logits(teacher, images), np.float64))


def np_base(r, base):
  return np_ce(r.cls, r.q.argmax(-1)) if base == 'released' else np_soft_ce(r.cls, r.q)


# ------------------------------------------------------------------ (a) the base loss
@pytest.mark.parametrize('targets', ['mixed', 'smoothed'])
@pytest.mark.parametrize('base', ['deit', 'released'])
def test_base_loss_reads_the_targets_as_distill_base_says(deit, teacher, batch, base, targets):
  """hard KD, (1 − α)·base + α·CE(dist, argmax t): 'released' base = CE(cls, argmax of the
  mixed / smoothed target), unsmoothed; 'deit' base = CE against the soft target itself."""
  arg = 'small,hard,released' if base == 'released' else 'small,hard'
  r = mixed_step(deit, teacher, batch, arg, augment=targets == 'mixed')
  if targets == 'mixed':
    assert (r.q.argmax(-1) != LABELS).all()  # the argmax is the partner's label, not the own
  else:
    assert (r.q.argmax(-1) == LABELS).all() and r.q.max() < 0.95  # smoothed, same argmax
  want = np_base(r, base)
  np.testing.assert_allclose(r.metrics['base_loss'], want, rtol=LOSS_RTOL)
  np.testing.assert_allclose(r.metrics['loss'], 0.5 * want + 0.5 * np_ce(r.dist, r.t.argmax(-1)),
                             rtol=LOSS_RTOL)
  # The other reading of the same targets is another loss, and so is the true label (mixed).
  assert far(np_base(r, 'deit' if base == 'released' else 'released'), want)
  if targets == 'mixed':
    assert far(np_ce(r.cls, LABELS), want)
  if base == 'released':  # the gradient too: hard KD with the one-hot argmax as the target
    x = dict(method_inputs(teacher, batch, jax.nn.one_hot(r.q.argmax(-1), C)), t=r.t)
    assert_same_gradient(r.grads,
                         expected(deit, r.params, r.images, x, {'ce': 0.5, 'hard': 0.5})[3])


# ------------------------------------------------------------------ (b) DKD's and PKCD's label
@pytest.mark.parametrize('base', ['deit', 'released'])
def test_dkd_target_class_is_the_argmax_of_the_mixed_target(deit, teacher, batch, base):
  arg = 'small,dkd,released' if base == 'released' else 'small,dkd'
  tau = RELEASED_TAU if base == 'released' else 4.0
  r = mixed_step(deit, teacher, batch, arg)
  label = r.q.argmax(-1) if base == 'released' else LABELS
  other = LABELS if base == 'released' else r.q.argmax(-1)
  assert (label != other).all()
  want = np_dkd(r.dist, r.t, label, tau)
  np.testing.assert_allclose(r.metrics['distill_loss'], want, rtol=LOSS_RTOL)  # unwarmed
  assert far(np_dkd(r.dist, r.t, other, tau), want)
  warm = min((FLIPPED_STEP // STEPS_PER_EPOCH + 1) / 20.0, 1.0)
  np.testing.assert_allclose(r.metrics['loss'], np_base(r, base) + warm * want, rtol=LOSS_RTOL)


@pytest.mark.parametrize('base', ['deit', 'released'])
def test_pkcd_positives_and_carried_labels_are_the_argmax_of_the_mixed_target(
    deit, teacher, batch, base):
  arg = 'small,pkcd,released' if base == 'released' else 'small,pkcd'
  tau = RELEASED_TAU if base == 'released' else 4.0
  prev_t = np.random.default_rng(1).normal(0.0, 2.0, (B, C)).astype(np.float32)
  prev = {'prev_teacher_logits': prev_t, 'prev_labels': PREV_LABELS, 'valid': np.bool_(True)}
  r = mixed_step(deit, teacher, batch, arg, objective_state={'pkcd': prev})
  label = r.q.argmax(-1) if base == 'released' else LABELS
  other = LABELS if base == 'released' else r.q.argmax(-1)

  def total(y):
    contrast = pkcd_contrast(r.dist.astype(np.float32), r.t.astype(np.float32), y, prev_t,
                             PREV_LABELS, tau)
    return np_base(r, base) + np_deit_soft(r.dist, r.t, tau) + float(contrast)

  np.testing.assert_allclose(r.metrics['loss'], total(label), rtol=LOSS_RTOL)
  assert far(total(other), total(label))  # the previous batch's positives follow the label
  # The label is also what the next step's "previous batch" carries.
  np.testing.assert_array_equal(r.state.term_state['pkcd']['prev_labels'], label)


# ------------------------------------------------------------------ (c) the preset
# JSJ515-Group/TIKD losses.py `DistillationLoss.forward`: (1 − α)·base + α·distill, pkcd
# base + distill, α 0.5; the alignment loss is returned but never added, and there is no text
# predictor. dkd here is mdistiller's DKD with its own weights (docs/methods.md).
RELEASED_TERMS = {
    'none': (('ce', 1.0),),
    'soft': (('ce', 0.5), ('soft', 0.5)),
    'hard': (('ce', 0.5), ('hard', 0.5)),
    'ctkd': (('ce', 0.5), ('ctkd', 0.5)),
    'pkcd': (('ce', 1.0), ('pkcd', 1.0)),
    'dkd': (('ce', 1.0), ('dkd', 1.0)),
}


@pytest.mark.parametrize('method', sorted(RELEASED_TERMS))
def test_released_preset_is_one_fused_phase_with_the_released_terms(method):
  c = tikd_cifar100.get_config(f'large,{method},released')
  with c.unlocked():
    c.text.features_dir = '/features'  # with captions: still no predictor or alignment term
  (phase,) = build_phases(c, steps_per_epoch=10)  # no stages: fused from the first step
  assert phase.fuse_text and (phase.start_step, phase.end_step) == (0, 3000)
  assert phase.terms == RELEASED_TERMS[method]
  settings = term_settings(c)
  assert settings['ce'] == {'target': 'argmax'}
  assert settings['dkd']['label'] == 'argmax_target'
  assert settings['pkcd'] == {'temperature': RELEASED_TAU, 'label': 'argmax_target'}
  assert settings['soft'] == settings['kd'] == {'temperature': RELEASED_TAU}
  assert settings['dkd']['temperature'] == RELEASED_TAU
  assert (c.tikd.text_rows, c.tikd.eval_text) == ('released', 'released')
  assert c.eval_batch_size == 384  # main.py: int(1.5 * args.batch_size)
  assert c.augment.mixup_alpha == 0.8 and c.label_smoothing == 0.1  # DeiT's augmentation kept


# JSJ515-Group/TIKD at a8f73e5: main.py's argparse defaults (line numbers in main.py) and the
# README_tikd.md "Training" launch (torch.distributed.launch --nproc_per_node=4, --batch-size 256).
RELEASED_MAIN = {
    'epochs': 300,  # main.py:37 --epochs
    'lr': 5e-4,  # main.py:74 --lr
    'drop_path': 0.1,  # main.py:48 --drop-path
    'opt_eps': 1e-8,  # main.py:61 --opt-eps
    'clip_grad': None,  # main.py:65 --clip-grad
    'weight_decay': 0.05,  # main.py:69 --weight-decay
    'warmup_lr': 1e-6,  # main.py:82 --warmup-lr
    'min_lr': 1e-5,  # main.py:84 --min-lr
    'warmup_epochs': 5,  # main.py:89 --warmup-epochs
    'aa': 'rand-m9-mstd0.5-inc1',  # main.py:101 --aa
    'smoothing': 0.1,  # main.py:104 --smoothing
    'repeated_aug': True,  # main.py:108-110, set_defaults(repeated_aug=True)
    'num_repeats': 3,  # samplers.py RASampler(num_repeats=3), called without it at main.py:232
    'reprob': 0.25,  # main.py:121 --reprob
    'mixup': 0.8,  # main.py:131 --mixup
    'cutmix': 1.0,  # main.py:133 --cutmix
    'mixup_prob': 1.0,  # main.py:137 --mixup-prob
    'mixup_switch_prob': 0.5,  # main.py:139 --mixup-switch-prob
    'distillation_alpha': 0.5,  # main.py:149 --distillation-alpha
    'distillation_tau': 0.2,  # main.py:151 --distillation-tau
    'model_ema_decay': 0.99996,  # main.py:51-54 --model-ema (on by default), --model-ema-decay
}
README_LAUNCH = {'nproc_per_node': 4, 'batch_size': 256}


def test_released_preset_resolves_to_the_released_main_defaults():
  c = tikd_cifar100.get_config('large,hard,released')
  gpus, per_gpu = README_LAUNCH['nproc_per_node'], README_LAUNCH['batch_size']
  assert c.batch_size == gpus * per_gpu == 1024
  # main.py:370-372: lr · batch_size · world_size / 512 unless --unscale-lr.
  assert c.schedule.lr == pytest.approx(RELEASED_MAIN['lr'] * per_gpu * gpus / 512.0) == 1e-3
  assert c.eval_batch_size == int(1.5 * per_gpu) == 384  # main.py:264, per GPU, no --dist-eval
  assert c.num_epochs == RELEASED_MAIN['epochs'] and not c.stages
  assert c.model.drop_path == RELEASED_MAIN['drop_path']
  assert (c.optimizer.name, c.optimizer.eps, c.optimizer.weight_decay,
          c.optimizer.grad_clip_norm) == ('adamw', RELEASED_MAIN['opt_eps'],
                                          RELEASED_MAIN['weight_decay'], 0.0)
  assert (c.schedule.name, c.schedule.warmup_lr, c.schedule.min_lr,
          c.schedule.warmup_epochs) == ('cosine', RELEASED_MAIN['warmup_lr'],
                                        RELEASED_MAIN['min_lr'], RELEASED_MAIN['warmup_epochs'])
  a = c.augment  # rand-m9-mstd0.5-inc1: RandAugment, 2 ops (timm's default n), m 9, std 0.5, inc
  assert (a.randaugment, a.randaugment_num_ops, a.randaugment_magnitude,
          a.randaugment_magnitude_std, a.randaugment_increasing) == (True, 2, 9.0, 0.5, True)
  assert (a.erasing_prob, a.mixup_alpha, a.cutmix_alpha, a.mix_prob,
          a.switch_prob) == (RELEASED_MAIN['reprob'], RELEASED_MAIN['mixup'],
                             RELEASED_MAIN['cutmix'], RELEASED_MAIN['mixup_prob'],
                             RELEASED_MAIN['mixup_switch_prob'])
  assert c.label_smoothing == RELEASED_MAIN['smoothing']
  assert c.ema.decay == RELEASED_MAIN['model_ema_decay']
  assert (c.distill.alpha, c.distill.temperature) == (RELEASED_MAIN['distillation_alpha'],
                                                      RELEASED_MAIN['distillation_tau'])
  # The sampler under the launch: 4 ranks of 256; per rank floor(50,000 // 256 · 256 / 4) =
  # 12,480 examples (len(RASampler)), 48 batches of 256 with drop_last: 48 steps per epoch.
  assert RELEASED_MAIN['repeated_aug']
  sampler = repeated_augmentation(resolve_spec(c), 50_000)
  assert (sampler.num_repeats, sampler.num_replicas,
          sampler.replica_batch) == (RELEASED_MAIN['num_repeats'], gpus, per_gpu)
  assert (sampler.per_replica, sampler.steps_per_epoch) == (12_480, 48)


def test_released_text_rows_restart_at_every_replica():
  """Each released GPU took caption rows 0…b−1 for its b images: with 2 replicas of 8 rows, the
  global batch of 16 gets rows 0…7 twice, and each of 2 processes (one replica each) 0…7."""
  src = ArraySource(np.zeros((300, 8, 8, 3), np.uint8), np.zeros(300, np.int32), ['a'], 'toy',
                    'train')
  features = np.arange(300 * 2, dtype=np.float32).reshape(300, 2)
  sampler = RepeatedAugmentation(num_examples=300, batch_size=16, num_replicas=2)
  kw = dict(seed=0, text_features=features, text_rows='released', sampler=sampler)
  b = pipeline.train_dataset(src, batch_size=16, **kw)[3]
  np.testing.assert_array_equal(b['text'], features[np.r_[0:8, 0:8]])
  for p in (0, 1):
    b = pipeline.train_dataset(src, batch_size=8, process_index=p, process_count=2, **kw)[3]
    np.testing.assert_array_equal(b['text'], features[:8])


def test_released_preset_builds_the_per_block_student():
  c = tikd_cifar100.get_config('large,hard,released')
  name, kwargs = model_spec(c.model, 100)
  model = nnx.eval_shape(lambda: build_model(name, text_dim=512, rngs=nnx.Rngs(0), **kwargs))
  names = {'/'.join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert {f'blocks/{i}/attn/text_proj/kernel' for i in range(5)} <= names
  assert model.text_predictor is None  # the released model has none
  assert count_params(model) == 16_352_264  # the paper's 16.35M, the released model's count


@pytest.mark.parametrize('arg', ['large', 'small,dkd', 'medium,pkcd,notext'])
def test_default_presets_keep_the_deit_reading(arg):
  c = tikd_cifar100.get_config(arg)
  settings = term_settings(c)
  assert c.distill.base == 'deit' and c.tikd.text_rows == 'index'
  assert settings['ce'] == {'target': 'soft'}
  assert settings['dkd']['label'] == settings['pkcd']['label'] == 'true'
  assert 'text_proj_layout' not in c.model  # the shared projection
  assert term_settings(kd_cifar100.get_config('dkd'))['dkd']['label'] == 'true'


def test_preset_argument_errors_name_the_grammar():
  for arg in ('large,notext,released', 'large,kd,dkd', 'huge', 'large,relased'):
    with pytest.raises(ValueError, match=r'small\|medium\|large\[,method\]'):
      tikd_cifar100.get_config(arg)
  with pytest.raises(ValueError, match="distill.base='ours'"):
    c = tiny.get_config('hard')
    c.distill.base = 'ours'
    term_settings(c)


# ------------------------------------------------------------------ (d) text rows
N, FEATURE_DIM = 40, 4


def _source():
  rng = np.random.default_rng(0)
  return ArraySource(rng.integers(0, 256, (N, 8, 8, 3), dtype=np.uint8),
                     rng.integers(0, 10, N).astype(np.int32), [str(i) for i in range(10)], 'toy',
                     'train')


FEATURES = np.arange(N * FEATURE_DIM, dtype=np.float32).reshape(N, FEATURE_DIM)


def _batches(text_rows, batch_size=8, **kw):
  ds = pipeline.train_dataset(_source(), batch_size=batch_size, seed=0, text_features=FEATURES,
                              text_rows=text_rows, **kw)
  return ds[0], ds[1]


def test_text_rows_released_gives_every_batch_rows_0_to_b():
  b0, b1 = _batches('released')
  assert not np.array_equal(b0['index'], b1['index'])  # two different batches…
  for b in (b0, b1):  # … with the same text: rows 0..B−1, whatever the images
    np.testing.assert_array_equal(b['text'], FEATURES[:8])
  # Two processes of per-process batch 4: together rows 0..7 of the global batch.
  for p in (0, 1):
    b = _batches('released', batch_size=4, process_index=p, process_count=2)[0]
    np.testing.assert_array_equal(b['text'], FEATURES[4 * p:4 * p + 4])
  with pytest.raises(ValueError, match='which have only 40 rows'):
    _batches('released', batch_size=48)
  with pytest.raises(ValueError, match='text_rows'):
    _batches('first_rows')


def test_text_rows_index_gives_each_image_its_own_caption():
  b0, b1 = _batches('index')
  for b in (b0, b1):
    np.testing.assert_array_equal(b['text'], FEATURES[b['index']])
  assert not np.array_equal(b0['text'], b1['text'])


@pytest.mark.parametrize('text_rows', ['index', 'released'])
def test_train_stream_takes_text_rows_from_the_config(text_rows):
  c = tiny.get_config('none')
  with c.unlocked():
    c.batch_size = 8
    c.tikd.text_rows = text_rows
  data = types.SimpleNamespace(train=_source(), text_features=FEATURES, host_augment=None,
                               num_workers=0, sampler=None)
  stream = loop.train_stream(types.SimpleNamespace(spec=resolve_spec(c), data=data),
                             types.SimpleNamespace(resolution=None), 0)
  b = next(stream.iterator)
  want = FEATURES[:8] if text_rows == 'released' else FEATURES[b['index']]
  np.testing.assert_array_equal(b['text'], want)


def test_a_released_layout_model_exports_and_reads_back_without_a_predictor(tmp_path):
  """The `:released` student (registry heads, per-block text_proj, no text predictor) exports to
  the PyTorch twin strictly with the same fused logits, and its metadata says text_predictor
  False."""
  import torch  # pylint: disable=g-import-not-at-top
  from convert.to_torch import export  # pylint: disable=g-import-not-at-top
  from tikd_jax.tree import flatten  # pylint: disable=g-import-not-at-top
  from tikd_jax.models.variables import model_variables  # pylint: disable=g-import-not-at-top
  c = tikd_cifar100.get_config('small,hard,released')
  name, kwargs = model_spec(c.model, 100)
  kwargs = dict(kwargs, variant='micro', heads=2, text_dim=16)
  model = build_model(name, rngs=nnx.Rngs(0), **kwargs)
  assert model.text_predictor is None and not kwargs['text_predictor']
  _, twin, state_dict = export(flatten(model_variables(model)), {'name': name, 'kwargs': kwargs})
  assert not any(k.startswith('text_predictor') for k in state_dict)
  x = np.random.default_rng(0).random((2, 32, 32, 3), np.float32)
  text = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
  ours = np.asarray(model(x, text=text, fuse_text=True)[0])
  with torch.no_grad():
    out = twin.forward_heads(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(text), True)
  theirs = ((out['cls_logits'] + out['dist_logits']) / 2).numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
