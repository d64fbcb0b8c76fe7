"""Every preset's docstring lists where it departs from the released code, machine-readably, and
the list matches the config: a block

  Departs from the released code (`ARG`):
    key.path = python_value  # why, and what the released code does

per argument it documents (or `Departs from the released code (`ARG`): none  # why`). Each
`key = value` line must equal `get_config(ARG)`'s value (a key the config lacks reads as None), so
a preset that drifts from its docstring fails here. docs/differences.md is the table of them all.
"""
import ast
import glob
import importlib
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = re.compile(r'^Departs from the released code \(`([^`]*)`\):(.*)$')
LINE = re.compile(r'^  ([A-Za-z_][\w.]*) = (.+?)(?:  # .*)?$')
PRESETS = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
    if os.path.basename(p) not in ('__init__.py', 'common.py'))


def departures(doc: str) -> list[tuple[str, bool, list[tuple[str, str]]]]:
  """[(arg, says none, [(key, value source)])] of a docstring."""
  blocks, lines = [], doc.splitlines()
  for i, line in enumerate(lines):
    m = HEADER.match(line)
    if not m:
      continue
    entries = []
    for follow in lines[i + 1:]:
      e = LINE.match(follow)
      if not e:
        break
      entries.append((e.group(1), e.group(2)))
    blocks.append((m.group(1), m.group(2).strip().startswith('none'), entries))
  return blocks


def _plain(x):
  if hasattr(x, 'to_dict'):
    x = x.to_dict()
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def _get(config, key: str):
  node = config
  for part in key.split('.'):
    if part not in node:
      return None
    node = node[part]
  return _plain(node)


def _value(source: str):
  tree = ast.parse(source, mode='eval')
  for node in ast.walk(tree):  # literals, tuples / lists, and dict(k=literal) calls only
    if isinstance(node,
                  ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id == 'dict'):
      raise ValueError(f'not a literal: {source}')
  return _plain(eval(compile(tree, '<docstring>', 'eval'), {'__builtins__': {}}, {'dict': dict}))  # pylint: disable=eval-used


@pytest.mark.parametrize('preset', PRESETS)
def test_preset_docstring_lists_its_departures_and_they_hold(preset):
  module = importlib.import_module(f'configs.{preset}')
  blocks = departures(module.__doc__ or '')
  assert blocks, (f'configs/{preset}.py: its docstring has no "Departs from the released code '
                  f'(`ARG`):" list (docs/differences.md)')
  for arg, none, entries in blocks:
    assert none or entries, f'configs/{preset}.py `{arg}`: an empty list (write ": none  # why")'
    config = module.get_config(arg)
    for key, source in entries:
      assert _get(config, key) == _value(source), (
          f'configs/{preset}.py:{arg}: the docstring says {key} = {source}, the config has '
          f'{_get(config, key)!r}: update the docstring (and docs/differences.md) or the config')


def test_the_check_catches_a_drift():
  doc = 'x\n\nDeparts from the released code (`large`):\n  batch_size = 256  # ours\n  ema.decay = 0.5\n'
  from configs import tikd_cifar100  # pylint: disable=g-import-not-at-top
  (arg, _, entries), = departures(doc)
  config = tikd_cifar100.get_config(arg)
  assert [(k, _get(config, k) == _value(v)) for k, v in entries] == [('batch_size', True),
                                                                     ('ema.decay', False)]
