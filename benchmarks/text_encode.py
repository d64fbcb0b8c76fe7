r"""Text-encoder throughput of the text teacher (captions/s) on this machine.

  python benchmarks/text_encode.py [--num_captions 2048] [--runs 3] [--out results.jsonl]

Encoders: a tiny random CLIP (width 32, built on the fly, 77-token limit) and the real offline
all-MiniLM-L6-v2 (384-d, mean pooling). Workloads: `vlm` = distinct VLM-like captions of 8–40
words (some over 77 tokens); `prompts` = CIFAR-100 class prompts, 50,000 captions but only 100
distinct (encode_texts encodes each once). Each workload runs `--runs` times after one warm-up;
one JSON line per (encoder, workload) with every run and the median goes to stdout (and --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Neutral English words for synthetic captions (the tiny tokenizer maps unknown words to <unk>).
_WORDS = (
    'a photo of small large red blue green black white cat dog bird car truck ship plane '
    'horse deer frog flower tree house road sky water grass sitting standing flying on in '
    'near the with and background close-up blurry bright dark old young wooden metal').split()
_CIFAR100_CLASSES = 100


def vlm_captions(n: int, seed: int = 0) -> list[str]:
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return [' '.join(rng.choice(_WORDS, size=int(rng.integers(8, 41)))) + f' #{i}.' for i in range(n)]


def prompt_captions(n: int = 50_000) -> list[str]:
  return [f'a photo of a class {i % _CIFAR100_CLASSES}.' for i in range(n)]


def bench(encoder, captions: list[str], runs: int, batch_size: int) -> list[float]:
  from tikd_jax.text_teacher.encoders import encode_texts  # pylint: disable=g-import-not-at-top
  encode_texts(encoder, captions[:batch_size], batch_size=batch_size)  # warm-up
  rates = []
  for _ in range(runs):
    start = time.perf_counter()
    encode_texts(encoder, captions, batch_size=batch_size, normalize=True)
    rates.append(len(captions) / (time.perf_counter() - start))
  return rates


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--num_captions', type=int, default=2048)
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--encoders', default='tiny_clip,minilm')
  parser.add_argument('--out', default=None, help='also append the JSON lines to this file')
  args = parser.parse_args()
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  import torch  # pylint: disable=g-import-not-at-top
  from tikd_jax.text_teacher import minilm_folder  # pylint: disable=g-import-not-at-top
  from tikd_jax.text_teacher.encoders import TextEncoder  # pylint: disable=g-import-not-at-top
  from tikd_jax.text_teacher.tiny import save_tiny_clip  # pylint: disable=g-import-not-at-top

  workloads = {'vlm': vlm_captions(args.num_captions), 'prompts': prompt_captions()}
  lines = []
  with tempfile.TemporaryDirectory() as tmp:
    folders = {
        'tiny_clip': lambda: save_tiny_clip(os.path.join(tmp, 'clip')), 'minilm': minilm_folder
    }
    for name in args.encoders.split(','):
      start = time.perf_counter()
      encoder = TextEncoder(folders[name](), 'auto', 'cpu')
      load_s = time.perf_counter() - start
      for workload, captions in workloads.items():
        rates = bench(encoder, captions, args.runs, args.batch_size)
        lengths = encoder.token_lengths(sorted(set(captions)))
        lines.append({
            'bench': 'text_encode', 'encoder': name, 'encoder_kind': encoder.kind,
            'dim': encoder.dim, 'max_length': encoder.max_length, 'workload': workload,
            'num_captions': len(captions), 'num_unique': len(set(captions)),
            'mean_tokens': round(float(lengths.mean()), 1), 'num_truncated_unique': int(
                (lengths
                 > encoder.max_length).sum()), 'batch_size': args.batch_size, 'runs': args.runs,
            'captions_per_s': [round(r, 1) for r in rates
                              ], 'median_captions_per_s': round(statistics.median(rates), 1),
            'load_s': round(load_s, 2), 'torch_threads': torch.get_num_threads(),
            'cpu_count': os.cpu_count(), 'machine': platform.machine(), 'torch': torch.__version__
        })
        print(json.dumps(lines[-1]), flush=True)
  if args.out:
    with open(args.out, 'a') as f:
      f.writelines(json.dumps(line) + '\n' for line in lines)


if __name__ == '__main__':
  main()
