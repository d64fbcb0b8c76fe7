"""An input worker killed mid-run (what the OOM killer does): one line, exit 71, a rerun resumes.

End to end: `main.py --config=configs/tiny.py` with one grain worker process, the worker SIGKILLed
once the first checkpoint is complete, then the same command rerun to one step past it.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import main  # noqa: E402  pylint: disable=g-import-not-at-top

psutil = pytest.importorskip('psutil')

# configs/tiny.py checkpoints every 10 steps; 20 epochs (880 steps) outlast the kill.
ARGS = ['--config=configs/tiny.py', '--config.data.num_workers=1', '--config.num_epochs=20']


def _env(tmp_path):
  return dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
              JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')


def _grain_worker(pid: int):
  """The main process's grain worker (multiprocessing spawn), not its resource tracker."""
  children = psutil.Process(pid).children()
  workers = [c for c in children if 'spawn_main' in ' '.join(c.cmdline())]
  return workers[0] if len(workers) == 1 else None


def _complete_steps(ckpt_dir) -> list[int]:
  return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if ckpt_dir.is_dir() else []


@pytest.mark.slow
def test_killed_worker_is_one_line_and_the_rerun_resumes(tmp_path):
  workdir, env = tmp_path / 'run', _env(tmp_path)
  with open(tmp_path / 'out.log', 'w') as out, open(tmp_path / 'err.log', 'w') as err:
    proc = subprocess.Popen([sys.executable, 'main.py', *ARGS, f'--workdir={workdir}'], cwd=REPO,
                            env=env, stdout=out, stderr=err)
    deadline = time.time() + 240
    while not _complete_steps(workdir / 'checkpoints'):
      assert proc.poll() is None and time.time() < deadline, (tmp_path / 'err.log').read_text()
      time.sleep(0.05)
    worker = _grain_worker(proc.pid)
    assert worker is not None, [c.cmdline() for c in psutil.Process(proc.pid).children()]
    os.kill(worker.pid, signal.SIGKILL)
    code = proc.wait(timeout=120)
  stderr = (tmp_path / 'err.log').read_text()
  assert code == main.EXIT_WORKER_DIED == 71, stderr[-3000:]
  assert 'Traceback' not in stderr, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, stderr[-3000:]
  saved = _complete_steps(workdir / 'checkpoints')[-1]
  assert lines[0] == (
      f'error: an input worker process was killed by SIGKILL: usually the OOM killer (see '
      f'`dmesg`); lower --config.data.num_workers or --config.batch_size. Training stopped; the '
      f'last checkpoint is step {saved} in {workdir}/checkpoints; rerunning the same command '
      f'resumes from it (exit status 71)')

  rerun = subprocess.run([
      sys.executable, 'main.py', *ARGS, f'--config.stop_at_step={saved + 1}', f'--workdir={workdir}'
  ], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'resumed at step {saved}' in rerun.stdout + rerun.stderr


def test_only_grains_dead_worker_error_is_recognised():
  died = RuntimeError('Worker process was terminated unexpectedly with exit code -7. Search the '
                      'logs above for the source of the crash.')
  assert main._dead_worker_exit_code(died) == -7  # pylint: disable=protected-access
  assert main._dead_worker_exit_code(RuntimeError('something else')) is None  # pylint: disable=protected-access
  assert main._dead_worker_exit_code(ValueError(str(died))) is None  # pylint: disable=protected-access
  assert 'SIGBUS: usually a full /dev/shm' in str(main.InputWorkerDied(-7, '/nowhere'))
  assert 'exited with status 3' in str(main.InputWorkerDied(3, '/nowhere'))
  assert 'starts over' in str(main.InputWorkerDied(-9, '/nowhere'))
