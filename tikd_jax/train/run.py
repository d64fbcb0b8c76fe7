"""What a run is built from, before its first step: `setup(config, workdir) → Run`, then
`create_train_state(run)`.

  mesh → data → phases → student → loss terms → teacher → optimizer → shardings

Benchmarks and tests build their runs here too: `setup(..., sources=, teacher=)` takes in-memory
data and an already built teacher in place of the configured ones.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from tikd_jax import normalization
from tikd_jax import sharding as sharding_lib
from tikd_jax.cpu import compiler
from tikd_jax.cpu import layers as cpu_layers
from tikd_jax.data import build_source, pipeline
from tikd_jax.data.errors import DataError, DataNotFoundError
from tikd_jax.data.repeated_aug import RepeatedAugmentation
from tikd_jax.losses.registry import Loss
from tikd_jax.models import VIT_MODELS, build_model, count_params
from tikd_jax.models.variables import load_model, model_variables
from tikd_jax.train import checkpoint as ckpt_lib
from tikd_jax.train import optim, stage_val
from tikd_jax.train.ema import check_decay
from tikd_jax.train.loss_config import term_settings
from tikd_jax.train.plan import Phase, build_phases
from tikd_jax.train.state import TrainState, init_train_state
from tikd_jax.train.step import FUSION_TEXT, StepOptions, loss_shapes, make_train_step


@dataclasses.dataclass(frozen=True)
class Data:
  """The splits and what the input pipeline applies to them."""
  train: Any  # a source: len(), [i] → {'image', 'label'}, num_classes
  eval: Any
  val: Any  # the hold-out the stages are validated on (curriculum.val_transform), or None
  num_classes: int
  steps_per_epoch: int
  text_features: np.ndarray | None  # caption features, one row per train example (TIKD)
  eval_text_features: np.ndarray | None  # the eval split's own caption features, if encoded
  eval_released_text: np.ndarray | None  # the released code's rows for each eval example
  sampler: RepeatedAugmentation | None  # DeiT's repeated augmentation: the order of examples
  host_augment: Callable | None  # per example, in the grain workers (RandAugment)
  batch_augment: Callable | None  # per batch, inside the jitted step (erasing, Mixup/CutMix)
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
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  rules: list  # sharding rules (tikd_jax/sharding.py)
  data: Data
  phases: list[Phase]
  student: Model
  teacher: Teacher | None
  loss: Loss  # every phase's terms: the state holds their parameters
  phase_losses: dict  # phase.loss → its Loss
  loss_shapes: dict  # what the terms' init(rng, shapes) reads
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  state_shardings: Any = None
  compiled_steps: dict = dataclasses.field(default_factory=dict)  # phase.switches → step

  @property
  def total_steps(self) -> int:
    return self.phases[-1].end_step

  @property
  def data_sharding(self):
    return sharding_lib.batch_sharding(self.mesh)

  @property
  def is_chief(self) -> bool:
    return jax.process_index() == 0


def setup(config: ml_collections.ConfigDict, workdir: str, *, sources: tuple | None = None,
          teacher: Teacher | None = None) -> Run:
  """Everything `config` trains with, built once. `sources` = (train, eval) replaces the
  configured data (with the stages' hold-out as a third when the curriculum validates); `teacher`
  replaces loading `config.teacher.checkpoint`."""
  mesh = sharding_lib.make_mesh(config.mesh)
  if config.batch_size % mesh.size or config.eval_batch_size % mesh.size:
    raise ValueError(f'batch_size {config.batch_size} and eval_batch_size '
                     f'{config.eval_batch_size} must divide by the {mesh.size} devices')
  rules = [tuple(r) for r in config.sharding_rules]
  if sources is None:
    sources = configured_sources(config)
  # data.normalization='compute': the model and teacher mean/std measured on the train split.
  config, norm_notes = normalization.resolve(config, workdir, sources[0])
  data = load_data(config, sources)
  data = dataclasses.replace(data, notes=data.notes + tuple(norm_notes))
  _check_best_metric(config.best_metric, data.num_classes, check_decay(config.ema.decay))
  phases = build_phases(config, data.steps_per_epoch)
  _check_text_for(phases, data, config.tikd)
  student = student_model(config, data)
  settings = term_settings(config)
  loss = Loss(tuple(dict.fromkeys(t for p in phases for t in p.loss)), settings)
  if loss.needs_teacher and teacher is None:
    teacher = load_teacher(config, data.num_classes, mesh, rules)
  abstract_variables = _abstract_variables(student)
  shapes = _loss_shapes(config, data, student, abstract_variables, teacher)
  schedule = optim.make_schedule(config.schedule, data.steps_per_epoch, phases[-1].end_step)
  abstract_params = {
      'student': abstract_variables['params'],
      'objective': jax.eval_shape(lambda: loss.init(jax.random.key(0), shapes))[0]
  }
  compiler.compiler_options(config.xla_options)  # an unknown preset fails before any work
  run = Run(config=config, workdir=workdir, mesh=mesh, rules=rules, data=data, phases=phases,
            student=student, teacher=teacher, loss=loss,
            phase_losses={p.loss: Loss(p.loss, settings) for p in phases}, loss_shapes=shapes,
            schedule=schedule, tx=optim.make_optimizer(config.optimizer, schedule, abstract_params))
  abstract_state = jax.eval_shape(_fresh_state_fn(run))
  return dataclasses.replace(
      run, state_shardings=sharding_lib.param_shardings(abstract_state, mesh, rules))


def create_train_state(run: Run) -> TrainState:
  """A fresh state (seeded by `config.seed`), built directly on its shardings."""
  return jax.jit(_fresh_state_fn(run), out_shardings=run.state_shardings)()


def _fresh_state_fn(run: Run) -> Callable[[], TrainState]:
  seed = run.config.seed

  def init() -> TrainState:
    variables = model_variables(run.student.build(seed))
    state = init_train_state(variables, run.loss, run.tx,
                             rng=jax.random.fold_in(jax.random.key(seed), 1),
                             shapes=run.loss_shapes, ema=run.config.ema.decay > 0)
    if stage_val.enabled(run.config):
      state = state.replace(stage_val=stage_val.fresh(variables))
    return state

  return init


def train_step_for(run: Run, phase: Phase):
  """The phase's jitted train step (state, batch, teacher_vars) → (state, metrics), compiled
  once per distinct `phase.switches`; the state is donated."""
  if phase.switches not in run.compiled_steps:
    config = run.config
    opts = StepOptions(
        num_classes=run.data.num_classes, steps_per_epoch=run.data.steps_per_epoch,
        seed=config.seed, label_smoothing=config.label_smoothing, fuse_text=phase.fuse_text,
        frozen=phase.frozen, batch_augment=run.data.batch_augment,
        grad_accum_steps=config.grad_accum_steps, fusion_text=config.tikd.fusion_text,
        phase_steps=(phase.start_step, phase.end_step), ema_decay=float(config.ema.decay))
    frozen_mask = (optim.frozen_mask(run.state_shardings.params, phase.frozen)
                   if phase.frozen else None)
    fn = make_train_step(graphdef=run.student.graphdef,
                         teacher_graphdef=run.teacher.graphdef if run.teacher else None,
                         loss=run.phase_losses[phase.loss], tx=run.tx, frozen_mask=frozen_mask,
                         opts=opts)
    options = compiler.step_options(config.xla_options, fn, jax.eval_shape(_fresh_state_fn(run)),
                                    abstract_batch(run, phase),
                                    run.teacher.variables if run.teacher else None)
    run.compiled_steps[phase.switches] = jax.jit(fn, compiler_options=options,
                                                 out_shardings=(run.state_shardings, None),
                                                 donate_argnums=(0,))
  return run.compiled_steps[phase.switches]


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
      k: jax.ShapeDtypeStruct((run.config.batch_size,) + v.shape, v.dtype)
      for k, v in element.items()
  }


# ------------------------------------------------------------------------------------ data
def configured_sources(config) -> tuple:
  """(train, eval) from `config.data`, and the stages' hold-out when the curriculum validates."""
  sources = (build_source(config.data,
                          config.data.train_split), build_source(config.data,
                                                                 config.data.eval_split))
  if stage_val.enabled(config):
    sources += (build_source(config.data, config.curriculum.val_split),)
  return sources


def load_data(config, sources: tuple | None = None) -> Data:
  """The train and eval splits (`config.data`, or `sources` = (train, eval)) and their
  augmentations."""
  validated = stage_val.enabled(config)
  if sources is None:
    sources = configured_sources(config)
  if validated and len(sources) != 3:
    raise ValueError('curriculum.val_transform validates the stages on a hold-out: pass sources '
                     '= (train, eval, val)')
  train, eval_ = sources[:2]
  notes = tuple(n for source in sources for n in getattr(source, 'notes', ()))
  sampler = repeated_augmentation(config, len(train))
  steps_per_epoch = sampler.steps_per_epoch if sampler else len(train) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'batch_size {config.batch_size} is larger than the train split '
                     f'({len(train)} examples)')
  host_augment, batch_augment = build_augmentations(config)
  text_features = load_train_text_features(config, train)
  return Data(
      train=train, eval=eval_, val=sources[2] if validated else None, num_classes=train.num_classes,
      steps_per_epoch=steps_per_epoch, text_features=text_features,
      eval_text_features=_load_eval_text_features(config, eval_),
      eval_released_text=None if text_features is None else pipeline.released_rows(
          text_features, len(eval_), config.eval_batch_size), sampler=sampler,
      host_augment=host_augment, batch_augment=batch_augment,
      num_workers=pipeline.resolve_num_workers(config.data.num_workers), notes=notes)


def repeated_augmentation(config, num_examples: int) -> RepeatedAugmentation | None:
  """DeiT's sampler when `config.data.repeated_aug` > 1, over `repeated_aug_replicas` replicas
  (0: one per JAX process, as DeiT's one per GPU)."""
  repeats, replicas = int(config.data.repeated_aug), int(config.data.repeated_aug_replicas)
  if repeats <= 1:
    return None
  replicas = replicas or jax.process_count()
  if replicas % jax.process_count():
    raise ValueError(f'config.data.repeated_aug_replicas={replicas} does not split over '
                     f'{jax.process_count()} processes: use a multiple of {jax.process_count()}')
  return RepeatedAugmentation(num_examples=num_examples, batch_size=config.batch_size,
                              num_repeats=repeats, num_replicas=replicas, seed=config.seed)


def build_augmentations(config):
  """(per-example host augmentation or None, on-device batch augmentation or None).

  Host: RandAugment on uint8 images in the grain workers. Device (inside the jitted step, so
  teacher and student see the same result): random erasing, then Mixup/CutMix with smoothed
  targets. Built once: the compiled step is specialised on the batch-augmentation function.
  """
  from tikd_jax.data.mixup import make_batch_augment  # pylint: disable=g-import-not-at-top
  from tikd_jax.data.randaugment import make_host_augment  # pylint: disable=g-import-not-at-top
  aug = config.augment
  cfg = ml_collections.ConfigDict(
      dict(aug.to_dict(), label_smoothing=config.label_smoothing, mean=tuple(config.model.mean),
           std=tuple(config.model.std)))
  host = make_host_augment(cfg) if aug.randaugment else None
  on_device = aug.mixup_alpha > 0 or aug.cutmix_alpha > 0 or aug.erasing_prob > 0
  return host, (make_batch_augment(cfg) if on_device else None)


def load_train_text_features(config, train_source) -> np.ndarray | None:
  """The caption features of the train split, one row per example index (README "The text
  teacher").

  With `config.text.class_prompt_encoder` set (a local encoder folder, or 'minilm' for the
  offline MiniLM), class-prompt features are built first when the folder has none (the
  fallback without a VLM). Eval never reads these: it uses the text predictor or no text.
  """
  text = config.text
  if not text.features_dir:
    return None
  from tikd_jax.data.text_features import load_text_features  # pylint: disable=g-import-not-at-top
  if text.class_prompt_encoder:
    if jax.process_index() == 0:
      from tikd_jax import text_teacher  # pylint: disable=g-import-not-at-top
      encoder = text.class_prompt_encoder
      if encoder == 'minilm':
        encoder = text_teacher.minilm_folder()
      text_teacher.build_class_prompt_features(config.data, config.data.train_split,
                                               text.features_dir, encoder,
                                               template=text.class_prompt_template,
                                               source=train_source)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('class prompt features written')
  return load_text_features(text.features_dir, train_source)


def _load_eval_text_features(config, eval_source) -> np.ndarray | None:
  """The eval split's own caption features (`text.eval_features_dir`: `python -m
  tikd_jax.text_teacher caption/encode` on that split), for eval_text='captions'."""
  if not config.text.eval_features_dir:
    return None
  from tikd_jax.data.text_features import load_text_features  # pylint: disable=g-import-not-at-top
  return load_text_features(config.text.eval_features_dir, eval_source)


def _check_text_for(phases: list[Phase], data: Data, tikd) -> None:
  fusing = [p.name for p in phases if p.fuse_text]
  if fusing and data.text_features is None:
    raise ValueError(f'stage(s) {fusing} fuse text but config.text.features_dir is empty: '
                     f'generate caption features (python -m tikd_jax.text_teacher, see README) '
                     f'and pass --config.text.features_dir=DIR, or use a config without text '
                     f'stages (e.g. configs/tikd_cifar100.py:large,hard,notext)')
  from tikd_jax.train.evaluate import EVAL_TEXT  # pylint: disable=g-import-not-at-top
  if tikd.eval_text not in EVAL_TEXT:
    raise ValueError(f'tikd.eval_text={tikd.eval_text!r}: use one of {sorted(EVAL_TEXT)}')
  if tikd.eval_text == 'captions' and data.eval_text_features is None:
    raise ValueError("tikd.eval_text='captions' reads the eval split's own caption features: "
                     'caption and encode that split (python -m tikd_jax.text_teacher, README "The '
                     'text teacher") and pass --config.text.eval_features_dir=DIR')
  if tikd.fusion_text not in FUSION_TEXT:
    raise ValueError(f'tikd.fusion_text={tikd.fusion_text!r}: use one of {FUSION_TEXT}')


# ------------------------------------------------------------------------------------ models
def _check_best_metric(best_metric: str, num_classes: int, ema_decay: float) -> None:
  """`best_metric='[ema_]top<k>'` needs k ≤ the number of classes (evaluation reports no top-k
  beyond), and the `ema_` ones a model EMA."""
  if (best_metric or '').startswith('ema_') and not ema_decay:
    raise ValueError(f'best_metric={best_metric!r} ranks checkpoints by the model EMA, but '
                     'config.ema.decay is 0 (no EMA): set --config.ema.decay (e.g. 0.99996) or '
                     'rank by the raw weights (--config.best_metric=top1)')
  match = re.fullmatch(r'(?:ema_)?top(\d+)', best_metric or '')
  if match and int(match.group(1)) > num_classes:
    raise ValueError(f'best_metric={best_metric!r}, but the data has {num_classes} classes and '
                     'evaluation reports top-k only for k ≤ the number of classes; set '
                     f"--config.best_metric=top1 (the default)")


def model_spec(model_config, num_classes: int) -> tuple[str, dict]:
  """(name, kwargs) for build_model from a config block; num_classes filled from the data."""
  kwargs = {k: v for k, v in model_config.to_dict().items() if k not in ('name', 'checkpoint')}
  kwargs.setdefault('num_classes', num_classes)
  for k, v in list(kwargs.items()):
    if isinstance(v, tuple):
      kwargs[k] = list(v)
  return model_config.name, kwargs


def student_model(config, data: Data) -> Model:
  name, kwargs = model_spec(config.model, data.num_classes)
  if config.dtype != 'float32':
    # Mixed precision: compute in config.dtype; parameters, optimizer state and losses float32.
    kwargs['dtype'] = config.dtype
  if data.text_features is not None and name in VIT_MODELS:
    kwargs.setdefault('text_dim', int(data.text_features.shape[1]))
    kwargs.setdefault('fusion_gate', bool(config.tikd.fusion_gate))
  fast_layers = cpu_layers.enabled(config.cpu_fast_layers)
  abstract = nnx.eval_shape(
      lambda: build_model(name, rngs=nnx.Rngs(config.seed), fast_layers=fast_layers, **kwargs))
  graphdef, _, _ = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  return Model(name=name, kwargs=kwargs, fast_layers=fast_layers, graphdef=graphdef,
               num_params=count_params(abstract))


def _abstract_variables(model: Model) -> dict:
  return jax.eval_shape(lambda: model_variables(model.build(0)))


def load_teacher(config, num_classes: int, mesh, rules) -> Teacher:
  """Builds the teacher, loads its checkpoint strictly and places it on the mesh."""
  name, kwargs = model_spec(config.teacher, num_classes)
  if config.dtype != 'float32':
    kwargs['dtype'] = config.dtype
  kwargs['fast_layers'] = cpu_layers.enabled(config.cpu_fast_layers)
  path = config.teacher.checkpoint
  if not path:
    raise DataError(f'the loss terms of distill.method={config.distill.method!r} / config.loss '
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
  return Teacher(graphdef, place(variables, sharding_lib.param_shardings(variables, mesh, rules)))


def place(tree, shardings):
  """Host NumPy → global arrays with the given shardings (works on every host of a pod)."""

  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

  return jax.tree.map(put, tree, shardings)


def _loss_shapes(config, data: Data, student: Model, abstract_variables: dict,
                 teacher: Teacher | None) -> dict:
  """The shapes the loss terms' init reads, for one micro-batch."""
  return loss_shapes(graphdef=student.graphdef, variables=abstract_variables,
                     teacher_graphdef=teacher.graphdef if teacher else None,
                     teacher_vars=teacher.variables if teacher else None,
                     image_shape=data.train[0]['image'].shape,
                     rows=config.batch_size // config.grad_accum_steps,
                     num_classes=data.num_classes)
