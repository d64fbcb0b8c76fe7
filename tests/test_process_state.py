"""Importing tikd_jax, building models with the CPU layers and running them changes no process-wide
state: the application (main.py --allocator) and the benchmarks choose it, never the library.

A fresh interpreter imports the third-party packages first and takes a snapshot of what is
process-wide (environment, jax.config, logging levels, warning filters, signal handlers, NumPy
error handling), then imports tikd_jax with the packages the trainer uses, builds a ViT and a
ResNet with fast_layers=True, runs them forward and asks `step_options` for a step's compiler
options, and compares. glibc's malloc parameters have no getter, so mallopt is caught twice:
  * every symbol looked up through ctypes is recorded (how Python code reaches mallopt), and
  * malloc's behaviour is probed: with glibc's defaults a 30 MiB block is mapped on its own (its
    dynamic threshold stays below it in this process); under the allocator policy's fixed mmap
    threshold of 32 MiB it comes from the arena. The probe's control applies that policy, as
    main.py does, and must then see a 31 MiB block stay in the arena.
"""
import json
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = r'''
import ctypes, json, logging, os, signal, sys, warnings

looked_up = []
_getitem = ctypes.CDLL.__getitem__


def _recording_getitem(self, name):
  looked_up.append(name)
  return _getitem(self, name)


ctypes.CDLL.__getitem__ = _recording_getitem  # CDLL.__getattr__ looks symbols up through it

import absl.logging, flax.nnx, grain, jax, jax.numpy as jnp, ml_collections, numpy as np, optax
import orbax.checkpoint


class MallInfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in (
      'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks',
      'fordblks', 'keepcost')]


libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)


def mapped_alone(mib):
  """Whether malloc serves a block of `mib` MiB by a mapping of its own."""
  before = libc.mallinfo2().hblks
  block = libc.malloc(mib << 20)
  mapped = libc.mallinfo2().hblks - before
  libc.free(block)
  return mapped == 1


def snapshot():
  loggers = {name: (logger.level, logger.disabled)
             for name, logger in logging.Logger.manager.loggerDict.items()
             if isinstance(logger, logging.Logger)}
  return {
      'environ': dict(os.environ),
      'jax_config': {k: repr(v) for k, v in jax.config.values.items()},
      'root_logger': (logging.root.level, len(logging.root.handlers)),
      'loggers': loggers,
      'absl_verbosity': absl.logging.get_verbosity(),
      'warning_filters': [repr(f) for f in warnings.filters],
      'signals': {s.name: repr(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM)},
      'numpy_errors': np.geterr(),
  }


before = snapshot()
before_symbols = len(looked_up)

import tikd_jax
from tikd_jax.cpu import compiler, kernels, layers
from tikd_jax.models import build_model
from tikd_jax.train import evaluate, loop, run, trainer

vit = build_model('distilled_vit', variant='micro', num_classes=10, rngs=flax.nnx.Rngs(0),
                  fast_layers=True)
images = jnp.ones((2, 32, 32, 3), jnp.float32)
jax.block_until_ready(jax.jit(lambda x: vit(x)[0])(images))
resnet = build_model('resnet8', num_classes=10, rngs=flax.nnx.Rngs(0), fast_layers=True)
jax.block_until_ready(resnet(images[:, :16, :16])[0])
options = compiler.step_options('auto', lambda x: jnp.sum(jnp.outer(x, x)),
                                jax.ShapeDtypeStruct((64,), jnp.float32))

after = snapshot()
changed = sorted(k for k in before if before[k] != after[k])
if 'loggers' in changed:  # loggers created by the imports are new, not changed: compare the old
  changed.remove('loggers')
  old = {k: v for k, v in after['loggers'].items() if k in before['loggers']}
  if old != before['loggers'] or any(level != (0, False) for name, level in after['loggers'].items()
                                     if name.startswith('tikd_jax')):
    changed.append('loggers')
result = {
    'changed': {k: [str(before[k])[:300], str(after[k])[:300]] for k in changed},
    'symbols': sorted(set(looked_up[before_symbols:])),
    'small_heaps': compiler.uses_small_heaps(options),
    'default_maps_30_mib': mapped_alone(30),
}
compiler.keep_freed_memory_mapped()  # the control: what main.py --allocator=auto applies
result['policy_maps_31_mib'] = mapped_alone(31)
print(json.dumps(result))
'''


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc',
                    reason='probes glibc malloc (mallinfo2)')
def test_importing_and_building_models_changes_no_process_wide_state():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', PROGRAM], cwd=ROOT, env=env, text=True,
                        capture_output=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['changed'] == {}, result['changed']
  assert not [s for s in result['symbols'] if 'mallopt' in s], result['symbols']
  assert result['small_heaps']  # the library still decides the heaps, for the application to use
  # glibc's defaults still hold after everything above: a 30 MiB block is mapped on its own ...
  assert result['default_maps_30_mib'], result
  # ... and the probe sees the policy the application may apply (a fixed 32 MiB threshold)
  assert not result['policy_maps_31_mib'], result
