"""Which libraries a module pulls in: models, sharding and tree logic must not need orbax or grain.

Converting weights, building a model or a mesh should not start a checkpoint or input library
(slow imports, and grain brings worker machinery), and a run on digits should not start torch or
scikit-learn (~2 s each, per run); each check runs in a fresh interpreter, because this test
process has long imported everything.
"""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ('orbax', 'grain')


@pytest.mark.parametrize('module', [
    'tikd_jax.tree', 'tikd_jax.models', 'tikd_jax.models.variables', 'tikd_jax.sharding',
    'tikd_jax.train.optim', 'tikd_jax.train.checkpoint_integrity'
])
def test_module_imports_neither_orbax_nor_grain(module):
  code = (f'import sys, {module}; '
          f'print(sorted({{m.split(".")[0] for m in sys.modules if m.startswith({HEAVY!r})}}))')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       check=True).stdout.strip().splitlines()[-1]
  assert out == '[]', f'importing {module} imports {out}'


def test_digits_data_and_the_tensorboard_log_import_neither_torch_nor_sklearn(tmp_path):
  """The trainer's digits source and its MetricLogger (tensorboardX imports torch when it is
  installed); the log still holds the scalar, and torch still imports afterwards."""
  code = f"""
import sys
from tikd_jax.data import digits
from tikd_jax.train.logger import MetricLogger
assert len(digits.load('train', 16)) == 1437
log = MetricLogger({str(tmp_path)!r}, total_steps=1)
log.write(1, {{'loss': 0.5}})
log.close()
print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'torch', 'sklearn'}}))
import torch
print(torch.ones(2).sum().item())
"""
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       check=True).stdout.strip().splitlines()
  assert out[-2:] == ['[]', '2.0'], out
  events = b''.join(
      open(os.path.join(d, f), 'rb').read()
      for d, _, files in os.walk(tmp_path / 'tensorboard')
      for f in files)
  assert b'train/loss' in events
