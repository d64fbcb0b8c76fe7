"""Exact resume beyond method `none` (docs/reliability.md, "Exact resume").

Each scenario stops a tiny run mid-epoch, off the checkpoint cadence (`stop_at_step`, or a real
SIGTERM to `main.py`), resumes it, and compares it with an uninterrupted run, bit for bit: every
array of the final checkpoint (student params and batch stats, the objective's params and carried
state, the optimizer state), its metadata (phase, input position), every step's train metrics and
the final evaluation. Scenarios: hard KD from a trained teacher with DeiT's augmentations
(RandAugment on the host, erasing + mixup/cutmix in the step), PKCD (carried previous batch; also
through a real SIGTERM), CTKD (trained temperature), TIKD across its stage switch, IRKD across a
resolution change with the optimizer re-created (and IRKD's hidden and attention dropout).

Runs use one CPU device: compiles dominate their runtime, and resume on 8 devices is covered by
tests/test_train.py (method none).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import common
from tikd_jax.data import build_source
from tikd_jax.models import build_model
from tikd_jax.models.variables import model_variables
from tikd_jax.train import checkpoint as ckpt_lib
from tikd_jax.train import preemption
from tikd_jax.train import trainer
from tests.method_loss import method_loss
from tikd_jax.tree import flatten
from tests.test_train import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITEMS = ('model', 'extra', 'optimizer')
# 44 steps per epoch; runs of 0.5 epoch (22 steps), checkpoints every 10: a stop at 13 is
# mid-epoch and between checkpoints, so the resume needs the saved input position exactly.
STEPS = 22
STOP = 13
ONE_DEVICE = (('data', 1),)
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def _config(arg, **overrides):
  overrides = dict(
      dict(mesh=ONE_DEVICE, num_epochs=0.5, checkpoint_every_steps=10, log_every_steps=1),
      **overrides)
  return tiny_config(arg, **overrides)


def _with(config, **changes):
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.update(changes)
  return c


# ------------------------------------------------------------------------------- reading runs


def _checkpoint(workdir, step=None) -> dict:
  """Every array of a saved step as NumPy ({item: {flat path: array}}), its step and meta."""
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  step = step if step is not None else max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  step_dir = os.path.join(ckpt_dir, str(step))
  handler = ocp.CompositeCheckpointHandler(
      meta=ocp.JsonCheckpointHandler(), data=grain.checkpoint.CheckpointHandler(),
      **{item: ocp.StandardCheckpointHandler() for item in ITEMS})
  checkpointer = ocp.Checkpointer(handler)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  saved = checkpointer.metadata(step_dir).item_metadata
  targets = {
      item:
          jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                       saved[item].tree) for item in ITEMS
  }
  restored = checkpointer.restore(
      step_dir,
      args=ocp.args.Composite(meta=ocp.args.JsonRestore(),
                              **{k: ocp.args.StandardRestore(t) for k, t in targets.items()}))
  checkpointer.close()
  out = {item: {k: np.asarray(v) for k, v in flatten(restored[item]).items()} for item in ITEMS}
  return dict(out, step=step, meta=dict(restored['meta']))


def _train_rows(workdir) -> dict:
  """{step: train metrics}; a resumed run appends to metrics.jsonl, and a step logged twice (a
  rerun that started over instead of resuming) fails here."""
  rows = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      if row['kind'] == 'train':
        assert row['step'] not in rows, f'step {row["step"]} was trained twice in {workdir}'
        rows[row['step']] = {k: v for k, v in row.items() if k != 'time'}
  return rows


def _assert_same_run(straight, resumed_dir, resumed_result):
  """The resumed run equals the uninterrupted one: final checkpoint, metrics, evaluation."""
  straight_dir, straight_result = straight
  # Every step's metrics first: a failure names the first step that went another way.
  rows_a, rows_b = _train_rows(straight_dir), _train_rows(resumed_dir)
  assert rows_a.keys() == rows_b.keys() == set(range(1, straight_result['step'] + 1))
  first = next((s for s in sorted(rows_a) if rows_a[s] != rows_b[s]), None)
  assert first is None, f'train metrics differ from step {first}: {rows_a[first]} vs {rows_b[first]}'
  a, b = _checkpoint(straight_dir), _checkpoint(resumed_dir)
  assert a['step'] == b['step'] == straight_result['step']
  for item in ITEMS:
    assert a[item].keys() == b[item].keys(), item
    differ = [k for k in a[item] if not np.array_equal(a[item][k], b[item][k])]
    assert not differ, f'{item} differs from the uninterrupted run in {len(differ)}: {differ[:8]}'
  for key in ('phase', 'epoch', 'data', 'checksums'):
    assert a['meta'][key] == b['meta'][key], key
  assert resumed_result == straight_result


def _stop_and_resume(config, workdir, stops) -> dict:
  """Runs `config` in `workdir` stopping (checkpointed) at each of `stops`, then to the end."""
  for stop in stops:
    assert trainer.train_and_evaluate(_with(config, stop_at_step=stop),
                                      str(workdir))['step'] == stop
    assert _checkpoint(workdir)['step'] == stop
  return trainer.train_and_evaluate(config, str(workdir))


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  """A resnet8 teacher trained for one epoch on the digits."""
  workdir = str(tmp_path_factory.mktemp('teacher'))
  c = tiny_config('teacher', num_epochs=1.0, checkpoint_every_steps=100, mesh=ONE_DEVICE)
  assert trainer.train_and_evaluate(c, workdir)['top1'] > 20.0  # far above chance (10%)
  return workdir


@pytest.fixture(scope='module')
def text_features(tmp_path_factory):
  """Synthetic caption features of the digits train split: one random 24-d row per example (so a
  batch taken from the wrong position gets other rows), with the metadata the loader checks."""
  source = build_source(tiny_config().data, 'train')
  out = tmp_path_factory.mktemp('text')
  features = np.random.default_rng(0).standard_normal((len(source), 24)).astype(np.float32)
  np.save(out / 'features.npy', features)
  meta = {
      'dim': 24, 'dtype': 'float32', 'num_examples': len(source),
      'dataset': {'name': source.name, 'split': source.split, 'fingerprint': source.fingerprint()}
  }
  (out / 'meta.json').write_text(json.dumps(meta))
  return str(out)


@pytest.fixture(scope='module')
def vit_teacher(tmp_path_factory):
  """A micro ViT teacher for IRKD's saliency alignment, saved as a converted checkpoint would be:
  random weights drawn in NumPy (building the model eagerly costs seconds of op compiles)."""
  kwargs = dict(variant='micro', img_size=16, num_classes=10, mean=common.DIGITS_MEAN,
                std=common.DIGITS_STD)
  shapes = model_variables(nnx.eval_shape(lambda: build_model('vit', rngs=nnx.Rngs(0), **kwargs)))
  rng = np.random.default_rng(7)

  def draw(path, x):  # LayerNorm scales 1, every other weight small and random
    if path[-1].key == 'scale':
      return np.ones(x.shape, x.dtype)
    return (0.05 * rng.standard_normal(x.shape)).astype(x.dtype)

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  path = str(tmp_path_factory.mktemp('vit_teacher'))
  ckpt_lib.save_weights(path, variables, {'model': {'name': 'vit', 'kwargs': kwargs}})
  return path


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """Uninterrupted runs, one per scenario, shared by the tests that resume it."""
  runs = {}

  def run(name, config):
    if name not in runs:
      workdir = tmp_path_factory.mktemp(f'straight_{name}')
      runs[name] = workdir, trainer.train_and_evaluate(config, str(workdir))
    return runs[name]

  return run


def _kd(method, teacher_dir, **overrides):
  return _config(method, **{'teacher.checkpoint': teacher_dir}, **overrides)


def _tikd(text_features):
  c = _config('none', **{'text.features_dir': text_features})
  with c.unlocked():
    common.tikd_stages(c, warmup_epochs=0.25, joint_epochs=0.25)  # switch at step 11
  return c


def _irkd(vit_teacher):
  return _config(
      'kd', **{
          'model.name': 'irkd_vit', 'model.drop_path': 0.0, 'model.dropout': 0.1,
          'model.attn_dropout': 0.1, 'teacher.name': 'vit', 'teacher.variant': 'micro',
          'teacher.img_size': 16, 'teacher.checkpoint': vit_teacher, 'saliency.kind': 'attention',
          'curriculum.stages': [(8, 0.25), (16, 0.25)], 'curriculum.reset_optimizer': True
      })  # resolution 8 → 16 at step 11


# ------------------------------------------------------------------------------- scenarios


@pytest.mark.parametrize('randaugment_on', ['host', 'device'])
def test_hard_kd_with_deit_augmentations_resumes_mid_epoch(tmp_path, teacher_dir, straight,
                                                           randaugment_on):
  """TIKD's headline recipe: hard KD from a trained teacher, RandAugment on the host (a function
  of the example's position) or in the step, random erasing and Mixup/CutMix in the step (of the
  step number)."""
  c = _kd('hard', teacher_dir, **{'augment.randaugment_on': randaugment_on})
  with c.unlocked():
    common.deit_augment(c)
  reference = straight(f'hard_deit_{randaugment_on}', c)
  _assert_same_run(reference, tmp_path, _stop_and_resume(c, tmp_path, [STOP]))
  assert 'distill_loss' in _train_rows(tmp_path)[STOP + 1]


def test_pkcd_previous_batch_is_checkpointed_and_restored(tmp_path, teacher_dir, straight):
  c = _kd('pkcd', teacher_dir)
  reference = straight('pkcd', c)
  trainer.train_and_evaluate(_with(c, stop_at_step=STOP), str(tmp_path))
  carried = _checkpoint(tmp_path)['extra']
  # The previous batch of step STOP is in the checkpoint (not the zeros / −1 / False of a fresh
  # state), so a resume that reset it would start step STOP + 1 with another loss.
  assert bool(carried['objective_state/pkcd/valid'])
  assert np.all(carried['objective_state/pkcd/prev_labels'] >= 0)
  assert np.any(carried['objective_state/pkcd/prev_teacher_logits'] != 0)
  _assert_same_run(reference, tmp_path, trainer.train_and_evaluate(c, str(tmp_path)))


def test_ctkd_temperature_and_its_optimizer_state_resume_exactly(tmp_path, teacher_dir, straight):
  c = _kd('ctkd', teacher_dir)
  reference = straight('ctkd', c)
  _assert_same_run(reference, tmp_path, _stop_and_resume(c, tmp_path, [STOP]))
  final = _checkpoint(tmp_path)
  name = 'ctkd/raw_temperature'
  # The temperature was trained (moved from its initial value) and has Adam moments of its own.
  initial = method_loss(c.distill).init(jax.random.key(0), {})[0]['ctkd']['raw_temperature']
  assert final['extra'][f'objective/{name}'] != float(initial)
  moments = [k for k in final['optimizer'] if k.endswith(f'objective/{name}')]
  assert len(moments) == 2 and all(np.all(final['optimizer'][k] != 0) for k in moments), moments


@pytest.mark.parametrize('stop', [7, 11], ids=['before_switch', 'at_switch'])
def test_tikd_resumes_across_its_stage_switch(tmp_path, text_features, straight, stop):
  c = _tikd(text_features)
  reference = straight('tikd', c)
  assert 'top1_no_text' in reference[1]  # the run ended in the fused (joint) stage
  _assert_same_run(reference, tmp_path, _stop_and_resume(c, tmp_path, [stop]))
  rows = _train_rows(tmp_path)
  assert 'alignment_loss' not in rows[11] and 'alignment_loss' in rows[12]  # the switch


@pytest.mark.parametrize('stops', [(7, 15), (11,)], ids=['mid_stages', 'at_change'])
def test_irkd_resumes_across_a_resolution_change(tmp_path, vit_teacher, straight, stops):
  c = _irkd(vit_teacher)
  reference = straight('irkd', c)
  _assert_same_run(reference, tmp_path, _stop_and_resume(c, tmp_path, stops))
  rows = _train_rows(tmp_path)
  assert [rows[s]['resolution'] for s in (1, 11, 12, STEPS)] == [8, 8, 16, 16]


# ------------------------------------------------------------------------------- a real signal


@pytest.mark.slow
def test_sigterm_to_main_py_resumes_pkcd_exactly(tmp_path, teacher_dir, straight):
  """`python main.py` (PKCD) gets SIGTERM mid-epoch; with no periodic checkpoint before it, the
  run must resume from the one written at the stop (exit 75), and the rerun equals the
  uninterrupted run bit for bit."""
  c = _kd('pkcd', teacher_dir)
  reference = straight('pkcd', c)
  workdir = tmp_path / 'run'
  args = [
      '--config=configs/tiny.py:pkcd',
      f'--config.teacher.checkpoint={teacher_dir}',
      '--config.num_epochs=0.5',
      '--config.log_every_steps=1',
      '--config.checkpoint_every_steps=100',
      "--config.mesh=(('data',1),)",
      '--config.xla_options=fast_compile',  # as tiny_config compiles the in-process runs
      f'--workdir={workdir}'
  ]
  log_path = tmp_path / 'main.log'
  with open(log_path, 'w') as log:
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'main.py')] + args, cwd=REPO,
                            env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 300
  while not (metrics.exists() and '"step": 3,' in metrics.read_text()):  # step 3 is done
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      pytest.fail(f'main.py did not reach step 3:\n{log_path.read_text()[-3000:]}')
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == preemption.EXIT_PREEMPTED, log_path.read_text()[-3000:]
  out = log_path.read_text()
  stopped = int(re.search(r'stopped by SIGTERM at step (\d+)', out).group(1))
  assert 3 <= stopped < STEPS, stopped
  saved = _checkpoint(workdir)
  assert saved['step'] == stopped and saved['meta']['data']['start'] == 0
  assert sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit()) == [stopped]
  assert bool(saved['extra']['objective_state/pkcd/valid'])
  _assert_same_run(reference, workdir, trainer.train_and_evaluate(c, str(workdir)))
