"""XLA:CPU's temporaries stay mapped between steps under the 'auto' preset and allocator
(tikd_jax/cpu/compiler.py).

glibc's settings are process-wide, so each preset runs in a fresh interpreter: a ViT-Tiny gradient
(batch 64, 16 px; its largest intermediate 3 MiB), jitted with `step_options` of the preset and the
allocator main.py's --allocator=auto picks for it, is called repeatedly, and its minor page faults
per call are compared with its temporaries' pages.
"""
import json
import os
import platform
import subprocess
import sys

import pytest

from tikd_jax.cpu import compiler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = r'''
import json, resource, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from tikd_jax.cpu import compiler
from tikd_jax.models import build_model

model = build_model('vit', variant='vit_tiny', patch_size=4, num_classes=10, rngs=nnx.Rngs(0))
graphdef, params = nnx.split(model)
x = jnp.asarray(np.random.RandomState(0).rand(64, 16, 16, 3), jnp.float32)

def loss(params):
  logits, _ = nnx.merge(graphdef, params)(x)
  return jnp.mean(logits[0])

compiler.set_allocator('auto', sys.argv[1])
options = compiler.step_options(sys.argv[1], jax.grad(loss), params)
grad = jax.jit(jax.grad(loss), compiler_options=options).lower(params).compile()
faults = []
for call in range(6):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(grad(params))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({'faults': sorted(faults[2:])[1],
                  'temp_pages': grad.memory_analysis().temp_size_in_bytes // 4096}))
'''


def faults_per_call(preset: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  proc = subprocess.run([sys.executable, '-c', PROGRAM, preset], cwd=ROOT, env=env, text=True,
                        capture_output=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='the settings are glibc mallopt(3)')
def test_auto_keeps_temporaries_mapped_between_calls():
  plain, auto = faults_per_call('no_ynn'), faults_per_call('auto')
  # Without the settings a call faults its temporaries in again (47,300 faults for 46,900 pages
  # when measured); with them, none.
  assert plain['faults'] > 0.3 * plain['temp_pages'], plain
  assert auto['faults'] < 0.02 * auto['temp_pages'], auto


def test_settings_stay_within_what_glibc_accepts():
  # mallopt refuses an mmap threshold above HEAP_MAX_SIZE / 2, and the heaps XLA is told to cut
  # must stay under it, or glibc maps each one afresh.
  assert compiler.MALLOPT_SETTINGS[compiler.M_MMAP_THRESHOLD] == compiler.MMAP_THRESHOLD_MAX
  assert compiler.HEAP_BYTES < compiler.MMAP_THRESHOLD_MAX
  assert compiler.MALLOPT_SETTINGS[compiler.M_TOP_PAD] >= compiler.ARENA_HEAP_BYTES
