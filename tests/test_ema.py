"""Model EMA (`config.ema.decay`; DeiT / TIKD main.py --model-ema, timm ModelEma / ModelEmaV2).

Pinned: through the real jitted step, after every optimizer step the EMA of every student
parameter and BatchNorm statistic is decay · ema + (1 − decay) · (the step's new value), from
the first step on (no warm-up), the raw weights untouched by it; a run stopped and resumed ends
on a bit-identical EMA (and everything else); the EMA is evaluated beside the raw weights
(`ema_` metrics in metrics.jsonl, final_eval.json, the final lines and the suite table) and
those numbers are the EMA weights' own; the released TIKD preset carries decay 0.99996. Through
the public entry points: `main.py --mode=eval` reports the same ema_ metrics, recomputed from the
checkpoint's EMA (`--ema=on` refuses a checkpoint without one), and `convert.to_torch
--weights=ema` writes the checkpoint's EMA, which the printed load calls load strictly.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from configs import tikd_cifar100
from tikd_jax.data import build_source
from tikd_jax.losses.registry import Loss
from tikd_jax.train import evaluate as evaluate_lib
from tikd_jax.train import trainer
from tikd_jax.train.checkpoint import load_weights, save_weights
from tikd_jax.train.state import init_train_state
from tikd_jax.train.step import StepOptions, make_eval_step, make_train_step
from tikd_jax.models.variables import abstract_model, load_variables
from tikd_jax.tree import CheckpointMismatchError, fill_template
from tests.test_resume import (ONE_DEVICE, STEPS, STOP, _assert_same_run, _checkpoint, _config,
                               _stop_and_resume)
from tests.test_step_meaning import COMPILE, make_model
from tests.test_train import REPO

B, C, IMG = 8, 10, 16
DECAY = 0.9  # far from 1, so that one step moves the average visibly


def _batch():
  rng = np.random.default_rng(0)
  return {
      'image': jnp.asarray(rng.integers(0, 256, (B, IMG, IMG, 3), dtype=np.uint8)),
      'label': jnp.asarray(rng.integers(0, C, B).astype(np.int32))
  }


def _leaves(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope='module')
def resnet_steps():
  """A resnet8 student (BatchNorm statistics to average) and the real step with and without
  EMA, SGD lr 1 (so one step moves the weights far)."""
  graphdef, variables = make_model('resnet8', 3)
  loss, tx = Loss((('ce', 1.0),)), optax.sgd(1.0)

  def step(decay):
    return jax.jit(
        make_train_step(
            graphdef=graphdef, teacher_graphdef=None, loss=loss, tx=tx, frozen_mask=None,
            opts=StepOptions(num_classes=C, steps_per_epoch=10, seed=0, ema_decay=decay)),
        **COMPILE)

  def state(n, ema):
    return init_train_state(variables, loss, tx, rng=jax.random.key(0),
                            shapes={'rows': B, 'num_classes': C}, step=n, ema=ema)

  return variables, state, step(DECAY), step(0.0)


@pytest.mark.parametrize('start', [0, 5], ids=['first_step', 'later_step'])
def test_step_updates_the_ema_by_timm_s_rule(resnet_steps, start):
  """ema' = d·ema + (1 − d)·new, on parameters and BatchNorm statistics, at the first step as at
  any other (a warm-up such as TF's min(d, (1 + n)/(10 + n)) gives 0.1 at step 0, not 0.9)."""
  variables, state_at, step, plain_step = resnet_steps
  batch = _batch()
  state = state_at(start, ema=True)
  # An EMA away from the weights (as after training), so that every term of the rule shows.
  rng = np.random.default_rng(1)
  old_ema = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(0, 0.5, x.shape), x.dtype), state.ema)
  new, _ = step(state.replace(ema=old_ema), batch, None)
  assert set(new.ema) == {'params', 'batch_stats'} and new.ema['batch_stats']
  model_new = {'params': new.params['student'], 'batch_stats': new.batch_stats}
  for name in ('params', 'batch_stats'):
    e_old, v_new, e_new = (_leaves(t[name]) for t in (old_ema, model_new, new.ema))
    for a, b, got in zip(e_old, v_new, e_new):
      np.testing.assert_allclose(got, DECAY * a + (1 - DECAY) * b, rtol=1e-6, atol=1e-6,
                                 err_msg=name)
    # The step moved the weights (so averaging the pre-step ones would show), and the EMA.
    v_old = _leaves(variables[name])
    assert max(np.abs(a - b).max() for a, b in zip(v_new, v_old)) > 1e-2, name
    assert max(np.abs(a - b).max() for a, b in zip(e_new, e_old)) > 1e-2, name
  # The raw weights and statistics are those of a step without EMA (up to float32 rounding: the
  # two steps are two programs, which XLA fuses differently).
  plain, _ = plain_step(state_at(start, ema=False), batch, None)
  for a, b in zip(_leaves((new.params, new.batch_stats)), _leaves(
      (plain.params, plain.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert plain.ema == {}


def test_fresh_ema_is_the_initial_model_and_steps_without_it_are_refused(resnet_steps):
  variables, state_at, step, plain_step = resnet_steps
  fresh = state_at(0, ema=True)
  for a, b in zip(_leaves(fresh.ema), _leaves(variables)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='holds no EMA'):
    step(state_at(0, ema=False), _batch(), None)


# ------------------------------------------------------------------------------ through the trainer
@pytest.fixture(scope='module')
def straight_ema(tmp_path_factory):
  """An uninterrupted run with EMA: a resnet8 student (BatchNorm), 22 steps."""
  c = _config('teacher', **{'ema.decay': DECAY})
  workdir = tmp_path_factory.mktemp('straight_ema')
  return c, (workdir, trainer.train_and_evaluate(c, str(workdir)))


def test_ema_resumes_bit_identically_and_is_evaluated(tmp_path, straight_ema):
  c, straight = straight_ema
  resumed = _stop_and_resume(c, tmp_path, [STOP])
  # Every array of the final checkpoint, EMA included, every step's metrics, the final eval.
  _assert_same_run(straight, tmp_path, resumed)
  final = _checkpoint(tmp_path)
  ema = {k[len('ema/'):]: v for k, v in final['extra'].items() if k.startswith('ema/')}
  assert ema.keys() == final['model'].keys() and any('batch_stats' in k for k in ema)
  assert final['meta']['ema'] is True
  # 22 steps at decay 0.9: the EMA trails the weights (neither equal to them nor to the start).
  assert max(np.abs(ema[k] - final['model'][k]).max() for k in ema) > 1e-3
  # The stopped run's checkpoint held its EMA too (what the resume read).
  assert _checkpoint(tmp_path, STOP)['meta']['ema'] is True

  # Evaluated beside the raw weights: the ema_ numbers are the EMA weights' own.
  result = straight[1]
  assert {'top1', 'ema_top1', 'ema_loss', 'ema_top5'} <= set(result)
  assert 'ema_count' not in result
  eval_rows = [
      json.loads(line)
      for line in open(os.path.join(straight[0], 'metrics.jsonl'))
      if json.loads(line)['kind'] == 'eval'
  ]
  assert eval_rows[-1]['step'] == STEPS and eval_rows[-1]['ema_top1'] == result['ema_top1']
  saved = json.load(open(os.path.join(straight[0], 'final_eval.json')))
  assert saved['ema_top1'] == result['ema_top1'] and saved['top1'] == result['top1']
  for prefix, weights in (('', final['model']), ('ema_', ema)):
    m = _evaluate_flat(c, weights)
    assert (m['top1'], m['loss']) == pytest.approx(
        (result[prefix + 'top1'], result[prefix + 'loss']), rel=1e-5)
  assert result['ema_loss'] != pytest.approx(result['loss'], rel=1e-3)  # two evaluations
  # The final lines.
  lines = evaluate_lib.format_evals(result).splitlines()
  assert lines[0].startswith('* Acc@1 ') and lines[1] == (
      f"* EMA Acc@1 {result['ema_top1']:.3f} Acc@5 {result['ema_top5']:.3f} "
      f"loss {result['ema_loss']:.3f}")

  # A checkpoint with an EMA does not resume into a run without one (and says so).
  no_ema = c.copy_and_resolve_references()
  with no_ema.unlocked():
    no_ema.ema.decay = 0.0
  with pytest.raises(CheckpointMismatchError, match='with a model EMA.*ema.decay'):
    trainer.train_and_evaluate(no_ema, str(tmp_path))


def _evaluate_flat(config, flat):
  """Top-1 / loss of the flat {'params/…', 'batch_stats/…'} weights on the eval split."""
  graphdef, template = abstract_model('resnet8', num_classes=C, mean=config.model.mean,
                                      std=config.model.std)
  tree = fill_template(template, flat, 'weights')
  step = jax.jit(make_eval_step(graphdef=graphdef))
  source = build_source(config.data, config.data.eval_split)
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return evaluate_lib.evaluate_source(step, {'student': tree['params']}, tree['batch_stats'],
                                      source, batch_size=config.eval_batch_size,
                                      data_sharding=sharding)


# ------------------------------------------------------------------------------ configs, table
def test_released_tikd_preset_has_main_py_s_ema_and_others_none():
  assert tikd_cifar100.get_config('large,hard,released').ema.decay == 0.99996
  assert tikd_cifar100.get_config('large,hard').ema.decay == 0.0


def test_best_metric_on_the_ema_needs_an_ema(tmp_path):
  with pytest.raises(ValueError, match="best_metric='ema_top1'.*ema.decay"):
    trainer.train_and_evaluate(_config('none', best_metric='ema_top1', mesh=ONE_DEVICE),
                               str(tmp_path))


def test_suite_table_has_an_ema_row_below_the_raw_one():
  import main  # pylint: disable=g-import-not-at-top  (its flags are defined once per process)
  row = dict(top1=80.0, top5=95.0, loss=0.5, num_params=1000)
  table = main._summary({'kd': dict(row, ema_top1=81.0, ema_top5=96.0, ema_loss=0.4), 'ce': row},
                        {})  # pylint: disable=protected-access
  lines = [line.split() for line in table.splitlines()[3:]]
  assert lines == [['kd', '1,000', '80.00', '95.00', '0.500', '1'],
                   ['kd', '(EMA)', '1,000', '81.00', '96.00', '0.400', '1'],
                   ['ce', '1,000', '80.00', '95.00', '0.500', '1']], table


# ------------------------------------------------------------------------------ --mode=eval, export
def _weights_only_copy(tmp_path, workdir) -> str:
  """The run's newest raw weights as a weights-only checkpoint (no model EMA)."""
  meta, flat = load_weights(str(workdir))
  _, template = abstract_model(meta['model']['name'], **meta['model']['kwargs'])
  nested = fill_template(template, flat, 'weights')
  save_weights(str(tmp_path / 'raw_only' / 'checkpoints'), nested, {'model': meta['model']})
  return str(tmp_path / 'raw_only')


def test_eval_mode_reports_the_ema_beside_the_raw_weights(tmp_path, capsys, straight_ema):
  """`main.py --mode=eval` on a checkpoint with an EMA: the ema_ metrics training reports (same
  names, same numbers at the final step), each the recomputation from the checkpoint's EMA
  weights, unlike the raw ones; --ema=off skips it, --ema=on refuses a checkpoint without one."""
  import main  # pylint: disable=g-import-not-at-top  (its flags are defined once per process)
  c, (workdir, trained) = straight_ema
  final = _checkpoint(workdir)
  assert final['step'] == STEPS
  ema = {k[len('ema/'):]: v for k, v in final['extra'].items() if k.startswith('ema/')}

  result = main.run(c, str(workdir), 'eval')  # --ema=auto
  assert {k for k in result if k.startswith('ema_')} == {k for k in trained if k.startswith('ema_')}
  assert {'ema_top1', 'ema_top5', 'ema_loss'} <= set(result)
  for prefix, weights in (('', final['model']), ('ema_', ema)):
    m = _evaluate_flat(c, weights)
    assert (result[prefix + 'top1'], result[prefix + 'loss']) == pytest.approx(
        (m['top1'], m['loss']), rel=1e-5), prefix
    assert (result[prefix + 'top1'], result[prefix + 'loss']) == pytest.approx(
        (trained[prefix + 'top1'], trained[prefix + 'loss']), rel=1e-5), prefix
  assert result['ema_loss'] != pytest.approx(result['loss'], rel=1e-3)
  assert capsys.readouterr().out.splitlines()[-2:] == evaluate_lib.format_evals(result).splitlines()
  assert evaluate_lib.format_evals(result).splitlines()[1].startswith('* EMA Acc@1 ')

  on = main.run(c, str(workdir), 'eval', 'on')
  assert on['ema_loss'] == result['ema_loss'] and on['loss'] == result['loss']
  off = main.run(c, str(workdir), 'eval', 'off')
  assert not any(k.startswith('ema_') for k in off) and off['loss'] == result['loss']

  raw_only = _weights_only_copy(tmp_path, workdir)
  assert not any(k.startswith('ema_') for k in main.run(c, raw_only, 'eval'))
  assert 'holds no model EMA' in capsys.readouterr().out  # config.ema.decay > 0: said so
  with pytest.raises(
      ValueError, match=r'--ema=on: the checkpoint in .*raw_only.* holds no model '
      r'EMA.*--ema=auto or --ema=off'):
    main.run(c, raw_only, 'eval', 'on')


def test_ema_flag_is_for_eval_mode_only(tmp_path):
  out = subprocess.run([
      sys.executable,
      os.path.join(REPO, 'main.py'), '--config=configs/tiny.py', f'--workdir={tmp_path}', '--ema=on'
  ], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and '--ema applies to --mode=eval' in out.stdout + out.stderr
  assert not os.listdir(tmp_path)  # nothing trained


def test_to_torch_exports_the_ema_on_request(tmp_path, capsys, straight_ema):
  """`convert.to_torch --weights=ema`: the state dict is the checkpoint's EMA, of the step asked
  for (the raw weights by default); the printed load calls are the raw export's; a checkpoint
  without an EMA is refused naming the option."""
  from convert import to_torch  # pylint: disable=g-import-not-at-top
  from convert.mapping import torch_to_flax  # pylint: disable=g-import-not-at-top
  workdir = straight_ema[1][0]

  def export(*args):
    path = to_torch.main(['--workdir', str(workdir), *args])
    return path, capsys.readouterr().out

  def flat_of(path):
    if path.endswith('.pt'):
      return {k: np.asarray(v) for k, v in torch_to_flax(torch.load(path)).items()}
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    with safe_open(path, framework='pt') as f:
      return dict(torch_to_flax({k: f.get_tensor(k) for k in f.keys()}),
                  weights=f.metadata()[to_torch.WEIGHTS_KEY])

  for step in (STEPS, 10):
    saved = _checkpoint(workdir, step)
    ema = {k[len('ema/'):]: v for k, v in saved['extra'].items() if k.startswith('ema/')}
    raw_path, raw_text = export('--step', str(step), '--out', str(tmp_path / f'raw{step}.pt'))
    ema_path, ema_text = export('--step', str(step), '--weights=ema', '--out',
                                str(tmp_path / f'ema{step}.pt'))
    got_raw, got_ema = flat_of(raw_path), flat_of(ema_path)
    assert got_ema.keys() == ema.keys() == got_raw.keys() and any('batch_stats' in k for k in ema)
    for k in ema:
      np.testing.assert_array_equal(got_ema[k], ema[k], err_msg=k)
      np.testing.assert_array_equal(got_raw[k], saved['model'][k], err_msg=k)
    assert max(np.abs(got_ema[k] - got_raw[k]).max() for k in ema) > 1e-3
    assert ema_text == raw_text.replace(raw_path, ema_path)  # the same load calls
  st, _ = export('--weights', 'ema', '--out', str(tmp_path / 'ema.safetensors'))
  assert flat_of(st)['weights'] == 'ema'

  raw_only = _weights_only_copy(tmp_path, workdir)
  with pytest.raises(
      ValueError, match=r'--weights=ema: the checkpoint in .*raw_only.* holds no '
      r'model EMA.*--weights=raw'):
    to_torch.main(['--workdir', raw_only, '--weights=ema', '--out', str(tmp_path / 'x.pt')])


def test_exported_vit_ema_loads_as_printed_and_gives_the_ema_s_logits(tmp_path, capsys):
  """A micro distilled ViT trained a few steps with an EMA: `--weights=ema` prints timm's
  VisionTransformerDistilled call (as the raw export does) and the twin's lines, which, run as
  printed, load the EMA strictly and give the Flax EMA weights' logits (not the raw ones')."""
  from convert import to_torch  # pylint: disable=g-import-not-at-top
  from tests.test_convert import (  # pylint: disable=g-import-not-at-top
      assert_close, flax_forward, images, torch_forward)
  c = _config('none', num_epochs=0.15, **{'ema.decay': DECAY})
  trainer.train_and_evaluate(c, str(tmp_path / 'run'))
  capsys.readouterr()  # the run's log lines
  saved = _checkpoint(tmp_path / 'run')
  ema = {k[len('ema/'):]: v for k, v in saved['extra'].items() if k.startswith('ema/')}

  texts = {}
  for weights in ('raw', 'ema'):
    path = to_torch.main([
        '--workdir',
        str(tmp_path / 'run'), f'--weights={weights}', '--out',
        str(tmp_path / f'{weights}.pt')
    ])
    texts[weights] = capsys.readouterr().out.replace(path, 'EXPORTED')
  assert texts['ema'] == texts['raw']
  assert 'model = timm.models.deit.VisionTransformerDistilled(' in texts['ema']
  twin_lines = texts['ema'][texts['ema'].index("# this repository's PyTorch twin"):]
  namespace = {}
  exec(twin_lines.replace('EXPORTED', str(tmp_path / 'ema.pt')), namespace)  # pylint: disable=exec-used
  x = images(size=c.data.image_size)
  twin_logits = torch_forward(namespace['model'].eval(), x)[0]
  logits = {}
  for name, flat in (('raw', saved['model']), ('ema', ema)):
    model = to_torch.build_flax_model(saved['meta']['model'])
    load_variables(model, flat)
    logits[name] = flax_forward(model, x)['logits']
  assert_close(logits['ema'], twin_logits, 'printed twin, EMA weights')
  assert np.abs(logits['raw'] - twin_logits).max() > 1e-3
