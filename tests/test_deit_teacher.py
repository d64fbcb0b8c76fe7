"""configs/deit_teacher_cifar10.py:p2, IRKD's patch-2 teacher: the recipe numbers against the
notebook, its cls-only classifier against Hugging Face's, and the command chain of its docstring
(convert a Hugging Face DeiT folder, fine-tune it through main.py) on digits."""
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs import deit_teacher_cifar10
from tikd_jax.train.spec import resolve
from convert import from_torch
from convert.mapping import hf_deit_to_timm
from tests.test_train import _main
from tikd_jax.models import build_model
from tikd_jax.models.variables import model_variables
from tikd_jax.train import checkpoint as ckpt_lib
from tikd_jax.train import optim
from tikd_jax.train.run import model_spec
from tikd_jax.tree import flatten

# IRKD's P_2_OUR_STUDENT.ipynb, cell 3 (the teacher fine-tuning), as written there.
NB_EPOCHS = 50  # epochs = 50
NB_LR, NB_WEIGHT_DECAY = 3e-4, 2e-4  # optim.AdamW(teacher.parameters(), lr=3e-4, weight_decay=2e-4)
NB_BATCH, NB_ACCUM = 128, 2  # batch_size = 128; accum_steps = 2
NB_HIDDEN_DROPOUT = NB_ATTN_DROPOUT = 0.1  # hidden_dropout_prob, attention_probs_dropout_prob
NB_PATIENCE = 8  # best_val, no_imp, patience = 0.0, 0, 8
NB_WARMUP_FRACTION = 0.2  # warmup_steps = int(0.2 * total_steps)
NB_SMOOTHING = 0.05  # nn.CrossEntropyLoss(label_smoothing=0.05)
NB_MIXUP, NB_CUTMIX, NB_SWITCH = 0.2, 1.0, 0.5  # mixup_data(α 0.2) if random() < 0.5 else cutmix(1.0)
NB_MEAN, NB_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # Normalize(mean, std)
NB_VAL_SIZE, NB_SPLIT_SEED = 5000, 42  # int(0.1 * 50000); torch.Generator().manual_seed(42)
NB_IMAGE, NB_PATCH, NB_CLASSES = 32, 2, 10  # ViTConfig.from_pretrained(image_size=32, patch_size=2,
# num_labels=10) for DeiTForImageClassification.from_pretrained(..., ignore_mismatched_sizes=True)


def _hf_cosine_lrs(base_lr: float, warmup: int, total: int, steps: int) -> np.ndarray:
  """The lr of optimizer steps 0 … steps-1 under transformers' get_cosine_schedule_with_warmup
  (the notebook calls opt.step() then sched.step(), so step k runs at the k-th value)."""
  from transformers import get_cosine_schedule_with_warmup
  opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
  sched = get_cosine_schedule_with_warmup(opt, warmup, total)
  lrs = []
  for _ in range(steps):
    lrs.append(opt.param_groups[0]['lr'])
    opt.step()
    sched.step()
  return np.asarray(lrs)


def test_p2_config_is_the_notebooks_teacher_recipe():
  c = deit_teacher_cifar10.get_config('p2')
  assert c.num_epochs == NB_EPOCHS
  assert (c.optimizer.name, c.optimizer.weight_decay, tuple(c.optimizer.wd_exclude), c.optimizer.b1,
          c.optimizer.b2, c.optimizer.eps) == ('adamw', NB_WEIGHT_DECAY, (), 0.9, 0.999, 1e-8)
  # 128 per micro-batch, 2 accumulated: one optimizer step per 256 images.
  assert (c.batch_size, c.grad_accum_steps) == (NB_BATCH * NB_ACCUM, NB_ACCUM)
  assert c.label_smoothing == NB_SMOOTHING
  assert (c.augment.mixup_alpha, c.augment.cutmix_alpha, c.augment.switch_prob, c.augment.mix_prob,
          c.augment.correct_lam) == (NB_MIXUP, NB_CUTMIX, NB_SWITCH, 1.0, True)
  # The cell's train_tf is replaced by val_tf before training: no crop, flip, AutoAugment, erasing.
  assert (c.data.crop_padding, c.data.flip, c.augment.randaugment,
          c.augment.erasing_prob) == (0, False, False, 0.0)
  assert (c.data.name, c.data.val_size, c.data.val_seed,
          c.data.val_split_method) == ('cifar10', NB_VAL_SIZE, NB_SPLIT_SEED, 'torch')
  assert tuple(c.model.mean) == NB_MEAN and tuple(c.model.std) == NB_STD
  assert (c.model.name, c.model.variant, c.model.img_size, c.model.patch_size, c.model.eval_head,
          c.model.drop_path) == ('distilled_vit', 'deit_small', NB_IMAGE, NB_PATCH, 'cls', 0.0)
  assert c.distill.method == 'none' and c.init_from
  # ViTConfig(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).
  assert (c.model.dropout, c.model.attn_dropout) == (NB_HIDDEN_DROPOUT, NB_ATTN_DROPOUT)
  assert c.model.layer_norm_eps == 1e-12  # the Hub config's (transformers' default)
  # best_val, no_imp, patience = 0.0, 0, 8; validated on val_ds (val_tf: the image at 32 px, as
  # it is) after every epoch; best_teacher.pth reloaded before the test. One stage (no
  # curriculum), so the stage's validation is the run's.
  assert (c.curriculum.val_transform, c.curriculum.val_split, c.curriculum.patience,
          list(c.curriculum.stages), list(c.stages)) == ('center_crop', 'val', NB_PATIENCE, [], [])
  assert resolve(c).stage_val is not None  # the run spec validates its stage
  # ignore_mismatched_sizes: exactly the patch kernel (not its bias), the position embedding and
  # the two 1000-class heads start fresh.
  name, kwargs = model_spec(c.model, 10)
  keys = flatten(
      model_variables(nnx.eval_shape(lambda: build_model(name, rngs=nnx.Rngs(0), **kwargs))))
  fresh = {k for k in keys if any(re.search(p, k) for p in c.init_exclude)}
  assert fresh == {
      'params/patch_embed/kernel', 'params/pos_embed', 'params/head/kernel', 'params/head/bias',
      'params/head_dist/kernel', 'params/head_dist/bias'
  }
  # The schedule is get_cosine_schedule_with_warmup's at every step, over the notebook's own
  # step count (352 micro-batches per epoch → 176 optimizer steps).
  steps_per_epoch = math.ceil(45000 / NB_BATCH) // NB_ACCUM
  total = steps_per_epoch * NB_EPOCHS
  assert (steps_per_epoch, total) == (176, 8800)
  schedule = optim.make_schedule(c.schedule, steps_per_epoch, total)
  want = _hf_cosine_lrs(NB_LR, int(NB_WARMUP_FRACTION * total), total, total)
  with jax.enable_x64(True):  # float64, as torch's Python floats
    np.testing.assert_allclose(np.asarray(schedule(jnp.arange(total))), want, rtol=1e-9, atol=0)
  assert want[0] == 0.0 and want[1760] == NB_LR  # the warm-up ends at step 1,760
  with pytest.raises(ValueError, match='takes p2'):
    deit_teacher_cifar10.get_config('p4')
  with pytest.raises(AttributeError):  # locked: a misspelt override fails loudly
    c.init_exclud = ()


def test_cls_only_classifier_gives_hugging_faces_deit_for_image_classification_logits():
  """The notebook's teacher is DeiTForImageClassification: its logits are classifier(cls token
  after the final norm); the dist token still takes part in attention. `eval_head='cls'` on our
  distilled ViT gives exactly those; the DeiT default (mean of both heads) does not."""
  from transformers import DeiTConfig, DeiTForImageClassification
  torch.manual_seed(0)
  hf_config = DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, image_size=16, patch_size=2, num_labels=10,
                         hidden_act='gelu', layer_norm_eps=1e-6)
  hf = DeiTForImageClassification(hf_config).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(0.05 * torch.randn_like(p))
  sd = {k.replace('classifier.', 'cls_classifier.'): v for k, v in hf.state_dict().items()}
  sd['distillation_classifier.weight'] = 0.1 * torch.randn(10, 32)  # HF's model has none
  sd['distillation_classifier.bias'] = torch.ones(10)
  mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
  images = np.random.RandomState(0).rand(4, 16, 16, 3).astype(np.float32)
  pixels = (torch.from_numpy(images).permute(0, 3, 1, 2) - 0.5) / 0.25
  with torch.no_grad():
    want = hf(pixel_values=pixels).logits.numpy()
  logits = {}
  for eval_head in ('cls', 'mean'):
    meta = {
        'name':
            'distilled_vit', 'kwargs':
                dict(variant='micro', patch_size=2, img_size=16, num_classes=10,
                     eval_head=eval_head, mean=mean, std=std)
    }
    model = from_torch.convert(hf_deit_to_timm(sd), meta, 'HF DeiTForImageClassification')
    logits[eval_head] = np.asarray(model(jnp.asarray(images), train=False)[0])
  np.testing.assert_allclose(logits['cls'], want, atol=2e-5)
  assert np.abs(logits['mean'] - want).max() > 0.1


@pytest.fixture(scope='module')
def converted_deit(tmp_path_factory):
  """A tiny Hugging Face DeiT-distilled folder (16 px, patch 4, 7 classes: none of it fits the
  recipe's 32 px / patch 2 / 10 classes), converted as the config's docstring says."""
  from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher
  torch.manual_seed(1)
  hf_config = DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, image_size=16, patch_size=4, num_labels=7,
                         hidden_act='gelu', layer_norm_eps=1e-6)
  hf = DeiTForImageClassificationWithTeacher(hf_config)
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(0.05 * torch.randn_like(p))
  root = tmp_path_factory.mktemp('deit')
  hf.save_pretrained(root / 'deit-tiny-distilled')
  out = str(root / 'deit_converted')
  from_torch.main(['--checkpoint', str(root / 'deit-tiny-distilled'), '--out', out])
  return out


@pytest.mark.slow
def test_p2_fine_tunes_a_converted_deit_through_main(tmp_path, converted_deit):
  workdir = tmp_path / 'run'
  overrides = {
      'data.name': 'digits', 'data.val_size': 237, 'data.num_workers': 0, 'model.variant': 'micro',
      'batch_size': 64, 'eval_batch_size': 120, 'init_from': converted_deit, 'stop_at_step': 3,
      'checkpoint_every_steps': 1, 'keep_checkpoints': 3, 'log_every_steps': 1,
      'xla_options': 'fast_compile'
  }
  proc = _main(['--config=configs/deit_teacher_cifar10.py:p2', f'--workdir={workdir}'] +
               [f'--config.{k}={v}' for k, v in overrides.items()], timeout=600)
  log = proc.stdout + proc.stderr
  assert proc.returncode == 0, log[-3000:]
  # 1,437 - 237 = 1,200 digits, 18 steps of 64 per epoch, the recipe's 50 epochs.
  assert 'stopped at step 3 of 900' in log

  _, source = ckpt_lib.load_weights(converted_deit)
  n = len(source)
  fresh_keys = [
      'params/head/bias', 'params/head/kernel', 'params/head_dist/bias', 'params/head_dist/kernel',
      'params/patch_embed/kernel', 'params/pos_embed'
  ]
  assert f'{n - 6} of {n} arrays loaded' in log and f'fresh (init_exclude): {fresh_keys}' in log
  assert 'position embedding resampled' not in log  # nothing interpolated: HF re-initialises what does not fit

  # The lr of each step is get_cosine_schedule_with_warmup's (180 of 900 steps warm up).
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  train = [r for r in rows if r['kind'] == 'train']
  assert [r['step'] for r in train] == [1, 2, 3]
  np.testing.assert_allclose([r['lr'] for r in train], _hf_cosine_lrs(3e-4, 180, 900, 3),
                             rtol=1e-5)  # float32 in the run
  assert all(np.isfinite(r['loss']) for r in train)

  # Step 0 runs at lr 0, so checkpoint 1 holds the starting weights: the converted ones where they
  # fit, the model's own fresh initialisation (seed 0) for the excluded keys.
  _, start = ckpt_lib.load_weights(str(workdir / 'checkpoints' / '1'))
  config = deit_teacher_cifar10.get_config('p2')
  with config.unlocked():
    config.model.variant = 'micro'
  name, kwargs = model_spec(config.model, 10)
  own = flatten(model_variables(build_model(name, rngs=nnx.Rngs(config.seed), **kwargs)))
  assert start.keys() == source.keys() == own.keys()
  for key in start:
    np.testing.assert_array_equal(start[key], own[key] if key in fresh_keys else source[key],
                                  err_msg=key)
  assert source['params/patch_embed/bias'].any()  # loaded, as HF loads the bias that fits
  # Then it trains: steps 1 and 2 (lr > 0) move the loaded weights.
  _, third = ckpt_lib.load_weights(str(workdir / 'checkpoints' / '3'))
  moved = [k for k in start if not np.array_equal(third[k], start[k])]
  assert 'params/blocks/0/attn/qkv/kernel' in moved and 'params/head/kernel' in moved
