"""`python -m tikd_jax.text_teacher import-log`: a released TIKD description log → captions.jsonl.

The released log format (docs/text_teacher.md, "The released captions"; docs of
tikd_jax/text_teacher/released_log.py) is read by `extract_descriptions` in JSJ515-Group/TIKD's
text_encoder.py; `released_descriptions` below states that parser again, in our words, so the
importer is checked against it as well as against captions written out by hand.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tikd_jax.text_teacher.__main__ import main

NUM_IMAGES = 4


def released_descriptions(path: str) -> list[str]:
  """The released parser: responses are collected until a line starting with "Batch" closes the
  description; other lines are skipped; empty descriptions are dropped."""
  out, current = [], ''
  with open(path, encoding='utf-8') as f:
    for raw in f:
      line = raw.strip()
      if 'Model response:' in line:
        current += ' ' + line.split('Model response:')[1].strip()
      if line.startswith('Batch'):
        if current:
          out.append(current.strip())
        current = ''
  if current:
    out.append(current.strip())
  return out


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """An image folder of NUM_IMAGES tiny images: the split the log describes."""
  from PIL import Image
  root = tmp_path_factory.mktemp('import_log') / 'images'
  rng = np.random.default_rng(0)
  for i in range(NUM_IMAGES):
    d = root / 'train' / f'class{i % 2}'
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(d / f'{i}.png')
  return str(root)


def _write(path, text: str) -> str:
  path.write_text(text, encoding='utf-8')
  return str(path)


def _import(folder, log, out, *extra) -> int:
  return main([
      'import-log', '--data.name', 'image_folder', '--data.dir', folder, '--split', 'train',
      '--log', log, '--out',
      str(out), *extra
  ])


def _captions(out) -> list[str]:
  with open(os.path.join(out, 'captions.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['index'] for r in rows] == list(range(len(rows)))
  return [r['caption'] for r in rows]


# Header-first layout: a block with its response split over two marker lines (the released parser
# joins them with a space), and console noise that is not part of any response.
HEADER_FIRST = """\
Batch 1/4, image 0
Model response: A small   black cat.
Batch 2/4, image 1
  Model response: A red truck
Model response: on a road.

Batch 3/4, image 2
Model response: Two birds.
Batch 4/4, image 3
Model response: A ship at sea.
"""
HEADER_FIRST_CAPTIONS = [
    'A small   black cat.', 'A red truck on a road.', 'Two birds.', 'A ship at sea.'
]

INLINE = """\
Batch 1 Model response: A small black cat.
Batch 2 Model response: A red truck.
Batch 3 Model response: Two birds.
Batch 4 Model response: A ship at sea.
"""

# A response that spans lines: the continuation lines carry no marker.
MULTILINE = """\
Batch 1
Model response: A small black cat
sitting on a sofa.
Batch 2
Model response: A red truck.
Batch 3
Model response: Two birds.
Batch 4
Model response: A ship
at sea,
with sails.
"""


def test_both_layouts_give_the_captions_of_the_released_parser_by_index(folder, tmp_path):
  log = _write(tmp_path / 'header.txt', HEADER_FIRST)
  assert _import(folder, log, tmp_path / 'a') == 0
  assert _captions(tmp_path / 'a') == HEADER_FIRST_CAPTIONS
  assert released_descriptions(log) == HEADER_FIRST_CAPTIONS
  with open(tmp_path / 'a' / 'caption_meta.json') as f:
    meta = json.load(f)
  assert meta['captioner'] == 'released_log'
  assert meta['dataset']['num_examples'] == NUM_IMAGES
  assert 'import-log' in meta['command'] and os.path.abspath(log) in meta['command']

  log = _write(tmp_path / 'inline.txt', INLINE)
  assert _import(folder, log, tmp_path / 'b') == 0
  expected = ['A small black cat.', 'A red truck.', 'Two birds.', 'A ship at sea.']
  assert _captions(tmp_path / 'b') == expected == released_descriptions(log)


def test_multiline_response_is_an_error_unless_joined_or_ignored(folder, tmp_path, capsys):
  log = _write(tmp_path / 'multi.txt', MULTILINE)
  assert _import(folder, log, tmp_path / 'a') == 2
  err = capsys.readouterr().err
  assert f'{log}:3:' in err and "'sitting on a sofa.'" in err
  assert '--other_lines join' in err and '--other_lines ignore' in err
  assert not os.path.exists(tmp_path / 'a' / 'captions.jsonl')

  assert _import(folder, log, tmp_path / 'j', '--other_lines', 'join') == 0
  assert _captions(tmp_path / 'j') == [
      'A small black cat sitting on a sofa.', 'A red truck.', 'Two birds.',
      'A ship at sea, with sails.'
  ]
  assert _import(folder, log, tmp_path / 'i', '--other_lines', 'ignore') == 0
  assert _captions(tmp_path / 'i') == ['A small black cat', 'A red truck.', 'Two birds.', 'A ship']
  assert _captions(tmp_path / 'i') == released_descriptions(log)


def test_count_mismatch_says_both_counts_and_writes_nothing(folder, tmp_path, capsys):
  three = _write(tmp_path / 'three.txt', INLINE.split('Batch 4')[0])
  assert _import(folder, three, tmp_path / 'a') == 2
  err = capsys.readouterr().err
  assert 'holds 3 descriptions; the last one starts at line 3' in err
  assert 'images/train has 4 examples' in err and 'cut short' in err
  assert not os.path.exists(tmp_path / 'a' / 'captions.jsonl')

  five = _write(tmp_path / 'five.txt', INLINE + 'Batch 5 Model response: A frog.\n')
  assert _import(folder, five, tmp_path / 'a') == 2
  err = capsys.readouterr().err
  assert 'holds 5 descriptions; the last one starts at line 5' in err
  assert 'has 4 examples: it describes a larger split' in err


@pytest.mark.parametrize(
    'text, line, says',
    [
        # Block 2 lost its response: the released parser drops it and shifts captions 3, 4 up.
        ('Batch 1\nModel response: a\nBatch 2\nBatch 3\nModel response: c\nBatch 4\n'
         'Model response: d\nBatch 5\nModel response: e\n', 3, 'has no "Model response: …" line '
         'before the next "Batch …" line (line 4)'),
        ('Model response: a\nBatch 1\nModel response: b\n', 1, 'before the first "Batch …" line'),
        ('Batch 1\nModel response:   \n', 2, 'is followed by no text'),
        ('Batch 1\nModel response: a Model response: b\n', 2, 'appears 2 times'),
        ('Batch 1 Model response: a\nModel response: b\n', 2, 'whose "Batch …" line carries its '
         'own response'),
        ('Batch 1\nModel response: a\nBatch 2 Model response: b\n', 3, 'still open: the released '
         'parser would merge the two captions'),
        ('Batch 1\nModel response: a\nBatch 2\n', 3, 'before the end of the file'),
    ])
def test_malformed_line_is_named_with_what_was_expected(folder, tmp_path, capsys, text, line, says):
  log = _write(tmp_path / 'bad.txt', text)
  assert _import(folder, log, tmp_path / 'out') == 2
  err = capsys.readouterr().err
  assert f'{log}:{line}: ' in err, err
  assert says in err, err


def test_refuses_vlm_captions_and_drops_features_of_other_captions(folder, tmp_path, capsys):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'caption_meta.json').write_text(json.dumps({'captioner': '/models/MiniCPM-V-2_6'}))
  log = _write(tmp_path / 'inline.txt', INLINE)
  assert _import(folder, log, out) == 2
  assert "made by '/models/MiniCPM-V-2_6'" in capsys.readouterr().err
  (out / 'meta.json').write_text(json.dumps({'captions_sha256': 'of other captions'}))
  (out / 'features.npy').write_bytes(b'stale')
  assert _import(folder, log, out, '--overwrite') == 0
  assert not (out / 'meta.json').exists() and not (out / 'features.npy').exists()
  assert _captions(out)[1] == 'A red truck.'
