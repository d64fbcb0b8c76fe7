"""Pure, jitted train and eval steps over plain pytrees (the `nnx.split` pattern).

The student lives as `graphdef` (static) + `params` / `batch_stats` (nested dicts, in the state);
inside the step `nnx.merge` rebuilds it, so the step is a pure function the trainer can `jax.jit`
with shardings and donate. The frozen teacher's variables are an argument, not a constant baked
into the compiled program.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tikd_jax import losses
from tikd_jax.train.objectives import LossInputs, Objective, tree_any_nonfinite
from tikd_jax.train.optim import zero_frozen


@flax.struct.dataclass
class TrainState:
  step: jax.Array                 # int32 scalar: optimizer steps taken
  params: dict                    # {'student': …, 'objective': …} trainable
  batch_stats: dict               # the student's BatchNorm statistics (empty for ViTs)
  opt_state: Any
  objective_state: dict           # carried loss state (PKCD's previous batch)


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What a compiled train step is specialised on (one compile per distinct value)."""
  num_classes: int
  steps_per_epoch: int
  seed: int
  label_smoothing: float = 0.0
  fuse_text: bool = False          # TIKD second pass on (stage switch)
  alignment_beta: float = 0.0      # weight of mean(1 − c)
  text_predictor_weight: float = 0.0
  frozen: tuple[str, ...] = ()     # regexes of frozen parameter paths
  batch_augment: Callable | None = None  # (images, labels, num_classes, rng) → (images, targets)
  saliency: str = 'none'           # IRKD saliency alignment: 'none' | 'attention' | 'gradient'
  saliency_weight: float = 0.0
  saliency_layers: str = ''        # '' → the variant's default; else '0,2,3' or 'all'
  saliency_resize_to: str = 'teacher'
  grad_accum_steps: int = 1        # micro-batches per optimizer step (gradients averaged)


def _teacher_forward(teacher_graphdef, teacher_vars, images):
  """The frozen teacher in eval mode: (module, logits, out), all outputs stop-gradient."""
  if teacher_graphdef is None:
    return None, None, {}
  teacher = nnx.merge(teacher_graphdef, teacher_vars['params'], teacher_vars['batch_stats'])
  logits, out = teacher(images, train=False)
  return teacher, jax.lax.stop_gradient(logits.astype(jnp.float32)), jax.lax.stop_gradient(out)


def _parse_layers(spec: str):
  if spec in ('', 'all'):
    return spec or None
  return tuple(int(i) for i in spec.split(','))


def saliency_term(opts: StepOptions, student, student_out, teacher, teacher_out):
  """IRKD's saliency alignment (REFERENCE §7) between student and (stop-gradient) teacher."""
  if teacher is None or not hasattr(teacher, 'num_prefix'):
    raise ValueError('saliency alignment needs a ViT teacher (attention maps, patch tokens)')
  common = dict(student_prefix=student.num_prefix, teacher_prefix=teacher.num_prefix,
                resize_to=opts.saliency_resize_to)
  layers = _parse_layers(opts.saliency_layers)
  if opts.saliency == 'attention':
    return losses.attention_saliency_loss(student_out, teacher_out, layers=layers or 'all',
                                          **common)
  if opts.saliency == 'gradient':
    kw = {'layers': layers} if layers else {}
    return losses.gradient_saliency_loss(student_out, teacher_out, student_classifier=student.head,
                                         teacher_classifier=teacher.head, **kw, **common)
  raise ValueError(f"saliency must be 'none', 'attention' or 'gradient', got {opts.saliency!r}")


def _cosine_loss(pred, target):
  pred = pred / jnp.maximum(jnp.linalg.norm(pred, axis=-1, keepdims=True), 1e-8)
  target = target / jnp.maximum(jnp.linalg.norm(target, axis=-1, keepdims=True), 1e-8)
  return jnp.mean(1.0 - jnp.sum(pred * target, axis=-1))


def make_train_step(*, graphdef, teacher_graphdef, objective: Objective,
                    tx: optax.GradientTransformation, frozen_mask, opts: StepOptions):
  """(state, batch, teacher_vars) → (state, metrics). Metrics are device scalars."""
  base_key = jax.random.key(opts.seed)

  def train_step(state: TrainState, batch: dict, teacher_vars):
    rng = jax.random.fold_in(base_key, state.step)
    aug_rng, model_rng = jax.random.split(rng)
    images = batch['image'].astype(jnp.float32) / 255.0
    labels = batch['label']
    if opts.batch_augment is not None:
      images, targets = opts.batch_augment(images, labels, opts.num_classes, aug_rng)
    else:
      targets = losses.one_hot_smoothed(labels, opts.num_classes, opts.label_smoothing)
    teacher, teacher_logits, teacher_out = _teacher_forward(teacher_graphdef, teacher_vars,
                                                            images)
    epoch = state.step.astype(jnp.float32) // opts.steps_per_epoch + 1.0

    def loss_fn(params, batch_stats=None, objective_state=None, micro=None, rng=model_rng):
      """The loss of one (micro-)batch; `micro` overrides the full-batch inputs."""
      x, y_soft, y, t_logits, t_out, text = (images, targets, labels, teacher_logits,
                                             teacher_out, batch.get('text'))
      if micro is not None:
        x, y_soft, y, t_logits, t_out, text = micro
      bstats = state.batch_stats if batch_stats is None else batch_stats
      obj_state = state.objective_state if objective_state is None else objective_state
      student = nnx.merge(graphdef, params['student'], bstats)
      logits, out = student(x, train=True, rng=rng, text=text, fuse_text=opts.fuse_text)
      inputs = LossInputs(out=out, teacher_logits=t_logits, targets=y_soft,
                          labels=y, epoch=epoch)
      loss, metrics, new_obj_state = objective(inputs, params['objective'], obj_state)
      teacher_out_ = t_out
      if opts.fuse_text and opts.alignment_beta:
        loss = loss + opts.alignment_beta * out['alignment_loss']
        metrics['alignment_loss'] = out['alignment_loss']
      if opts.text_predictor_weight and text is not None:
        pred_loss = _cosine_loss(out['text_pred'], text)
        loss = loss + opts.text_predictor_weight * pred_loss
        metrics['text_predictor_loss'] = pred_loss
      if opts.saliency != 'none':
        sal = saliency_term(opts, student, out, teacher, teacher_out_)
        loss = loss + opts.saliency_weight * sal
        metrics['saliency_loss'] = sal
      new_stats = nnx.to_pure_dict(nnx.state(student, nnx.BatchStat))
      metrics['train_top1'] = jnp.mean(jnp.argmax(logits, -1) == y)
      return loss, (metrics, new_stats, new_obj_state)

    k = opts.grad_accum_steps
    if images.shape[0] % k:
      raise ValueError(f'batch {images.shape[0]} is not divisible by grad_accum_steps {k}')
    _check_objective_state(objective, state.objective_state, images.shape[0] // k, opts)
    if k == 1:
      (loss, (metrics, new_stats, new_obj_state)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(state.params)
    else:
      loss, metrics, new_stats, new_obj_state, grads = _accumulate(
          loss_fn, state, images, targets, labels, teacher_logits, teacher_out, batch, k,
          model_rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if frozen_mask is not None:
      updates = zero_frozen(updates, frozen_mask)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   nonfinite=tree_any_nonfinite((loss, grads)))
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=new_stats,
                           opt_state=opt_state, objective_state=new_obj_state)
    return new_state, metrics

  return train_step


def _check_objective_state(objective, obj_state, rows, opts):
  """Carried objective state (PKCD's previous batch) must be sized for one micro-batch."""
  expected = jax.eval_shape(lambda: objective.init_state(rows, opts.num_classes))
  shapes = lambda tree: (jax.tree.structure(tree), [jnp.shape(x) for x in jax.tree.leaves(tree)])
  if shapes(obj_state) != shapes(expected):
    raise ValueError(
        f'objective {objective.name!r} carries state of shapes {shapes(obj_state)[1]}, but a '
        f'micro-batch has {rows} rows (batch / grad_accum_steps {opts.grad_accum_steps}) and '
        f'needs {shapes(expected)[1]}: build it with objective.init_state({rows}, '
        f'{opts.num_classes}), i.e. from the micro-batch size')


def _accumulate(loss_fn, state, images, targets, labels, teacher_logits, teacher_out, batch, k,
                rng):
  """Mean loss and gradients over k micro-batches (rows j, j + k, j + 2k, …), scanned.

  PyTorch's accumulation: each micro-batch is a batch of its own, so BatchNorm normalises with
  its statistics and updates the running ones micro-batch after micro-batch, and carried
  objective state passes on (PKCD's "previous batch" of micro-batch j is micro-batch j − 1, for
  j = 0 the last one of the previous step). Micro-batch j draws from fold_in(rng, j), rng being
  the step's model key (config.seed, step). Strided rows keep every micro-batch spread over all
  devices of the batch sharding. Losses that are means over examples equal the full batch's.
  """
  b = images.shape[0]
  split = lambda x: None if x is None else jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)
  micro = jax.tree.map(split, (images, targets, labels, teacher_logits, teacher_out,
                               batch.get('text')))
  zeros = jax.tree.map(jnp.zeros_like, state.params)

  def body(carry, xs):
    grads_sum, stats, obj_state, i = carry
    (loss, (metrics, stats, obj_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, stats, obj_state, xs, jax.random.fold_in(rng, i))
    return (jax.tree.map(jnp.add, grads_sum, grads), stats, obj_state, i + 1), (loss, metrics)

  (grads, stats, obj_state, _), (losses_, metrics) = jax.lax.scan(
      body, (zeros, state.batch_stats, state.objective_state, 0), micro)
  grads = jax.tree.map(lambda g: g / k, grads)
  return (jnp.mean(losses_), jax.tree.map(jnp.mean, metrics), stats, obj_state, grads)


def make_eval_step(*, graphdef, eval_text: str = 'none', fuse_text: bool = False):
  """(params, batch_stats, batch) → summed loss / top-1 / top-5 / count over real rows.

  `eval_text`: 'none' (first pass only), 'predicted' (the text predictor stands in for the
  caption) — eval never reads training captions.
  """
  use_fusion = fuse_text and eval_text == 'predicted'

  def eval_step(params, batch_stats, batch):
    student = nnx.merge(graphdef, params['student'], batch_stats)
    images = batch['image'].astype(jnp.float32) / 255.0
    logits, _ = student(images, train=False, text=None, fuse_text=use_fusion)
    mask = batch['mask']
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    return {
        'loss_sum': jnp.sum(ce * mask),
        'top1_sum': jnp.sum(losses.topk_correct(logits, batch['label'], 1) * mask),
        'top5_sum': jnp.sum(losses.topk_correct(logits, batch['label'], 5) * mask),
        'count': jnp.sum(mask),
    }

  return eval_step
