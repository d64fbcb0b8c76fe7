"""One formatter (yapf) and one linter (ruff) for the whole tree, configured in pyproject.toml."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = ('tikd_jax', 'configs', 'convert', 'tests', 'benchmarks', 'main.py')


def _run(*args):
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True)


def test_the_tree_is_formatted_by_yapf():
  out = _run('yapf', '--diff', '--recursive', '--parallel', *CODE)
  assert out.returncode == 0 and not out.stdout, (
      f'yapf would reformat these lines; run `yapf -ir -p {" ".join(CODE)}`:\n'
      f'{out.stdout[:4000]}{out.stderr[-2000:]}')


def test_ruff_finds_nothing():
  out = _run('ruff', 'check', '.')
  assert out.returncode == 0, f'ruff check . (fix with `ruff check --fix .`):\n{out.stdout[-4000:]}'
