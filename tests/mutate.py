"""Mutation check: small meaning-changing edits to the code that decides what is trained; the
tests that guard it must fail on each one.

  python tests/mutate.py --list                         # the mutants, nothing run
  python tests/mutate.py --max_mutants 60 --sample 0    # a deterministic sample, run
  python tests/mutate.py --only tikd_jax/losses/kd.py:37    # rerun the mutants of one line
  python tests/mutate.py --must_kill                    # the named mutants; exit 1 if one survives

Each mutant is one textual edit of the exact source span (the rest of the file keeps its
formatting), applied to a private copy of the tree (the working tree is never touched); the
target's test files then run as `pytest -x -q -p no:cacheprovider` with a per-mutant timeout
(a timeout counts as killed; a crash is rerun with a cold cache, then reported, not counted). A
JAX persistent compilation cache shared by all mutants keeps the unmutated programs compiled once.
One JSON line per mutant goes to --results; a kill rate per file is printed at the end. Not a
pytest module (the name does not start with test_).
"""
from __future__ import annotations

import argparse
import ast
import collections
import concurrent.futures
import dataclasses
import fnmatch
import glob
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Target file pattern → pytest argument groups, run in order (fast, likely killers first); the
# first matching pattern wins. Test files that do not exist (yet) are dropped.
_STEP_TESTS = ('tests/test_step_meaning.py tests/test_loss_terms.py tests/test_methods.py '
               'tests/test_accumulation.py tests/test_tikd.py tests/test_irkd.py '
               'tests/test_mutation_survivors.py')
TEST_MAP = [
    ('tikd_jax/losses/registry.py', [_STEP_TESTS]),
    ('tikd_jax/losses/tikd.py', [_STEP_TESTS]),
    ('tikd_jax/losses/saliency.py', [
        'tests/test_saliency.py tests/test_losses.py '
        'tests/test_step_meaning.py tests/test_irkd.py '
        'tests/test_mutation_survivors.py'
    ]),
    ('tikd_jax/losses/*.py', [
        'tests/test_losses.py tests/test_saliency.py '
        'tests/test_step_meaning.py tests/test_methods.py'
    ]),
    ('tikd_jax/train/step.py', [_STEP_TESTS]),
    ('tikd_jax/train/loss_config.py', [_STEP_TESTS]),
    ('tikd_jax/train/objectives.py', [_STEP_TESTS]),  # before the loss-terms refactor
    ('tikd_jax/models/vit.py', [
        'tests/test_models.py tests/test_dropout.py tests/test_tikd.py '
        'tests/test_step_meaning.py tests/test_mutation_survivors.py',
        'tests/test_convert.py -k vit'
    ]),
    ('tikd_jax/train/plan.py', ['tests/test_plan.py']),
]
DEFAULT_TARGETS = [
    'tikd_jax/losses/*.py', 'tikd_jax/train/step.py', 'tikd_jax/train/loss_config.py',
    'tikd_jax/models/vit.py', 'tikd_jax/train/plan.py'
]
# Only these functions (qualified names, nested ones included) are mutated in a file listed here;
# --all_functions lifts it (vit.py's hand-written VJPs are pinned by their own gradient tests).
FUNCTIONS = {
    'tikd_jax/models/vit.py':
        ('drop_path', 'dropout', '_dropout_keys', 'Block.__call__', 'Block.split', 'Block._mix',
         'LowRankLinear.__call__', '_cosine', 'DistilledViT.heads', 'DistilledViT.__call__',
         'DistilledViT._text_fusion'),
}

# Named mutants from issue 13: (name, file, old text (must occur once), new text).
MUST_KILL = [
    ('distillation term on the class head', 'tikd_jax/losses/registry.py',
     "return self.out.get('dist_logits', self.out['cls_logits'])", "return self.out['cls_logits']"),
    ('CTKD reversal strength negated', 'tikd_jax/losses/ctkd.py',
     'reversed_cotangent = (-strength * cotangent)', 'reversed_cotangent = (strength * cotangent)'),
    ('teacher in train mode inside the step', 'tikd_jax/train/step.py',
     'teacher(images, train=False)', 'teacher(images, train=True)'),
    ('TIKD alignment loss subtracted', 'tikd_jax/losses/tikd.py',
     "return loss, {'alignment_loss': loss}", "return -loss, {'alignment_loss': loss}"),
]

# ------------------------------------------------------------------ mutation operators
BINOP_SWAP = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
    ast.Pow: ast.Mult
}
CMP_SWAP = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is
}
SYMBOL = {
    ast.Add: '+', ast.Sub: '-', ast.Mult: '*', ast.Div: '/', ast.FloorDiv: '//', ast.Pow: '**',
    ast.Lt: '<', ast.LtE: '<=', ast.Gt: '>', ast.GtE: '>=', ast.Eq: '==', ast.NotEq: '!=',
    ast.In: 'in', ast.NotIn: 'not in', ast.Is: 'is', ast.IsNot: 'is not', ast.And: 'and',
    ast.Or: 'or'
}
# Key names and mode strings whose swap changes which tensor / branch is used.
STRING_SWAP = {
    'cls_logits': 'dist_logits', 'dist_logits': 'cls_logits', 'mean': 'cls', 'cls': 'mean',
    'attention': 'gradient', 'gradient': 'attention', 'crop': 'resize', 'resize': 'crop',
    'teacher': 'student', 'student': 'teacher'
}
# Function (attribute) names swapped in calls: jnp.mean ↔ jnp.sum and friends.
CALL_SWAP = {
    'mean': 'sum', 'sum': 'mean', 'maximum': 'minimum', 'minimum': 'maximum', 'max': 'min',
    'min': 'max', 'argmax': 'argmin', 'argmin': 'argmax', 'log_softmax': 'softmax',
    'softmax': 'log_softmax', 'any': 'all', 'all': 'any'
}
# Calls whose first two arguments commute (a swap is equivalent) or whose swap can only crash.
SYMMETRIC = {
    'maximum', 'minimum', 'add', 'multiply', 'max', 'min', 'zip', 'dict', 'isinstance', 'getattr',
    'hasattr', 'get', 'setdefault', 'pop', 'split', 'reshape', 'broadcast_to', 'asarray', 'astype',
    'fold_in', 'clip', 'full', 'ones', 'zeros'
}
SIMPLE = (ast.Name, ast.Attribute, ast.Subscript)
LOG_CALLS = {'info', 'warning', 'debug', 'print'}


@dataclasses.dataclass
class Mutant:
  file: str
  line: int
  col: int
  operator: str
  edits: list  # [(start byte, end byte, new text)]
  original: str = ''  # the changed source line(s), before / after
  mutated: str = ''
  index: int = 0  # position among the mutants of the same line (for --only file:line:i)
  name: str = ''  # must-kill mutants only

  @property
  def key(self):
    return f'{self.file}:{self.line}:{self.index}'


class _Source:
  """Byte offsets of (line, col) pairs (ast columns are UTF-8 byte offsets)."""

  def __init__(self, text: str):
    self.data = text.encode()
    self.starts = [0]
    for line in self.data.splitlines(keepends=True):
      self.starts.append(self.starts[-1] + len(line))

  def offset(self, line, col):
    return self.starts[line - 1] + col

  def span(self, node):
    return (self.offset(node.lineno,
                        node.col_offset), self.offset(node.end_lineno, node.end_col_offset))

  def text(self, start, end):
    return self.data[start:end].decode()


def _code_mask(gap: str) -> str:
  """The gap with comments blanked, so an operator is searched in code only."""
  return re.sub(r'#[^\n]*', lambda m: ' ' * len(m.group()), gap)


def _op_edit(src: _Source, start: int, end: int, old: str, new: str):
  """Replace operator `old` inside the gap [start, end) between two operands, or None."""
  gap = src.text(start, end)
  code = _code_mask(gap)
  pattern = (r'(?<![\w])' + r'\s+'.join(map(re.escape, old.split())) +
             r'(?![\w])' if old[0].isalpha() else r'(?<![*/<>=!])' + re.escape(old) +
             r'(?![*/<>=])')
  hits = list(re.finditer(pattern, code))
  if len(hits) != 1:
    return None
  m = hits[0]
  a = len(gap[:m.start()].encode())
  b = len(gap[:m.end()].encode())
  return (start + a, start + b, new)


def _number(value):
  """c → c+1 for ints; 0.0 → 1.0, 1.0 → 2.0, other floats halved."""
  if isinstance(value, int):
    return value + 1
  if value == 0.0:
    return 1.0
  if value == 1.0:
    return 2.0
  return value / 2


class _Collector(ast.NodeVisitor):

  def __init__(self, file, text, functions=None):
    self.file = file
    self.src = _Source(text)
    self.functions = functions
    self.scope: list[str] = []
    self.out: list[Mutant] = []

  # -------------------------------------------------------------- scoping and skips
  def _active(self):
    if self.functions is None:
      return True
    q = '.'.join(self.scope)
    return any(q == f or q.startswith(f + '.') for f in self.functions)

  def _scoped(self, node):
    # Decorators, base classes and annotations are not visited; argument defaults are code.
    self.scope.append(node.name)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
        self.visit(default)
    body = node.body
    if body and _is_docstring(body[0]):
      body = body[1:]
    for stmt in body:
      self.visit(stmt)
    self.scope.pop()

  visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

  def visit_Module(self, node):
    body = node.body[1:] if node.body and _is_docstring(node.body[0]) else node.body
    for stmt in body:
      self.visit(stmt)

  def visit_Raise(self, node):  # error paths and their messages
    pass

  def visit_Import(self, node):
    pass

  visit_ImportFrom = visit_Import

  def visit_JoinedStr(self, node):  # f-strings: messages
    pass

  def visit_AnnAssign(self, node):  # the annotation is a type hint; its value is code
    if node.value is not None:
      self.visit(node.value)

  def visit_Assign(self, node):
    # metrics['name'] = …: a logged value, not what is trained.
    if any(
        isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id == 'metrics'
        for t in node.targets):
      return
    self.generic_visit(node)

  def visit_Expr(self, node):
    if _is_docstring(node):
      return
    self.generic_visit(node)

  # -------------------------------------------------------------- operators
  def _add(self, node, operator, edits):
    if not self._active() or not edits or any(e is None for e in edits):
      return
    self.out.append(Mutant(self.file, node.lineno, node.col_offset, operator, sorted(edits)))

  def visit_BinOp(self, node):
    new = BINOP_SWAP.get(type(node.op))
    if new is not None:
      start, end = self.src.span(node.left)[1], self.src.span(node.right)[0]
      self._add(node, f'binop {SYMBOL[type(node.op)]}→{SYMBOL[new]}',
                [_op_edit(self.src, start, end, SYMBOL[type(node.op)], SYMBOL[new])])
    self.generic_visit(node)

  def visit_AugAssign(self, node):
    new = BINOP_SWAP.get(type(node.op))
    if new is not None:
      start, end = self.src.span(node.target)[1], self.src.span(node.value)[0]
      old_s, new_s = SYMBOL[type(node.op)] + '=', SYMBOL[new] + '='
      self._add(node, f'augassign {old_s}→{new_s}', [_op_edit(self.src, start, end, old_s, new_s)])
    self.generic_visit(node)

  def visit_Compare(self, node):
    operands = [node.left] + node.comparators
    for i, op in enumerate(node.ops):
      new = CMP_SWAP.get(type(op))
      if new is None:
        continue
      start, end = self.src.span(operands[i])[1], self.src.span(operands[i + 1])[0]
      self._add(node, f'compare {SYMBOL[type(op)]}→{SYMBOL[new]}',
                [_op_edit(self.src, start, end, SYMBOL[type(op)], SYMBOL[new])])
    self.generic_visit(node)

  def visit_BoolOp(self, node):
    old = SYMBOL[type(node.op)]
    new = 'or' if old == 'and' else 'and'
    for a, b in zip(node.values, node.values[1:]):
      start, end = self.src.span(a)[1], self.src.span(b)[0]
      self._add(node, f'boolop {old}→{new}', [_op_edit(self.src, start, end, old, new)])
    self.generic_visit(node)

  def visit_keyword(self, node):
    # axis=-1 → axis=1 is the same axis on [B, C] logits (the common case); axis=-2 still runs.
    v = node.value
    if (node.arg == 'axis' and isinstance(v, ast.UnaryOp) and isinstance(v.op, ast.USub)
        and isinstance(v.operand, ast.Constant) and v.operand.value == 1):
      self.visit(v.operand)
      return
    self.generic_visit(node)

  def visit_UnaryOp(self, node):
    if isinstance(node.op, (ast.USub, ast.Not)):
      start, end = self.src.span(node)
      inner = self.src.text(*self.src.span(node.operand))
      label = 'unary -x→x' if isinstance(node.op, ast.USub) else 'not x→x'
      self._add(node, label, [(start, end, f'({inner})')])
    self.generic_visit(node)

  def visit_If(self, node):
    self._negate(node.test)
    self.generic_visit(node)

  def visit_IfExp(self, node):
    self._negate(node.test)
    self.generic_visit(node)

  def _negate(self, test):
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
      return  # covered by 'not x→x'
    start, end = self.src.span(test)
    self._add(test, 'condition c→not c', [(start, end, f'(not ({self.src.text(start, end)}))')])

  def visit_Return(self, node):
    if isinstance(node.value, (ast.BinOp, ast.Call)):
      start, end = self.src.span(node.value)
      self._add(node, 'return e→-e', [(start, end, f'-({self.src.text(start, end)})')])
    self.generic_visit(node)

  def visit_Constant(self, node):
    v = node.value
    start, end = self.src.span(node)
    if isinstance(v, bool):
      self._add(node, f'constant {v}→{not v}', [(start, end, repr(not v))])
    elif isinstance(v, (int, float)):
      new = _number(v)
      self._add(node, f'constant {v!r}→{new!r}', [(start, end, repr(new))])
    elif isinstance(v, str) and v in STRING_SWAP:
      quote = self.src.text(start, start + 1)
      self._add(node, f'string {v!r}→{STRING_SWAP[v]!r}',
                [(start, end, quote + STRING_SWAP[v] + quote)])

  def visit_Call(self, node):
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, 'id', None)
    if name in LOG_CALLS:
      return
    if name == 'stop_gradient' and len(node.args) == 1:
      start, end = self.src.span(node)
      arg = self.src.text(*self.src.span(node.args[0]))
      self._add(node, 'stop_gradient(x)→x', [(start, end, f'({arg})')])
    if name in CALL_SWAP:
      fstart, fend = self.src.span(func)
      self._add(node, f'call {name}→{CALL_SWAP[name]}',
                [(fend - len(name.encode()), fend, CALL_SWAP[name])])
    args = node.args
    if (len(args) >= 2 and name not in SYMMETRIC and all(isinstance(a, SIMPLE) for a in args[:2])
        and not any(isinstance(a, ast.Starred) for a in args[:2])):
      a0, a1 = self.src.span(args[0]), self.src.span(args[1])
      t0, t1 = self.src.text(*a0), self.src.text(*a1)
      if t0 != t1:
        self._add(node, 'swap first two args', [(*a0, t1), (*a1, t0)])
    self.generic_visit(node)


def _is_docstring(stmt):
  return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
          and isinstance(stmt.value.value, str))


def apply_edits(data: bytes, edits) -> bytes:
  for start, end, new in sorted(edits, reverse=True):
    data = data[:start] + new.encode() + data[end:]
  return data


def _describe(m: Mutant, data: bytes):
  """Fill m.original / m.mutated with the changed line(s), whitespace-collapsed."""
  first = data.rfind(b'\n', 0, m.edits[0][0]) + 1
  last = data.find(b'\n', m.edits[-1][1])
  last = len(data) if last < 0 else last
  delta = sum(len(new.encode()) - (e - s) for s, e, new in m.edits)
  mutated = apply_edits(data, m.edits)
  squash = lambda b: ' '.join(b.decode().split())
  m.original = squash(data[first:last])
  m.mutated = squash(mutated[first:last + delta])


def collect(file: str, all_functions=False) -> list[Mutant]:
  with open(os.path.join(ROOT, file), encoding='utf-8') as f:
    text = f.read()
  functions = None if all_functions else FUNCTIONS.get(file)
  c = _Collector(file, text, functions)
  c.visit(ast.parse(text))
  data = c.src.data
  seen, out = set(), []
  for m in sorted(c.out, key=lambda m: (m.line, m.col, m.operator)):
    mutated = apply_edits(data, m.edits)
    if mutated == data or mutated in seen:
      continue
    try:
      compile(mutated, file, 'exec')
    except SyntaxError:
      continue
    seen.add(mutated)
    _describe(m, data)
    out.append(m)
  per_line = collections.Counter()
  for m in out:
    m.index = per_line[m.line]
    per_line[m.line] += 1
  return out


def must_kill_mutants() -> list[Mutant]:
  out = []
  for name, file, old, new in MUST_KILL:
    with open(os.path.join(ROOT, file), encoding='utf-8') as f:
      data = f.read().encode()
    n = data.count(old.encode())
    if n != 1:
      raise SystemExit(f'must-kill mutant {name!r}: {old!r} occurs {n} times in {file} (needs '
                       f'exactly 1); update MUST_KILL in tests/mutate.py to the current source')
    start = data.find(old.encode())
    line = data.count(b'\n', 0, start) + 1
    m = Mutant(file, line, 0, 'must-kill', [(start, start + len(old.encode()), new)], name=name)
    _describe(m, data)
    out.append(m)
  return out


# ------------------------------------------------------------------ selection
def groups_for(file: str, override=None) -> list[list[str]]:
  groups = [override] if override else next(
      (g for p, g in TEST_MAP if fnmatch.fnmatch(file, p)), None)
  if groups is None:
    raise SystemExit(f'no tests mapped to {file}: add it to TEST_MAP or pass --tests')
  out = []
  for g in groups:
    args = shlex.split(g)
    kept = [
        a for a in args if not (a.endswith('.py') or '.py::' in a)
        or os.path.exists(os.path.join(ROOT,
                                       a.split('::')[0]))
    ]
    if any(a.endswith('.py') or '.py::' in a for a in kept):
      out.append(kept)
  return out


def sample(mutants, n, seed):
  """n mutants in random order, deterministic in seed: 2 per file when n allows, then at random."""
  if n is None or n >= len(mutants):
    return mutants
  rng = random.Random(seed)
  by_file = collections.defaultdict(list)
  for m in mutants:
    by_file[m.file].append(m)
  chosen, per_file = [], 2 if n >= 2 * len(by_file) else 0
  for file in sorted(by_file):
    chosen += rng.sample(by_file[file], min(per_file, len(by_file[file])))
  rest = [m for m in mutants if m not in chosen]
  chosen += rng.sample(rest, max(n - len(chosen), 0))
  rng.shuffle(chosen)  # run order is random too: a run cut short by --budget_s is still a sample
  return chosen


# ------------------------------------------------------------------ running
def make_copy() -> str:
  dst = tempfile.mkdtemp(prefix='tikd-mutate-tree-')
  ignore = shutil.ignore_patterns('.git', '__pycache__', '.pytest_cache', 'workdirs', '*.pyc')
  shutil.copytree(ROOT, dst, ignore=ignore, dirs_exist_ok=True)
  return dst


def child_env(cache_dir):
  env = dict(os.environ)
  env.update(
      JAX_COMPILATION_CACHE_DIR=cache_dir,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
      PYTHONDONTWRITEBYTECODE='1',  # equal-size edits within a second: no stale .pyc
      COLUMNS='250')  # pytest's summary line (the killing assertion) is not cut short
  return env


_FAIL = re.compile(r'^(FAILED|ERROR) (\S+)(?: - (.*))?$', re.M)


def run_pytest(tree, groups, timeout, env, extra=()):
  """→ (status 'passed' | 'killed' | 'timeout' | 'crashed', test id, detail, seconds, output)."""
  t0 = time.monotonic()
  for args in groups:
    left = timeout - (time.monotonic() - t0)
    if left <= 0:
      return 'timeout', None, f'over {timeout:.0f} s', time.monotonic() - t0, ''
    cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *extra, *args]
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, text=True)
    try:
      output, _ = proc.communicate(timeout=left)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      output = proc.communicate()[0]
      return 'timeout', None, f'over {timeout:.0f} s', time.monotonic() - t0, output
    if proc.returncode in (0, 5):  # 5: nothing selected (e.g. -k matched no test)
      continue
    if proc.returncode < 0:  # killed by a signal (an abort, the OOM killer): not a verdict
      tail = ' | '.join(output.strip().splitlines()[-3:])[-300:]
      return ('crashed', None, f'pytest died of signal {-proc.returncode}: {tail}',
              time.monotonic() - t0, output)
    hit = _FAIL.search(output)
    if hit:
      return 'killed', hit.group(2), (hit.group(3) or '')[:300], time.monotonic() - t0, output
    tail = ' | '.join(output.strip().splitlines()[-3:])[-300:]
    return 'killed', None, f'pytest rc {proc.returncode}: {tail}', time.monotonic() - t0, output
  return 'passed', None, '', time.monotonic() - t0, ''


class Runner:
  """One private tree per job; mutants of a file are applied to and restored in that tree."""

  def __init__(self, jobs, cache_dir, timeout, extra):
    self.trees = [make_copy() for _ in range(jobs)]
    self.free = list(self.trees)
    self.lock = threading.Lock()
    self.env = child_env(cache_dir)
    self.timeout = timeout
    self.extra = extra

  def close(self):
    for t in self.trees:
      shutil.rmtree(t, ignore_errors=True)

  def _take(self):
    with self.lock:
      return self.free.pop()

  def _give(self, tree):
    with self.lock:
      self.free.append(tree)

  def baseline(self, groups):
    tree = self._take()
    try:
      return run_pytest(tree, groups, 3600, self.env, self.extra)
    finally:
      self._give(tree)

  def run(self, m: Mutant, groups, timeout):
    tree = self._take()
    path = os.path.join(tree, m.file)
    with open(path, 'rb') as f:
      original = f.read()
    try:
      with open(path, 'wb') as f:
        f.write(apply_edits(original, m.edits))
      result = run_pytest(tree, groups, timeout, self.env, self.extra)
      if result[0] == 'crashed':
        # A crash is no verdict. Seen: an 8-device sharded step aborting when its executable is
        # loaded from the persistent cache (jax 0.10.2, CPU, flaky); rerun with a cold cache.
        cold = tempfile.mkdtemp(prefix='tikd-mutate-cold-cache-')
        try:
          result = run_pytest(tree, groups, timeout, dict(self.env, JAX_COMPILATION_CACHE_DIR=cold),
                              self.extra)
        finally:
          shutil.rmtree(cold, ignore_errors=True)
      return result
    finally:
      with open(path, 'wb') as f:
        f.write(original)
      self._give(tree)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('targets', nargs='*', help=f'files / globs to mutate (default {DEFAULT_TARGETS})')
  p.add_argument(
      '--tests', help="pytest arguments for every target instead of TEST_MAP, e.g. "
      "'tests/test_losses.py -k kd'")
  p.add_argument('--max_mutants', type=int, help='run a deterministic sample of this many')
  p.add_argument('--sample', type=int, default=0, help='sampling seed')
  p.add_argument('--jobs', type=int, default=1, help='mutants run in parallel (one tree copy each)')
  p.add_argument('--list', action='store_true', help='print the mutants, run nothing')
  p.add_argument('--only', action='append', default=[],
                 help='file:line or file:line:index (repeatable): run just these mutants')
  p.add_argument('--must_kill', action='store_true', help='run the named must-kill mutants')
  p.add_argument('--all_functions', action='store_true',
                 help='mutate every function, also outside FUNCTIONS (vit.py VJPs)')
  p.add_argument(
      '--budget_s', type=float, help='start no mutant after this many seconds '
      '(baselines included); the ones not started are reported as not run')
  p.add_argument(
      '--timeout', type=float, help='seconds per mutant (default max(60, 3 × the '
      'unmutated run of its tests)); a mutant over it counts as killed (timeout)')
  p.add_argument(
      '--skip_baseline', action='store_true', help='do not run the unmutated tests '
      'first (right after a run whose baselines passed; needs --timeout)')
  p.add_argument('--results', default=os.path.join(ROOT, 'workdirs', 'mutate', 'results.jsonl'),
                 help='JSON lines, appended; each line carries the run id')
  p.add_argument('--cache_dir', default=os.path.join(tempfile.gettempdir(), 'tikd-mutate-cache'),
                 help='JAX persistent compilation cache shared by all mutants')
  p.add_argument(
      '--pytest_arg', action='append', default=[],
      help="extra pytest argument (repeatable), e.g. --pytest_arg=-m "
      "--pytest_arg='not slow'")
  args = p.parse_args(argv)

  if args.must_kill:
    mutants = must_kill_mutants()
  else:
    files = []
    for pattern in args.targets or DEFAULT_TARGETS:
      hits = sorted(os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(ROOT, pattern)))
      if not hits:
        raise SystemExit(f'{pattern}: no such file')
      files += [f for f in hits if f not in files]
    mutants = [m for f in files for m in collect(f, args.all_functions)]
    if args.only:
      keep = set()
      for spec in args.only:
        parts = spec.split(':')
        sel = [
            m for m in mutants if m.file == parts[0] and str(m.line) == parts[1] and (
                len(parts) < 3 or str(m.index) == parts[2])
        ]
        if not sel:
          raise SystemExit(f'--only {spec}: no mutant there (see --list)')
        keep |= {m.key for m in sel}
      mutants = [m for m in mutants if m.key in keep]
    else:
      mutants = sample(mutants, args.max_mutants, args.sample)

  if args.list:
    for m in mutants:
      label = m.name or m.operator
      print(f'{m.key:40s} {label}\n    - {m.original}\n    + {m.mutated}')
    print(f'{len(mutants)} mutants', file=sys.stderr)
    return 0

  groups = {m.file: groups_for(m.file, args.tests) for m in mutants}
  for f in sorted(groups):
    if not groups[f]:
      print(f'{f}: none of its test files exist; its mutants are skipped', file=sys.stderr)
  mutants = [m for m in mutants if groups[m.file]]
  run_id = time.strftime('%Y%m%d-%H%M%S')
  log_dir = os.path.join(os.path.dirname(os.path.abspath(args.results)), f'logs-{run_id}')
  os.makedirs(log_dir, exist_ok=True)
  runner = Runner(max(1, args.jobs), args.cache_dir, args.timeout, args.pytest_arg)
  t_start = time.monotonic()
  try:
    # The unmutated tests must pass (and fill the compilation cache); their time sets the timeout.
    timeouts = {}
    for key in sorted({tuple(map(tuple, g)) for g in groups.values() if g}):
      g = [list(a) for a in key]
      if args.skip_baseline:
        if not args.timeout:
          raise SystemExit('--skip_baseline needs --timeout')
        timeouts[key] = args.timeout
        continue
      status, test, detail, secs, _ = runner.baseline(g)
      print(f'baseline {" ; ".join(" ".join(a) for a in g)}: {status} in {secs:.0f} s', flush=True)
      if status != 'passed':
        raise SystemExit(f'the unmutated tests fail ({test}: {detail}); fix them before mutating')
      timeouts[key] = args.timeout or max(60.0, 3 * secs)

    def one(m):
      if args.budget_s and time.monotonic() - t_start > args.budget_s:
        return None
      key = tuple(map(tuple, groups[m.file]))
      status, test, detail, secs, output = runner.run(m, groups[m.file], timeouts[key])
      status = {'passed': 'survived'}.get(status, status)
      if status in ('crashed', 'timeout') or (status == 'killed' and not test):
        log = os.path.join(log_dir, f'{m.file.replace("/", "_")}-{m.line}-{m.index}.txt')
        with open(log, 'w') as f:
          f.write(output)
        detail = f'{detail} (output: {log})'
      return dict(run=run_id, file=m.file, line=m.line, index=m.index, operator=m.operator,
                  name=m.name or None, original=m.original, mutated=m.mutated, status=status,
                  killed_by=test, detail=detail, seconds=round(secs, 1))

    records = []
    with open(args.results,
              'a') as out, concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
      for i, r in enumerate(pool.map(one, mutants)):
        if r is None:
          continue
        records.append(r)
        out.write(json.dumps(r) + '\n')
        out.flush()
        print(
            f'[{i + 1}/{len(mutants)}] {r["status"]:8s} {r["seconds"]:6.1f}s '
            f'{r["file"]}:{r["line"]}:{r["index"]} {r["name"] or r["operator"]}' +
            (f'  ({r["killed_by"]})' if r['killed_by'] else ''), flush=True)
  finally:
    runner.close()

  summary = collections.defaultdict(collections.Counter)
  for r in records:
    summary[r['file']][r['status']] += 1
  # Kill rate = (killed + timeout) / (run − crashed): a crash (twice) says nothing of the mutant.
  def row(name, c):
    n = sum(c.values())
    rate = (c['killed'] + c['timeout']) / max(n - c['crashed'], 1)
    return (f'{name:34s} {n:4d} {c["killed"]:7d} {c["timeout"]:8d} {c["crashed"]:8d} '
            f'{c["survived"]:9d} {rate:6.0%}')

  print(f'\n{"file":34s} {"run":>4s} {"killed":>7s} {"timeout":>8s} {"crashed":>8s} '
        f'{"survived":>9s} {"rate":>6s}')
  total = collections.Counter()
  for f in sorted(summary):
    total.update(summary[f])
    print(row(f, summary[f]))
  if records:
    secs = sum(r['seconds'] for r in records) / len(records)
    print(row('all', total) + f'   ({secs:.1f} s per mutant)')
  for r in records:
    if r['status'] in ('survived', 'crashed'):
      print(f'{r["status"].upper()} {r["file"]}:{r["line"]}:{r["index"]} '
            f'{r["name"] or r["operator"]}: '
            f'{r["original"]}  →  {r["mutated"]}')
  with open(args.results, 'a') as out:
    out.write(json.dumps(dict(run=run_id, summary={f: dict(c) for f, c in summary.items()})) + '\n')
  if len(records) < len(mutants):
    print(f'{len(mutants) - len(records)} mutants not run (--budget_s {args.budget_s:.0f} spent)')
  print(f'results: {args.results}')
  return 1 if args.must_kill and (total['survived'] or total['crashed']) else 0


if __name__ == '__main__':
  sys.exit(main())
