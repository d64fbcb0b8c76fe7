"""`config.text.control`: the caption rows a TIKD run trains on, or a control in their place
(configs/demo.py:rows=text compares them paired by seed; docs/experiments.md)."""
import json
import types

import numpy as np
import pytest

from configs import demo, tiny
from tikd_jax.data import build_source
from tikd_jax.train import loop
from tikd_jax.train.run import load_data
from tikd_jax.train.spec import resolve


@pytest.fixture(scope='module')
def features_dir(tmp_path_factory):
  """One random 8-d row per digits train example, with the metadata the loader checks."""
  source = build_source(tiny.get_config('none').data, 'train')
  out = tmp_path_factory.mktemp('text')
  np.save(out / 'features.npy',
          np.random.default_rng(0).standard_normal((len(source), 8)).astype(np.float32))
  meta = {
      'dim': 8, 'dtype': 'float32', 'num_examples': len(source),
      'dataset': {'name': source.name, 'split': source.split, 'fingerprint': source.fingerprint()}
  }
  (out / 'meta.json').write_text(json.dumps(meta))
  return str(out)


def _loaded(features_dir, control, seed=3):
  c = tiny.get_config('none')
  with c.unlocked():
    c.seed, c.text.features_dir, c.text.control = seed, features_dir, control
  train = build_source(c.data, 'train')
  return c, load_data(resolve(c), (train, train))


def test_each_control_replaces_the_rows_as_documented(features_dir):
  captions = np.load(f'{features_dir}/features.npy')
  _, data = _loaded(features_dir, 'captions')
  np.testing.assert_array_equal(data.text_features, captions)
  _, shuffled = _loaded(features_dir, 'shuffled')
  perm = np.random.default_rng(3).permutation(len(captions))  # the run's seed draws it
  np.testing.assert_array_equal(shuffled.text_features, captions[perm])
  assert np.mean(perm == np.arange(len(perm))) < 0.01  # almost every image gets another's row
  _, other_seed = _loaded(features_dir, 'shuffled', seed=4)
  assert not np.array_equal(other_seed.text_features, shuffled.text_features)
  _, constant = _loaded(features_dir, 'constant')
  np.testing.assert_allclose(constant.text_features,
                             np.broadcast_to(captions.mean(0), captions.shape), atol=1e-6)


def test_a_train_batch_carries_the_controlled_rows_of_its_images(features_dir):
  c, data = _loaded(features_dir, 'shuffled')
  stream = loop.train_stream(types.SimpleNamespace(spec=resolve(c), data=data),
                             types.SimpleNamespace(resolution=None), 0)
  batch = next(stream.iterator)
  stream.close()
  np.testing.assert_array_equal(batch['text'], data.text_features[batch['index']])


def test_unknown_controls_fail_and_the_demo_pairs_the_controls_by_seed():
  c = tiny.get_config('none')
  with c.unlocked():
    c.text.control = 'random'
  with pytest.raises(ValueError, match=r"config.text.control='random': use one of"):
    resolve(c)
  runs = demo.get_config('seeds=2,rows=text')
  controls = {name: runs.runs[name].text.control for name in runs.run_order if 'student' in name}
  assert controls == {
      f'student_tikd_self_distill{suffix}_seed{s}': control for s in (0, 1)
      for suffix, control in (('', 'captions'), ('_shuffled', 'shuffled'), ('_constant',
                                                                            'constant'))
  }
  for s in (0, 1):  # same seed, same teacher, same design: only the text differs
    rows = [runs.runs[n] for n in runs.run_order if n.endswith(f'_seed{s}') and 'student' in n]
    assert {r.seed for r in rows} == {s} and len({r.teacher.checkpoint for r in rows}) == 1
    assert len({json.dumps(r.tikd.to_dict(), sort_keys=True) for r in rows}) == 1


def test_the_paired_summary_reads_each_seeds_rows(tmp_path, capsys):
  """benchmarks/text_controls.py: paired differences and t over the seeds that finished."""
  from benchmarks import text_controls
  top1 = {'': [90.0, 92.0, 95.0], '_shuffled': [89.0, 92.5, 93.0], '_constant': [90.0, 92.0, 95.0]}
  for suffix, values in top1.items():
    for seed, value in enumerate(values):
      run = tmp_path / f'student_tikd_self_distill{suffix}_seed{seed}'
      run.mkdir()
      (run / 'final_eval.json').write_text(json.dumps({'top1': value}))
  (tmp_path / 'student_tikd_self_distill_seed3').mkdir()  # unfinished: left out
  summary = text_controls.main([str(tmp_path), '--out', str(tmp_path / 'rows.jsonl')])
  assert summary['seeds'] == [0, 1, 2]
  d = np.array([1.0, -0.5, 2.0])  # captions − shuffled
  shuffled = summary['comparisons']['shuffled']
  assert shuffled['mean'] == pytest.approx(d.mean())
  assert shuffled['t'] == pytest.approx(d.mean() / (d.std(ddof=1) / np.sqrt(3)))
  assert summary['comparisons']['constant']['mean'] == 0.0
  assert '| captions − shuffled | +0.83 ± 1.26 |' in capsys.readouterr().out
  rows = [json.loads(line) for line in (tmp_path / 'rows.jsonl').read_text().splitlines()]
  assert [r['control'] for r in rows] == ['shuffled', 'constant'] and rows[0]['df'] == 2
