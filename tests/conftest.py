"""Test setup: 8 fake CPU devices (set before JAX starts) and the repo on sys.path."""
import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# One persistent compilation cache for the session, inherited by the training subprocesses:
# the same tiny programs are compiled by many tests, and each compile costs seconds on a CPU.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import tempfile
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='tikd-jax-cache-')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.5'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
# pytest-xdist workers (the README's test command runs two) each keep a cache of their own.
if os.environ.get('PYTEST_XDIST_WORKER'):
  os.environ['JAX_COMPILATION_CACHE_DIR'] = os.path.join(os.environ['JAX_COMPILATION_CACHE_DIR'],
                                                         os.environ['PYTEST_XDIST_WORKER'])
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: longer end-to-end runs (subprocesses, many steps)')
