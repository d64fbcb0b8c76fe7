"""Text encoders that turn captions into feature vectors (a local folder or a hub id).

  clip       CLIPModel.get_text_features (or CLIPTextModelWithProjection's text_embeds): the
             projected EOS-token embedding, 512-d for ViT-B/32.
  mean_pool  any AutoModel text encoder: the attention-masked mean of the last hidden states
             (sentence-transformers' recipe, e.g. all-MiniLM-L6-v2, 384-d).

Captions are truncated at the smallest of the tokenizer's model_max_length, the model's position
embeddings and (mean_pool) sentence-transformers' max_seq_length, so a long caption never crashes:
CLIP keeps its first 76 tokens plus the end token. Computation is float32.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

from tikd_jax.text_teacher.captioners import read_config

log = logging.getLogger('tikd_jax.text_teacher')

KINDS = ('auto', 'clip', 'mean_pool')
_CLIP_TYPES = ('clip', 'clip_text_model')
_NO_LIMIT = 1_000_000  # tokenizers without a limit report a huge model_max_length


def encoder_path(encoder: str) -> str:
  """`minilm` (unless a folder of that name exists) → the offline all-MiniLM-L6-v2 folder."""
  if encoder == 'minilm' and not os.path.isdir(encoder):
    from tikd_jax.text_teacher import minilm_folder  # pylint: disable=g-import-not-at-top
    return minilm_folder()
  return encoder


def resolve_kind(encoder: str, kind: str = 'auto') -> str:
  encoder = encoder_path(encoder)
  if kind not in KINDS:
    raise ValueError(f'--encoder_kind must be one of {KINDS}, got {kind!r}')
  if kind != 'auto':
    return kind
  return 'clip' if read_config(encoder).get('model_type') in _CLIP_TYPES else 'mean_pool'


def encoder_name(encoder: str) -> str:
  """How meta.json records the encoder: an absolute path for a folder, else the hub id."""
  encoder = encoder_path(encoder)
  return os.path.abspath(encoder) if os.path.isdir(encoder) else encoder


class TextEncoder:
  """`encode(texts) -> float32 [len(texts), dim]` with truncation at `max_length` tokens."""

  def __init__(self, encoder: str, kind: str = 'auto', device: str = 'cpu'):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    from tikd_jax.text_teacher import captioners  # pylint: disable=g-import-not-at-top
    encoder = encoder_path(encoder)
    self.name = encoder_name(encoder)
    self.kind = resolve_kind(encoder, kind)
    self.device = captioners.resolve_device(device)
    captioners.quiet_progress_bars()
    local = os.path.isdir(encoder)
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(encoder, local_files_only=local)
    config = read_config(encoder)
    if self.kind == 'clip' and config.get('model_type') == 'clip_text_model':
      self.model = transformers.CLIPTextModelWithProjection.from_pretrained(
          encoder, local_files_only=local)
    else:
      self.model = transformers.AutoModel.from_pretrained(encoder, local_files_only=local)
      if self.kind == 'clip' and not hasattr(self.model, 'get_text_features'):
        raise ValueError(f'{encoder} ({type(self.model).__name__}) has no get_text_features; '
                         f'use --encoder_kind mean_pool')
    self.model = self.model.float().eval().to(self.device)
    self._torch = torch
    if self.tokenizer.pad_token is None:  # e.g. GPT-style tokenizers; the mask hides the padding
      self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
    limits = [self.tokenizer.model_max_length]
    text_config = getattr(self.model.config, 'text_config', None) or self.model.config
    limits.append(getattr(text_config, 'max_position_embeddings', None) or _NO_LIMIT)
    sbert = os.path.join(encoder, 'sentence_bert_config.json')
    if self.kind == 'mean_pool' and local and os.path.isfile(sbert):
      with open(sbert) as f:
        limits.append(json.load(f).get('max_seq_length') or _NO_LIMIT)
    self.max_length = int(min(x for x in limits if x and x > 0))
    if self.max_length >= _NO_LIMIT:
      raise ValueError(f'{encoder}: no maximum sequence length in its tokenizer or config')
    self.dim = int(self.encode(['a'])[0].shape[-1])

  def token_lengths(self, texts: list[str]) -> np.ndarray:
    """Untruncated token counts (special tokens included)."""
    ids = self.tokenizer(list(texts), add_special_tokens=True, truncation=False,
                         verbose=False)['input_ids']
    return np.asarray([len(x) for x in ids], np.int64)

  def encode(self, texts: list[str]) -> np.ndarray:
    torch = self._torch
    batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                           return_tensors='pt')
    inputs = {
        k: v.to(self.device)
        for k, v in batch.items()
        if k in ('input_ids',
                 'attention_mask') or (k == 'token_type_ids' and self.kind == 'mean_pool')
    }
    with torch.inference_mode():
      if self.kind == 'clip':
        if hasattr(self.model, 'get_text_features'):
          out = self.model.get_text_features(**inputs)
          out = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5
        else:
          out = self.model(**inputs).text_embeds
      else:
        hidden = self.model(**inputs).last_hidden_state
        mask = inputs['attention_mask'].unsqueeze(-1).to(hidden.dtype)
        out = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return out.float().cpu().numpy()


def encode_texts(encoder: TextEncoder, texts: list[str], *, batch_size: int = 256,
                 normalize: bool = False, progress=None) -> tuple[np.ndarray, dict]:
  """float32 [len(texts), dim] in the order of `texts`, plus stats (truncated, unique).

  Each distinct text is encoded once (class prompts: one per class), longest first in batches of
  similar length so padding stays small.
  """
  positions: dict[str, int] = {}
  inverse = np.asarray([positions.setdefault(str(t), len(positions)) for t in texts], np.int64)
  unique = list(positions)
  counts = np.bincount(inverse, minlength=len(unique))
  lengths = encoder.token_lengths(unique) if unique else np.zeros(0, np.int64)
  order = np.argsort(-lengths, kind='stable')
  out = np.zeros((len(unique), encoder.dim), np.float32)
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    out[rows] = encoder.encode([unique[i] for i in rows])
    if progress is not None:
      progress.update(int(counts[rows].sum()))
  if normalize:
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
  truncated = lengths > encoder.max_length
  stats = {
      'max_length': encoder.max_length, 'num_truncated': int(counts[truncated].sum()),
      'max_tokens': int(lengths.max()) if len(lengths) else 0, 'num_unique_captions': len(unique)
  }
  if stats['num_truncated']:
    log.info('%s of %s captions are longer than %d tokens and were truncated (longest: %d)',
             f'{stats["num_truncated"]:,}', f'{len(texts):,}', encoder.max_length,
             stats['max_tokens'])
  return out[inverse], stats
