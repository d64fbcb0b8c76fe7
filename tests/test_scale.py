"""Scale out (issue 8): FSDP layout, two processes on one machine, bf16 compute.

One module fixture runs the two-process job (subprocesses, 4 fake devices each) while this
process runs the references: 1 device, then 8 devices with the FSDP layout; a bf16 run follows.
Every run stops (checkpointed) at step STOP of a 22-step (half-epoch) schedule, so resuming can
be checked too. Measured: ~180 s of CPU in all; keep it that small (2 shared cores).
SGD throughout: Adam turns float noise in zero-gradient parameters (the attention key bias) into
lr-sized steps, so only SGD trajectories compare at 1e-5 (see test_train).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.test_train import tiny_config
from tikd_jax import sharding as sharding_lib
from tikd_jax.data import build_source
from tikd_jax.data import pipeline
from tikd_jax.train import checkpoint as ckpt_lib
from tikd_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOP = 6  # of the 22 steps of num_epochs=0.5
FSDP = {'mesh': [('data', 4), ('fsdp', 2)], 'sharding_rules': [('.*', 'fsdp')]}
ONE_DEVICE = {'mesh': [('data', 1)], 'sharding_rules': []}
# The same settings as main.py flags (the two-process job) and as config overrides (in-process).
# drop_path 0: see test_process_shares_of_a_train_batch_are_contiguous_blocks_of_the_global_batch.
SETTINGS = {
    'num_epochs': 0.5, 'stop_at_step': STOP, 'checkpoint_every_steps': 100, 'log_every_steps': 1,
    'optimizer.name': 'sgd', 'schedule.lr': 0.05, 'model.drop_path': 0.0,
    'xla_options': 'fast_compile'
}
CHILD_TIMEOUT = 240


def scale_config(layout, **overrides):
  return tiny_config('none', **dict(SETTINGS, **layout, **overrides))


def _write_layout_config(path, layout) -> str:
  """A config file: configs/tiny.py with `layout` (config.mesh, a list, has no CLI override)."""
  with open(path, 'w') as f:
    f.write('from configs import tiny\n\n\ndef get_config():\n'
            "  c = tiny.get_config('none')\n" +
            ''.join(f'  c.{k} = {v!r}\n' for k, v in layout.items()) + '  return c\n')
  return str(path)


def _child_env(devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  env.pop('JAX_NUM_CPU_DEVICES', None)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _tail(path, n=3000) -> str:
  with open(path, errors='replace') as f:
    return f.read()[-n:]


class TwoProcessJob:
  """`main.py` as processes 0 and 1 of a 2-process job on 127.0.0.1, 4 fake devices each."""

  def __init__(self, workdir, layout):
    self.workdir = str(workdir)
    root = os.path.dirname(self.workdir)
    config = _write_layout_config(os.path.join(root, 'layout_config.py'), layout)
    port = _free_port()
    self.logs = [os.path.join(root, f'process_{i}.log') for i in (0, 1)]
    self.procs = []
    for i in (0, 1):
      cmd = [
          sys.executable,
          os.path.join(REPO, 'main.py'), f'--config={config}', f'--workdir={self.workdir}',
          f'--coordinator=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'
      ] + [f'--config.{k}={v}' for k, v in SETTINGS.items()]
      with open(self.logs[i], 'w') as log:
        self.procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=_child_env(4), stdout=log,
                             stderr=subprocess.STDOUT))
    self.returncodes = None

  def wait(self, timeout) -> list[int]:
    if self.returncodes is None:
      deadline = time.time() + timeout
      try:
        for p in self.procs:
          p.wait(timeout=max(deadline - time.time(), 1))
      except subprocess.TimeoutExpired:
        pass
      finally:
        self.kill()
      self.returncodes = [p.returncode for p in self.procs]
    return self.returncodes

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def describe(self) -> str:
    return '\n'.join(f'--- process {i} (exit {p.returncode}), log tail:\n{_tail(self.logs[i])}'
                     for i, p in enumerate(self.procs))


def _metric_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _train_losses(workdir) -> np.ndarray:
  return np.array([r['loss'] for r in _metric_rows(workdir) if r['kind'] == 'train'])


def _params(path):
  return ckpt_lib.load_weights(str(path))[1]


def _assert_params_close(a, b, atol=1e-5):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=1e-5, err_msg=k)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """{'two': TwoProcessJob, 'fsdp': workdir, 'one': workdir, results…}; the job overlaps."""
  assert jax.device_count() == 8
  root = tmp_path_factory.mktemp('scale')
  job = TwoProcessJob(root / 'two', FSDP)
  try:
    out = {'two': job}
    for name, layout in (('one', ONE_DEVICE), ('fsdp', FSDP)):
      out[name] = str(root / name)
      out[f'{name}_result'] = trainer.train_and_evaluate(scale_config(layout), out[name])
    job.wait(CHILD_TIMEOUT)
    yield out
  finally:
    job.kill()


# ------------------------------------------------------------------------------- FSDP layout


def test_fsdp_rules_split_the_largest_divisible_dimension():
  mesh = sharding_lib.make_mesh(FSDP['mesh'])
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2}
  tree = {
      'blocks': [{'mlp': {'fc1': {'kernel': np.zeros((32, 64)), 'bias': np.zeros(64)}}}],
      'patch_embed': {'kernel': np.zeros((4, 4, 3, 32))}, 'cls_token': np.zeros(
          (1, 1, 32)), 'odd': np.zeros((3, 5)), 'step': np.zeros(())
  }
  specs = jax.tree.map(lambda s: s.spec, sharding_lib.param_shardings(tree, mesh, [('.*', 'fsdp')]))
  assert specs['blocks'][0]['mlp']['fc1'] == {'kernel': P(None, 'fsdp'), 'bias': P('fsdp')}
  assert specs['patch_embed']['kernel'] == P(None, None, None, 'fsdp')
  assert specs['cls_token'] == P(None, None, 'fsdp')
  assert specs['odd'] == P() and specs['step'] == P()  # nothing divides: replicated
  # First matching rule wins; unmatched leaves are replicated.
  specs = jax.tree.map(
      lambda s: s.spec,
      sharding_lib.param_shardings(tree, mesh, [('bias$', 'replicate'), ('kernel$', 'fsdp')]))
  assert specs['blocks'][0]['mlp']['fc1'] == {'kernel': P(None, 'fsdp'), 'bias': P()}
  assert specs['cls_token'] == P()
  with pytest.raises(ValueError, match='fsdp'):
    sharding_lib.param_shardings(tree, mesh, [('.*', 'shard')])


@pytest.mark.slow
def test_fsdp_training_matches_one_device(runs):
  """Same losses and parameters as 1 device; the checkpoint holds the kernels split in two."""
  _assert_params_close(_params(runs['fsdp']), _params(runs['one']))
  np.testing.assert_allclose(_train_losses(runs['fsdp']), _train_losses(runs['one']), atol=1e-5)
  assert len(_train_losses(runs['one'])) == STOP
  assert abs(runs['fsdp_result']['loss'] - runs['one_result']['loss']) < 1e-4
  assert runs['fsdp_result']['step'] == STOP

  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.join(runs['fsdp'], 'checkpoints')
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                               item_handlers={'model': ocp.StandardCheckpointHandler()})
  saved = dict(mngr.item_metadata(STOP)['model'])
  mngr.close()
  fc1 = saved['params/blocks/0/mlp/fc1/kernel']
  assert fc1.shape == (32, 64)
  assert tuple(fc1.sharding.partition_spec) == (None, 'fsdp')
  assert fc1.storage.write_shape[1] == 32  # written in fsdp halves
  assert tuple(saved['params/blocks/0/attn/qkv/kernel'].sharding.partition_spec) == (None, 'fsdp')


def test_mesh_and_sharding_rules_can_be_set_on_the_command_line():
  # config_flags registers its --config.* overrides on absl's global FLAGS, as main.py uses them.
  code = ('import sys\n'
          'from absl import flags\n'
          'from ml_collections import config_flags\n'
          "c = config_flags.DEFINE_config_file('config', None, '', lock_config=True)\n"
          'flags.FLAGS(sys.argv)\n'
          'print([tuple(a) for a in c.value.mesh], [tuple(r) for r in c.value.sharding_rules])\n')
  proc = subprocess.run([
      sys.executable, '-c', code, f'--config={REPO}/configs/tiny.py',
      "--config.mesh=(('data', 4), ('fsdp', 2))", "--config.sharding_rules=(('kernel$', 'fsdp'),)"
  ], capture_output=True, text=True, timeout=120, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == "[('data', 4), ('fsdp', 2)] [('kernel$', 'fsdp')]"


# ------------------------------------------------------------------------------- two processes


def _assert_job_succeeded(runs):
  job = runs['two']
  assert job.wait(CHILD_TIMEOUT) == [0, 0], job.describe()


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
  _assert_job_succeeded(runs)
  two = runs['two'].workdir
  _assert_params_close(_params(two), _params(runs['fsdp']))
  with open(os.path.join(two, 'final_eval.json')) as f:
    final = json.load(f)
  assert final['count'] == 360 and final['step'] == STOP
  assert abs(final['loss'] - runs['fsdp_result']['loss']) < 1e-4, (final, runs['fsdp_result'])
  np.testing.assert_allclose(_train_losses(two), _train_losses(runs['fsdp']), atol=1e-5)
  # Both processes took their half of each global batch: one data-iterator state each.
  data_dir = os.path.join(two, 'checkpoints', str(STOP), 'data')
  assert sorted(os.listdir(data_dir)) == sorted(
      ['commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json'])


@pytest.mark.slow
def test_only_process_zero_writes_logs(runs):
  _assert_job_succeeded(runs)
  rows = _metric_rows(runs['two'].workdir)
  keys = [(r['kind'], r['step']) for r in rows]
  assert len(keys) == len(set(keys)), 'a step was logged twice: process 1 wrote metrics too'
  assert sorted(keys) == sorted([('train', s) for s in range(1, STOP + 1)] + [('eval', STOP)])
  logs = [_tail(path, 10**6) for path in runs['two'].logs]
  assert '* Acc@1' in logs[0] and '[step 1/22]' in logs[0]
  assert '[step ' not in logs[1] and 'starting fresh' not in logs[1]  # process 1 stays quiet


@pytest.mark.slow
def test_two_process_checkpoint_evaluates_in_one_single_device_process(runs):
  """Eval mode in this plain process (no jax.distributed) on 1 device of a 2-host checkpoint."""
  _assert_job_succeeded(runs)
  two = runs['two'].workdir
  with open(os.path.join(two, 'final_eval.json')) as f:
    final = json.load(f)
  result = trainer.evaluate_checkpoint(scale_config(ONE_DEVICE), two)
  assert result['count'] == 360 and result['step'] == STOP
  assert abs(result['loss'] - final['loss']) < 1e-4, (result, final)
  assert abs(result['top1'] - final['top1']) < 1e-6


@pytest.mark.slow
def test_two_process_checkpoint_resumes_training_in_one_process(runs, tmp_path):
  """Host count 2 → 1 and layout FSDP 4x2 → 1 device: the run goes on to the same result."""
  _assert_job_succeeded(runs)
  shutil.copytree(runs['two'].workdir, tmp_path / 'two')
  resumed = trainer.train_and_evaluate(scale_config(ONE_DEVICE, stop_at_step=STOP + 4),
                                       str(tmp_path / 'two'))
  shutil.copytree(runs['fsdp'], tmp_path / 'fsdp')  # the one-process run, carried on alike
  reference = trainer.train_and_evaluate(scale_config(FSDP, stop_at_step=STOP + 4),
                                         str(tmp_path / 'fsdp'))
  assert resumed['step'] == reference['step'] == STOP + 4
  _assert_params_close(_params(tmp_path / 'two'), _params(tmp_path / 'fsdp'))
  assert abs(resumed['loss'] - reference['loss']) < 1e-4


def test_process_shares_of_a_train_batch_are_contiguous_blocks_of_the_global_batch():
  source = build_source(tiny_config().data, 'train')
  whole = pipeline.train_dataset(source, batch_size=32, seed=0)[3]
  shares = [
      pipeline.train_dataset(source, batch_size=16, seed=0, process_index=p, process_count=2)[3]
      for p in (0, 1)
  ]
  joined = {k: np.concatenate([s[k] for s in shares]) for k in whole}
  assert sorted(joined['index']) == sorted(whole['index'])  # the same examples (holds today)
  # make_array_from_process_local_data puts process p's rows at [16p, 16p + 16).
  for k in whole:
    np.testing.assert_array_equal(joined[k], whole[k], err_msg=k)


# ------------------------------------------------------------------------------- bf16


@pytest.mark.slow
def test_bfloat16_compute_stays_close_to_float32_with_float32_parameters(runs, tmp_path):
  result = trainer.train_and_evaluate(scale_config(ONE_DEVICE, dtype='bfloat16'),
                                      str(tmp_path / 'bf16'))
  f32 = runs['one_result']
  bf16_losses, f32_losses = _train_losses(tmp_path / 'bf16'), _train_losses(runs['one'])
  assert len(bf16_losses) == len(f32_losses) == STOP
  assert np.max(np.abs(bf16_losses - f32_losses)) < 0.01, (bf16_losses, f32_losses)
  assert abs(result['loss'] - f32['loss']) < 0.05, (result, f32)
  params, reference = _params(tmp_path / 'bf16'), _params(runs['one'])
  assert {str(v.dtype) for v in params.values()} == {'float32'}
  # bf16 really was used (results differ), and only by rounding-sized amounts.
  diffs = {k: float(np.max(np.abs(params[k] - reference[k]))) for k in params}
  assert max(diffs.values()) > 1e-6, diffs
  assert max(diffs.values()) < 5e-3, diffs  # seen: 4e-4 after 6 steps
