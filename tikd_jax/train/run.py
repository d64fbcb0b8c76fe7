"""What a run is built from, before its first step: `setup(config, workdir) → Run`, then
`create_train_state(run)`, and the phases' jitted train steps (`train_step_for`).

  spec (train/spec.py) → mesh → data → phases → student → loss terms → teacher → optimizer →
  shardings

`setup` reads the config once, into the run's spec; nothing after it reads the config. Benchmarks
and tests build their runs here too: `setup(..., sources=, teacher=)` takes in-memory data and an
already built teacher in place of the configured ones.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from tikd_jax import normalization
from tikd_jax import sharding as sharding_lib
from tikd_jax.cpu import compiler
from tikd_jax.data import build_source, pipeline
from tikd_jax.data.errors import DataError, DataNotFoundError
from tikd_jax.data.repeated_aug import RepeatedAugmentation
from tikd_jax.losses.registry import Loss
from tikd_jax.models import VIT_MODELS, build_model, count_params
from tikd_jax.models.variables import load_model, model_variables
from tikd_jax.train import checkpoint as ckpt_lib
from tikd_jax.train import optim, stage_val
from tikd_jax.train import spec as spec_lib
from tikd_jax.train.plan import Phase, build_phases
from tikd_jax.train.spec import RunSpec
from tikd_jax.train.state import TERM_PARAMS, TrainState, init_train_state
from tikd_jax.train.step import StepOptions, make_train_step, term_shapes


@dataclasses.dataclass(frozen=True)
class Data:
  """The splits and what the input pipeline applies to them."""
  train: Any  # a source: len(), [i] → {'image', 'label'}, num_classes
  eval: Any
  val: Any  # the hold-out the stages are validated on (spec.stage_val), or None
  num_classes: int
  steps_per_epoch: int
  text_features: np.ndarray | None  # caption features, one row per train example (TIKD)
  eval_text_features: np.ndarray | None  # the eval split's own caption features, if encoded
  eval_released_text: np.ndarray | None  # the released code's rows for each eval example
  sampler: RepeatedAugmentation | None  # DeiT's repeated augmentation: the order of examples
  host_augment: Callable | None  # per example, in the grain workers (RandAugment)
  batch_augment: Callable | None  # in the jitted step: [RandAugment,] erasing, Mixup/CutMix
  num_workers: int
  notes: tuple[str, ...] = ()  # how the data was read, for the log (eval split, skipped files)


@dataclasses.dataclass(frozen=True)
class Model:
  """A model by name and constructor arguments (what checkpoint metadata records), and its
  static graph. `fast_layers` is a property of this machine, so it is kept out of `kwargs`."""
  name: str
  kwargs: dict
  fast_layers: bool
  graphdef: Any
  num_params: int

  def build(self, seed: int) -> nnx.Module:
    return build_model(self.name, rngs=nnx.Rngs(seed), fast_layers=self.fast_layers, **self.kwargs)


@dataclasses.dataclass(frozen=True)
class Teacher:
  graphdef: Any
  variables: dict  # {'params', 'batch_stats'}, placed on the mesh


@dataclasses.dataclass(frozen=True)
class Run:
  spec: RunSpec  # every setting, decided once
  config: ml_collections.ConfigDict  # the config as run, for config.json only (spec.config_as_run)
  workdir: str
  mesh: jax.sharding.Mesh
  data_sharding: jax.sharding.Sharding  # a batch's rows over every mesh axis
  data: Data
  phases: list[Phase]
  student: Model
  teacher: Teacher | None
  all_terms: Loss  # the union of every phase's terms: the state holds their parameters
  losses: dict  # phase.terms → the phase's Loss (Σ weight · term)
  term_shapes: dict  # what the terms' init(rng, shapes) reads
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  state_shardings: Any = None

  @property
  def total_steps(self) -> int:
    return self.phases[-1].end_step

  @property
  def is_chief(self) -> bool:
    return jax.process_index() == 0


def setup(config: ml_collections.ConfigDict, workdir: str, *, sources: tuple | None = None,
          teacher: Teacher | None = None) -> Run:
  """Everything `config` trains with, built once. `sources` = (train, eval) replaces the
  configured data (with the stages' hold-out as a third when the curriculum validates); `teacher`
  replaces loading `config.teacher.checkpoint`."""
  spec = spec_lib.resolve(config)
  mesh = sharding_lib.make_mesh(spec.mesh)
  if spec.batch_size % mesh.size or spec.eval_batch_size % mesh.size:
    raise ValueError(f'batch_size {spec.batch_size} and eval_batch_size '
                     f'{spec.eval_batch_size} must divide by the {mesh.size} devices')
  if sources is None:
    sources = configured_sources(spec)
  # data.normalization='compute': the model and teacher mean/std measured on the train split.
  spec = spec_lib.with_normalization(
      spec, *normalization.measure(spec.normalization, workdir, sources[0]))
  data = load_data(spec, sources)
  data = dataclasses.replace(data, notes=data.notes + spec.notes)
  spec_lib.check_best_metric_classes(spec.cadence.best_metric, data.num_classes)
  phases = build_phases(config, data.steps_per_epoch)
  _check_text_for(phases, data, spec)
  student = student_model(spec, data)
  all_terms = Loss(tuple(dict.fromkeys(t for p in phases for t in p.terms)), spec.term_settings)
  if all_terms.needs_teacher and teacher is None:
    teacher = load_teacher(spec, data.num_classes, mesh)
  abstract_variables = _abstract_variables(student)
  shapes = _term_shapes(spec, data, student, abstract_variables, teacher)
  schedule = optim.make_schedule(spec.schedule, data.steps_per_epoch, phases[-1].end_step)
  abstract_params = {
      'student': abstract_variables['params'],
      TERM_PARAMS: jax.eval_shape(lambda: all_terms.init(jax.random.key(0), shapes))[0]
  }
  run = Run(spec=spec, config=spec_lib.config_as_run(config, spec), workdir=workdir, mesh=mesh,
            data_sharding=sharding_lib.batch_sharding(mesh), data=data, phases=phases,
            student=student, teacher=teacher, all_terms=all_terms,
            losses={p.terms: Loss(p.terms, spec.term_settings) for p in phases}, term_shapes=shapes,
            schedule=schedule, tx=optim.make_optimizer(spec.optimizer, schedule, abstract_params))
  abstract_state = jax.eval_shape(_fresh_state_fn(run))
  return dataclasses.replace(
      run, state_shardings=sharding_lib.param_shardings(abstract_state, mesh, spec.sharding_rules))


def create_train_state(run: Run) -> TrainState:
  """A fresh state (seeded by `spec.seed`), built directly on its shardings."""
  return jax.jit(_fresh_state_fn(run), out_shardings=run.state_shardings)()


def _fresh_state_fn(run: Run) -> Callable[[], TrainState]:
  seed = run.spec.seed

  def init() -> TrainState:
    variables = model_variables(run.student.build(seed))
    state = init_train_state(variables, run.all_terms, run.tx,
                             rng=jax.random.fold_in(jax.random.key(seed), 1),
                             shapes=run.term_shapes, ema=run.spec.ema_decay > 0)
    if run.spec.stage_val:
      state = state.replace(stage_val=stage_val.fresh(variables))
    return state

  return init


# ------------------------------------------------------------------------------------ steps
def train_step_for(run: Run, phase: Phase):
  """The phase's jitted train step (state, batch, teacher_vars) → (state, metrics); the state
  is donated. Each call builds a new one: the loop's `Steps` keeps one per distinct
  `phase.switches`."""
  spec = run.spec
  opts = StepOptions(num_classes=run.data.num_classes, steps_per_epoch=run.data.steps_per_epoch,
                     seed=spec.seed, label_smoothing=spec.label_smoothing,
                     fuse_text=phase.fuse_text, frozen=phase.frozen,
                     batch_augment=run.data.batch_augment, grad_accum_steps=spec.grad_accum_steps,
                     fusion_text=spec.text.fusion_text,
                     phase_steps=(phase.start_step, phase.end_step), ema_decay=spec.ema_decay)
  frozen_mask = (optim.frozen_mask(run.state_shardings.params, phase.frozen)
                 if phase.frozen else None)
  fn = make_train_step(graphdef=run.student.graphdef,
                       teacher_graphdef=run.teacher.graphdef if run.teacher else None,
                       loss=run.losses[phase.terms], tx=run.tx, frozen_mask=frozen_mask, opts=opts)
  options = compiler.step_options(spec.xla_options, fn, jax.eval_shape(_fresh_state_fn(run)),
                                  abstract_batch(run, phase),
                                  run.teacher.variables if run.teacher else None)
  return jax.jit(fn, compiler_options=options, out_shardings=(run.state_shardings, None),
                 donate_argnums=(0,))


def abstract_batch(run: Run, phase: Phase) -> dict:
  """One global train batch of `phase` as ShapeDtypeStructs: what loop.train_stream's pipeline
  yields, the train split's element with its image at the phase's resolution, and 'text' (float32
  caption features) when the run has them."""
  element = {k: np.asarray(v) for k, v in run.data.train[0].items()}
  if phase.resolution:
    element['image'] = np.zeros((phase.resolution, phase.resolution) + element['image'].shape[2:],
                                element['image'].dtype)
  if run.data.text_features is not None:
    element['text'] = np.asarray(run.data.text_features[0], np.float32)
  return {
      k: jax.ShapeDtypeStruct((run.spec.batch_size,) + v.shape, v.dtype) for k, v in element.items()
  }


# ------------------------------------------------------------------------------------ data
def configured_sources(spec: RunSpec) -> tuple:
  """(train, eval) from `spec.data`, and the stages' hold-out when the curriculum validates."""
  sources = (build_source(spec.data,
                          spec.data.train_split), build_source(spec.data, spec.data.eval_split))
  if spec.stage_val:
    sources += (build_source(spec.data, spec.stage_val.split),)
  return sources


def load_data(spec: RunSpec, sources: tuple | None = None) -> Data:
  """The train and eval splits (`spec.data`, or `sources` = (train, eval)) and their
  augmentations."""
  validated = spec.stage_val is not None
  if sources is None:
    sources = configured_sources(spec)
  if validated and len(sources) != 3:
    raise ValueError('curriculum.val_transform validates the stages on a hold-out: pass sources '
                     '= (train, eval, val)')
  train, eval_ = sources[:2]
  notes = tuple(n for source in sources for n in getattr(source, 'notes', ()))
  sampler = repeated_augmentation(spec, len(train))
  steps_per_epoch = sampler.steps_per_epoch if sampler else len(train) // spec.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'batch_size {spec.batch_size} is larger than the train split '
                     f'({len(train)} examples)')
  host_augment, batch_augment = build_augmentations(spec)
  text_features = load_train_text_features(spec, train)
  return Data(
      train=train, eval=eval_, val=sources[2] if validated else None, num_classes=train.num_classes,
      steps_per_epoch=steps_per_epoch, text_features=text_features,
      eval_text_features=_load_eval_text_features(spec, eval_),
      eval_released_text=None if text_features is None else pipeline.released_rows(
          text_features, len(eval_), spec.eval_batch_size), sampler=sampler,
      host_augment=host_augment, batch_augment=batch_augment, num_workers=spec.input.num_workers,
      notes=notes)


def repeated_augmentation(spec: RunSpec, num_examples: int) -> RepeatedAugmentation | None:
  """DeiT's sampler when `data.repeated_aug` > 1, over `repeated_aug_replicas` replicas (0: one
  per JAX process, as DeiT's one per GPU)."""
  repeats, replicas = spec.input.repeated_aug, spec.input.repeated_aug_replicas
  if repeats <= 1:
    return None
  replicas = replicas or jax.process_count()
  if replicas % jax.process_count():
    raise ValueError(f'config.data.repeated_aug_replicas={replicas} does not split over '
                     f'{jax.process_count()} processes: use a multiple of {jax.process_count()}')
  return RepeatedAugmentation(num_examples=num_examples, batch_size=spec.batch_size,
                              num_repeats=repeats, num_replicas=replicas, seed=spec.seed)


def build_augmentations(spec: RunSpec):
  """(per-example host augmentation or None, on-device batch augmentation or None).

  Host: RandAugment on uint8 images in the grain workers. Device (inside the jitted step, so
  teacher and student see the same result): RandAugment there instead with
  `augment.randaugment_on='device'`, then random erasing, then Mixup/CutMix with smoothed
  targets. Built once: the compiled step is specialised on the batch-augmentation function.
  """
  from tikd_jax.data.host_augment import make_host_augment  # pylint: disable=g-import-not-at-top
  from tikd_jax.data.batch_augment import RANDAUGMENT_ON, make_batch_augment  # pylint: disable=g-import-not-at-top
  aug = spec.augment
  cfg = ml_collections.ConfigDict(
      dict(aug.to_dict(), label_smoothing=spec.label_smoothing, mean=tuple(spec.student.mean),
           std=tuple(spec.student.std)))
  if aug.randaugment_on not in RANDAUGMENT_ON:
    raise ValueError(f'config.augment.randaugment_on={aug.randaugment_on!r}: use one of '
                     f'{RANDAUGMENT_ON}')
  on_host = aug.randaugment and aug.randaugment_on == 'host'
  host = make_host_augment(cfg) if on_host else None
  on_device = (aug.mixup_alpha > 0 or aug.cutmix_alpha > 0 or aug.erasing_prob > 0
               or (aug.randaugment and not on_host))
  return host, (make_batch_augment(cfg) if on_device else None)


def load_train_text_features(spec: RunSpec, train_source) -> np.ndarray | None:
  """The caption features of the train split, one row per example index (README "The text
  teacher").

  With `text.class_prompt_encoder` set (a local encoder folder, or 'minilm' for the offline
  MiniLM), class-prompt features are built first when the folder has none (the fallback without
  a VLM). Eval never reads these: it uses the text predictor or no text.
  """
  text = spec.text
  if not text.features_dir:
    return None
  from tikd_jax.data.text_features import load_text_features  # pylint: disable=g-import-not-at-top
  if text.class_prompt_encoder:
    if jax.process_index() == 0:
      from tikd_jax import text_teacher  # pylint: disable=g-import-not-at-top
      encoder = text.class_prompt_encoder
      if encoder == 'minilm':
        encoder = text_teacher.minilm_folder()
      text_teacher.build_class_prompt_features(spec.data, spec.data.train_split, text.features_dir,
                                               encoder, template=text.class_prompt_template,
                                               source=train_source)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('class prompt features written')
  return text_control(load_text_features(text.features_dir, train_source), text.control, spec.seed)


def text_control(features: np.ndarray, control: str, seed: int) -> np.ndarray:
  """The caption rows training reads under `text.control` (spec.TEXT_CONTROLS): 'captions' as
  they are; 'shuffled': row i holds row perm[i] of a permutation drawn with `seed` (each image
  fuses another training image's caption); 'constant': every row the mean row."""
  if control == 'captions':
    return features
  if control == 'shuffled':
    return features[np.random.default_rng(seed).permutation(len(features))]
  if control == 'constant':
    return np.broadcast_to(
        features.mean(axis=0, dtype=np.float64).astype(features.dtype), features.shape).copy()
  raise ValueError(f'text control {control!r}: use one of {spec_lib.TEXT_CONTROLS}')


def _load_eval_text_features(spec: RunSpec, eval_source) -> np.ndarray | None:
  """The eval split's own caption features (`text.eval_features_dir`: `python -m
  tikd_jax.text_teacher caption/encode` on that split), for eval_text='captions'."""
  if not spec.text.eval_features_dir:
    return None
  from tikd_jax.data.text_features import load_text_features  # pylint: disable=g-import-not-at-top
  return load_text_features(spec.text.eval_features_dir, eval_source)


def _check_text_for(phases: list[Phase], data: Data, spec: RunSpec) -> None:
  fusing = [p.name for p in phases if p.fuse_text]
  if fusing and data.text_features is None:
    raise ValueError(f'stage(s) {fusing} fuse text but config.text.features_dir is empty: '
                     f'generate caption features (python -m tikd_jax.text_teacher, see README) '
                     f'and pass --config.text.features_dir=DIR, or use a config without text '
                     f'stages (e.g. configs/tikd_cifar100.py:large,hard,notext)')
  if spec.text.eval_text == 'captions' and data.eval_text_features is None:
    raise ValueError("tikd.eval_text='captions' reads the eval split's own caption features: "
                     'caption and encode that split (python -m tikd_jax.text_teacher, README "The '
                     'text teacher") and pass --config.text.eval_features_dir=DIR')


# ------------------------------------------------------------------------------------ models
def model_spec(model_config, num_classes: int) -> tuple[str, dict]:
  """(name, kwargs) for build_model from a config block; num_classes filled from the data."""
  block = model_config.to_dict()
  kwargs = {k: v for k, v in block.items() if k not in ('name', 'checkpoint')}
  kwargs.setdefault('num_classes', num_classes)
  for k, v in list(kwargs.items()):
    if isinstance(v, tuple):
      kwargs[k] = list(v)
  return block['name'], kwargs


def student_model(spec: RunSpec, data: Data) -> Model:
  name, kwargs = model_spec(spec.student, data.num_classes)
  if spec.dtype != 'float32':
    # Mixed precision: compute in spec.dtype; parameters, optimizer state and losses float32.
    kwargs['dtype'] = spec.dtype
  if data.text_features is not None and name in VIT_MODELS:
    kwargs.setdefault('text_dim', int(data.text_features.shape[1]))
    kwargs.setdefault('fusion_gate', spec.text.fusion_gate)
  fast_layers = spec.fast_layers
  abstract = nnx.eval_shape(
      lambda: build_model(name, rngs=nnx.Rngs(spec.seed), fast_layers=fast_layers, **kwargs))
  graphdef, _, _ = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  return Model(name=name, kwargs=kwargs, fast_layers=fast_layers, graphdef=graphdef,
               num_params=count_params(abstract))


def _abstract_variables(model: Model) -> dict:
  return jax.eval_shape(lambda: model_variables(model.build(0)))


def load_teacher(spec: RunSpec, num_classes: int, mesh) -> Teacher:
  """Builds the teacher, loads its checkpoint strictly and places it on the mesh."""
  name, kwargs = model_spec(spec.teacher, num_classes)
  if spec.dtype != 'float32':
    kwargs['dtype'] = spec.dtype
  kwargs['fast_layers'] = spec.fast_layers
  path = spec.teacher_checkpoint
  if not path:
    raise DataError(f'the loss terms of distill.method={spec.distill_method!r} / config.loss '
                    f'need a teacher: set '
                    f'--config.teacher.checkpoint to a workdir or converted checkpoint')
  try:
    _, flat = ckpt_lib.load_weights(path)
  except FileNotFoundError as e:  # a path to fix, not a fault: main.py prints it without a trace
    raise DataNotFoundError(f'config.teacher.checkpoint: {e}. Train the teacher first (its '
                            f'--workdir is the path) or convert one (python -m '
                            f'convert.from_torch)') from None
  graphdef, variables = load_model(name, kwargs, flat,
                                   what=f'teacher checkpoint {path} (for model {name})')
  return Teacher(
      graphdef,
      sharding_lib.place(variables,
                         sharding_lib.param_shardings(variables, mesh, spec.sharding_rules)))


def _term_shapes(spec: RunSpec, data: Data, student: Model, abstract_variables: dict,
                 teacher: Teacher | None) -> dict:
  """The shapes the loss terms' init reads, for one micro-batch."""
  return term_shapes(graphdef=student.graphdef, variables=abstract_variables,
                     teacher_graphdef=teacher.graphdef if teacher else None,
                     teacher_vars=teacher.variables if teacher else None,
                     image_shape=data.train[0]['image'].shape,
                     rows=spec.batch_size // spec.grad_accum_steps, num_classes=data.num_classes)
