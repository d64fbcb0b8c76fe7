"""Defaults shared by every config: each `get_config` starts from `base()` and states its recipe.

Every knob the trainer reads is here, so a misspelt override (`--config.optimzer.lr=…`) fails
loudly once the config is locked. `parse_arg` reads every config's `:arg` string.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from tikd_jax import losses

# Re-exported for the configs (`common.CIFAR100_MEAN`); defined once in tikd_jax/normalization.py.
from tikd_jax.normalization import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD,
                                    DIGITS_MEAN, DIGITS_STD, IMAGENET_MEAN, IMAGENET_STD,
                                    TINY_IMAGENET_MEAN, TINY_IMAGENET_STD)

# No weight decay on the model's biases, norm scales, position embedding, cls/dist tokens (DeiT)
# and TIKD's fusion gate. A loss term's own parameters follow its registration
# (`register(..., no_decay=...)`, e.g. CTKD's temperature), whatever this list says.
NO_DECAY = ('bias$', 'scale$', 'pos_embed', 'cls_token', 'dist_token', 'text_gate')


def base() -> ConfigDict:
  c = ConfigDict()
  c.name = ''
  c.seed = 0
  c.dtype = 'float32'  # compute dtype: 'bfloat16' for mixed precision
  c.grad_accum_steps = 1
  # val_size > 0 holds out that many train examples as split 'val', drawn with val_seed by
  # val_split_method: 'numpy' (RandomState permutation) or 'torch' (the indices of torch's
  # random_split with a manual_seed generator, as IRKD's notebooks; no torch needed).
  # eval_split 'auto': an image folder's val/ (else test/), a TFDS set's 'test' (else
  # 'validation'), 'test' otherwise (tikd_jax/data/__init__.py). normalization: 'explicit' (the
  # model's and teacher's mean/std below) or 'compute' (measured on the train split, saved as
  # <workdir>/normalization.json; tikd_jax/normalization.py). bad_images: an image-folder file
  # that does not decode, found by decoding every image when the folder opens, stops the run
  # ('error') or is left out with a warning ('skip'); 'unchecked' skips that check (ImageNet-sized
  # folders) and such a file stops the run, with its path, when it is first read
  # (tikd_jax/data/image_folder.py).
  # repeated_aug: DeiT's repeated-augmentation sampler with that many repeats (3 in DeiT; 0 or 1:
  # off), over repeated_aug_replicas replicas (DeiT's GPUs; 0: one per JAX process), each taking
  # batch_size / replicas rows of every global batch (tikd_jax/data/repeated_aug.py).
  c.data = ConfigDict(
      dict(name='digits', dir='', download=False, tfds_name='', image_size=32, val_size=0,
           val_seed=42, val_split_method='numpy', num_workers=0, crop_padding=4, flip=True,
           train_split='train', eval_split='auto', normalization='explicit', bad_images='error',
           repeated_aug=0, repeated_aug_replicas=0))
  # ViTs: drop_path (stochastic depth, DeiT / TIKD); dropout / attn_dropout (Hugging Face ViT's
  # hidden / attention-probability dropout, IRKD's notebooks; tikd_jax/models/vit.py).
  c.model = ConfigDict(
      dict(name='distilled_vit', variant='micro', drop_path=0.1, dropout=0.0, attn_dropout=0.0,
           mean=CIFAR100_MEAN, std=CIFAR100_STD))
  c.teacher = ConfigDict(
      dict(name='resnet32x4', checkpoint='', mean=CIFAR100_MEAN, std=CIFAR100_STD))
  # base: how the base CE (and DKD / PKCD's label) read the targets: 'deit' soft targets, or
  # 'released' their argmax as the released TIKD code does (tikd_jax/losses/registry.py BASES).
  c.distill = ConfigDict(
      dict(method='hard', base='deit', alpha=0.5, base_weight=placeholder(float),
           distill_weight=placeholder(float), temperature=4.0, dkd_alpha=1.0, dkd_beta=8.0,
           dkd_warmup_epochs=20, ctkd_ramp_epochs=10))
  # distill.method's terms, the TIKD / saliency terms the config adds, then extra_loss: your own
  # (term, weight) pairs, e.g. (('my_term', 0.5),) (tikd_jax/train/loss_config.py). `loss`, when
  # set, is the whole list in their place. loss_settings.<term>.<key>: a term's setting, None
  # (unset) leaves it to the distill / saliency blocks or the term's default.
  c.loss = ()
  c.extra_loss = ()
  c.loss_settings = loss_settings()
  # IRKD saliency alignment (README "IRKD"): 'none' | 'attention' | 'gradient'.
  c.saliency = ConfigDict(dict(kind='none', weight=0.8, layers='', resize_to='teacher'))
  # eval_features_dir: the eval split's own caption features (tikd.eval_text='captions').
  # control: 'captions' (each train image its own caption feature), or a control in its place:
  # 'shuffled' (another train image's, a fixed permutation seeded by config.seed) or 'constant'
  # (the mean feature for every image); they measure what the caption itself adds
  # (tikd_jax/train/run.py text_control).
  c.text = ConfigDict(
      dict(features_dir='', eval_features_dir='', class_prompt_encoder='',
           class_prompt_template='a photo of a {name}.', control='captions'))
  # eval_text: the headline test-time text ('predicted' | 'none' | 'captions' | 'released'; all
  # available ones are reported). fusion_text: what the fused pass trains on ('caption' |
  # 'predicted' | 'scheduled'). self_distill_weight: KD from the fused to the first pass.
  # Default: design (c), text-guided self-distillation evaluated without text: of the three
  # caption-free designs it needs no text module at test time; on the demo it is within noise of
  # soft KD alone (+0.44 ± 1.09 over 5 seeds, t = 0.91; docs/caption_free.md), not shown better.
  # alignment_beta 0.1: the released main.py's --alignment-beta default, a loss the released
  # code computes but never adds (adding it is ours; 0 = the released behaviour).
  # text_rows: which caption rows a train batch carries: 'index' (each image its own caption) or
  # 'released' (rows 0..B-1 for every batch, as the released code; data/pipeline.py TEXT_ROWS).
  # fusion_gate: the fused pass enters through a zero-initialised gain (ours; models/vit.py), so
  # that the joint stage starts from the first pass's logits; the released fusion has none. On
  # with design (c): without it (c) on soft KD fell to chance at the stage switch (README "The
  # demo", 5 seeds: 89.22 ± 4.44 ungated, 98.17 ± 0.37 gated).
  c.tikd = ConfigDict(
      dict(fuse_text=False, alignment_beta=0.1, text_predictor_weight=1.0, eval_text='none',
           fusion_text='caption', self_distill_weight=1.0, text_rows='index', fusion_gate=True))
  # Off by default; `deit_augment` turns on DeiT's recipe (DeiT main.py defaults; README "TIKD").
  # randaugment_on: 'host' (grain workers, Pillow: timm's arithmetic bit for bit) or 'device'
  # (in the jitted step, data/device_randaugment.py) when the host has too few cores to feed the
  # device.
  c.augment = ConfigDict(
      dict(randaugment=False, randaugment_num_ops=2, randaugment_magnitude=9.0,
           randaugment_magnitude_std=0.5, randaugment_increasing=True, randaugment_on='host',
           interpolation='bicubic', mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5,
           mix_prob=1.0, correct_lam=True, erasing_prob=0.0))
  c.optimizer = ConfigDict(
      dict(name='adamw', b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, momentum=0.9,
           nesterov=False, wd_exclude=NO_DECAY, grad_clip_norm=0.0))
  # onecycle (tikd_jax/train/optim.py OneCycle): torch's OneCycleLR with `lr` as max_lr, stepped
  # per optimizer step. Its settings below are torch's defaults under torch's names, so that a
  # recipe written against torch (IRKD's P4 teacher) reads across one to one; cycle_momentum
  # cycles AdamW's b1 (SGD's momentum) between max_momentum and base_momentum in place of
  # optimizer.b1 / .momentum, as torch does by default.
  c.schedule = ConfigDict(
      dict(name='cosine', lr=5e-4, warmup_epochs=5.0, warmup_lr=1e-6, min_lr=1e-5,
           decay_epochs=(150, 180, 210), decay_factor=0.1, pct_start=0.3, anneal_strategy='cos',
           div_factor=25.0, final_div_factor=1e4, three_phase=False, cycle_momentum=True,
           base_momentum=0.85, max_momentum=0.95))
  # Model EMA (tikd_jax/train/ema.py; DeiT / TIKD main.py --model-ema): decay per optimizer step,
  # 0 = off. Evaluated beside the raw weights (metrics `ema_top1`, …; best_metric may name them).
  c.ema = ConfigDict(dict(decay=0.0))
  c.batch_size = 128
  c.eval_batch_size = 256
  c.num_epochs = 300.0
  c.label_smoothing = 0.1
  c.log_every_steps = 50
  c.eval_every_epochs = 1.0
  c.checkpoint_every_steps = 0  # 0: every epoch
  c.keep_checkpoints = 3
  c.stop_at_step = 0  # >0: checkpoint and exit there (rerun resumes)
  c.best_metric = 'top1'
  # Tuples, so that they can be overridden: --config.mesh="(('data',4),('fsdp',2))".
  c.mesh = (('data', -1),)
  c.sharding_rules = ()
  # XLA compiler options of the steps (tikd_jax/cpu/compiler.py): auto = the fastest measured.
  c.xla_options = 'auto'
  # The CPU backend (tikd_jax/cpu/), swapped into the models where they are built: the ViT's
  # layers and the CIFAR ResNets' 3×3 convs lowered for XLA:CPU (the attention core and the
  # Winograd convolution are C++ kernels built once with the system compiler). 'auto' turns it on
  # on CPU only, where it measured faster; 'on' | 'off'.
  c.cpu_fast_layers = 'auto'
  # Start from other weights (docs/configs.md): a workdir or converted
  # checkpoint; init_exclude: regexes of flat keys ('params/head/kernel') that start fresh.
  c.init_from = ''
  c.init_exclude = ()
  c.stages = []
  # Curriculum mode: 'crop' a res×res window of the padded image (IRKD) or 'resize' the whole image.
  # val_transform: validate every stage after each epoch on split `val_split` shown at the stage's
  # resolution ('center_crop' as IRKD's P2 notebooks, 'resize' as P4; '' = no), stop a stage after
  # `patience` epochs without a better top-1 and restore its best weights (train/stage_val.py).
  c.curriculum = ConfigDict(
      dict(stages=[], mode='crop', reset_optimizer=False, val_transform='', val_split='val',
           patience=3))
  return c


def loss_settings() -> ConfigDict:
  """Every registered term's settings as unset fields, so that the command line can set one:
  `--config.loss_settings.dkd.beta=2`."""
  fields = ConfigDict()
  for name, term in losses.TERMS.items():
    fields[name] = ConfigDict({
        key: placeholder(object if default is None or default is term.EMPTY else type(default))
        for key, default in term.setting_defaults().items()
    })
  return fields


def deit_augment(c: ConfigDict) -> None:
  """DeiT: RandAugment rand-m9-mstd0.5-inc1, RandomErasing 0.25, Mixup 0.8 / CutMix 1.0 with
  switch 0.5, label smoothing 0.1. Teacher and student see the same augmented batch."""
  c.augment.randaugment = True
  c.augment.mixup_alpha = 0.8
  c.augment.cutmix_alpha = 1.0
  c.augment.erasing_prob = 0.25
  c.label_smoothing = 0.1


def tikd_stages(c: ConfigDict, warmup_epochs: float, joint_epochs: float) -> None:
  """TIKD's staged semantic-guided training: vision-only KD, then joint text-image training.
  Needs caption features: --config.text.features_dir=DIR (python -m tikd_jax.text_teacher)."""
  c.stages = [
      dict(name='vision_warmup', epochs=warmup_epochs, fuse_text=False),
      dict(name='joint', epochs=joint_epochs, fuse_text=True)
  ]
  c.num_epochs = float(warmup_epochs + joint_epochs)


def sgd_recipe(c: ConfigDict, lr: float = 0.05) -> None:
  """RepDistiller / mdistiller CIFAR recipe: SGD 0.05, momentum 0.9, wd 5e-4 on every weight,
  batch 64, 240 epochs, ×0.1 at 150/180/210, no label smoothing."""
  c.optimizer.name = 'sgd'
  c.optimizer.weight_decay = 5e-4
  c.optimizer.wd_exclude = ()  # the loss terms' own exclusions still apply (CTKD's temperature)
  c.schedule.name = 'multistep'
  c.schedule.lr = lr
  c.schedule.decay_epochs = (150, 180, 210)
  c.batch_size = 64
  c.num_epochs = 240.0
  c.label_smoothing = 0.0


# ----------------------------------------------------------------------------- the `:arg` string
@dataclasses.dataclass(frozen=True)
class Option:
  """A `key=value` argument: `parse` turns the value into the config's (ValueError: what is
  allowed), `usage` shows the value's form."""
  usage: str
  parse: Callable[[str], Any]
  default: Any = None


def choice(*values: str, default: str | None = None) -> Option:
  """An option whose value is one of `values`; the default is the first unless given."""

  def parse(value: str) -> str:
    if value not in values:
      raise ValueError(f'one of {"|".join(values)}')
    return value

  return Option('|'.join(values), parse, values[0] if default is None else default)


def number(kind: type = int, default: Any = None, minimum: float | None = None,
           usage: str = 'N') -> Option:
  """An int or float option, at least `minimum` (exclusive for floats, inclusive for ints)."""

  def parse(value: str):
    try:
      x = kind(value)
    except ValueError:
      x = None
    if x is None or (minimum is not None and (x < minimum if kind is int else x <= minimum)):
      what = 'a whole number' if kind is int else 'a number'
      op = '>=' if kind is int else '>'
      raise ValueError(
          f'{usage} {op} {minimum:g}, {what}' if minimum is not None else f'{usage} is {what}')
    return x

  return Option(usage, parse, default)


@dataclasses.dataclass(frozen=True)
class Args:
  """What a config's `:arg` string holds, comma-separated: the positional words in order
  (`positional`: (name, choices or None for any word, default or None if required)), and in any
  order a distillation method (one of the registry's `losses.METHODS`; `method` is its default,
  None: the config takes none), `flags`, and `key=value` `options`. `exclusive` lists groups of
  which at most one may be given ('method' names a given method). One error message for every
  mistake, listing what is allowed."""
  config: str
  positional: Sequence[tuple[str, Sequence[str] | None, str | None]] = ()
  method: str | None = None
  flags: Sequence[str] = ()
  exclusive: Sequence[Sequence[str]] = ()
  options: Mapping[str, Option] = dataclasses.field(default_factory=dict)
  usage: str = ''  # replaces the generated one; '{methods}' stands for the registry's methods

  def describe(self) -> str:
    if self.usage:
      return self.usage.format(methods='|'.join(losses.METHODS))
    parts = []
    for name, choices, default in self.positional:
      word = '|'.join(choices) if choices else name.upper()
      parts.append(word if default is None else f'[{word}]')
    if self.method is not None:
      parts.append('[method]')
    groups = [[f for f in group if f in self.flags] for group in self.exclusive]
    groups = [group for group in groups if len(group) > 1]  # shown as [a|b]
    parts += [f'[{"|".join(group)}]' for group in groups]
    parts += [f'[{f}]' for f in self.flags if not any(f in group for group in groups)]
    parts += [f'[{k}={o.usage}]' for k, o in self.options.items()]
    text = ','.join(parts).replace('],[', '][,').replace(',[', '[,')
    if self.method is not None:
      text += f' (method: {"|".join(losses.METHODS)}; default {self.method})'
    return text

  def error(self, arg: str, detail: str = '') -> ValueError:
    return ValueError(f'{self.config} takes {self.describe()}, got {arg!r}' +
                      (f': {detail}' if detail else ''))

  def parse(self, arg: str) -> dict[str, Any]:
    """{positional name: word, 'method': method, flag: bool, option key: value}."""
    words, given = [], set()
    values = {k: o.default for k, o in self.options.items()}
    values.update({f: False for f in self.flags})
    for part in filter(None, arg.split(',')):
      key, eq, value = part.partition('=')
      if eq:
        if key not in self.options:
          known = [f'{k}={o.usage}' for k, o in self.options.items()]
          known = ' and '.join([', '.join(known[:-1]), known[-1]] if len(known) > 1 else known)
          raise self.error(
              arg, f'unknown option {key!r}' + (f'; the options are {known}' if known else ''))
        try:
          values[key] = self.options[key].parse(value)
        except ValueError as e:
          raise self.error(arg, f'{part}: {e}') from None
        given.add(key)
      elif part in self.flags:
        values[part] = True
        given.add(part)
      elif self.method is not None and part in losses.METHODS:
        if 'method' in given:
          raise self.error(arg, 'one method at most')
        values['method'] = part
        given.add('method')
      else:
        words.append(part)
    if len(words) > len(self.positional):
      raise self.error(arg, f'{words[len(self.positional):]} not understood')
    for i, (name, choices, default) in enumerate(self.positional):
      word = words[i] if i < len(words) else default
      if word is None or (choices and word not in choices):
        raise self.error(arg)
      values[name] = word
    if self.method is not None and 'method' not in given:
      values['method'] = self.method
    for group in self.exclusive:
      if len(given & set(group)) > 1:
        raise self.error(arg, f'{" and ".join(sorted(given & set(group)))} exclude each other')
    return values
