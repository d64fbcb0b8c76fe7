r"""The machine's matrix-multiply peak, measured in the same run as the benchmark it scales.

  python benchmarks/peak.py [--device cpu|gpu] [--n 2048] [--out FILE]

CPU: float32 square products as `jax.numpy.dot` (jitted) and as numpy's sgemm. numpy's sgemm is
measured in a child process with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE removed from its
environment: with them set, OpenBLAS picks a slower kernel (188 GFLOP/s where the chip does about
480 on the AMD EPYC sessions; /work/shared/ENVIRONMENT.md). GPU: bfloat16 and float32 products
(8192³ by default) through jax and through torch, beside the card's datasheet dense bfloat16 peak,
the denominator of MFU. One JSON line per measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# Dense (no sparsity) bfloat16 tensor-core peaks from NVIDIA's datasheets, in TFLOP/s: the
# denominator of MFU. The SXM parts; PCIe/NVL parts are lower and match their own names first.
DATASHEET_BF16_TFLOPS = (
    ('H100 PCIe', 756.0),
    ('H100 NVL', 835.0),
    ('H100', 989.4),
    ('H200', 989.4),
    ('A100', 312.0),
)
OPENBLAS_SKIP = ('OPENBLAS_CORETYPE', 'OPENBLAS_L2_SIZE')


def datasheet_bf16_tflops(device_name: str) -> float | None:
  """The datasheet dense bf16 peak of the card called `device_name`, None when not listed."""
  for key, tflops in DATASHEET_BF16_TFLOPS:
    if key.lower() in device_name.lower():
      return tflops
  return None


def _best_rate(fn, flops: float, repeats: int) -> float:
  """GFLOP/s of the fastest of `repeats` synchronised calls of `fn` (after one warm-up)."""
  fn()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return flops / best / 1e9


def jax_dot(n: int, dtype: str, repeats: int = 5) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  dot = jax.jit(jnp.dot)
  rate = _best_rate(lambda: dot(a, b).block_until_ready(), 2.0 * n**3, repeats)
  return {
      'what': 'jax_dot', 'dtype': dtype, 'n': n, 'gflops': round(rate, 1),
      'device': jax.devices()[0].device_kind, 'backend': jax.default_backend()
  }


def torch_mm(n: int, dtype: str, repeats: int = 5) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  a = torch.randn(n, n, dtype=getattr(torch, dtype), device=device)
  b = torch.randn(n, n, dtype=getattr(torch, dtype), device=device)

  def run():
    a @ b
    if device == 'cuda':
      torch.cuda.synchronize()

  rate = _best_rate(run, 2.0 * n**3, repeats)
  name = torch.cuda.get_device_name() if device == 'cuda' else 'cpu'
  return {
      'what': 'torch_mm', 'dtype': dtype, 'n': n, 'gflops': round(rate, 1), 'device': name,
      'torch_threads': torch.get_num_threads()
  }


_SGEMM_CHILD = r'''
import json, sys, time
import numpy as np
n = int(sys.argv[1])
a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
a @ b
best = float('inf')
for _ in range(5):
  t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)
print(json.dumps({'gflops': round(2.0 * n**3 / best / 1e9, 1)}))
'''


def numpy_sgemm(n: int) -> dict:
  """numpy's float32 product in a child process without the OPENBLAS_* overrides."""
  env = {k: v for k, v in os.environ.items() if k not in OPENBLAS_SKIP}
  out = subprocess.run(
      [sys.executable, '-c', _SGEMM_CHILD, str(n)], env=env, check=True, capture_output=True,
      text=True)
  row = json.loads(out.stdout.strip().splitlines()[-1])
  return {
      'what': 'numpy_sgemm', 'dtype': 'float32', 'n': n,
      **row, 'unset_env': [k for k in OPENBLAS_SKIP if k in os.environ]
  }


def measure(device: str, n: int | None = None) -> list[dict]:
  """Every peak measurement for `device` ('cpu' or 'gpu'), as rows."""
  if device == 'cpu':
    n = n or 2048
    return [jax_dot(n, 'float32'), numpy_sgemm(n)]
  n = n or 8192
  rows = [
      jax_dot(n, 'bfloat16'),
      jax_dot(n, 'float32'),
      torch_mm(n, 'bfloat16'),
      torch_mm(n, 'float32')
  ]
  sheet = datasheet_bf16_tflops(rows[0]['device'])
  for row in rows:
    row['datasheet_bf16_gflops'] = sheet * 1000 if sheet else None
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--device', default='cpu', choices=('cpu', 'gpu'))
  parser.add_argument('--n', type=int, default=None, help='matrix side (2048 on CPU, 8192 GPU)')
  parser.add_argument('--out', default=None, help='also append the JSON lines to this file')
  args = parser.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from benchmarks import report  # pylint: disable=g-import-not-at-top
  with report.JsonLines(args.out) as emit:
    for row in measure(args.device, args.n):
      emit({'name': 'peak', **row, 'load_1min': report.load_now()})


if __name__ == '__main__':
  main()
