"""Hidden and attention dropout (`model.dropout`, `model.attn_dropout`; HF ViT's
hidden_dropout_prob / attention_probs_dropout_prob, IRKD's notebooks).

Pinned: each dropout site zeroes entries at its rate and scales the kept ones by exactly
1 / (1 − rate), where HF puts it (embeddings — not IRKD's dist token —, attention probabilities,
after the attention projection, after the MLP's second linear); eval mode is deterministic and
equals a rate-0 model; the train step's masks come from (config.seed, state.step), so the same
step repeats bit for bit (what resume relies on) and another step draws other masks; the IRKD
configs carry the notebooks' rates and the DeiT / TIKD ones none.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import common, irkd_cifar10, irkd_digits, tikd_cifar100, vit_teacher_cifar10
from tikd_jax.losses.registry import Loss
from tikd_jax.models import build_model
from tikd_jax.models.variables import model_variables
from tikd_jax.models.vit import dropout
from tikd_jax.train.state import init_train_state
from tikd_jax.train.step import StepOptions, make_train_step
from tests.test_step_meaning import COMPILE

IMG, C = 16, 10


def _binomial_tolerance(n, p):
  """Five standard deviations of a fraction of n Bernoulli(p) draws."""
  return 5.0 * np.sqrt(p * (1 - p) / n)


def _check_dropped(name, dropped, full, rate, atol=1e-7):
  """`dropped` is `full` with a fraction ≈ rate zeroed and the rest × 1/(1 − rate)."""
  dropped, full = np.asarray(dropped, np.float64), np.asarray(full, np.float64)
  assert np.all(full != 0.0), f'{name}: the reference has exact zeros, the test cannot tell'
  zero = dropped == 0.0
  frac = zero.mean()
  assert abs(frac - rate) < _binomial_tolerance(zero.size, rate), (name, frac, rate)
  np.testing.assert_allclose(dropped[~zero], full[~zero] / (1.0 - rate), rtol=2e-6, atol=atol,
                             err_msg=name)


@pytest.mark.parametrize('rate', [0.1, 0.5])
def test_dropout_zeroes_at_the_rate_and_rescales_the_kept_entries(rate):
  x = jax.random.normal(jax.random.key(0), (64, 50, 32)) + 3.0  # no exact zeros
  y = dropout(x, rate, jax.random.key(1))
  _check_dropped('dropout', y, x, rate)
  # Independent per entry: a per-token or per-feature mask would zero whole rows or columns.
  zero = np.asarray(y) == 0.0
  assert not zero.all(axis=-1).any() and not zero.all(axis=(0, 1)).any()
  assert zero.any(axis=-1).mean() > 0.95
  np.testing.assert_array_equal(dropout(x, rate, None), x)  # no key (eval): unchanged
  np.testing.assert_array_equal(dropout(x, 0.0, jax.random.key(1)), x)


def _model(**kw):
  kw = dict(dict(variant='micro', img_size=IMG, num_classes=C, drop_path=0.0), **kw)
  name = kw.pop('name', 'distilled_vit')
  return build_model(name, rngs=nnx.Rngs(0), **kw)


def _images():
  return jax.random.uniform(jax.random.key(7), (16, IMG, IMG, 3))


def test_embedding_dropout_and_irkd_dist_token_kept():
  """Hidden dropout on the embedded tokens; in IRKD's layout the dist token is never dropped."""
  x = _images()
  for name, dist_index in (('distilled_vit', None), ('irkd_vit', 1)):
    model = _model(name=name, dropout=0.4)
    # IRKD's dist token starts at zero (where dropping changes nothing): give it values.
    model.dist_token[...] = 1.0 + jax.random.uniform(jax.random.key(8), model.dist_token.shape)
    full = model.embed(x)
    dropped = model.embed(x, jax.random.key(3))
    if dist_index is None:
      _check_dropped(f'{name} embeddings', dropped, full, 0.4)
      continue
    np.testing.assert_array_equal(dropped[:, dist_index], full[:, dist_index])  # zeros, kept
    keep = np.delete(np.arange(full.shape[1]), dist_index)
    _check_dropped(f'{name} embeddings',
                   np.asarray(dropped)[:, keep],
                   np.asarray(full)[:, keep], 0.4)


@pytest.mark.parametrize('site', ['attention_output', 'mlp_output'])
def test_block_hidden_dropout_after_attention_projection_and_mlp(site):
  """Block output − input is Drop(Attn) + Drop(MLP); zeroing one branch's last linear leaves the
  other branch's dropped output alone, against its eval-mode value."""
  rate = 0.3
  model = _model(dropout=rate)
  block = model.blocks[0]
  silenced = block.mlp.fc2 if site == 'attention_output' else block.attn.proj
  silenced.kernel[...] = jnp.zeros_like(silenced.kernel[...])
  silenced.bias[...] = jnp.zeros_like(silenced.bias[...])
  # Small tokens, so that the residual sum keeps the branch's digits (x + y − x == y to ~1e-9).
  tokens = 0.01 * jax.random.normal(jax.random.key(6), (16, 18, 32))
  eval_out, _ = block(tokens)
  train_out, _ = block(tokens, jax.random.key(5))
  _check_dropped(site, train_out - tokens, eval_out - tokens, rate, atol=1e-8)


def test_attention_dropout_on_the_probabilities():
  """out['attn<i>'] holds the dropped probabilities (as HF returns them): zeros at the rate, the
  rest the eval-mode probabilities × 1/(1 − rate); rows no longer sum to 1."""
  rate = 0.25
  model = _model(attn_dropout=rate)  # no hidden dropout: block 0 sees the eval-mode input
  x = _images()
  _, eval_out = model(x, train=False)
  _, train_out = model(x, train=True, rng=jax.random.key(2))
  _check_dropped('attn0', train_out['attn0'], eval_out['attn0'], rate)
  assert np.abs(np.asarray(train_out['attn0']).sum(-1) - 1.0).max() > 0.1


def test_eval_is_deterministic_and_equals_rate_zero():
  x = _images()
  plain = _model()
  dropped = _model(dropout=0.5, attn_dropout=0.5)
  # Dropout owns no parameters: the same seed builds the same weights.
  for a, b in zip(jax.tree.leaves(nnx.state(plain)), jax.tree.leaves(nnx.state(dropped))):
    np.testing.assert_array_equal(a, b)
  ref, ref_out = plain(x, train=False)
  for rng in (None, jax.random.key(0), jax.random.key(1)):
    logits, _ = dropped(x, train=False, rng=rng)
    np.testing.assert_array_equal(logits, ref)
  # Train mode (cls head) with a key does drop: the test above would pass for a model that
  # never drops.
  train, _ = dropped(x, train=True, rng=jax.random.key(0))
  assert np.abs(np.asarray(train) - np.asarray(ref_out['cls_logits'])).max() > 1e-2
  # Rates 0 in train mode: nothing drawn, the eval cls logits (drop_path is 0 too).
  np.testing.assert_array_equal(
      plain(x, train=True, rng=jax.random.key(0))[0], ref_out['cls_logits'])


def test_drop_path_draws_unchanged_by_dropout_keys():
  """Dropout's keys are its own: drop path still draws from split(block key) (as before dropout
  existed, so DeiT / TIKD runs are unchanged), whether dropout is on or not."""
  from tikd_jax.models.vit import drop_path
  tokens = 0.5 * jax.random.normal(jax.random.key(6), (16, 18, 32))
  key = jax.random.key(4)
  outputs = []
  for rate in (0.0, 1e-9):  # 1e-9 draws dropout keys but keeps every entry and scales by 1
    model = _model(drop_path=0.5, dropout=rate, attn_dropout=rate)
    block = model.blocks[1]  # drop path 0.5 (linspace over 2 blocks)
    r1, r2 = jax.random.split(key)
    x = tokens + drop_path(block.attn(block.norm1(tokens))[0], 0.5, r1)
    want = x + drop_path(block.mlp(block.norm2(x)), 0.5, r2)
    got, _ = block(tokens, key)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f'dropout {rate}')
    outputs.append(np.asarray(got))
  # The masks matter: a block without drop path gives another output.
  assert np.abs(np.asarray(_model().blocks[1](tokens, key)[0]) - outputs[0]).max() > 1e-2


# ------------------------------------------------------------------------------ the train step
def _step_setup(rate, seed=0):
  model = _model(dropout=rate, attn_dropout=rate)
  graphdef, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
  variables = model_variables(model)
  loss = Loss((('ce', 1.0),), {})
  tx = optax.sgd(1.0)
  step = jax.jit(
      make_train_step(graphdef=graphdef, teacher_graphdef=None, loss=loss, tx=tx, frozen_mask=None,
                      opts=StepOptions(num_classes=C, steps_per_epoch=10, seed=seed)), **COMPILE)

  def state_at(n):
    return init_train_state(variables, loss, tx, rng=jax.random.key(0),
                            shapes={'rows': 16, 'num_classes': C}, step=n)

  return graphdef, variables, step, state_at


def _batch():
  rng = np.random.default_rng(0)
  return {
      'image': jnp.asarray(rng.integers(0, 256, (16, IMG, IMG, 3), dtype=np.uint8)),
      'label': jnp.asarray(rng.integers(0, C, 16).astype(np.int32))
  }


def _relative_change(a, b):
  """|Δ| / |a| over the student's parameters of two states (what two updates changed)."""
  da = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a.params['student'])])
  db = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b.params['student'])])
  return float(np.linalg.norm(da - db) / np.linalg.norm(da))


def test_step_dropout_key_comes_from_seed_and_step():
  """The step's loss and gradient are those of the model in train mode with the key
  split(fold_in(key(seed), step))[1] (the model key drop path uses); the same (seed, step)
  repeats exactly, another step or seed draws other masks; with rates 0 the step number
  changes nothing (so the differences are dropout's)."""
  rate, batch = 0.3, _batch()
  graphdef, variables, step, state_at = _step_setup(rate)
  new, m = step(state_at(5), batch, None)
  again, m_again = step(state_at(5), batch, None)
  other, m_other = step(state_at(6), batch, None)
  np.testing.assert_array_equal(m['loss'], m_again['loss'])
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(a, b)
  assert _relative_change(new, other) > 0.1  # step 6: other masks, another update

  # Restatement: CE of the train-mode model under the step's model key; sgd(1): grad = old − new.
  images = batch['image'].astype(jnp.float32) / 255.0

  def ce(params, key):
    logits, _ = nnx.merge(graphdef, params, variables['batch_stats'])(images, train=True, rng=key)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']))

  for n, state_new, metrics in ((5, new, m), (6, other, m_other)):
    key = jax.random.split(jax.random.fold_in(jax.random.key(0), n))[1]
    want, grads = jax.jit(jax.value_and_grad(ce), **COMPILE)(variables['params'], key)
    np.testing.assert_allclose(metrics['loss'], want, rtol=1e-6)
    got = jax.tree.map(jnp.subtract, variables['params'], state_new.params['student'])
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(grads)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
  # Another seed, same step: other masks.
  _, _, step_seed1, state_at1 = _step_setup(rate, seed=1)
  assert _relative_change(new, step_seed1(state_at1(5), batch, None)[0]) > 0.1
  # Rates 0: the step number reaches nothing.
  _, _, step0, state_at0 = _step_setup(0.0)
  assert _relative_change(step0(state_at0(5), batch, None)[0],
                          step0(state_at0(6), batch, None)[0]) == 0.0


# ------------------------------------------------------------------------------ configs
def test_configs_carry_the_notebook_rates():
  rates = lambda c: (c.model.dropout, c.model.attn_dropout)
  assert rates(irkd_cifar10.get_config('kd_cl_sal,p4')) == (0.1, 0.0)
  assert rates(irkd_cifar10.get_config('ce,p2')) == (0.1, 0.1)
  assert rates(irkd_cifar10.get_config('kd,p2,custom')) == (0.0, 0.0)
  assert rates(vit_teacher_cifar10.get_config()) == (0.1, 0.1)
  digits = irkd_digits.get_config()
  assert rates(digits.runs.teacher) == (0.1, 0.1)
  assert all(rates(digits.runs[row]) == (0.1, 0.0) for row in irkd_cifar10.ROWS)
  # DeiT / TIKD: drop path, no dropout.
  for arg in ('large,hard', 'small,hard,notext'):
    c = tikd_cifar100.get_config(arg)
    assert rates(c) == (0.0, 0.0) and c.model.drop_path == 0.1, arg
  assert rates(common.base()) == (0.0, 0.0)
  # The rates reach the built model.
  from tikd_jax.train.run import model_spec
  name, kwargs = model_spec(irkd_cifar10.get_config('kd,p2').model, 10)
  model = nnx.eval_shape(lambda: build_model(name, rngs=nnx.Rngs(0), **kwargs))
  assert (model.dropout, model.blocks[3].attn.attn_dropout) == (0.1, 0.1)
