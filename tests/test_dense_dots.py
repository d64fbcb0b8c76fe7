"""benchmarks/dense_dots.py: every XLA way computes the dense layer's product, and the script
reports every contestant of every layer and product, PyTorch's too."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import dense_dots  # noqa: E402
from benchmarks import report  # noqa: E402


def test_every_product_of_every_layer_is_timed_and_checked(tmp_path):
  out = tmp_path / 'rows.jsonl'
  dense_dots.main(['--models', 'micro', '--rows', '40', '--runs', '2', '--out', str(out)])
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  ways = {'xla', 'torch'} | {f'xla@{o}' for o in dense_dots.OPTIONS}
  dots = [r for r in rows if r['name'] == 'dense_dot']
  expected = {(layer, product, way)
              for layer in ('qkv', 'proj', 'fc1', 'fc2')
              for product in dense_dots.PRODUCTS
              for way in ways}
  assert {(r['layer'], r['product'], r['way']) for r in dots} == expected
  assert {(r['layer'], r['in'], r['out']) for r in dots} == {('qkv', 32, 96), ('proj', 32, 32),
                                                             ('fc1', 32, 64), ('fc2', 64, 32)}
  assert all(r['max_rel_error'] <= dense_dots.TOLERANCE for r in dots if r['way'].startswith('xla'))
  assert all(r['median_ms'] > 0 and r['rows'] == 40 for r in dots)
  block = {r['way']: r for r in rows if r['name'] == 'dense_dots_block'}
  assert set(block) == ways
  for way, row in block.items():
    total = sum(r['median_ms'] for r in dots if r['way'] == way)
    assert row['sum_of_medians_ms'] == pytest.approx(total, abs=0.01)
  assert block['torch']['torch_over_way'] == 1.0


def test_a_product_that_is_not_the_layers_is_refused(monkeypatch):
  """The check is real: a dW off by 0.1 % (100× the tolerance) stops the benchmark."""
  products = dense_dots.products

  def with_wrong_dw():
    ways = products()
    right = ways['dW']
    ways['dW'] = lambda x, w, dy: right(x, w, dy) * 1.001
    return ways

  monkeypatch.setattr(dense_dots, 'products', with_wrong_dw)
  monkeypatch.setattr(dense_dots, 'OPTIONS', {})
  with pytest.raises(AssertionError, match='xla dW of micro qkv differs from the float64'):
    dense_dots.run('micro', 40, 1, lambda row: None)


def test_every_call_waits_before_it_and_outside_its_time(monkeypatch):
  """report.interleave's pause (dense_dots uses it so that one contestant's spinning threads do
  not slow the next): before every call, order rotated per round, and not in the timings."""
  times = report.interleave({'a': lambda: None, 'b': lambda: None}, 2, pause_s=0.03)
  assert all(t < 0.02 for name in 'ab' for t in times[name][0]), times
  events = []
  monkeypatch.setattr(report.time, 'sleep', lambda s: events.append(s))
  report.interleave({'a': lambda: events.append('a'), 'b': lambda: events.append('b')}, 2, 0.05)
  assert events == [0.05, 'a', 0.05, 'b', 0.05, 'b', 0.05, 'a']
