"""Faults: preemption signals, kills at any moment, damaged checkpoints, a full disk.

End to end (`main.py --config=configs/tiny.py` subprocesses on 1 CPU device): a SIGTERM stop and
its rerun; SIGKILLs at three points (during a checkpoint write, while an old step is dropped,
during the final write), each followed by a restart, then a truncated newest checkpoint; a disk
that fills during a background write. Every resumed run ends with the parameters of an
uninterrupted run, bit for bit. In process: each file of a checkpoint damaged in turn, checksum
mismatches, disk full at once / in the background / on a real 1 MiB tmpfs (when one can be
mounted), the signal handler and the multi-host stop agreement. The faults injected are counted
in the pytest summary.

The children share a JAX compilation cache (one compile for the module): the programs are the
same, so the cache changes start-up time only.
"""
import collections
import errno
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.test_train import _final_params
from tikd_jax.train import checkpoint as ckpt_lib
from tikd_jax.train import preemption
from tikd_jax.train.checkpoint_integrity import UnreadableCheckpointError
from tikd_jax.tree import CheckpointMismatchError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ['--config=configs/tiny.py']  # 44 steps; checkpoints every 10 steps and at 44
TOTAL_STEPS = 44
FAULTS = collections.Counter()  # what was injected, for the summary
# A restore that fails midway leaves tensorstore reads in flight; they call back into orbax's
# already-closed event loop ("Event loop is closed"): noise, not a failure.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


class _FaultSummary:
  """A pytest plugin registered by the module fixture: prints FAULTS at the end of the run."""

  def pytest_terminal_summary(self, terminalreporter):
    if FAULTS:
      terminalreporter.write_sep('-', 'fault injections (tests/test_faults.py)')
      for kind, n in sorted(FAULTS.items()):
        terminalreporter.write_line(f'{n:4d}  {kind}')
      terminalreporter.write_line(f'{sum(FAULTS.values()):4d}  in all')


@pytest.fixture(scope='module', autouse=True)
def _report_faults(request):
  plugin = _FaultSummary()
  request.config.pluginmanager.register(plugin, 'tikd_fault_summary')


# ------------------------------------------------------------------------------- subprocess helpers


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  return tmp_path_factory.mktemp('faults')


def _env(base):
  return dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
              JAX_COMPILATION_CACHE_DIR=str(base / 'jax_cache'),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


class Child:
  """`main.py` on `workdir`, output to a log file (no pipe to fill while we poll)."""

  def __init__(self, workdir, base, args=(), prelude=None):
    """`prelude`: Python code run before main.py in the same process (to inject a fault)."""
    self.workdir = workdir
    self.ckpt_dir = workdir / 'checkpoints'
    n = len(glob.glob(f'{workdir}.*.log'))
    self.log_path = f'{workdir}.{n}.log'
    command = [sys.executable, os.path.join(REPO, 'main.py')]
    if prelude:
      command = [sys.executable, '-c', prelude + _RUN_MAIN]
    with open(self.log_path, 'w') as log:
      self.proc = subprocess.Popen(command + ARGS + list(args) + [f'--workdir={workdir}'], cwd=REPO,
                                   env=_env(base), stdout=log, stderr=subprocess.STDOUT)

  def output(self) -> str:
    with open(self.log_path) as f:
      return f.read()

  def wait(self, timeout=300) -> int:
    return self.proc.wait(timeout=timeout)

  def signal_when(self, predicate, sig, timeout=300) -> set:
    """Sends `sig` as soon as the checkpoint folder listing satisfies `predicate`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
      names = set(os.listdir(self.ckpt_dir)) if self.ckpt_dir.is_dir() else set()
      if predicate(names):
        self.proc.send_signal(sig)
        self.proc.wait(timeout=timeout)
        return names
      if self.proc.poll() is not None:
        raise AssertionError(f'the run ended before the fault point:\n{self.output()[-3000:]}')
      time.sleep(0.001)
    self.proc.kill()
    raise AssertionError(f'fault point not reached in {timeout}s:\n{self.output()[-3000:]}')


_RUN_MAIN = """
import runpy, sys
sys.argv[0] = 'main.py'
runpy.run_path('main.py', run_name='__main__')
"""


def _run_to_end(workdir, base) -> str:
  child = Child(workdir, base)
  assert child.wait() == 0, child.output()[-3000:]
  return child.output()


def _steps(names) -> set:
  return {int(n) for n in names if n.isdigit()}


def _writing(names) -> set:
  """Steps whose orbax write is in flight (`<step>.orbax-checkpoint-tmp…` folders)."""
  return {int(n.split('.')[0]) for n in names if '.orbax-checkpoint-tmp' in n}


def _listing(ckpt_dir) -> set:
  return set(os.listdir(ckpt_dir))


def _metric_rows(workdir) -> dict:
  """The last row per (kind, step): rows repeated after a resume are told apart by step."""
  rows = {}
  with open(workdir / 'metrics.jsonl') as f:
    for line in f:
      row = json.loads(line)
      rows[row['kind'], row['step']] = row
  return rows


def _assert_same_params(reference, workdir):
  got = _final_params(workdir)
  assert got.keys() == reference['params'].keys()
  differ = [k for k in got if not np.array_equal(got[k], reference['params'][k])]
  assert not differ, f'parameters differ from the uninterrupted run: {differ}'


@pytest.fixture(scope='module')
def reference(base):
  """The uninterrupted run every interrupted one must reproduce bit for bit."""
  workdir = base / 'reference'
  _run_to_end(workdir, base)
  return {'params': _final_params(workdir), 'metrics': _metric_rows(workdir)}


def _truncate_arrays(step_dir) -> int:
  """Cuts every array data file of the model and optimizer items to half its length."""
  paths = [
      p for item in ('model', 'optimizer')
      for p in glob.glob(str(step_dir / item / '**' / 'd' / '*'), recursive=True)
  ]
  for path in paths:
    os.truncate(path, os.path.getsize(path) // 2)
  return len(paths)


# --------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_it_stopped_at_and_resumes_exactly(base, reference):
  workdir = base / 'sigterm'
  child = Child(workdir, base)
  # Once step 20 is being written (so the stop falls between checkpoints, after ≥ 2 of them).
  child.signal_when(lambda names: any(s >= 20 for s in _writing(names) | _steps(names)),
                    signal.SIGTERM)
  FAULTS['SIGTERM, then resume'] += 1
  out = child.output()
  assert child.proc.returncode == preemption.EXIT_PREEMPTED == 75, out[-3000:]
  assert 'received SIGTERM' in out and 'Rerun the same command to resume' in out
  stopped = int(re.search(r'stopped by SIGTERM at step (\d+)', out).group(1))
  assert 20 <= stopped < TOTAL_STEPS
  names = _listing(child.ckpt_dir)
  assert max(_steps(names)) == stopped and not _writing(names), names
  # The metrics of the steps before the stop were written before exiting.
  assert ('train', stopped) in _metric_rows(workdir)

  out = _run_to_end(workdir, base)
  assert f'resumed at step {stopped}' in out
  _assert_same_params(reference, workdir)


@pytest.mark.slow
def test_sigkill_at_three_points_and_a_truncated_checkpoint_resume_exactly(base, reference):
  """Kill (1) during the first checkpoint write, (2) while the oldest step is being dropped
  after step 40 was committed, (3) during the final write; restart after each. Before the last
  restart, truncate the newest checkpoint's array files: it is reported and the previous one
  resumed. The final parameters and metrics equal the uninterrupted run's."""
  workdir = base / 'killed'
  ckpt_dir = workdir / 'checkpoints'

  # 1. During the first write: nothing complete yet, a temporary folder left behind.
  at_kill = Child(workdir, base).signal_when(lambda names: _writing(names), signal.SIGKILL)
  FAULTS['SIGKILL during a checkpoint write'] += 1
  left = _listing(ckpt_dir)
  leftover_tmp = {n for n in left if '.orbax-checkpoint-tmp' in n}
  assert leftover_tmp and not _steps(left), (at_kill, left)

  # 2. Restart: the leftover is ignored (fresh start) and removed; kill while an old step is
  # dropped (renamed into _deleted/), or right after step 40 is committed.
  child = Child(workdir, base)
  at_kill = child.signal_when(lambda names: ckpt_lib._DELETED in names or 40 in _steps(names),
                              signal.SIGKILL)
  FAULTS['SIGKILL after a commit, while the oldest step is dropped'] += 1
  assert 'starting fresh' in child.output()
  left = _listing(ckpt_dir)
  assert not leftover_tmp & left, left
  for step in _steps(left):  # every step folder that exists is complete
    assert ckpt_lib.load_weights(str(ckpt_dir / str(step)))[0]['step'] == step
  resume_at = max(_steps(left))
  assert resume_at >= 40, (at_kill, left)

  # 3. Restart and kill during the write of the final checkpoint (after the final eval).
  child = Child(workdir, base)
  child.signal_when(lambda names: any(s > resume_at for s in _writing(names)), signal.SIGKILL)
  FAULTS['SIGKILL during a checkpoint write'] += 1
  assert f'resumed at step {resume_at}' in child.output()
  left = _listing(ckpt_dir)
  assert TOTAL_STEPS in _writing(left) and TOTAL_STEPS not in _steps(left), left

  # 4. Damage the newest complete checkpoint, restart: reported, set aside, previous resumed.
  newest, previous = sorted(_steps(left))[-1:-3:-1]
  assert _truncate_arrays(ckpt_dir / str(newest))
  FAULTS['truncated newest checkpoint, then resume'] += 1
  out = _run_to_end(workdir, base)
  assert f'could not restore checkpoint step {newest} in {ckpt_dir}' in out
  assert f'checkpoint step {newest} is unreadable' in out
  assert f'resumed at step {previous}' in out
  assert os.listdir(workdir / ckpt_lib.UNREADABLE_DIR)[0].startswith(f'{newest}-')
  assert not _writing(_listing(ckpt_dir)) and ckpt_lib._DELETED not in _listing(ckpt_dir)
  _assert_same_params(reference, workdir)
  # No metric lost: the last row per step equals the uninterrupted run's.
  rows, expected = _metric_rows(workdir), reference['metrics']
  assert rows.keys() == expected.keys()
  for key, row in expected.items():
    for name in ('loss', 'top1'):
      if name in row:
        assert rows[key][name] == row[name], (key, name)


# ------------------------------------------------------------------------------ in process: signals


def test_signal_sets_the_request_and_a_second_ctrl_c_interrupts():
  with preemption.StopRequest(process_count=1) as stop:
    assert not stop.should_stop(at_sync_point=False)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    assert stop.should_stop(at_sync_point=False) and stop.reason == 'SIGTERM'
    os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C only asks...
    time.sleep(0.01)
    with pytest.raises(KeyboardInterrupt):  # ...the second interrupts at once
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  assert signal.getsignal(signal.SIGTERM) != stop._handle  # handlers restored
  FAULTS['SIGTERM / SIGINT to the handler (in process)'] += 3


def test_hosts_stop_together_at_a_sync_point():
  """One host signalled: every host stops at the next log interval, none before."""
  others = [0]
  gathered = []

  def allgather(flag):
    gathered.append(int(flag))
    return np.array([int(flag)] + others)

  stop = preemption.StopRequest(process_count=2, allgather=allgather)
  assert not stop.should_stop(at_sync_point=True)
  stop.request('SIGTERM')
  assert not stop.should_stop(at_sync_point=False)  # no decision between sync points
  assert stop.should_stop(at_sync_point=True) and gathered == [0, 1]
  # The other host: not signalled itself, stops because this one was.
  peer = preemption.StopRequest(process_count=2, allgather=lambda f: np.array([int(f), 1]))
  assert peer.should_stop(at_sync_point=True) and peer.reason == 'a signal on another host'


# -------------------------------------------------------------------------------- in process: files


def _toy_state(seed):
  rng = np.random.default_rng(seed)
  params = {
      'w': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
      'b': jnp.asarray(rng.normal(size=(3,)), jnp.float32)
  }
  return ({'params': params,
           'batch_stats': {}}, {'objective': {},
                                'objective_state': {}}, optax.adam(1e-3).init(params))


def _iterator(position=0):
  it = iter(grain.MapDataset.range(100).to_iter_dataset())
  for _ in range(position):
    next(it)
  return it


def _save_toy(checkpointer, step, wait=True):
  variables, extra, opt_state = _toy_state(step)
  checkpointer.save(step, variables=variables, extra=extra, opt_state=opt_state,
                    data_iterator=_iterator(step), meta={'step': step},
                    metrics={'top1': float(step)}, force=True)
  if wait:
    checkpointer.wait()


def _restore_toy(checkpointer):
  variables, extra, opt_state = _toy_state(0)

  def attempt(step):
    it = _iterator()
    v, _, _, _ = checkpointer.restore(step, variables_template=variables, extra_template=extra,
                                      opt_template=opt_state, data_iterator=it)
    return v, next(it)

  return checkpointer.restore_newest(attempt)


def _toy_dir(tmp_path, steps=(1, 2, 3), keep=3):
  directory = tmp_path / 'checkpoints'
  checkpointer = ckpt_lib.Checkpointer(str(directory), keep=keep, best_metric='top1')
  for step in steps:
    _save_toy(checkpointer, step)
  checkpointer.close()
  return directory


def _files(step_dir, pattern):
  paths = [p for p in glob.glob(str(step_dir / pattern), recursive=True) if os.path.isfile(p)]
  assert paths, pattern
  return paths


def _truncate(paths):
  for p in paths:
    os.truncate(p, os.path.getsize(p) // 2)


def _garble(paths):
  for p in paths:
    with open(p, 'wb') as f:
      f.write(b'\x00garbage{')


def _wrong_checksum(step_dir):
  path = _files(step_dir, 'meta/metadata')[0]
  meta = json.load(open(path))
  meta['checksums']['model']['params/w'] ^= 1
  json.dump(meta, open(path, 'w'))


CORRUPTIONS = {
    'model arrays truncated': lambda d: _truncate(_files(d, 'model/**/d/*')),
    'optimizer arrays truncated': lambda d: _truncate(_files(d, 'optimizer/**/d/*')),
    'model array metadata garbled': lambda d: _garble(_files(d, 'model/_METADATA')),
    'model arrays emptied': lambda d: [os.truncate(p, 0) for p in _files(d, 'model/**/d/*')],
    'run metadata garbled': lambda d: _garble(_files(d, 'meta/metadata')),
    'data-iterator state garbled': lambda d: _garble(_files(d, 'data/process_*.json')),
    'checksum mismatch': _wrong_checksum,
}


@pytest.mark.parametrize('corruption', list(CORRUPTIONS))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_step(tmp_path, corruption):
  directory = _toy_dir(tmp_path)
  CORRUPTIONS[corruption](directory / '3')
  FAULTS['corrupted checkpoint file (in process)'] += 1
  checkpointer = ckpt_lib.Checkpointer(str(directory), best_metric='top1')
  step, (variables, position) = _restore_toy(checkpointer)
  assert step == 2 and position == 2
  np.testing.assert_array_equal(variables['params']['w'], _toy_state(2)[0]['params']['w'])
  assert [s for s, _ in checkpointer.set_aside] == [3]
  assert os.listdir(tmp_path / ckpt_lib.UNREADABLE_DIR)[0].startswith('3-')
  _save_toy(checkpointer, 3)  # the set-aside step can be written again
  checkpointer.close()
  assert ckpt_lib.load_weights(str(directory))[0]['step'] == 3


@pytest.mark.parametrize('bookkeeping', ['_CHECKPOINT_METADATA', 'metrics/metrics'])
def test_garbled_bookkeeping_file_loses_nothing(tmp_path, bookkeeping):
  """Timestamps and the best-metric value are not needed to restore the step."""
  directory = _toy_dir(tmp_path)
  _garble(_files(directory / '3', bookkeeping))
  FAULTS['corrupted checkpoint file (in process)'] += 1
  step, (_, position) = _restore_toy(ckpt_lib.Checkpointer(str(directory), best_metric='top1'))
  assert step == 3 and position == 3


def test_best_checkpoint_survives_a_restart(tmp_path):
  directory = tmp_path / 'checkpoints'
  checkpointer = ckpt_lib.Checkpointer(str(directory), keep=1, best_metric='top1')
  _save_toy(checkpointer, 1)  # metric top1 = 1.0, the best
  checkpointer.close()
  checkpointer = ckpt_lib.Checkpointer(str(directory), keep=1, best_metric='top1')
  for step in (2, 3):
    variables, extra, opt_state = _toy_state(step)
    checkpointer.save(step, variables=variables, extra=extra, opt_state=opt_state,
                      data_iterator=_iterator(step), meta={'step': step}, force=True)
  checkpointer.close()
  assert sorted(os.listdir(directory)) == ['1', '3']


def test_checksum_mismatch_names_the_array(tmp_path):
  directory = _toy_dir(tmp_path, steps=(1,))
  _wrong_checksum(directory / '1')
  with pytest.raises(
      UnreadableCheckpointError,
      match=r"(?s)step 1 was named.*step 1: CheckpointIntegrityError: .*'model' "
      r"data differs from the checksums .* params/w"):
    ckpt_lib.load_weights(str(directory / '1'))


def test_no_readable_checkpoint_says_what_to_do_and_moves_nothing(tmp_path):
  directory = _toy_dir(tmp_path, steps=(1, 2))
  for step in (1, 2):
    _truncate(_files(directory / str(step), 'model/**/d/*'))
  checkpointer = ckpt_lib.Checkpointer(str(directory), best_metric='top1')
  with pytest.raises(
      UnreadableCheckpointError, match=rf'(?s)no readable checkpoint in {directory}:.*step 2: .*'
      r'step 1: .*delete that folder'):
    _restore_toy(checkpointer)
  assert _steps(os.listdir(directory)) == {1, 2}
  with pytest.raises(UnreadableCheckpointError,
                     match=f'(?s)no readable checkpoint in {directory}:.*another checkpoint'):
    ckpt_lib.load_weights(str(tmp_path))
  FAULTS['corrupted checkpoint file (in process)'] += 2


def test_load_weights_falls_back_and_a_named_step_fails_clearly(tmp_path):
  directory = _toy_dir(tmp_path, steps=(1, 2))
  _truncate(_files(directory / '2', 'model/**/d/*'))
  FAULTS['corrupted checkpoint file (in process)'] += 1
  meta, flat = ckpt_lib.load_weights(str(tmp_path))  # a workdir: the newest readable step
  assert meta['step'] == 1 and 'checksums' not in meta
  np.testing.assert_array_equal(flat['params/w'], _toy_state(1)[0]['params']['w'])
  with pytest.raises(UnreadableCheckpointError, match=r'(?s)step 2 was named.*step 2: '):
    ckpt_lib.load_weights(str(directory / '2'))


def test_a_model_that_does_not_fit_is_not_treated_as_damage(tmp_path):
  directory = _toy_dir(tmp_path, steps=(1,))
  checkpointer = ckpt_lib.Checkpointer(str(directory))
  variables, extra, opt_state = _toy_state(0)
  variables['params']['w'] = jnp.zeros((5, 3))
  with pytest.raises(CheckpointMismatchError, match='mis-shaped keys'):
    checkpointer.restore_newest(
        lambda step: checkpointer.restore(step, variables_template=variables, extra_template=extra,
                                          opt_template=opt_state, data_iterator=_iterator()))
  assert _steps(os.listdir(directory)) == {1} and not checkpointer.set_aside


def test_unfinished_write_is_ignored_and_cleaned(tmp_path):
  directory = _toy_dir(tmp_path, steps=(1,))
  shutil.copytree(directory / '1', directory / '2.orbax-checkpoint-tmp')
  FAULTS['unfinished checkpoint folder left behind (in process)'] += 1
  checkpointer = ckpt_lib.Checkpointer(str(directory))
  assert checkpointer.all_steps() == [1]
  _save_toy(checkpointer, 2)
  checkpointer.close()
  assert sorted(os.listdir(directory)) == ['1', '2']


# ---------------------------------------------------------------------------- in process: disk full


def _enospc(*args, **kwargs):
  raise OSError(errno.ENOSPC, 'No space left on device')


def _disk_full_message(directory, step, previous):
  return (rf'disk full while saving checkpoint step {step} in {re.escape(str(directory))}; the '
          rf'previous checkpoint \(step {previous}\) is intact; free space and rerun to resume')


def test_disk_full_at_once_keeps_the_previous_checkpoint(tmp_path):
  directory = tmp_path / 'checkpoints'
  checkpointer = ckpt_lib.Checkpointer(str(directory), keep=1)
  _save_toy(checkpointer, 1)
  checkpointer.manager.save = _enospc
  FAULTS['ENOSPC while saving (in process)'] += 1
  with pytest.raises(ckpt_lib.CheckpointSaveError, match=_disk_full_message(directory, 2, 1)):
    _save_toy(checkpointer, 2)
  checkpointer.close(quiet=True)
  meta, flat = ckpt_lib.load_weights(str(directory))
  assert meta['step'] == 1
  np.testing.assert_array_equal(flat['params/w'], _toy_state(1)[0]['params']['w'])


@pytest.mark.parametrize('surfaces_at', ['wait', 'next save'])
def test_disk_full_in_the_background_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                   surfaces_at):
  """keep=1: step 1 would be dropped once step 2 is complete; step 2 never is, so it stays."""
  from orbax.checkpoint._src.checkpointers import async_checkpointer
  directory = tmp_path / 'checkpoints'
  checkpointer = ckpt_lib.Checkpointer(str(directory), keep=1)
  _save_toy(checkpointer, 1)
  monkeypatch.setattr(async_checkpointer, '_on_commit_callback', _enospc)
  FAULTS['ENOSPC while saving (in process)'] += 1
  _save_toy(checkpointer, 2, wait=False)  # returns: the write goes on in the background
  with pytest.raises(ckpt_lib.CheckpointSaveError, match=_disk_full_message(directory, 2, 1)):
    if surfaces_at == 'wait':
      checkpointer.wait()
    else:
      _save_toy(checkpointer, 3, wait=False)
  checkpointer.close(quiet=True)
  assert sorted(os.listdir(directory)) == ['1']  # no step 2, no leftover temporary folder
  assert ckpt_lib.load_weights(str(directory))[0]['step'] == 1


def test_disk_full_on_a_real_small_filesystem(tmp_path):
  """A 1 MiB tmpfs (needs root and mount permission; skipped otherwise)."""
  mount_point = tmp_path / 'small'
  mount_point.mkdir()
  if os.geteuid() != 0 or subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs',
       str(mount_point)], capture_output=True).returncode != 0:
    pytest.skip('cannot mount a tmpfs here')
  try:
    directory = mount_point / 'checkpoints'
    checkpointer = ckpt_lib.Checkpointer(str(directory), keep=3)
    big = {
        'params': {'w': jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)},
        'batch_stats': {}
    }
    opt_state = optax.sgd(0.1).init(big['params'])
    FAULTS['ENOSPC while saving (real 1 MiB tmpfs)'] += 1
    with pytest.raises(ckpt_lib.CheckpointSaveError,
                       match=_disk_full_message(directory, r'\d+', r'\d+')):
      for step in range(1, 6):  # 256 KiB each: the disk fills within a few steps
        checkpointer.save(step, variables=big, extra={}, opt_state=opt_state,
                          data_iterator=_iterator(step), meta={'step': step}, force=True)
        checkpointer.wait()
    checkpointer.close(quiet=True)
    assert ckpt_lib.load_weights(str(directory))[0]['step'] == step - 1
    assert not _writing(os.listdir(directory))
  finally:
    subprocess.run(['umount', str(mount_point)], check=False)


_FAIL_STEP_20_WITH_ENOSPC = """
import errno, os
from orbax.checkpoint._src.checkpointers import async_checkpointer
original = async_checkpointer._on_commit_callback
def fail_step_20(tmpdir, *args, **kwargs):  # the background part of orbax's write
  if os.path.basename(str(tmpdir.get_final())) == '20':
    raise OSError(errno.ENOSPC, 'No space left on device')
  return original(tmpdir, *args, **kwargs)
async_checkpointer._on_commit_callback = fail_step_20
"""


@pytest.mark.slow
def test_training_stops_with_a_clear_error_when_the_disk_fills(base, reference):
  """main.py whose step-20 write fails in the background: training stops at the next save with
  the message, and the step-10 checkpoint (keep_checkpoints=1) still loads."""
  workdir = base / 'disk_full'
  child = Child(workdir, base, args=['--config.keep_checkpoints=1'],
                prelude=_FAIL_STEP_20_WITH_ENOSPC)
  FAULTS['ENOSPC while saving (main.py)'] += 1
  assert child.wait() == 1
  out = child.output()
  assert re.search(r'CheckpointSaveError: ' + _disk_full_message(workdir / 'checkpoints', 20, 10),
                   out), out[-3000:]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['10']
  assert ckpt_lib.load_weights(str(workdir))[0]['step'] == 10
  assert ('train', 30) in _metric_rows(workdir)  # metrics up to the failure are in the log
