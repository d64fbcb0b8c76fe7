"""benchmarks/attention_core.py: every way of writing the attention core is the model's formula
(forward and the q, k, v gradients), and the script reports every contestant, PyTorch's too."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import attention_core  # noqa: E402


def test_every_way_is_the_model_formula_and_every_contestant_is_reported(tmp_path):
  out = tmp_path / 'rows.jsonl'
  attention_core.main(['--sizes', 'small', '--batch', '8', '--runs', '1', '--out', str(out)])
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  core = {r['way']: r for r in rows if r['name'] == 'attention_core'}
  jax_ways = set(attention_core.cores()) | {f'model@{o}' for o in attention_core.OPTIONS}
  assert set(core) == jax_ways | {'torch'}
  for way in jax_ways:
    assert core[way]['max_rel_error_vs_model'] <= attention_core.TOLERANCE, way
  assert {r['way'] for r in rows if r['name'] == 'attention_matmul'
         } == {'xla_batched_dot', 'torch_bmm'}
  assert all(r['median_ms'] > 0 and r['heads'] == 8 and r['head_dim'] == 16 for r in rows)


def test_a_way_that_is_not_the_formula_is_refused(monkeypatch):
  """The check is real: a core without the 1/√d scale stops the benchmark."""
  cores = attention_core.cores

  def with_unscaled():
    ways = cores()
    model = ways['model']
    ways['scale_q'] = lambda q, k, v: model(q * q.shape[-1]**0.5, k, v)
    return ways

  monkeypatch.setattr(attention_core, 'cores', with_unscaled)
  monkeypatch.setattr(attention_core, 'OPTIONS', {})
  with pytest.raises(AssertionError, match='scale_q differs from the model formula'):
    attention_core.run('small', 8, 1, 'core', lambda row: None)
