"""benchmarks/host_memory.py: one row per (step, preset), each from a fresh interpreter."""
import json

from benchmarks import host_memory


def test_rows_say_which_preset_kept_the_temporaries(tmp_path, capsys):
  out = tmp_path / 'rows.jsonl'
  host_memory.main([
      '--resolutions', '12', '--sizes', '', '--batch', '16', '--calls', '2', '--presets',
      'no_ynn,auto', f'--out={out}'
  ])
  rows = {r['xla_options']: r for r in map(json.loads, out.read_text().splitlines())}
  assert capsys.readouterr().out.count('"host_memory"') == 2
  assert (rows['no_ynn']['small_heaps'], rows['auto']['small_heaps']) == (False, True)
  assert rows['auto']['minor_faults'] <= rows['no_ynn']['minor_faults']
  for row in rows.values():
    assert (row['step'], row['resolution'], row['batch'], row['calls']) == ('irkd', 12, 16, 2)
    assert row['peak_rss_mb'] > 0 and row['median_s'] > 0
