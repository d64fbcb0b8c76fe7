"""The trainer end to end on digits: steps, sharding, evaluation, resume, bad input."""
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tiny
from tikd_jax.data import build_source
from tikd_jax.models import build_model
from tikd_jax.models.variables import model_variables
from tikd_jax.train import checkpoint as ckpt_lib
from tikd_jax.train import trainer
from tests.method_loss import method_loss
from tikd_jax.train.state import init_train_state
from tikd_jax.train.step import StepOptions, make_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(arg='none', **overrides):
  """configs/tiny.py with overrides; compiled with the 'fast_compile' XLA:CPU preset unless a test
  names another (the tiny steps compile for longer than they run; tests/test_xla_options.py checks
  that every preset computes what the default does)."""
  c = tiny.get_config(arg)
  overrides.setdefault('xla_options', 'fast_compile')
  with c.unlocked():
    for key, value in overrides.items():
      node = c
      *path, last = key.split('.')
      for p in path:
        node = node[p]
      node[last] = value
  return c


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('teacher'))
  result = trainer.train_and_evaluate(tiny_config('teacher', num_epochs=2.0), workdir)
  assert result['top1'] > 30.0, result  # a real teacher, far above chance (10%)
  return workdir


def test_step_lowers_loss_on_a_fixed_batch():
  model = build_model('distilled_vit', variant='micro', img_size=16, num_classes=10, drop_path=0.0,
                      rngs=nnx.Rngs(0))
  graphdef, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
  variables = model_variables(model)
  tx = optax.adam(3e-3)
  objective = method_loss(tiny_config().distill)
  state = init_train_state(variables, objective, tx, rng=jax.random.key(0),
                           shapes={'rows': 32, 'num_classes': 10})
  step = jax.jit(
      make_train_step(graphdef=graphdef, teacher_graphdef=None, loss=objective, tx=tx,
                      frozen_mask=None, opts=StepOptions(num_classes=10, steps_per_epoch=10,
                                                         seed=0)))
  source = build_source(tiny_config().data, 'train')
  batch = {'image': jnp.asarray(source.images[:32]), 'label': jnp.asarray(source.labels[:32])}
  losses = []
  for _ in range(60):
    state, metrics = step(state, batch, None)
    losses.append(float(metrics['loss']))
  assert losses[0] > 2.0
  assert losses[-1] < 0.4 * losses[0], losses
  assert int(state.step) == 60


def _final_params(workdir):
  _, flat = ckpt_lib.load_weights(workdir)
  return flat


def test_eight_devices_match_one_device(tmp_path):
  assert jax.device_count() == 8
  results = {}
  for name, mesh in (('one', [('data', 1)]), ('eight', [('data', -1)])):
    # SGD: Adam divides by sqrt(v), turning float noise in zero-gradient parameters (the key
    # bias of attention, whose gradient is exactly 0 by softmax shift-invariance) into lr-sized
    # steps, so its trajectories cannot be compared at 1e-5.
    c = tiny_config('none', num_epochs=0.25, mesh=mesh, checkpoint_every_steps=100,
                    **{'optimizer.name': 'sgd', 'schedule.lr': 0.05})
    results[name] = trainer.train_and_evaluate(c, str(tmp_path / name))
  one, eight = _final_params(tmp_path / 'one'), _final_params(tmp_path / 'eight')
  assert one.keys() == eight.keys()
  for k in one:
    np.testing.assert_allclose(one[k], eight[k], atol=1e-5, rtol=1e-5, err_msg=k)
  assert abs(results['one']['loss'] - results['eight']['loss']) < 1e-4


def test_evaluation_counts_every_example_once(tmp_path, teacher_dir):
  c = tiny_config('teacher')
  source = build_source(c.data, 'test')
  meta, flat = ckpt_lib.load_weights(teacher_dir)
  # 360 examples in batches of 64: the last batch is padded; every example counts once.
  result = trainer.evaluate_checkpoint(c, teacher_dir)
  assert result['count'] == 360
  model = build_model('resnet8', rngs=nnx.Rngs(0), **meta['model']['kwargs'])
  from tikd_jax.models.variables import load_variables
  load_variables(model, flat)
  logits, _ = model(jnp.asarray(source.images, jnp.float32) / 255.0, train=False)
  expected_top1 = 100.0 * float(np.mean(np.argmax(np.asarray(logits), -1) == source.labels))
  expected_loss = float(
      optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(source.labels)).mean())
  assert abs(result['top1'] - expected_top1) < 1e-6
  assert abs(result['loss'] - expected_loss) < 1e-4


def test_hard_distillation_from_a_trained_teacher(tmp_path, teacher_dir):
  c = tiny_config('hard', **{'teacher.checkpoint': teacher_dir})
  result = trainer.train_and_evaluate(c, str(tmp_path / 'student'))
  assert result['count'] == 360 and np.isfinite(result['loss'])
  rows = [json.loads(l) for l in open(tmp_path / 'student' / 'metrics.jsonl')]
  train = [r for r in rows if r['kind'] == 'train']
  assert 'distill_loss' in train[0] and np.isfinite(train[-1]['distill_loss'])
  assert train[-1]['loss'] < train[0]['loss']
  assert os.path.exists(tmp_path / 'student' / 'tensorboard')
  assert json.load(open(tmp_path / 'student' / 'config.json'))['distill']['method'] == 'hard'
  # cpu_fast_layers changes how the layers lower, not the model: never saved as a model argument.
  meta, _ = ckpt_lib.load_weights(str(tmp_path / 'student'))
  assert 'fast_layers' not in meta['model']['kwargs'], meta['model']


def test_teacher_checkpoint_that_does_not_fit_fails_with_the_keys(tmp_path, teacher_dir):
  c = tiny_config('hard', **{'teacher.checkpoint': teacher_dir, 'teacher.name': 'resnet8x4'})
  with pytest.raises(ValueError, match=r'(?s)teacher checkpoint .* resnet8x4.*mis-shaped keys'):
    trainer.train_and_evaluate(c, str(tmp_path / 'x'))


def test_missing_teacher_checkpoint_says_what_to_set(tmp_path):
  with pytest.raises(ValueError, match='teacher.checkpoint'):
    trainer.train_and_evaluate(tiny_config('hard'), str(tmp_path / 'x'))


def test_unknown_names_fail_loudly(tmp_path):
  with pytest.raises(ValueError, match='unknown model'):
    trainer.train_and_evaluate(tiny_config('none', **{'model.name': 'vit_huge'}),
                               str(tmp_path / 'a'))
  with pytest.raises(ValueError, match='unknown distillation method'):
    trainer.train_and_evaluate(tiny_config('none', **{'distill.method': 'fitnet'}),
                               str(tmp_path / 'b'))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, teacher_dir):
  workdir = str(tmp_path / 'run')
  shutil.copytree(teacher_dir, workdir)  # a finished 2-epoch run, continued to 3 with lr NaN
  good = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints')).latest_step()
  before = _final_params(workdir)
  c = tiny_config('teacher', num_epochs=3.0, **{'schedule.lr': float('nan')})
  with pytest.raises(trainer.NonFiniteLossError, match=f'last good checkpoint \\(step {good}\\)'):
    trainer.train_and_evaluate(c, workdir)
  assert ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints')).latest_step() == good
  after = _final_params(workdir)
  assert all(np.array_equal(before[k], after[k]) for k in before)


def test_resume_with_another_worker_count_continues_the_same_stream(tmp_path, teacher_dir, capfd):
  """grain's iterator state belongs to one worker layout; another one resumes by position (batch
  k of the run is element k of the stream) and reaches the uninterrupted run's parameters."""
  workdir = str(tmp_path / 'run')
  c = tiny_config('teacher', num_epochs=2.0, stop_at_step=13)
  assert trainer.train_and_evaluate(c, workdir)['step'] == 13
  meta = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints')).read_meta(13)
  assert meta['data'] == {'start': 0, 'processes': 1, 'workers': 0}
  c = tiny_config('teacher', num_epochs=2.0, **{'data.num_workers': 1})
  trainer.train_and_evaluate(c, workdir)
  assert 'with 0 input worker(s), this run has 1 with 1: the input stream resumes by position' in (
      capfd.readouterr().out)
  a, b = _final_params(teacher_dir), _final_params(workdir)
  assert a.keys() == b.keys()
  assert all(
      np.array_equal(a[k], b[k]) for k in a), [k for k in a if not np.array_equal(a[k], b[k])]


def _main(args, **kw):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run([sys.executable, os.path.join(REPO, 'main.py')] + args, cwd=REPO, env=env,
                        capture_output=True, text=True, **kw)


def test_misspelt_override_fails_loudly(tmp_path):
  proc = _main(['--config=configs/tiny.py', f'--workdir={tmp_path}', '--config.optimzer.lr=0.1'],
               timeout=120)
  assert proc.returncode != 0
  assert 'optimzer' in proc.stderr


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parameters(tmp_path):
  """SIGKILL after a checkpoint, restart: final parameters equal an uninterrupted run's."""
  args = ['--config=configs/tiny.py', '--config.num_epochs=2']
  straight = _main(args + [f'--workdir={tmp_path / "straight"}'], timeout=600)
  assert straight.returncode == 0, straight.stderr[-2000:]

  workdir = tmp_path / 'killed'
  proc = subprocess.Popen(
      [sys.executable, os.path.join(REPO, 'main.py')] + args + [f'--workdir={workdir}'], cwd=REPO,
      env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1'),
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = workdir / 'checkpoints'
  import time
  deadline = time.time() + 300
  while time.time() < deadline:
    steps = [d for d in os.listdir(ckpt_dir) if d.isdigit()] if ckpt_dir.exists() else []
    if any(int(s) >= 30 for s in steps):
      break
    time.sleep(0.05)
  proc.kill()
  proc.wait()
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert steps and steps[-1] < 88, steps  # killed mid-run
  resumed = _main(args + [f'--workdir={workdir}'], timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'resumed at step' in resumed.stdout + resumed.stderr
  a, b = _final_params(tmp_path / 'straight'), _final_params(workdir)
  assert a.keys() == b.keys()
  assert all(
      np.array_equal(a[k], b[k]) for k in a), [k for k in a if not np.array_equal(a[k], b[k])]


def test_loading_weights_prints_no_orbax_warnings(teacher_dir, caplog):
  """Eval and convert.to_torch read checkpoints through load_weights: orbax must not warn the
  user about the items it is not asked for (issue: 'Item "metrics" … could not be restored')."""
  with caplog.at_level(logging.WARNING):
    meta, flat = ckpt_lib.load_weights(teacher_dir)
  assert meta['step'] > 0 and flat
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
