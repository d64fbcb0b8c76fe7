"""Tiny random CLIP and BLIP checkpoints for tests and benchmarks (no downloads).

Both are built from configs, saved with save_pretrained and meant to be loaded back through the
real code path (AutoTokenizer / AutoProcessor / Auto* models from the folder). Their outputs are
meaningless; their shapes, tokenizers, truncation and generate() are the real ones.
"""
from __future__ import annotations

import os

NUMBERS = 'zero one two three four five six seven eight nine'.split()
WORDS = NUMBERS + ('a photo of the digit cat kitten dog stock market small handwritten white '
                   'black on background').split()


def save_tiny_clip(folder: str, *, max_length: int = 77, seed: int = 0) -> str:
  """CLIPModel (width 32, projection 16) + a BPE tokenizer with <bos>/<eos>, limit `max_length`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE(unk_token='<unk>'))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator([' '.join(WORDS + list('0123456789.,'))] * 20,
                          trainers.BpeTrainer(vocab_size=160,
                                              special_tokens=['<pad>', '<unk>', '<bos>', '<eos>']))
  bos, eos = tok.token_to_id('<bos>'), tok.token_to_id('<eos>')
  tok.post_processor = processors.TemplateProcessing(
      single='<bos> $A <eos>', special_tokens=[('<bos>', bos), ('<eos>', eos)])
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<bos>',
                                                   eos_token='<eos>', pad_token='<pad>',
                                                   unk_token='<unk>', model_max_length=max_length)
  text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, max_position_embeddings=max_length, projection_dim=16,
              bos_token_id=bos, eos_token_id=eos, pad_token_id=0)
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=32, patch_size=8, projection_dim=16)
  torch.manual_seed(seed)
  model = transformers.CLIPModel(
      transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
  model.save_pretrained(folder)
  tokenizer.save_pretrained(folder)
  return folder


def save_tiny_blip(folder: str, *, seed: int = 0) -> str:
  """BlipForConditionalGeneration (width 32, 32 px) + BlipProcessor with a word-level BERT vocab.

  The weights are initialised large enough that different images get different captions.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  vocab = os.path.join(folder, 'vocab.txt')
  with open(vocab, 'w') as f:
    f.write('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', '[DEC]'] + WORDS) + '\n')
  tokenizer = transformers.BertTokenizerFast(vocab, bos_token='[DEC]', model_max_length=32)
  processor = transformers.BlipProcessor(
      transformers.BlipImageProcessor(size={'height': 32, 'width': 32}), tokenizer)
  text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, max_position_embeddings=32,
              bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
              pad_token_id=tokenizer.pad_token_id, encoder_hidden_size=32, initializer_range=0.2)
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=32, patch_size=8, initializer_range=0.5)
  torch.manual_seed(seed)
  model = transformers.BlipForConditionalGeneration(
      transformers.BlipConfig(text_config=text, vision_config=vision))
  model.save_pretrained(folder)
  processor.save_pretrained(folder)
  return folder
