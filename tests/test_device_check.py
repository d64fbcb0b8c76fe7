"""benchmarks/device_check.sh in its CPU mode: the GPU check's own code path, CI-sized.

Speed is never asserted; what is asserted is that every contestant of the matrix is there, that
bfloat16 really reaches the matmuls on both sides, and that the numbers the rows report are the
ones their definitions give (FLOP counts, fraction of the peak, the ratio against PyTorch eager).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import peak as peak_lib  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks import train_step  # noqa: E402


@pytest.fixture(scope='module')
def cpu_check(tmp_path_factory):
  out = tmp_path_factory.mktemp('device_check')
  env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
  subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'device_check.sh'), '--cpu'], env=env,
                 check=True, cwd=ROOT, timeout=900)
  with open(out / 'device_check.jsonl') as f:
    rows = [json.loads(line) for line in f]
  return out, rows


def test_every_framework_and_dtype_is_timed(cpu_check):
  _, rows = cpu_check
  steps = {(r['framework'], r['dtype']): r for r in rows if r['name'] == 'train_step'}
  assert set(steps) == {('jax', 'float32'), ('jax', 'bfloat16'), ('torch', 'float32'),
                        ('torch', 'bfloat16')}
  for row in steps.values():
    assert row['median_s'] > 0 and row['runs'] == 1 and row['size'] == 'micro'
  assert steps['jax', 'float32']['compile_s'] > 0


def test_bfloat16_reaches_the_matmuls_on_both_sides(cpu_check):
  _, rows = cpu_check
  steps = {(r['framework'], r['dtype']): r for r in rows if r['name'] == 'train_step'}
  assert steps['jax', 'float32']['bf16_dots'] == 0
  assert steps['jax', 'bfloat16']['bf16_dots'] > 20  # every ViT and ResNet matmul, fwd and bwd
  assert steps['torch', 'float32']['compute_dtype'] == 'float32'
  assert steps['torch', 'bfloat16']['compute_dtype'] == 'bfloat16'


def test_rows_report_what_their_definitions_give(cpu_check):
  out, rows = cpu_check
  peaks = {r['what']: r for r in rows if r['name'] == 'peak'}
  assert set(peaks) == {'jax_dot', 'numpy_sgemm'}
  assert all(p['gflops'] > 0 for p in peaks.values())
  for row in (r for r in rows if r['name'] == 'train_step'):
    # 8 images: the teacher forward once, the micro student's forward three times.
    flops = 8 * (train_step.resnet_forward_flops('resnet32x4') +
                 3 * train_step.vit_forward_flops('micro'))
    assert row['model_gflop'] == pytest.approx(flops / 1e9, abs=0.01)
    assert row['peak_gflops'] == peaks['jax_dot']['gflops']
    assert row['peak_source'] == 'jax_dot_float32_measured'
    # The row holds the fraction to 4 decimals: at most 5e-5 off, whatever the machine's speed.
    assert row['fraction_of_peak'] == pytest.approx(
        row['achieved_gflops'] / peaks['jax_dot']['gflops'], rel=1e-3, abs=5.1e-5)
  table = (out / 'device_check.md').read_text()
  assert table.count('| micro |') == 4
  torch_rows = [line for line in table.splitlines() if '| torch |' in line]
  assert len(torch_rows) == 2 and all('| 1.00 |' in line for line in torch_rows)
  assert 'jax' in (out / 'environment.txt').read_text()


def test_cpu_mode_profiles_one_step(cpu_check):
  out, _ = cpu_check
  (row,) = [json.loads(line) for line in (out / 'profile.jsonl').read_text().splitlines()]
  assert row['size'] == 'micro' and os.path.exists(row['trace'])
  assert 0 < len(row['top_ops']) <= 15 and 0 < len(row['top_kinds']) <= 15
  assert 0 < sum(o['share'] for o in row['top_ops']) <= 1.0001
  assert [o['ms'] for o in row['top_ops']] == sorted((o['ms'] for o in row['top_ops']),
                                                     reverse=True)
  assert '| op | ms | calls | share |' in (out / 'profile.md').read_text()


def test_cpu_mode_times_the_trainer_end_to_end(cpu_check):
  out, _ = cpu_check
  rows = [json.loads(line) for line in (out / 'trainer_throughput.jsonl').read_text().splitlines()]
  assert [row['randaugment_on'] for row in rows] == ['host', 'device']
  for row in rows:
    assert row['size'] == 'micro' and row['batch'] == 8 and row['rounds'] == 1
    assert row['end_to_end_images_per_s'] > 0 and row['step_images_per_s'] > 0
    assert set(row['breakdown_s']) == {
        'input_wait', 'host_to_device', 'metrics_sync', 'logging', 'evaluation', 'checkpointing'
    }
    assert row['breakdown_s']['input_wait'] > 0


def test_profile_summary_groups_complete_events_by_name():
  from benchmarks import profile_summary  # pylint: disable=g-import-not-at-top
  trace = {
      'traceEvents': [
          {'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/host:CPU'}},
          {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/device:GPU:0'}},
          {'ph': 'X', 'pid': 2, 'name': 'dot.1', 'dur': 300.0},
          {'ph': 'X', 'pid': 2, 'name': 'dot.2', 'dur': 100.0},
          {'ph': 'X', 'pid': 2, 'name': 'fusion.3', 'dur': 100.0},
          {'ph': 'X', 'pid': 1, 'name': 'host_op', 'dur': 5000.0},  # not the device's
          {'ph': 'i', 'pid': 2, 'name': 'marker'},
      ]
  }
  assert profile_summary.summarise(trace, top=2) == [
      {'op': 'dot.1', 'ms': 0.3, 'count': 1, 'share': 0.6},
      {'op': 'dot.2', 'ms': 0.1, 'count': 1, 'share': 0.2},
  ]
  assert profile_summary.summarise(
      trace, by_kind=True)[0] == {'op': 'dot', 'ms': 0.4, 'count': 2, 'share': 0.8}


def test_sweep_table_keeps_only_points_that_help():
  base = {'name': 'train_step', 'size': 'small', 'dtype': 'bfloat16', 'batch': 1024}
  rows = [
      dict(base, framework='jax', images_per_s=1000.0),
      dict(base, framework='jax_cudnn', images_per_s=1100.0),
      dict(base, framework='jax', tag='command buffers off', images_per_s=990.0),
      dict(base, framework='jax', tag='batch 2048', batch=2048, images_per_s=1050.0),
      dict(base, framework='torch_compile', images_per_s=2000.0),
  ]
  lines = report.sweep(rows).splitlines()[2:]
  assert [(line.split(' | ')[0].strip('| '), line.split(' | ')[-1].strip(' |')) for line in lines
         ] == [('cudnn attention', 'yes'), ('command buffers off', 'no'), ('batch 2048', 'yes')]


def test_resnet32x4_flops_match_the_published_count():
  # CRD / TIKD tables: ResNet32x4 on 32×32 CIFAR is 1.08 G multiply-adds per image.
  assert train_step.resnet_forward_flops('resnet32x4') / 2 / 1e9 == pytest.approx(1.08, abs=0.01)


def test_deadline_skips_sizes_without_building_them(tmp_path):
  out = tmp_path / 'rows.jsonl'
  subprocess.run([
      sys.executable,
      os.path.join(ROOT, 'benchmarks', 'train_step.py'), '--sizes', 'small,large', '--deadline_s',
      '0', '--peak', '100', '--out',
      str(out)
  ], check=True, cwd=ROOT, timeout=120, capture_output=True)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r['size'], 'deadline' in r['skipped']) for r in rows] == [('small', True),
                                                                     ('large', True)]


def test_datasheet_peaks_pick_the_specific_part_first():
  assert peak_lib.datasheet_bf16_tflops('NVIDIA H100 80GB HBM3') == 989.4
  assert peak_lib.datasheet_bf16_tflops('NVIDIA H100 PCIe') == 756.0
  assert peak_lib.datasheet_bf16_tflops('NVIDIA H200') == 989.4
  assert peak_lib.datasheet_bf16_tflops('cpu') is None


def test_table_ratio_is_torch_eager_time_over_ours():
  base = {
      'size': 's', 'dtype': 'float32', 'name': 'train_step', 'images_per_s': 1.0,
      'load_1min': {'median': 0}
  }
  rows = [dict(base, framework='torch', median_s=2.0), dict(base, framework='jax', median_s=0.5)]
  jax_line = next(line for line in report.table(rows).splitlines() if '| jax |' in line)
  assert '| 4.00 |' in jax_line


def test_curriculum_step_runs_the_irkd_config_against_its_torch_twin(tmp_path):
  """benchmarks/curriculum_step.py, CI-sized: the trainer's IRKD step as configured (stage
  validation off: it is an eval) against PyTorch, and the ratio row its definition gives."""
  out = tmp_path / 'curriculum.jsonl'
  subprocess.run([
      sys.executable,
      os.path.join(ROOT, 'benchmarks', 'curriculum_step.py'), '--batch', '8', '--runs', '2',
      '--warmup', '0', '--resolutions', '12', '--frameworks', 'jax,torch_1t', '--out',
      str(out)
  ], check=True, cwd=ROOT, timeout=900)
  with open(out) as f:
    rows = [json.loads(line) for line in f]
  steps = {r['framework']: r for r in rows if r['benchmark'] == 'curriculum_step'}
  assert set(steps) == {'jax', 'torch_1t'}
  assert all(r['median_s'] > 0 and r['resolution'] == 12 for r in steps.values())
  (ratio,) = [r for r in rows if r['benchmark'] == 'curriculum_ratio']
  assert ratio['torch_over_jax'] == pytest.approx(
      steps['torch_1t']['median_s'] / steps['jax']['median_s'], rel=0.01)


def test_curriculum_torch_twin_drops_out_as_the_recipe():
  """The PyTorch student does the work ours does: the recipe's hidden dropout after the
  embeddings, each attention's projection and each MLP, and no attention dropout (p4)."""
  from torch import nn  # pylint: disable=g-import-not-at-top

  from benchmarks import curriculum_step  # pylint: disable=g-import-not-at-top
  from configs import irkd_cifar10  # pylint: disable=g-import-not-at-top
  model = irkd_cifar10.get_config('kd_cl,p4').model
  student, teacher = curriculum_step.torch_twins()
  rates = [m.p for m in student.modules() if isinstance(m, nn.Dropout)]
  depth = len(student.blocks)
  assert model.dropout == 0.1 and model.attn_dropout == 0.0
  assert sorted(rates) == sorted([0.1] * (1 + 2 * depth) + [0.0] * depth)
  assert student.training and not teacher.training
  assert not any(p.requires_grad for p in teacher.parameters())
