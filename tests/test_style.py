"""One formatter (yapf) and one linter (ruff) for the Python tree, configured in pyproject.toml;
clang-format (.clang-format) for the C++ kernels."""
import ast
import glob
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


def test_the_cpp_kernels_are_formatted_by_clang_format():
  """The C++ sources and headers (XLA:CPU kernels) follow .clang-format (Google style, 100 columns)."""
  sources = sorted(
      glob.glob(os.path.join(ROOT, 'tikd_jax', '**', '*.cc'), recursive=True) +
      glob.glob(os.path.join(ROOT, 'tikd_jax', '**', '*.h'), recursive=True))
  assert sources
  out = subprocess.run([
      os.path.join(os.path.dirname(sys.executable), 'clang-format'), '--dry-run', '--Werror',
      *sources
  ], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, (f'clang-format would reformat; run `clang-format -i '
                               f'{" ".join(os.path.relpath(s, ROOT) for s in sources)}`:\n'
                               f'{out.stderr[:4000]}')


def test_ruff_finds_nothing():
  out = _run('ruff', 'check', '.')
  assert out.returncode == 0, f'ruff check . (fix with `ruff check --fix .`):\n{out.stdout[-4000:]}'


def test_no_function_in_the_trainer_is_longer_than_60_lines():
  """The trainer reads as small named pieces (README "How it is organised")."""
  long = []
  for path in sorted(glob.glob(os.path.join(ROOT, 'tikd_jax', 'train', '*.py'))):
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > 60:
          long.append(f'{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} ({lines} lines)')
  assert not long, long
