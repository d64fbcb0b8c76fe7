"""Pure, jitted train and eval steps over plain pytrees (the `nnx.split` pattern).

The student lives as `graphdef` (static) + `params` / `batch_stats` (nested dicts, in the state);
inside the step `nnx.merge` rebuilds it, so the step is a pure function the trainer can `jax.jit`
with shardings and donate. The frozen teacher's variables are an argument, not a constant baked
into the compiled program.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tikd_jax import losses
from tikd_jax.losses.registry import Context, Loss
from tikd_jax.train.ema import update_ema
from tikd_jax.train.state import TERM_PARAMS, TrainState

FUSION_TEXT = ('caption', 'predicted', 'scheduled')


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What a compiled train step is specialised on (one compile per distinct value); the loss
  terms and their weights are the step's `loss` (tikd_jax/losses/registry.py)."""
  num_classes: int
  steps_per_epoch: int
  seed: int
  label_smoothing: float = 0.0
  fuse_text: bool = False  # TIKD second pass on (stage switch)
  frozen: tuple[str, ...] = ()  # regexes of frozen parameter paths
  batch_augment: Callable | None = None  # (images, labels, num_classes, rng) → (images, targets)
  grad_accum_steps: int = 1  # micro-batches per optimizer step (gradients averaged)
  # What TIKD's second pass fuses in training (`tikd.fusion_text`): 'caption' | 'predicted' (the
  # text predictor's output) | 'scheduled' (caption with a probability falling linearly from 1 to
  # 0 over the phase's steps `phase_steps`, else the prediction).
  fusion_text: str = 'caption'
  phase_steps: tuple[int, int] = (0, 1)
  ema_decay: float = 0.0  # model EMA (train/ema.py) updated after every optimizer step; 0: none


class StepInputs(NamedTuple):
  """What the loss of one (micro-)batch reads; with gradient accumulation every field is split
  into micro-batches by rows."""
  images: jax.Array  # [B, H, W, C] in [0, 1], augmented
  targets: jax.Array  # [B, C] smoothed / mixed soft targets
  labels: jax.Array  # [B] int
  teacher_logits: jax.Array | None
  teacher_out: dict  # the teacher's named outputs ({} without a teacher)
  text: jax.Array | None  # [B, D] caption features
  text_keep: jax.Array | None  # [B] bool: fuse the caption (True) or the predicted text


class LossAux(NamedTuple):
  """What a (micro-)batch's loss returns beside its value."""
  metrics: dict
  batch_stats: dict  # the student's BatchNorm statistics after the forward pass
  term_state: dict  # the loss terms' carried state after this batch


class Gradients(NamedTuple):
  """The step's loss and gradients, averaged over its micro-batches, and the state they leave."""
  loss: jax.Array
  metrics: dict
  batch_stats: dict
  term_state: dict
  grads: Any  # like TrainState.params


def _teacher_forward(teacher_graphdef, teacher_vars, images):
  """The frozen teacher in eval mode: (module, logits, out), all outputs stop-gradient."""
  if teacher_graphdef is None:
    return None, None, {}
  teacher = nnx.merge(teacher_graphdef, teacher_vars['params'], teacher_vars['batch_stats'])
  logits, out = teacher(images, train=False)
  return teacher, jax.lax.stop_gradient(logits.astype(jnp.float32)), jax.lax.stop_gradient(out)


def _shapes_of(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), tree)


def term_shapes(*, graphdef, variables, teacher_graphdef=None, teacher_vars=None, image_shape,
                rows: int, num_classes: int) -> dict:
  """The `shapes` a term's `init(rng, shapes)` reads: 'rows' (one micro-batch), 'num_classes',
  and the eval_shape of the student's and the teacher's named outputs on `image_shape` images."""
  x = jax.ShapeDtypeStruct((rows,) + tuple(image_shape), jnp.float32)
  student_out = jax.eval_shape(
      lambda v, x: nnx.merge(graphdef, v['params'], v['batch_stats'])(x, train=False)[1], variables,
      x)
  teacher_out = {} if teacher_graphdef is None else jax.eval_shape(
      lambda v, x: _teacher_forward(teacher_graphdef, v, x)[2], teacher_vars, x)
  return {
      'rows': rows, 'num_classes': num_classes, 'student_out': student_out,
      'teacher_out': teacher_out
  }


def tree_any_nonfinite(tree: Any) -> jax.Array:
  leaves = [
      jnp.any(~jnp.isfinite(x))
      for x in jax.tree.leaves(tree)
      if jnp.issubdtype(x.dtype, jnp.floating)
  ]
  return jnp.any(jnp.stack(leaves)) if leaves else jnp.asarray(False)


def make_train_step(*, graphdef, teacher_graphdef, loss: Loss, tx: optax.GradientTransformation,
                    frozen_mask, opts: StepOptions):
  """(state, batch, teacher_vars) → (state, metrics): Σ weight · term over `loss`'s terms.
  Metrics are device scalars."""
  if loss.needs_teacher and teacher_graphdef is None:
    raise ValueError(f'{loss} needs a teacher: set config.teacher.checkpoint')
  base_key = jax.random.key(opts.seed)

  def train_step(state: TrainState, batch: dict, teacher_vars):
    if opts.ema_decay and not state.ema:
      raise ValueError(f'ema_decay={opts.ema_decay} but the state holds no EMA: build it with '
                       'init_train_state(..., ema=True)')
    rng = jax.random.fold_in(base_key, state.step)
    aug_rng, model_rng = jax.random.split(rng)
    images = batch['image'].astype(jnp.float32) / 255.0
    labels = batch['label']
    if opts.batch_augment is not None:
      images, targets = opts.batch_augment(images, labels, opts.num_classes, aug_rng)
    else:
      targets = losses.one_hot_smoothed(labels, opts.num_classes, opts.label_smoothing)
    teacher, teacher_logits, teacher_out = _teacher_forward(teacher_graphdef, teacher_vars, images)
    epoch = state.step.astype(jnp.float32) // opts.steps_per_epoch + 1.0

    keep = _caption_keep(opts, state.step, jax.random.fold_in(rng, 2), labels.shape[0])
    inputs = StepInputs(images=images, targets=targets, labels=labels,
                        teacher_logits=teacher_logits, teacher_out=teacher_out,
                        text=batch.get('text'), text_keep=keep)

    def loss_fn(params, batch_stats, term_state, micro: StepInputs, rng):
      """The loss of one (micro-)batch `micro` (the rows of `inputs`) → (loss, LossAux)."""
      student = nnx.merge(graphdef, params['student'], batch_stats)
      logits, out = student(micro.images, train=True, rng=rng, text=micro.text,
                            fuse_text=opts.fuse_text, text_keep=micro.text_keep)
      ctx = Context(out=out, labels=micro.labels, targets=micro.targets, epoch=epoch,
                    step=state.step, teacher_logits=micro.teacher_logits,
                    teacher_out=micro.teacher_out, text=micro.text, student=student,
                    teacher=teacher)
      _check_loss_state(loss, params[TERM_PARAMS], term_state, ctx, opts)
      total, metrics, new_term_state = loss(ctx, params[TERM_PARAMS], term_state)
      new_stats = nnx.to_pure_dict(nnx.state(student, nnx.BatchStat))
      metrics['train_top1'] = jnp.mean(jnp.argmax(logits, -1) == micro.labels)
      return total, LossAux(metrics=metrics, batch_stats=new_stats, term_state=new_term_state)

    g = _accumulate(loss_fn, state, inputs, opts.grad_accum_steps, model_rng)
    metrics = dict(g.metrics, loss=g.loss, grad_norm=optax.tree.norm(g.grads),
                   nonfinite=tree_any_nonfinite((g.loss, g.grads)))
    new_state = _apply_gradients(state, g.grads, tx, frozen_mask, batch_stats=g.batch_stats,
                                 term_state=g.term_state, ema_decay=opts.ema_decay)
    return new_state, metrics

  return train_step


def _apply_gradients(state: TrainState, grads, tx, frozen_mask, *, batch_stats: dict,
                     term_state: dict, ema_decay: float) -> TrainState:
  """The next state: one optimizer step (frozen parameters kept), the step's new BatchNorm
  statistics and loss-term state, and the model EMA moved towards the new student (its
  parameters and those statistics)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  if frozen_mask is not None:  # frozen leaves: a zero update
    updates = jax.tree.map(lambda u, m: jnp.zeros_like(u) if m else u, updates, frozen_mask)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema
  if ema_decay:
    ema = update_ema(ema, {'params': params['student'], 'batch_stats': batch_stats}, ema_decay)
  return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                       opt_state=opt_state, term_state=term_state, ema=ema)


def _caption_keep(opts: StepOptions, step, rng, rows: int):
  """Per example: True fuses its caption, False the text predictor's output; None: captions
  for all (the released fusion). Training on the predictor's output is what caption-free
  inference will see (`tikd.fusion_text`, README "Caption-free inference")."""
  if not opts.fuse_text or opts.fusion_text == 'caption':
    return None
  if opts.fusion_text == 'predicted':
    return jnp.zeros((rows,), bool)
  if opts.fusion_text not in FUSION_TEXT:
    raise ValueError(f'tikd.fusion_text={opts.fusion_text!r}: use one of {FUSION_TEXT}')
  start, end = opts.phase_steps
  caption_probability = 1.0 - (step - start).astype(jnp.float32) / max(end - start, 1)
  return jax.random.uniform(rng, (rows,)) < caption_probability


def _check_loss_state(loss, params, state, ctx, opts):
  """At trace time: each term's parameters and carried state have the shapes its init gives for
  this (micro-)batch (PKCD's previous batch holds one micro-batch)."""
  rows = ctx.labels.shape[0]
  shapes = {
      'rows': rows, 'num_classes': opts.num_classes, 'student_out': _shapes_of(ctx.out),
      'teacher_out': _shapes_of(ctx.teacher_out)
  }
  want_params, want_state = jax.eval_shape(lambda: loss.init(jax.random.key(0), shapes))
  shape = lambda tree: (jax.tree.structure(tree), [jnp.shape(x) for x in jax.tree.leaves(tree)])
  for name in loss.names:
    for what, have, want in (('parameters', params, want_params), ('state', state, want_state)):
      if shape(have.get(name, {})) != shape(want.get(name, {})):
        raise ValueError(
            f'loss term {name!r} has {what} of shapes {shape(have.get(name, {}))[1]}, but a '
            f'micro-batch has {rows} rows (batch / grad_accum_steps {opts.grad_accum_steps}) '
            f'and needs {shape(want.get(name, {}))[1]}: build them with loss.init(rng, shapes) '
            f'for rows={rows}, num_classes={opts.num_classes}, i.e. from the micro-batch size')


def _accumulate(loss_fn, state, inputs: StepInputs, k, rng) -> Gradients:
  """Mean loss and gradients over k micro-batches (rows j, j + k, j + 2k, …), scanned; k = 1 is
  the plain full-batch value_and_grad with the step's model key `rng`.

  PyTorch's accumulation: each micro-batch is a batch of its own, so BatchNorm normalises with
  its statistics and updates the running ones micro-batch after micro-batch, and carried
  loss-term state passes on (PKCD's "previous batch" of micro-batch j is micro-batch j − 1, for
  j = 0 the last one of the previous step). Micro-batch j draws from fold_in(rng, j), rng being
  the step's model key (config.seed, step). Strided rows keep every micro-batch spread over all
  devices of the batch sharding. Losses that are means over examples equal the full batch's.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if k == 1:
    (loss, aux), grads = grad_fn(state.params, state.batch_stats, state.term_state, inputs, rng)
    return Gradients(loss, aux.metrics, aux.batch_stats, aux.term_state, grads)
  b = inputs.images.shape[0]
  if b % k:
    raise ValueError(f'batch {b} is not divisible by grad_accum_steps {k}')
  split = lambda x: None if x is None else jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)
  micro = jax.tree.map(split, inputs)
  zeros = jax.tree.map(jnp.zeros_like, state.params)

  def body(carry, xs):
    grads_sum, stats, term_state, i = carry
    (loss, aux), grads = grad_fn(state.params, stats, term_state, xs, jax.random.fold_in(rng, i))
    return (jax.tree.map(jnp.add, grads_sum,
                         grads), aux.batch_stats, aux.term_state, i + 1), (loss, aux.metrics)

  (grads, stats, term_state,
   _), (losses_, metrics) = jax.lax.scan(body, (zeros, state.batch_stats, state.term_state, 0),
                                         micro)
  grads = jax.tree.map(lambda g: g / k, grads)
  return Gradients(jnp.mean(losses_), jax.tree.map(jnp.mean, metrics), stats, term_state, grads)


# The top-k accuracies evaluation reports, each only where k ≤ the number of classes (a 2-class
# model has top-1 alone: no `top5` key anywhere, rather than a meaningless 100%).
EVAL_TOPK = (1, 5)


def make_eval_step(*, graphdef, fuse_text: bool = False):
  """(params, batch_stats, batch) → summed loss / top-k (`EVAL_TOPK`, k ≤ classes) / count over
  real rows.

  Without `fuse_text`, the first pass alone. With it, TIKD's second pass fuses the batch's
  `text` (the test split's own captions, or the released code's rows) or, when the batch has
  none, the text predictor's output (caption-free).
  """

  def eval_step(params, batch_stats, batch):
    student = nnx.merge(graphdef, params['student'], batch_stats)
    images = batch['image'].astype(jnp.float32) / 255.0
    logits, _ = student(images, train=False, text=batch.get('text'), fuse_text=fuse_text)
    mask = batch['mask']
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    sums = {'loss_sum': jnp.sum(ce * mask), 'count': jnp.sum(mask)}
    for k in EVAL_TOPK:
      if k <= logits.shape[-1]:
        sums[f'top{k}_sum'] = jnp.sum(losses.topk_correct(logits, batch['label'], k) * mask)
    return sums

  return eval_step
