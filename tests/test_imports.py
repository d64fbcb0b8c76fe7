"""Which libraries a module pulls in: models, sharding and tree logic must not need orbax or grain.

Converting weights, building a model or a mesh should not start a checkpoint or input library
(slow imports, and grain brings worker machinery); each check runs in a fresh interpreter,
because this test process has long imported everything.
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
