"""Host memory reuse on XLA:CPU (tikd_jax/host_memory.py): a step stops page-faulting its buffers
back in, only when asked for before JAX starts, and main.py asks for it in time."""
import os
import subprocess
import sys
import textwrap
import types

import jax
import ml_collections
import pytest
from absl import logging

from tikd_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted step like a training step: temporaries over glibc's 32 MB mmap ceiling (two 64 MB
# intermediates), a small result. Prints the fewest minor page faults of one call over three,
# after warm-up calls (XLA frees a call's buffers asynchronously, so the heap settles in a few).
_FAULTS_PER_CALL = textwrap.dedent('''
    import resource, sys
    from tikd_jax import host_memory
    if sys.argv[1] == 'reuse':
      assert host_memory.reuse_freed_memory()
    import jax, jax.numpy as jnp
    step = jax.jit(lambda x: jnp.sum(jnp.sin(x) @ x, axis=0))
    x = jnp.ones((4096, 4096), jnp.float32) / 4096
    for _ in range(3):
      step(x).block_until_ready()
    faults = []
    for _ in range(3):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      step(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(min(faults))
''')


def _faults_per_call(mode: str) -> int:
  done = subprocess.run([sys.executable, '-c', _FAULTS_PER_CALL, mode], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=REPO))
  assert done.returncode == 0, done.stderr[-2000:]
  return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc')
def test_reused_memory_takes_no_page_faults_per_step():
  pages = 64 * 2**20 // 4096  # one 64 MB temporary: 16,384 pages
  assert _faults_per_call('default') > pages / 2  # glibc's default: every call faults it in
  assert _faults_per_call('reuse') < pages / 50


def test_too_late_says_to_call_it_before_jax_starts(caplog):
  jax.devices()  # this test process's backend is running
  with caplog.at_level(logging.WARNING):
    assert not host_memory.reuse_freed_memory.__wrapped__()
  assert 'before the first JAX computation' in caplog.text


def test_not_glibc_leaves_the_allocator_alone(monkeypatch):
  monkeypatch.setattr(host_memory.platform, 'libc_ver', lambda: ('', ''))
  assert not host_memory.reuse_freed_memory.__wrapped__()


def test_on_unless_xla_options_default_and_only_on_cpu(monkeypatch):
  config = ml_collections.ConfigDict({'xla_options': 'auto'})
  assert host_memory.wanted(config)
  config.xla_options = 'default'
  assert not host_memory.wanted(config)
  runs = ml_collections.ConfigDict(
      {'runs': {'teacher': {'xla_options': 'auto'}, 'student': {'xla_options': 'default'}}})
  assert not host_memory.wanted(runs)
  runs.runs.student.xla_options = 'no_ynn'
  assert host_memory.wanted(runs)

  def platforms(named):
    monkeypatch.setattr(host_memory, 'jax',
                        types.SimpleNamespace(config=types.SimpleNamespace(jax_platforms=named)))

  platforms('cuda,cpu')
  assert not host_memory.runs_on_cpu()
  platforms('cpu')
  assert host_memory.runs_on_cpu()
  platforms(None)
  monkeypatch.setattr(host_memory.importlib.metadata, 'entry_points', lambda group: ['xla_cuda12']
                      if group == 'jax_plugins' else [])
  assert not host_memory.runs_on_cpu()  # a GPU plugin is installed: JAX may not pick the CPU


def test_main_sets_it_before_jax_starts(tmp_path):
  """main.py asks before anything starts JAX: the log says it applies, not that it is late."""
  done = subprocess.run([
      sys.executable, 'main.py', '--config=configs/tiny.py', f'--workdir={tmp_path}', '--mode=eval',
      '--verbosity=0'
  ], cwd=REPO, capture_output=True, text=True, timeout=300)
  log = done.stdout + done.stderr
  assert 'Host memory: freed blocks are kept for reuse' in log, log[-3000:]
  assert 'JAX is already running' not in log
