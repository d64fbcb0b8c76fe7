"""The run spec: every setting a run trains with, read from the config once and checked there.

`resolve(config)` turns the ConfigDict into a frozen `RunSpec`; `setup` (train/run.py) calls it
once, and everything downstream (the data, the step, the loop, evaluation, checkpoints) reads the
spec, never the config. Each switch is decided here, in one place: whether the stages are
validated, whether the CPU's fast layers are built, which normalisation the student and the
teacher see, the test-time text modes, the loss terms' settings, the XLA preset.
"""
from __future__ import annotations

import copy
import dataclasses
import re

import ml_collections

from tikd_jax.data import pipeline
from tikd_jax.cpu import compiler
from tikd_jax.cpu import layers as cpu_layers
from tikd_jax.train.ema import check_decay
from tikd_jax.train.loss_config import term_settings
from tikd_jax.train.stage_val import VAL_TRANSFORMS
from tikd_jax.train.step import FUSION_TEXT

# TIKD's text inputs at test time (`tikd.eval_text` picks the headline one); the suffix of each
# one's metrics (`top1_no_text`, …).
EVAL_TEXT = {
    'predicted': 'predicted', 'none': 'no_text', 'captions': 'captions', 'released': 'released'
}


@dataclasses.dataclass(frozen=True)
class StageValidation:
  """Per-stage validation with early stopping (train/stage_val.py)."""
  transform: str  # a stage_val.VAL_TRANSFORMS name: how the hold-out is shown at the stage's size
  patience: int  # epochs without a better validation top-1 before a stage stops
  split: str  # the hold-out split


@dataclasses.dataclass(frozen=True)
class Input:
  """How the train stream reads and augments examples (data/pipeline.py)."""
  crop_padding: int
  crop_mode: str  # pipeline.CROP_MODES: how a curriculum stage's resolution is reached
  flip: bool
  num_workers: int  # grain worker processes, resolved (0: in this process)
  repeated_aug: int  # DeiT's repeated augmentation: repeats (≤ 1: off)
  repeated_aug_replicas: int  # 0: one per JAX process


@dataclasses.dataclass(frozen=True)
class Text:
  """TIKD's text: the caption features and how they are used in training and at test time."""
  features_dir: str  # the train split's caption features ('' : none)
  eval_features_dir: str  # the eval split's own caption features ('' : none)
  class_prompt_encoder: str  # builds class-prompt features first when set
  class_prompt_template: str
  eval_text: str  # the headline EVAL_TEXT mode
  fusion_text: str  # step.FUSION_TEXT: what the fused pass trains on
  fusion_gate: bool
  rows: str  # pipeline.TEXT_ROWS: which feature rows a train batch carries
  control: str  # TEXT_CONTROLS: each image's own caption feature, or a control in its place


@dataclasses.dataclass(frozen=True)
class Cadence:
  """When the loop logs, evaluates, checkpoints and stops."""
  log_every_steps: int
  eval_every_epochs: float
  checkpoint_every_steps: int  # 0: every epoch
  keep_checkpoints: int
  best_metric: str  # the eval metric the best checkpoint is ranked by ('top1', 'ema_top1', …)
  stop_at_step: int  # > 0: checkpoint and stop there


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Everything a run is built from, decided once (`resolve`)."""
  name: str
  seed: int
  dtype: str  # compute dtype of the student and the teacher
  batch_size: int  # global, per optimizer step
  eval_batch_size: int
  grad_accum_steps: int
  label_smoothing: float
  ema_decay: float  # 0: no model EMA
  data: ml_collections.FrozenConfigDict  # the data source block (data/__init__.py build_source)
  input: Input
  augment: ml_collections.FrozenConfigDict  # RandAugment, erasing, Mixup/CutMix settings
  text: Text
  # The models' config blocks (name, constructor arguments), mean / std resolved.
  student: ml_collections.FrozenConfigDict
  teacher: ml_collections.FrozenConfigDict
  teacher_checkpoint: str
  distill_method: str  # for messages
  term_settings: dict  # every loss term's settings (train/loss_config.py)
  optimizer: ml_collections.FrozenConfigDict
  schedule: ml_collections.FrozenConfigDict
  mesh: tuple
  sharding_rules: tuple
  fast_layers: bool  # the CPU's fast layers and kernels (tikd_jax/cpu/, swapped in by models.build_model)
  xla_options: str  # the steps' XLA compiler preset (tikd_jax/cpu/compiler.py)
  stage_val: StageValidation | None  # None: the stages are not validated
  cadence: Cadence
  init_from: str  # '' : a fresh run
  init_exclude: tuple[str, ...]
  normalization: str  # data.normalization: 'explicit' or 'compute' (measured in setup)
  notes: tuple[str, ...] = ()  # what was decided, for the log (normalisation measured)


def resolve(config: ml_collections.ConfigDict) -> RunSpec:
  """The spec of `config`, every setting checked. The normalisation is the config's; with
  data.normalization='compute' setup measures it on the train split (`with_normalization`)."""
  _check_text(config.tikd)
  data, tikd, text = config.data, config.tikd, config.text
  ema_decay = check_decay(config.ema.decay)
  inputs = Input(crop_padding=int(data.crop_padding), crop_mode=config.curriculum.mode,
                 flip=bool(data.flip), num_workers=pipeline.resolve_num_workers(data.num_workers),
                 repeated_aug=int(data.repeated_aug),
                 repeated_aug_replicas=int(data.repeated_aug_replicas))
  text = Text(features_dir=text.features_dir, eval_features_dir=text.eval_features_dir,
              class_prompt_encoder=text.class_prompt_encoder,
              class_prompt_template=text.class_prompt_template, eval_text=tikd.eval_text,
              fusion_text=tikd.fusion_text, fusion_gate=bool(tikd.fusion_gate), rows=tikd.text_rows,
              control=_checked_text_control(text.control))
  cadence = Cadence(log_every_steps=int(config.log_every_steps),
                    eval_every_epochs=float(config.eval_every_epochs),
                    checkpoint_every_steps=int(config.checkpoint_every_steps),
                    keep_checkpoints=int(config.keep_checkpoints),
                    best_metric=_checked_best_metric(config.best_metric, ema_decay),
                    stop_at_step=int(config.stop_at_step))
  mesh = tuple(tuple(axis) for axis in config.mesh)
  rules = tuple(tuple(rule) for rule in config.sharding_rules)
  fast_layers = cpu_layers.enabled(config.cpu_fast_layers)
  preset = _checked_preset(config.xla_options)
  student, teacher = _model_block(config.model), _model_block(config.teacher)
  teacher_checkpoint = config.teacher.get('checkpoint', '')
  return RunSpec(name=config.name, seed=int(config.seed), dtype=config.dtype,
                 batch_size=int(config.batch_size), eval_batch_size=int(config.eval_batch_size),
                 grad_accum_steps=int(config.grad_accum_steps), label_smoothing=float(
                     config.label_smoothing), ema_decay=ema_decay, data=_frozen(data), input=inputs,
                 augment=_frozen(config.augment), text=text, student=student, teacher=teacher,
                 teacher_checkpoint=teacher_checkpoint, distill_method=config.distill.method,
                 term_settings=term_settings(config), optimizer=_frozen(config.optimizer),
                 schedule=_frozen(config.schedule), mesh=mesh, sharding_rules=rules,
                 fast_layers=fast_layers, xla_options=preset, stage_val=_stage_validation(config),
                 cadence=cadence, init_from=config.init_from, init_exclude=tuple(
                     config.init_exclude), normalization=data.get('normalization', 'explicit'))


def with_normalization(spec: RunSpec, measured: dict | None, notes=()) -> RunSpec:
  """`spec` with the student's and the teacher's mean / std measured on the train split
  (normalization.measure, data.normalization='compute'); unchanged for None."""
  if measured is None:
    return spec
  student, teacher = _model_block(spec.student, measured), _model_block(spec.teacher, measured)
  return dataclasses.replace(spec, student=student, teacher=teacher,
                             notes=spec.notes + tuple(notes))


def config_as_run(config: ml_collections.ConfigDict, spec: RunSpec) -> ml_collections.ConfigDict:
  """The config with what setup measured written in (the student's and teacher's mean / std
  under data.normalization='compute'): what config.json records, so that the run reads back."""
  if spec.normalization != 'compute':
    return config
  config = copy.deepcopy(config)
  for block, resolved in ((config.model, spec.student), (config.teacher, spec.teacher)):
    if 'mean' in block:
      block.mean, block.std = tuple(resolved.mean), tuple(resolved.std)
  return config


def _frozen(block) -> ml_collections.FrozenConfigDict:
  return ml_collections.FrozenConfigDict(block)


def _model_block(block, measured: dict | None = None) -> ml_collections.FrozenConfigDict:
  values = block.to_dict() if hasattr(block, 'to_dict') else dict(block)
  if measured is not None and 'mean' in values:
    values['mean'], values['std'] = tuple(measured['mean']), tuple(measured['std'])
  return ml_collections.FrozenConfigDict(values)


def _stage_validation(config) -> StageValidation | None:
  """Whether the stages are validated (`curriculum.val_transform` set), and how."""
  curriculum = config.curriculum
  transform = curriculum.val_transform
  if transform and transform not in VAL_TRANSFORMS:
    raise ValueError(f'config.curriculum.val_transform={transform!r}: use one of '
                     f'{sorted(VAL_TRANSFORMS)} (the stage resolution as IRKD P2 / P4 validate), '
                     f"or '' for no per-stage validation")
  if not transform:
    return None
  if int(curriculum.patience) < 1:
    raise ValueError(f'config.curriculum.patience={curriculum.patience}: give at least 1 '
                     '(epochs without a better validation top-1 before a stage stops)')
  return StageValidation(transform=transform, patience=int(curriculum.patience),
                         split=curriculum.val_split)


def _check_text(tikd) -> None:
  if tikd.eval_text not in EVAL_TEXT:
    raise ValueError(f'tikd.eval_text={tikd.eval_text!r}: use one of {sorted(EVAL_TEXT)}')
  if tikd.fusion_text not in FUSION_TEXT:
    raise ValueError(f'tikd.fusion_text={tikd.fusion_text!r}: use one of {FUSION_TEXT}')


# What a train image's caption row holds: its own caption feature, another training image's (a
# fixed permutation of the rows), or the mean caption feature for every image. The controls keep
# the text path and its cost and remove what the caption says about this image.
TEXT_CONTROLS = ('captions', 'shuffled', 'constant')


def _checked_text_control(control: str) -> str:
  if control not in TEXT_CONTROLS:
    raise ValueError(f'config.text.control={control!r}: use one of {TEXT_CONTROLS}')
  return control


def _checked_preset(preset: str) -> str:
  compiler.compiler_options(preset)  # an unknown preset fails before any work
  return preset


def _checked_best_metric(best_metric: str, ema_decay: float) -> str:
  """`best_metric='ema_…'` needs a model EMA (the number of classes is checked in setup)."""
  if (best_metric or '').startswith('ema_') and not float(ema_decay):
    raise ValueError(f'best_metric={best_metric!r} ranks checkpoints by the model EMA, but '
                     'config.ema.decay is 0 (no EMA): set --config.ema.decay (e.g. 0.99996) or '
                     'rank by the raw weights (--config.best_metric=top1)')
  return best_metric


def check_best_metric_classes(best_metric: str, num_classes: int) -> None:
  """`best_metric='[ema_]top<k>'` needs k ≤ the number of classes (evaluation reports no top-k
  beyond)."""
  match = re.fullmatch(r'(?:ema_)?top(\d+)', best_metric or '')
  if match and int(match.group(1)) > num_classes:
    raise ValueError(f'best_metric={best_metric!r}, but the data has {num_classes} classes and '
                     'evaluation reports top-k only for k ≤ the number of classes; set '
                     f"--config.best_metric=top1 (the default)")
